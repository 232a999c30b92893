"""vamp's outputs as a runtime: the raw maps a card wrote for an image->npz datalist (`task=npz` writes one),
evaluated with the same decode and metrics as any other runtime. The precision is whatever vamp's model had;
`precision=` only labels the report."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from common.errors import UserError
from runtime import Artifact
from runtime.vacc import output_shapes


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
                                                    'output_shapes': output_shapes(onnx_path)})

    def load(self, artifact: Artifact) -> NpzSession:
        return NpzSession(artifact.path, Path(artifact.info['datalist']), artifact.info['output_shapes'])


class NpzSession:
    """Looks up each image's vamp output: `<stem>.npz` when vamp kept the input names, else the i-th output file
    (sorted) for the i-th datalist line, as the seeds' npz_decode pairs them."""

    reads = 'paths'

    def __init__(self, output_dir: Path, datalist: Path, shapes: list):
        self.shapes = [tuple(s) for s in shapes]
        inputs = [Path(line.strip()) for line in datalist.read_text().splitlines() if line.strip()]
        outputs = sorted(output_dir.glob('*.npz'))
        by_name = {p.stem: p for p in outputs}
        if all(i.stem in by_name for i in inputs):
            self.outputs = {i.stem: by_name[i.stem] for i in inputs}
        elif len(outputs) == len(inputs):
            self.outputs = {i.stem: o for i, o in zip(inputs, outputs)}
        else:
            raise UserError(f'runtime.output_dir={output_dir}: {len(outputs)} npz files for {len(inputs)} '
                            f'datalist lines in {datalist}; run vamp over the whole datalist')

    def run_paths(self, paths: list[str]) -> list[np.ndarray]:
        per_image = []
        for path in paths:
            stem = Path(path).stem
            if stem not in self.outputs:
                raise UserError(f'runtime.datalist: no line for image {Path(path).name}; write the datalist with '
                                'task=npz over the same data')
            with np.load(self.outputs[stem]) as npz:
                per_image.append([np.asarray(npz[f'output_{i}'], np.float32).reshape(shape)
                                  for i, shape in enumerate(self.shapes)])
        return [np.stack([maps[i] for maps in per_image]) for i in range(len(self.shapes))]
