"""Emulated vaststreamx (tests only; see ../README.md): the API subset runtime/vacc_worker.py uses, no more
forgiving than VastAI's SDK in the ways its public code shows:

- `set_device` returns 0 (VastAI's samples assert it) and must be called in every thread before it touches the
  card (their profiler does so per thread); a thread that did not is refused;
- `run_sync` takes at most the stream's batch (`Model(prefix, batch)`) of images;
- `create_image` takes RGB_PLANAR uint8 (3, H, W) with even sides (VastAI's scripts resize odd sides first);
- model outputs come back as float16, one list of tensors per image;
- the fusion op run alone (`cast_to_buildin_operator().execute`, as VastStreamX-Samples' yolo_world_image.py
  does) reads the input size from its attributes, so an image of another size than `set_attribute` gave is
  refused; its output size must have been set (`OIMAGE_WIDTH`/`OIMAGE_HEIGHT`, as the sample sets them), and the
  output must be asked for as the card's tiled fp16 layout, `[1, ceil(W/8), ceil(H/8), ceil(C/4), 256]`
  (common/utils.py's `get_activation_aligned_faster`): a plain (C, H, W) request is refused.

Every call is recorded in `calls` and, when VSX_EMULATION_LOG names a file, appended to it as a JSON line with the
process and thread (the SDK runs in the device worker process, so the tests read the calls from there).
VSX_EMULATION_FAIL=card_error@N or crash@N makes the N-th run_sync raise, or the process die, as a broken card or
driver would. VSX_EMULATION_MISBEHAVE makes it differ from what the tests hold a card to, in one named way, for the
checks of task=check: `layout` (the op's tiles in height-block-first order), `tile16` (16x16 tiles) or `batch`
(a run_sync over several images returns their outputs rotated by one).
"""
from __future__ import annotations

import json
import os
import sys
import threading
from pathlib import Path

import numpy as np

from .vdsp import FusionOp

__version__ = 'emulated'
calls: list[tuple] = []
_thread = threading.local()


def _record(*call) -> None:
    calls.append(call)
    log = os.environ.get('VSX_EMULATION_LOG')
    if log:
        with open(log, 'a') as f:
            f.write(json.dumps({'call': list(call), 'pid': os.getpid(), 'thread': threading.get_ident()}) + '\n')


def _maybe_fail(count: int) -> None:
    kind, _, when = os.environ.get('VSX_EMULATION_FAIL', '').partition('@')
    if kind and int(when) == count:
        print(f'vaststreamx (emulated): injected {kind} at run_sync #{count}', file=sys.stderr, flush=True)
        if kind == 'crash':
            os._exit(3)
        raise RuntimeError('emulated card error: VACC die timeout')


def _on_device(what: str) -> int:
    device = getattr(_thread, 'device', None)
    if device is None:
        raise RuntimeError(f'vsx.{what}: this thread did not call vsx.set_device')
    return device


class StreamBalanceMode:
    ONCE = 'ONCE'
    RUN = 'RUN'


class ImageFormat:
    RGB_PLANAR = 'RGB_PLANAR'
    BGR_INTERLEAVE = 'BGR_INTERLEAVE'
    YUV_NV12 = 'YUV_NV12'


class AttrKey:
    IIMAGE_WIDTH = 'IimageWidth'
    IIMAGE_HEIGHT = 'IimageHeight'
    OIMAGE_WIDTH = 'OimageWidth'
    OIMAGE_HEIGHT = 'OimageHeight'
    IIMAGE_WIDTH_PITCH = 'IimageWidthPitch'
    IIMAGE_HEIGHT_PITCH = 'IimageHeightPitch'


class TypeFlag:
    FLOAT16 = 'FLOAT16'
    UINT8 = 'UINT8'


def set_device(device_id: int) -> int:
    _record('set_device', device_id)
    _thread.device = device_id
    return 0


class Model:
    """A compiled model prefix: the fake vamc's mod.json/.so/.params, run by ONNX Runtime."""

    def __init__(self, prefix: str, batch_size: int):
        import onnxruntime as ort

        _on_device('Model')
        _record('Model', prefix, batch_size)
        for suffix in ('.so', '.json', '.params'):
            if not Path(prefix + suffix).is_file():
                raise RuntimeError(f'model file {prefix}{suffix} not found')
        self.meta = json.loads(Path(prefix + '.json').read_text())
        self.batch_size = batch_size
        print(f'vaststreamx (emulated): model {prefix} loaded, batch {batch_size}', file=sys.stderr, flush=True)
        self.session = ort.InferenceSession(prefix + '.params', providers=['CPUExecutionProvider'])


class Operator:
    """An op of the JSON: the stream runs it; alone, through its BuildInOperator."""

    def __init__(self, spec: dict):
        self.spec = spec
        self.fusion = FusionOp(spec)

    def __call__(self, planar: np.ndarray) -> np.ndarray:
        return self.fusion(planar)

    @staticmethod
    def load_ops_from_json_file(path: str) -> list[Operator]:
        _record('load_ops_from_json_file', path)
        return [Operator(json.loads(Path(path).read_text()))]

    def cast_to_buildin_operator(self) -> BuildInOperator:
        _record('cast_to_buildin_operator')
        return BuildInOperator(self.spec)


def _misbehaving(way: str) -> bool:
    return os.environ.get('VSX_EMULATION_MISBEHAVE') == way


