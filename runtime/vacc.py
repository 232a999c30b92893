"""VastAI VACC: `vamc compile` builds the model (mod.so/.json/.params) from the export and a YAML build config;
`vaststreamx` runs it behind a VDSP preprocessing op described by a JSON, on original images.

The SDK and the compiler are vendor software (not on PyPI). Without them `task=export` still writes the ONNX,
the vamc YAML and the VDSP JSON to carry to a machine with a card; everything else stops with one line saying
what is missing. Tested here only against the emulation in tests/emulation/ (never against real hardware).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

from common.errors import UserError, check_at_least
from runtime import Artifact

LETTERBOX_OP = 'FUSION_OP_RGB_LETTERBOX_CVTCOLOR_NORM_TENSOR'
RESIZE_OP = 'FUSION_OP_RGB_RESIZE_CVTCOLOR_NORM_TENSOR'
SDK_HINT = ("install VastAI's vaststreamx SDK (v2.8+, from VastAI's software ecosystem, not on PyPI) on a machine "
            'with a VastAI card, or run task=export here and carry the export directory to such a machine')
COMPILER_HINT = ("install VastAI's vamc (v3.0+), put it on PATH or set runtime.compiler=PATH, or give an already "
                 'compiled model with runtime.model_prefix=deploy_weights/<name>/mod')


def import_sdk():
    try:
        import vaststreamx
    except ImportError:
        raise UserError(f'runtime=vacc: the vaststreamx SDK is not importable; {SDK_HINT}') from None
    return vaststreamx


def read_planar_rgb(path: str | Path) -> np.ndarray:
    """(3, H, W) uint8 RGB, the layout the device's VDSP op and vamp's npz inputs take."""
    import cv2

    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise UserError(f'data.img_dir: cannot read image {path}')
    return np.ascontiguousarray(cv2.cvtColor(image, cv2.COLOR_BGR2RGB).transpose(2, 0, 1))


def normalization(preprocessing: dict) -> dict:
    """VDSP normalization of the family's mean/std (pixel units): DIV255 when it is x/255, otherwise
    DIV255_MINUSMEAN_DIVSTD with mean/std in 0..1 units."""
    mean = [m / 255 for m in preprocessing['mean']]
    std = [s / 255 for s in preprocessing['std']]
    if not any(mean) and all(abs(s - 1) < 1e-9 for s in std):
        return {'NormaType': 'DIV255'}
    return {'Mean': mean, 'Std': std, 'NormaType': 'DIV255_MINUSMEAN_DIVSTD'}


def vdsp_params(preprocessing: dict, resize_type: str) -> dict:
    """The VDSP fusion op: planar RGB in, the exported input tensor out (letterbox or plain resize, then
    normalization), as the seeds' vdsp_params JSON files describe it."""
    height, width = preprocessing['height'], preprocessing['width']
    config = {'IimageFormat': 'RGB_PLANAR', 'IimageWidth': width, 'IimageHeight': height,
              'OimageWidth': width, 'OimageHeight': height, 'IimageWidthPitch': width,
              'IimageHeightPitch': height, **normalization(preprocessing), 'ColorCvtCode': 'NO_CHANGE',
              'ResizeType': resize_type}
    if preprocessing['kind'] == 'letterbox':
        config['Padding'] = [preprocessing['pad']] * 3
    return {'OpType': LETTERBOX_OP if preprocessing['kind'] == 'letterbox' else RESIZE_OP, 'OpConfig': config}


def process_ops(preprocessing: dict) -> list[dict]:
    """vamc's calibration preprocessing (dataset.process_ops), the same steps as the evaluation's."""
    height, width = preprocessing['height'], preprocessing['width']
    norm = normalization(preprocessing)
    normalize = {'type': 'Normalize', 'div255': True}
    if norm['NormaType'] == 'DIV255':
        normalize['norm_type'] = None
    else:
        normalize.update(mean=norm['Mean'], std=norm['Std'])
    if preprocessing['kind'] == 'letterbox':
        resize = [{'type': 'Resize', 'size': [max(height, width), -1], 'adaptive_side': 'long'},
                  {'type': 'Pad', 'pad_to_square': True}]
    else:
        resize = [{'type': 'Resize', 'size': [height, width]}]
    return [{'type': 'DecodeImage'}, *resize, normalize, {'type': 'ToTensor'}]


