"""VastAI VACC: `vamc compile` builds the model (mod.so/.json/.params) from the export and a YAML build config;
`vaststreamx` runs it behind a VDSP preprocessing op described by a JSON, on original images.

VastAI builds its vaststreamx wheel for one Python each (cp38 in VastStreamX-Samples' image, cp312 in
xinference_vacc's), so the SDK runs in a device worker process (runtime/vacc_worker.py, valid Python 3.8 to 3.12)
started with `runtime.python` (default: this interpreter, if it can import the SDK); images and raw maps cross
through shared memory. The SDK and the compiler are vendor software (not on PyPI): without them `task=export`
still writes the ONNX, the vamc YAML and the VDSP JSON to carry to a machine with a card; everything else stops
with one line saying what is missing. Tested here only against the emulation in tests/emulation/.
"""
from __future__ import annotations

import json
import mmap
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from collections import deque
from pathlib import Path

import numpy as np

from common.errors import UserError, check_at_least
from runtime import Artifact

LETTERBOX_OP = 'FUSION_OP_RGB_LETTERBOX_CVTCOLOR_NORM_TENSOR'
RESIZE_OP = 'FUSION_OP_RGB_RESIZE_CVTCOLOR_NORM_TENSOR'
WORKER = Path(__file__).with_name('vacc_worker.py')
SDK_HINT = ("install VastAI's vaststreamx SDK (v2.8+; its wheel is built for one Python, e.g. cp38 or cp312) on a "
            'machine with a VastAI card and give that interpreter with runtime.python=PATH (e.g. /usr/bin/python3.8), '
            'or run task=export here and carry the export directory to such a machine')
COMPILER_HINT = ("install VastAI's vamc (v3.0+), put it on PATH or set runtime.compiler=PATH, or give an already "
                 'compiled model with runtime.model_prefix=deploy_weights/<name>/mod')
FLOAT_LAYERS = 'float_layers.json'  # precision.max_drop's choice beside vamc.yaml
# the card's fp16 activation layout, as the VDSP op writes its tensor (VastStreamX-Samples common/utils.py,
# get_activation_aligned_faster; common/yolo_world_image.py asks the op for [1, W/8, H/8, ceil(C/4), 256])
TILE, CHANNEL_GROUP = 8, 4
PROBE = 'import sys, numpy, vaststreamx; print(sys.version.split()[0], getattr(vaststreamx, "__version__", "unknown"))'
_probed: dict[tuple, str] = {}  # (interpreter, PYTHONPATH) -> what it reported


def probe_sdk(python: str | None) -> str:
    """'vaststreamx <version> on Python <x.y.z>' if `python` (this interpreter when None) imports the SDK and
    numpy; otherwise one line saying it does not and how to fix it."""
    executable = python or sys.executable
    key = (executable, os.environ.get('PYTHONPATH'))
    if key not in _probed:
        option = f'runtime.python={python}' if python else f'this interpreter ({sys.executable})'
        if python and not shutil.which(python):
            raise UserError(f'runtime.python={python}: no such interpreter; give the Python that has VastAI\'s '
                            'vaststreamx SDK (e.g. /usr/bin/python3.8)')
        try:
            done = subprocess.run([executable, '-c', PROBE], capture_output=True, text=True, timeout=120)
        except (OSError, subprocess.TimeoutExpired) as err:
            raise UserError(f'runtime=vacc: {option} cannot be started ({err})') from None
        if done.returncode != 0:
            reason = (done.stderr.strip().splitlines() or ['no output'])[-1]
            hint = SDK_HINT if python else f'give the interpreter that has it: runtime.python=PATH; {SDK_HINT}'
            raise UserError(f'runtime=vacc: {option} cannot import the vaststreamx SDK ({reason}); {hint}')
        version, sdk = done.stdout.split()[-2:]
        _probed[key] = f'vaststreamx {sdk} on Python {version}'
    return _probed[key]