def _tiled(tensor: np.ndarray) -> np.ndarray:
    """(C, H, W) -> the card's layout [1, W/8, H/8, C/4, 256], zero-padded: element (c, y, x) at tile
    (x // 8, y // 8, c // 4), position (c % 4) * 64 + (y % 8) * 8 + x % 8 (VastStreamX-Samples common/utils.py)."""
    tile = 16 if _misbehaving('tile16') else 8
    channels, height, width = tensor.shape
    wb, hb, cb = -(-width // tile), -(-height // tile), -(-channels // 4)
    out = np.zeros((wb, hb, cb, 4 * tile * tile), tensor.dtype)
    c, y, x = np.indices(tensor.shape)
    blocks = (y // tile, x // tile) if _misbehaving('layout') else (x // tile, y // tile)
    out[(*blocks, c // 4, (c % 4) * tile * tile + (y % tile) * tile + x % tile)] = tensor
    return out[None]


class BuildInOperator:
    """The fusion op run by itself: its input size comes from its attributes (the JSON's until set); its output
    size must be set, as the sample does."""

    def __init__(self, spec: dict):
        self.spec = json.loads(json.dumps(spec))
        self.output_size_set = False

    def set_attribute(self, attributes: dict) -> None:
        _record('set_attribute', sorted(attributes.items()))
        self.spec['OpConfig'].update(attributes)
        self.output_size_set |= {AttrKey.OIMAGE_WIDTH, AttrKey.OIMAGE_HEIGHT} <= set(attributes)

    def execute(self, tensors: list[Image], output_info: list) -> list[np.ndarray]:
        _on_device('execute')
        _record('execute', len(tensors), [[list(shape), flag] for shape, flag in output_info])
        config = self.spec['OpConfig']
        (image,) = tensors
        if (image.width, image.height) != (config['IimageWidth'], config['IimageHeight']):
            raise RuntimeError(f"execute: a {image.width}x{image.height} image, the op's attributes say "
                               f"{config['IimageWidth']}x{config['IimageHeight']}")
        if not self.output_size_set:
            raise RuntimeError('execute: the output size is not set (set_attribute OIMAGE_WIDTH, OIMAGE_HEIGHT)')
        out = _tiled(FusionOp(self.spec)(image.data))
        (shape, flag), = output_info
        if flag != TypeFlag.FLOAT16 or list(shape) != list(out.shape):
            raise RuntimeError(f'execute: output_info {list(shape)} {flag}, the op writes {list(out.shape)} FLOAT16')
        return [out]


class ModelOperator:
    def __init__(self, model: Model):
        _record('ModelOperator')
        self.model = model


class Graph:
    def __init__(self):
        self.operators: tuple = ()

    def add_operators(self, *operators) -> None:
        _record('add_operators', [type(o).__name__ for o in operators])
        self.operators = operators


class Image:
    def __init__(self, data: np.ndarray, image_format: str, width: int, height: int, device_id: int):
        self.data, self.format, self.width, self.height, self.device_id = data, image_format, width, height, device_id


def create_image(data: np.ndarray, image_format: str, width: int, height: int, device_id: int) -> Image:
    if _on_device('create_image') != device_id:
        raise RuntimeError(f'vsx.create_image: device {device_id}, but this thread is on {_thread.device}')
    _record('create_image', image_format, width, height, device_id)
    if image_format != ImageFormat.RGB_PLANAR:
        raise ValueError(f'emulation supports RGB_PLANAR only, got {image_format}')
    if data.dtype != np.uint8 or data.shape != (3, height, width):
        raise ValueError(f'RGB_PLANAR image must be uint8 (3, {height}, {width}), got {data.dtype} {data.shape}')
    if width % 2 or height % 2:
        raise ValueError(f'RGB_PLANAR image {width}x{height}: odd sides are not taken')
    return Image(data.copy(), image_format, width, height, device_id)


class Stream:
    """Runs the graph's VDSP op then its model on each image; outputs are float16 (1, C, H, W) per output."""

    def __init__(self, graph: Graph, balance_mode: str):
        _on_device('Stream')
        _record('Stream', balance_mode)
        self.graph = graph
        self.outputs: list = []
        self.built = False
        self.runs = 0

    def register_operator_output(self, operator) -> None:
        _record('register_operator_output', type(operator).__name__)
        self.outputs.append(operator)

    def build(self) -> None:
        _on_device('Stream.build')
        _record('build')
        if not self.outputs:
            raise RuntimeError('no operator output registered')
        self.built = True

    def run_sync(self, images: list[Image]) -> list[list[np.ndarray]]:
        _on_device('run_sync')
        _record('run_sync', len(images))
        self.runs += 1
        _maybe_fail(self.runs)
        if not self.built:
            raise RuntimeError('stream not built')
        fusion, model_op = self.graph.operators
        if len(images) > model_op.model.batch_size:
            raise RuntimeError(f'run_sync: {len(images)} images for a model of batch {model_op.model.batch_size}')
        session = model_op.model.session
        results = []
        for image in images:
            tensor = fusion(image.data)[None].astype(np.float32)
            outputs = session.run(None, {session.get_inputs()[0].name: tensor})
            results.append([o.astype(np.float16) for o in outputs])
        return results[1:] + results[:1] if _misbehaving('batch') else results


def as_numpy(tensor: np.ndarray) -> np.ndarray:
    return np.asarray(tensor)