class Runtime:
    """VACC through vamc and vaststreamx.

    Args:
        precision: fp16 or int8 (vamc's backend dtypes); int8 calibrates on `precision.calibration`'s images.
        device_id: the card's die; distributed ranks add their local rank to it.
        batch_size: the compiled model's batch.
        model_prefix: an already compiled model (`…/mod`); compiling is skipped.
        compiler: the vamc executable.
        compile: False writes the build files only (task=export).
        vdsp: the VDSP op's options: `resize_type` (BILINEAR_CV, BILINEAR_PILLOW, …).
        cluster_mode: vamc's backend.compile.cluster_mode.
    """

    name = 'vacc'

    def __init__(self, precision: dict, device_id: int = 0, batch_size: int = 1, model_prefix: str | None = None,
                 compiler: str = 'vamc', compile: bool = True, vdsp: dict | None = None,
                 cluster_mode: int = 0):
        check_at_least('runtime.device_id', device_id, 0)
        check_at_least('runtime.batch_size', batch_size, 1)
        check_at_least('runtime.cluster_mode', cluster_mode, 0)
        self.precision = dict(precision)
        self.device_id = device_id
        self.batch_size = batch_size
        self.model_prefix = model_prefix
        self.compiler = compiler
        self.compile = compile
        self.resize_type = (vdsp or {}).get('resize_type', 'BILINEAR_CV')
        self.cluster_mode = cluster_mode
        name = self.precision['name']
        if name not in ('fp16', 'int8'):
            raise UserError(f'precision={name}: runtime=vacc supports fp16, int8')
        if name == 'int8' and self.precision.get('exclude'):
            raise UserError('precision.exclude: runtime=vacc cannot keep layers in float through the vamc '
                            'build config written here; remove the option')
        if model_prefix and not Path(f'{model_prefix}.so').is_file():
            raise UserError(f'runtime.model_prefix={model_prefix}: {model_prefix}.so not found '
                            '(give the compiled model prefix, e.g. deploy_weights/<name>/mod)')
        if compile:
            import_sdk()
            if not model_prefix and shutil.which(compiler) is None:
                raise UserError(f'runtime=vacc: the compiler {compiler!r} is not on PATH; {COMPILER_HINT}')

    def version(self) -> str:
        try:
            import vaststreamx
        except ImportError:
            return 'vaststreamx not installed'
        return getattr(vaststreamx, '__version__', 'unknown')

    def build_config(self, onnx_name: str, shape: tuple, preprocessing: dict, calibration_dir: str | None) -> dict:
        """The vamc build YAML, field for field as the seeds write it; paths are relative to the build directory
        (vamc runs there), so the directory can be carried to another machine."""
        dtype = self.precision['name']
        config = {'name': f"{preprocessing['model_name']}_run_stream_{dtype}",
                  'frontend': {'checkpoint': onnx_name, 'shape': {'input': [self.batch_size, *shape]},
                               'type': 'onnx', 'dtype': 'fp32'},
                  'backend': {'type': 'tvm_vacc', 'dtype': dtype, 'compile': {'cluster_mode': self.cluster_mode}},
                  'workspace': {'path': './deploy_weights/'}}
        if dtype == 'int8':
            calibration = self.precision['calibration']
            config['backend']['quantize'] = {'calibrate_mode': calibration['method'],
                                             'quantize_per_channel': bool(self.precision['per_channel'])}
            config['dataset'] = {'type': 'tvm', 'path': calibration_dir,
                                 'sampler': {'suffix': 'jpg', 'get_data_num': int(calibration['num_images'])},
                                 'process_ops': process_ops(preprocessing)}
        return config

    def build(self, onnx_path: Path, out_dir: Path, calibration=None, keep_float=(), equalize=(),
              preprocessing=None, shape=None) -> Artifact:
        """Write vamc.yaml and vdsp_params.json beside the export (int8: with a copy of the calibration images,
        as JPEG), then compile unless told not to or given a compiled model. `keep_float` and `equalize` are
        not applied: the vamc build config has no verified key for them."""
        import yaml

        if preprocessing is None or shape is None:
            raise ValueError('runtime=vacc needs the model family\'s preprocessing and the input shape')
        calibration_dir = None
        if self.precision['name'] == 'int8':
            if calibration is None:
                raise ValueError('int8 needs calibration images')
            calibration_dir = './calibration_images'
            (out_dir / calibration_dir).mkdir()
            for path in calibration.paths:
                write_jpeg(path, out_dir / calibration_dir / f'{path.stem}.jpg')
        config = self.build_config(onnx_path.name, shape, preprocessing, calibration_dir)
        (out_dir / 'vamc.yaml').write_text(yaml.safe_dump(config, sort_keys=False))
        write_json(out_dir / 'vdsp_params.json', vdsp_params(preprocessing, self.resize_type))
        info = {'name': self.precision['name'], 'vamc_yaml': 'vamc.yaml', 'vdsp_params': 'vdsp_params.json',
                'resize_type': self.resize_type, 'batch_size': self.batch_size,
                'output_shapes': output_shapes(onnx_path), 'keep_float_ignored': list(keep_float),
                'equalize_ignored': list(equalize)}
        if self.precision['name'] == 'int8':
            info.update(method=self.precision['calibration']['method'], num_images=len(calibration.paths),
                        per_channel=bool(self.precision['per_channel']))
        files = {'vamc_yaml': 'vamc.yaml', 'vdsp_params': 'vdsp_params.json'}
        if self.model_prefix:
            return Artifact(Path(self.model_prefix).resolve(), {**info, 'compiled': 'given'}, files=files)
        prefix = out_dir / 'deploy_weights' / config['name'] / 'mod'
        if self.compile:
            self._compile(out_dir)
            missing = [f'{prefix}{s}' for s in ('.so', '.json', '.params') if not Path(f'{prefix}{s}').is_file()]
            if missing:
                raise RuntimeError(f'vamc compile finished but did not write {missing[0]}')
        return Artifact(prefix, {**info, 'compiled': 'here' if self.compile else 'not yet'}, files=files)

    def _compile(self, out_dir: Path) -> None:
        """`vamc compile vamc.yaml` in `out_dir`, its output streamed to ours."""
        process = subprocess.Popen([self.compiler, 'compile', 'vamc.yaml'], cwd=out_dir, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True)
        tail = []
        for line in process.stdout:
            sys.stdout.write(f'[vamc] {line}')
            tail = [*tail[-9:], line.rstrip()]
        if process.wait() != 0:
            raise UserError(f'runtime=vacc: `{self.compiler} compile {out_dir / "vamc.yaml"}` failed '
                            f'(exit {process.returncode}): {tail[-1] if tail else "no output"}')

    def load(self, artifact: Artifact) -> VaccSession:
        if artifact.info.get('compiled') == 'not yet':
            raise UserError('runtime.compile=false: nothing compiled to run; compile with vamc first')
        device_id = self.device_id + int(os.environ.get('LOCAL_RANK', '0'))
        return VaccSession(str(artifact.path), str(artifact.root / artifact.info['vdsp_params']), device_id,
                           self.batch_size, artifact.info['output_shapes'])


