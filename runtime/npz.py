"""vamp's outputs as a runtime: the raw maps a card wrote for an image->npz datalist (`task=npz` writes one),
evaluated with the same decode and metrics as any other runtime. The precision is whatever vamp's model had;
`precision=` only labels the report.

vamp writes one `output_%06d.npz` per datalist line (by its index; VastModelZOO's eval scripts read them back that
way), each holding `output_0..N` in the model's output order.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from common.errors import UserError
from runtime import Artifact
from runtime.vacc import device_geometry, output_shapes


class Runtime:
    name = 'npz'

    def __init__(self, precision: dict, output_dir: str, datalist: str):
        self.precision = dict(precision)
        self.output_dir = Path(output_dir)
        self.datalist = Path(datalist)
        if not self.output_dir.is_dir():
            raise UserError(f'runtime.output_dir={output_dir}: directory not found (vamp\'s --path_output)')
        if not self.datalist.is_file():
            raise UserError(f'runtime.datalist={datalist}: file not found (the datalist given to vamp)')

    @staticmethod
    def version() -> str:
        return 'vamp npz outputs'

    def build(self, onnx_path: Path, out_dir: Path, calibration=None, keep_float=(), equalize=(),
              preprocessing=None, shape=None) -> Artifact:
        """Nothing to build: the export only tells the shapes of the maps to read."""
        return Artifact(self.output_dir.resolve(), {'name': self.precision['name'], 'source': 'vamp outputs',
                                                    'datalist': str(self.datalist.resolve()),
                                                    'output_shapes': output_shapes(onnx_path),
                                                    'preprocessing': preprocessing})

    def load(self, artifact: Artifact) -> NpzSession:
        return NpzSession(artifact.path, Path(artifact.info['datalist']), artifact.info['output_shapes'],
                          artifact.info.get('preprocessing'))


class NpzSession:
    """Looks up each image's vamp output: `output_%06d.npz` of its datalist line (vamp's naming), else `<stem>.npz`
    when the outputs are named like the inputs, else the i-th output file (sorted) for the i-th line, as the
    seeds' npz_decode.py pairs them. Each output is checked against the export: as many maps, of its sizes."""

    reads = 'paths'

    def __init__(self, output_dir: Path, datalist: Path, shapes: list, preprocessing: dict | None = None):
        self.output_dir = output_dir
        self.shapes = [tuple(s) for s in shapes]
        self.preprocessing = preprocessing
        inputs = [Path(line.strip()) for line in datalist.read_text().splitlines() if line.strip()]
        outputs = sorted(output_dir.glob('*.npz'))
        by_name = {p.stem: p for p in outputs}
        if all(f'output_{i:06d}' in by_name for i in range(len(inputs))):
            self.outputs = {x.stem: by_name[f'output_{i:06d}'] for i, x in enumerate(inputs)}
        elif all(x.stem in by_name for x in inputs):
            self.outputs = {x.stem: by_name[x.stem] for x in inputs}
        elif len(outputs) == len(inputs):
            self.outputs = {x.stem: o for x, o in zip(inputs, outputs)}
        else:
            raise UserError(f'runtime.output_dir={output_dir}: {len(outputs)} npz files for {len(inputs)} '
                            f'datalist lines in {datalist}; run vamp over the whole datalist')

    def _maps(self, path: Path) -> list[np.ndarray]:
        """The maps of one output file, as float32 of the export's per-image shapes; one line if they do not fit."""
        expected = [int(np.prod(s)) for s in self.shapes]
        try:
            with np.load(path) as npz:
                arrays = [npz[k] for k in sorted(npz.files, key=lambda k: int(k.rsplit('_', 1)[-1]))
                          if k.startswith('output_')]
        except (OSError, ValueError) as err:
            raise UserError(f'runtime.output_dir: {path} is not a readable npz file ({err})') from None
        sizes = [int(a.size) for a in arrays]
        if sizes != expected or not all(np.issubdtype(a.dtype, np.floating) for a in arrays):
            found = ', '.join(f'{a.dtype}{list(a.shape)}' for a in arrays) or 'no output_N maps'
            raise UserError(f'runtime.output_dir: {path.name} holds {found}, the export has {len(expected)} float '
                            f'maps of {expected} values: the model vamp ran has other outputs (compiled with '
                            'extra_ops such as yolov5_nms?); compile the vamc.yaml inloop writes, which keeps the '
                            'raw maps')
        return [np.asarray(a, np.float32).reshape(shape) for a, shape in zip(arrays, self.shapes)]

    def run_paths(self, paths: list[str]) -> list[np.ndarray]:
        per_image = []
        for path in paths:
            stem = Path(path).stem
            if stem not in self.outputs:
                raise UserError(f'runtime.datalist: no line for image {Path(path).name}; write the datalist with '
                                'task=npz over the same data')
            per_image.append(self._maps(self.outputs[stem]))
        return [np.stack([maps[i] for maps in per_image]) for i in range(len(self.shapes))]

    def device_metas(self, metas: list[dict]) -> list[dict]:
        """The geometry vamp's VDSP op applied to the image as task=npz stored it (VastAI's convention)."""
        if self.preprocessing is None:
            return metas
        return [{**m, **device_geometry(self.preprocessing, tuple(m['ori_shape'][:2]), tuple(m['ori_shape'][:2]))}
                for m in metas]