def read_planar_rgb(path: str | Path, even_size: bool = False) -> tuple[np.ndarray, tuple[int, int]]:
    """(3, H, W) uint8 RGB, the layout the device's VDSP op and vamp's npz inputs take, and the image's own
    (height, width). `even_size`: an odd side is first resized to even (cv2, bilinear), as VastAI's scripts do
    before create_image."""
    import cv2

    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise UserError(f'data.img_dir: cannot read image {path}')
    height, width = image.shape[:2]
    if even_size and (height % 2 or width % 2):
        image = cv2.resize(image, (width // 2 * 2, height // 2 * 2))
    return np.ascontiguousarray(cv2.cvtColor(image, cv2.COLOR_BGR2RGB).transpose(2, 0, 1)), (height, width)


def device_geometry(preprocessing: dict, original: tuple[int, int], given: tuple[int, int]) -> dict:
    """The decode's metainfo for an image of `original` (h, w) handed to the VDSP op as `given` (h, w): where the
    op puts it in the model input, as VastAI's decode scripts undo it (scale_coords: centred letterbox, float
    padding), then scaled from the given size back to the original's pixels."""
    out_h, out_w = preprocessing['height'], preprocessing['width']
    (h, w), (gh, gw) = original, given
    if preprocessing['kind'] != 'letterbox':
        return {'scale_factor': (out_w / w, out_h / h)}
    gain = min(out_h / gh, out_w / gw)
    pad_x, pad_y = (out_w - gw * gain) / 2, (out_h - gh * gain) / 2
    return {'scale_factor': (gain * gw / w, gain * gh / h), 'pad_param': [pad_y, pad_y, pad_x, pad_x]}


def tiled_shape(channels: int, height: int, width: int) -> list[int]:
    """The shape the VDSP op writes a (C, H, W) fp16 tensor in: [1, ceil(W/8), ceil(H/8), ceil(C/4), 256], each
    256-block a (4 channels, 8 rows, 8 columns) tile, width blocks outermost."""
    blocks = [-(-size // group) for size, group in ((width, TILE), (height, TILE), (channels, CHANNEL_GROUP))]
    return [1, *blocks, CHANNEL_GROUP * TILE * TILE]


def untile(tiled: np.ndarray, channels: int, height: int, width: int) -> np.ndarray:
    """(N, 1, W/8, H/8, C/4, 256) as the op wrote it -> (N, C, H, W): the blocks put back in place and the padding
    (the fourth channel, rows and columns beyond the image) cut off."""
    n = tiled.shape[0]
    _, wb, hb, cb, _ = tiled_shape(channels, height, width)
    blocks = tiled.reshape(n, wb, hb, cb, CHANNEL_GROUP, TILE, TILE)  # (…, channel, row, column) in a tile
    planes = blocks.transpose(0, 3, 4, 2, 5, 1, 6).reshape(n, cb * CHANNEL_GROUP, hb * TILE, wb * TILE)
    return np.ascontiguousarray(planes[:, :channels, :height, :width])


def normalization(preprocessing: dict) -> dict:
    """The VDSP normalization of the family's mean/std (pixel units), by the names VastModelZOO's JSONs use: EQUAL
    (no normalization: mmyolo-yolox_s), DIV255 (x/255: YOLOv5), MINUSMEAN_DIVSTD in pixel units (std 1:
    mmdet-yolof), else DIV255_MINUSMEAN_DIVSTD with mean/std in 0..1 units (ImageNet: RetinaNet)."""
    mean, std = list(preprocessing['mean']), list(preprocessing['std'])
    if not any(mean) and all(abs(s - 1) < 1e-9 for s in std):
        return {'NormaType': 'EQUAL'}
    if not any(mean) and all(abs(s - 255) < 1e-6 for s in std):
        return {'NormaType': 'DIV255'}
    if all(abs(s - 1) < 1e-9 for s in std):
        return {'Mean': mean, 'Std': std, 'NormaType': 'MINUSMEAN_DIVSTD'}
    return {'Mean': [m / 255 for m in mean], 'Std': [s / 255 for s in std], 'NormaType': 'DIV255_MINUSMEAN_DIVSTD'}


def color_code(preprocessing: dict) -> str:
    """The op takes planar RGB: a model that takes BGR (preprocessing `channels`) needs the channels swapped."""
    return 'RGB2BGR' if preprocessing.get('channels') == 'bgr' else 'NO_CHANGE'


def vdsp_params(preprocessing: dict, resize_type: str) -> dict:
    """The VDSP fusion op: planar RGB in, the exported input tensor out (letterbox or plain resize, the channel
    order, then normalization), as the seeds' vdsp_params JSON files describe it."""
    height, width = preprocessing['height'], preprocessing['width']
    config = {'IimageFormat': 'RGB_PLANAR', 'IimageWidth': width, 'IimageHeight': height,
              'OimageWidth': width, 'OimageHeight': height, 'IimageWidthPitch': width,
              'IimageHeightPitch': height, **normalization(preprocessing), 'ColorCvtCode': color_code(preprocessing),
              'ResizeType': resize_type}
    return {'OpType': LETTERBOX_OP if preprocessing['kind'] == 'letterbox' else RESIZE_OP, 'OpConfig': config}


def process_ops(preprocessing: dict) -> list[dict]:
    """vamc's calibration preprocessing (dataset.process_ops), the same steps as the evaluation's (the key names
    VastModelZOO's YAMLs use: mmdet_yolof.yaml's CvtColor, mmyolo_yolox.yaml's Normalize without div255)."""
    height, width = preprocessing['height'], preprocessing['width']
    norm = normalization(preprocessing)
    normalize = {'type': 'Normalize', 'div255': norm['NormaType'].startswith('DIV255')}
    if 'Mean' in norm:
        normalize.update(mean=norm['Mean'], std=norm['Std'])
    else:
        normalize['norm_type'] = None
    if preprocessing['kind'] == 'letterbox':
        resize = [{'type': 'Resize', 'size': [max(height, width), -1], 'adaptive_side': 'long'},
                  {'type': 'Pad', 'pad_to_square': True}]
    else:
        resize = [{'type': 'Resize', 'size': [height, width]}]
    color = [{'type': 'CvtColor', 'code': 'COLOR_RGB2BGR'}] if color_code(preprocessing) == 'RGB2BGR' else []
    return [{'type': 'DecodeImage'}, *color, *resize, normalize, {'type': 'ToTensor'}]


class Runtime:
    """VACC through vamc and vaststreamx.

    Args:
        precision: fp16 or int8 (vamc's backend dtypes); int8 calibrates on `precision.calibration`'s images.
        device_id: the card's die; distributed ranks add their local rank to it.
        batch_size: the stream's batch (`vsx.Model(prefix, batch_size)`); the model is compiled at batch 1.
        model_prefix: an already compiled model (`…/mod`); compiling is skipped.
        compiler: the vamc executable.
        compile: False writes the build files only (task=export).
        vdsp: the VDSP op: `resize_type` (null: the family's, BILINEAR_CV for YOLOv5, BILINEAR_PILLOW for
            RetinaNet, as the seeds' files have it), `even_size` (resize an odd side to even first).
        vamc_compile: vamc's backend.compile section (null: the family's, as the seeds' build YAMLs).
        python: the interpreter that has the SDK (null: this one).
    """

    name = 'vacc'

    def __init__(self, precision: dict, device_id: int = 0, batch_size: int = 1, model_prefix: str | None = None,
                 compiler: str = 'vamc', compile: bool = True, vdsp: dict | None = None,
                 vamc_compile: dict | None = None, python: str | None = None):
        check_at_least('runtime.device_id', device_id, 0)
        check_at_least('runtime.batch_size', batch_size, 1)
        self.precision = dict(precision)
        self.device_id = device_id
        self.batch_size = batch_size
        self.model_prefix = model_prefix
        self.compiler = compiler
        self.compile = compile
        self.vdsp = {'resize_type': None, 'even_size': True, **(vdsp or {})}
        self.vamc_compile = vamc_compile
        self.python = python
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
            probe_sdk(python)
            if not model_prefix and shutil.which(compiler) is None:
                raise UserError(f'runtime=vacc: the compiler {compiler!r} is not on PATH; {COMPILER_HINT}')

    def version(self) -> str:
        try:
            return probe_sdk(self.python)
        except UserError:
            return 'vaststreamx not importable'

    def build_config(self, onnx_name: str, shape: tuple, preprocessing: dict, calibration_dir: str | None) -> dict:
        """The vamc build YAML, field for field as the seeds write it: compiled at batch 1 (every VastModelZOO CV
        YAML has frontend.shape [1, C, H, W]); paths relative to the build directory (vamc runs there), so the
        directory can be carried to another machine."""
        dtype = self.precision['name']
        compile_section = self.vamc_compile if self.vamc_compile is not None else preprocessing['vamc_compile']
        config = {'name': f"{preprocessing['model_name']}_run_stream_{dtype}",
                  'frontend': {'checkpoint': onnx_name, 'shape': {'input': [1, *shape]}, 'type': 'onnx',
                               'dtype': 'fp32'},
                  'backend': {'type': 'tvm_vacc', 'dtype': dtype, 'compile': dict(compile_section)},
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
              preprocessing=None, shape=None, select_float=None) -> Artifact:
        """Write vamc.yaml and vdsp_params.json beside the export (int8: with a copy of the calibration images,
        as JPEG), then compile unless told not to or given a compiled model. `keep_float` and `equalize` are
        not applied: the vamc build config has no verified key for them. `select_float` (precision.max_drop)
        runs on ONNX Runtime as a proxy and its choice is written beside vamc.yaml, not applied."""
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
        resize_type = self.vdsp['resize_type'] or preprocessing['resize_type']
        (out_dir / 'vamc.yaml').write_text(yaml.safe_dump(config, sort_keys=False))
        write_json(out_dir / 'vdsp_params.json', vdsp_params(preprocessing, resize_type))
        info = {'name': self.precision['name'], 'vamc_yaml': 'vamc.yaml', 'vdsp_params': 'vdsp_params.json',
                'resize_type': resize_type, 'batch_size': self.batch_size, 'even_size': self.vdsp['even_size'],
                'preprocessing': preprocessing, 'output_shapes': output_shapes(onnx_path),
                'keep_float_ignored': list(keep_float), 'equalize_ignored': list(equalize)}
        if self.precision['name'] == 'int8':
            info.update(method=self.precision['calibration']['method'], num_images=len(calibration.paths),
                        per_channel=bool(self.precision['per_channel']))
        files = {'vamc_yaml': 'vamc.yaml', 'vdsp_params': 'vdsp_params.json'}
        if select_float is not None:
            info.update(self._float_layer_proxy(onnx_path, out_dir, calibration, select_float))
            files['float_layers'] = FLOAT_LAYERS
        if self.model_prefix:
            return Artifact(Path(self.model_prefix).resolve(), {**info, 'compiled': 'given'}, files=files)
        prefix = out_dir / 'deploy_weights' / config['name'] / 'mod'
        if self.compile:
            self.run_vamc(out_dir)
            missing = [f'{prefix}{s}' for s in ('.so', '.json', '.params') if not Path(f'{prefix}{s}').is_file()]
            if missing:
                raise RuntimeError(f'vamc compile finished but did not write {missing[0]}')
        return Artifact(prefix, {**info, 'compiled': 'here' if self.compile else 'not yet'}, files=files)

    def run_vamc(self, out_dir: Path) -> None:
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

    def _float_layer_proxy(self, onnx_path: Path, out_dir: Path, calibration, select_float) -> dict:
        """The search on ONNX Runtime's int8 build of the same export and calibration images (a proxy: vamc
        quantizes by its own code), written to float_layers.json beside vamc.yaml with each conv's index among the
        export's Conv nodes in graph order (the other nodes of a chosen module have none). Not applied: that vamc's
        `quantize.skip_conv_layers` takes those indices is a guess from its name, verified against nothing."""
        import onnx

        from runtime.onnx import Runtime as OnnxRuntime

        try:  # space-to-depth regrouping is ONNX Runtime's own rewrite: off, so the convs are the export's
            onnx_runtime = OnnxRuntime(self.precision, int8_space_to_depth=False)
        except UserError as err:
            raise UserError(f'precision.max_drop with runtime=vacc searches on ONNX Runtime: {err}') from None
        proxy_dir = out_dir / 'onnx_int8_proxy'
        proxy_dir.mkdir()
        proxy = onnx_runtime.build(onnx_path, proxy_dir, calibration, select_float=select_float)
        shutil.rmtree(proxy_dir)
        convs = [n.name for n in onnx.load(str(onnx_path)).graph.node if n.op_type == 'Conv']
        conv_index = {name: i for i, name in enumerate(convs)}
        layers = [{**layer, 'conv_index': conv_index.get(layer['node'])} for layer in proxy.info['float_layers']]
        report = {'applied': False, 'chosen_on': 'onnxruntime int8 (proxy)',
                  'why': 'vamc quantize.skip_conv_layers is assumed to take conv indices; not verified',
                  'conv_indices': [layer['conv_index'] for layer in layers if layer['conv_index'] is not None],
                  'float_layers': layers, 'search': proxy.info['search']}
        write_json(out_dir / FLOAT_LAYERS, report)
        return {'float_layers': layers, 'float_layers_applied': False, 'search': proxy.info['search']}

    def load(self, artifact: Artifact) -> VaccSession:
        if artifact.info.get('compiled') == 'not yet':
            raise UserError('runtime.compile=false: nothing compiled to run; compile with vamc first')
        return self._session(artifact, str(artifact.path), artifact.info['output_shapes'], 'stream')

    def load_preprocessing(self, artifact: Artifact, onnx_path: Path) -> DevicePreprocessingSession:
        """The card's VDSP op alone, its output read back and run by ONNX Runtime fp32 on the host: the device's
        preprocessing and nothing else of the device (eval.explain's device_preprocessing stage)."""
        from runtime.onnx import OrtSession

        preprocessing = artifact.info['preprocessing']
        shape = tiled_shape(3, preprocessing['height'], preprocessing['width'])
        return DevicePreprocessingSession(self._session(artifact, None, [shape], 'preprocess'), OrtSession(onnx_path),
                                          (3, preprocessing['height'], preprocessing['width']))

    def _session(self, artifact: Artifact, prefix: str | None, output_shapes: list, mode: str) -> VaccSession:
        device_id = self.device_id + int(os.environ.get('LOCAL_RANK', '0'))
        return VaccSession(prefix, str(artifact.root / artifact.info['vdsp_params']), device_id, self.batch_size,
                           output_shapes, artifact.info['preprocessing'],
                           even_size=bool(artifact.info.get('even_size', True)), python=self.python, mode=mode)


class SharedBuffer:
    """A file in shared memory (/dev/shm where there is one) mapped by this process and by the worker; the name
    is removed once the worker has mapped it too, so nothing stays behind however either process ends."""

    def __init__(self, size: int):
        shm = Path('/dev/shm')
        fd, name = tempfile.mkstemp(prefix='inloop-vacc-', dir=shm if shm.is_dir() else None)
        self.path, self.size = Path(name), max(size, 1)
        try:
            os.ftruncate(fd, self.size)
            self.map = mmap.mmap(fd, self.size)
        finally:
            os.close(fd)

    def release_name(self) -> None:
        self.path.unlink(missing_ok=True)


class DeviceWorker:
    """The worker process (runtime/vacc_worker.py) and its two shared-memory buffers; `run(images)` places the
    planar images, asks for one run_sync and returns the maps (copies, in the SDK's dtype) and the SDK's
    seconds. Its stderr goes to ours with a [vacc] prefix; if it dies or the card errors, one UserError carries
    its last stderr lines."""

    def __init__(self, python: str | None, settings: dict, output_size: int, tail_lines: int = 5):
        self.inputs = SharedBuffer(1 << 20)
        self.outputs = SharedBuffer(output_size)
        self.tail: deque = deque(maxlen=tail_lines)
        self.lock = threading.Lock()
        settings = {**settings, 'input_buffer': str(self.inputs.path), 'input_size': self.inputs.size,
                    'output_buffer': str(self.outputs.path), 'output_size': self.outputs.size}
        # its own session: Ctrl-C reaches this process only, which unwinds and closes the worker; the worker also
        # ends when its stdin does, so it never outlives this process
        self.process = subprocess.Popen([python or sys.executable, str(WORKER), json.dumps(settings)],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        text=True, bufsize=1, start_new_session=True)
        self.logger = threading.Thread(target=self._log, name='vacc-stderr', daemon=True)
        self.logger.start()
        weakref.finalize(self, self.process.kill)  # a run stopped by an error never leaves the worker behind
        try:
            self.ready = self._reply()
        finally:
            self.inputs.release_name()
            self.outputs.release_name()

    def _log(self) -> None:
        for line in self.process.stderr:
            self.tail.append(line.rstrip())
            sys.stderr.write(f'[vacc] {line}')

    def _reply(self) -> dict:
        line = self.process.stdout.readline()
        if not line:
            code = self.process.wait()
            self.logger.join(timeout=5)
            raise UserError(f'runtime=vacc: the device worker stopped (exit {code}): '
                            + (' | '.join(self.tail) or 'no output'))
        message = json.loads(line)
        if 'error' in message:
            raise UserError(f"runtime=vacc: the card reported {message['error']}"
                            + (f" ({' | '.join(self.tail)})" if self.tail else ''))
        return message

    def _ask(self, message: dict) -> dict:
        try:
            self.process.stdin.write(json.dumps(message) + '\n')
            self.process.stdin.flush()
        except BrokenPipeError:
            pass  # the worker is gone; _reply reports how
        return self._reply()

    def run(self, images: list[np.ndarray]) -> tuple[np.ndarray, str, float]:
        with self.lock:
            needed = sum(image.nbytes for image in images)
            if needed > self.inputs.size:
                self.inputs = SharedBuffer(max(needed, 2 * self.inputs.size))
                try:
                    self._ask({'op': 'inputs', 'path': str(self.inputs.path), 'size': self.inputs.size})
                finally:
                    self.inputs.release_name()
            placed, offset = [], 0
            for image in images:  # straight into the shared buffer, no intermediate bytes copy
                np.frombuffer(self.inputs.map, np.uint8, image.nbytes, offset).reshape(image.shape)[...] = image
                placed.append([offset, int(image.shape[2]), int(image.shape[1])])
                offset += image.nbytes
            reply = self._ask({'op': 'run', 'images': placed})
            return self.outputs.map, reply['dtype'], reply['sdk_s']

    def close(self) -> None:
        if self.process.poll() is None:
            try:
                self.process.stdin.write(json.dumps({'op': 'close'}) + '\n')
                self.process.stdin.close()
                self.process.wait(timeout=10)
            except (BrokenPipeError, subprocess.TimeoutExpired):
                self.process.kill()
        self.logger.join(timeout=5)


class VaccSession:
    """A vaststreamx stream (VDSP op -> model) in the device worker, taking image files: `run_paths(paths)` ->
    raw maps (float32), at most `batch_size` images per run_sync. The host reads each image (cv2, RGB planar; an
    odd side resized to even with `even_size`, as VastAI's scripts do) and `device_metas` gives the decode the
    geometry the VDSP op applied, so boxes land in original pixels. `mode='preprocess'`: the VDSP op alone, no
    model (`prefix` None); its output tensor is the one "map"."""

    reads = 'paths'

    def __init__(self, prefix: str | None, vdsp_json: str, device_id: int, batch_size: int, output_shapes: list,
                 preprocessing: dict, even_size: bool = True, python: str | None = None, mode: str = 'stream'):
        self.output_shapes = [tuple(s) for s in output_shapes]
        self.sizes = [int(np.prod(s)) for s in self.output_shapes]
        self.batch_size = batch_size
        self.preprocessing = preprocessing
        self.even_size = even_size
        self.given: dict[str, tuple] = {}  # path -> (original (h, w), given (h, w)) until its maps are decoded
        self.sdk_s = 0.0  # seconds in the SDK's calls (the worker measures them)
        self.transfer_s = 0.0  # seconds the worker adds around them: placing images, messages, maps copied out
        self.images = 0
        self.worker = DeviceWorker(python, {'prefix': prefix, 'vdsp_params': vdsp_json, 'device_id': device_id,
                                            'batch_size': batch_size, 'output_shapes': output_shapes, 'mode': mode,
                                            'op_output_size': [preprocessing['width'], preprocessing['height']]},
                                   output_size=batch_size * sum(self.sizes) * 4)

    def run_paths(self, paths: list[str]) -> list[np.ndarray]:
        import torch  # its fp16 -> fp32 copy is ~18x numpy's (astype: 6.5 ms for YOLOv5s's maps, torch 0.35 ms)

        maps = [torch.empty((len(paths), *shape), dtype=torch.float32) for shape in self.output_shapes]
        for first in range(0, len(paths), self.batch_size):
            chunk = paths[first:first + self.batch_size]
            images = []
            for path in chunk:
                image, original = read_planar_rgb(path, self.even_size)
                self.given[path] = (original, image.shape[1:])
                images.append(image)
            start = time.perf_counter()
            buffer, dtype, sdk_s = self.worker.run(images)
            # what the worker adds to the SDK's own calls; the float32 copy below an in-process SDK needs too
            self.transfer_s += time.perf_counter() - start - sdk_s
            flat = torch.from_numpy(np.frombuffer(buffer, np.dtype(dtype), len(chunk) * sum(self.sizes)))
            position = 0
            for k in range(len(chunk)):  # out of the shared buffer (the next run writes over it), in float32
                for out, size, shape in zip(maps, self.sizes, self.output_shapes):
                    out[first + k].copy_(flat[position:position + size].view(shape))
                    position += size
            self.sdk_s += sdk_s
            self.images += len(chunk)
        return [m.numpy() for m in maps]

    def device_metas(self, metas: list[dict]) -> list[dict]:
        """The metainfo of each image as the device saw it (VastAI's letterbox convention, the even resize)."""
        out = []
        for meta in metas:
            original, given = self.given.pop(meta['img_path'], (meta['ori_shape'][:2],) * 2)
            out.append({**meta, **device_geometry(self.preprocessing, tuple(original), tuple(given))})
        return out

    def close(self) -> None:
        self.worker.close()


class DevicePreprocessingSession:
    """Image files -> raw maps through the card's VDSP op (a VaccSession in preprocess mode: the op's output
    tensor read back in the card's tiled fp16 layout, untiled here) and ONNX Runtime fp32 on the host."""

    reads = 'paths'

    def __init__(self, device: VaccSession, host, shape: tuple[int, int, int]):
        self.device, self.host, self.shape = device, host, shape

    def tensors(self, paths: list[str]) -> np.ndarray:
        """The op's output for each image as (N, C, H, W) float32."""
        (tiled,) = self.device.run_paths(paths)
        return untile(tiled, *self.shape)

    def run_paths(self, paths: list[str]) -> list[np.ndarray]:
        return self.host.run(self.tensors(paths))

    def device_metas(self, metas: list[dict]) -> list[dict]:
        return self.device.device_metas(metas)

    def close(self) -> None:
        self.device.close()


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
    path.write_text(json.dumps(data, indent=4))