class VaccSession:
    """A vaststreamx stream (VDSP op -> model) that takes image files: `run_paths(paths)` -> raw maps.

    Images go to the device as they are; the seeds' scripts first resize odd-sized images to even sizes, which
    would change the geometry the host decode assumes — whether the SDK needs it is not verified here.
    """

    reads = 'paths'

    def __init__(self, prefix: str, vdsp_json: str, device_id: int, batch_size: int, output_shapes: list):
        vsx = import_sdk()
        self.vsx = vsx
        self.device_id = device_id
        self.output_shapes = [tuple(s) for s in output_shapes]
        vsx.set_device(device_id)
        self.model = vsx.Model(prefix, batch_size)
        self.fusion_op = vsx.Operator.load_ops_from_json_file(vdsp_json)[0]
        self.model_op = vsx.ModelOperator(self.model)
        self.graph = vsx.Graph()
        self.graph.add_operators(self.fusion_op, self.model_op)
        self.stream = vsx.Stream(self.graph, vsx.StreamBalanceMode.ONCE)
        self.stream.register_operator_output(self.model_op)
        self.stream.build()

    def run_paths(self, paths: list[str]) -> list[np.ndarray]:
        vsx = self.vsx
        images = []
        for path in paths:
            planar = read_planar_rgb(path)
            images.append(vsx.create_image(planar, vsx.ImageFormat.RGB_PLANAR, planar.shape[2], planar.shape[1],
                                           self.device_id))
        outputs = self.stream.run_sync(images)  # per image: one device tensor per model output (fp16)
        return [np.stack([np.asarray(vsx.as_numpy(per_image[i]), np.float32).reshape(shape)
                          for per_image in outputs])
                for i, shape in enumerate(self.output_shapes)]


def output_shapes(onnx_path: Path) -> list[list[int]]:
    """Per-image shapes of the export's outputs (the batch axis left out)."""
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    return [[d.dim_value for d in o.type.tensor_type.shape.dim[1:]] for o in graph.output]


def write_jpeg(source: Path, target: Path) -> None:
    """Copy a JPEG as is; re-encode anything else (vamc's sampler reads one suffix)."""
    if source.suffix.lower() in ('.jpg', '.jpeg'):
        shutil.copyfile(source, target)
    else:
        from PIL import Image
        Image.open(source).convert('RGB').save(target, quality=95)


def write_json(path: Path, data: dict) -> None:
    import json
    path.write_text(json.dumps(data, indent=4))
