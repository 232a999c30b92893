"""Emulated vaststreamx (tests only; see ../README.md): the API subset runtime/vacc.py uses."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .vdsp import FusionOp

__version__ = 'emulated'
calls: list[tuple] = []  # (function, arguments) of every call, for tests


class StreamBalanceMode:
    ONCE = 'ONCE'
    RUN = 'RUN'


class ImageFormat:
    RGB_PLANAR = 'RGB_PLANAR'
    BGR_INTERLEAVE = 'BGR_INTERLEAVE'
    YUV_NV12 = 'YUV_NV12'


def set_device(device_id: int) -> int:
    calls.append(('set_device', device_id))
    return device_id


class Model:
    """A compiled model prefix: the fake vamc's mod.json/.so/.params, run by ONNX Runtime."""

    def __init__(self, prefix: str, batch_size: int):
        import onnxruntime as ort

        calls.append(('Model', prefix, batch_size))
        for suffix in ('.so', '.json', '.params'):
            if not Path(prefix + suffix).is_file():
                raise RuntimeError(f'model file {prefix}{suffix} not found')
        self.meta = json.loads(Path(prefix + '.json').read_text())
        self.batch_size = batch_size
        self.session = ort.InferenceSession(prefix + '.params', providers=['CPUExecutionProvider'])


class Operator:
    @staticmethod
    def load_ops_from_json_file(path: str) -> list[FusionOp]:
        calls.append(('load_ops_from_json_file', path))
        return [FusionOp(json.loads(Path(path).read_text()))]


class ModelOperator:
    def __init__(self, model: Model):
        calls.append(('ModelOperator',))
        self.model = model


class Graph:
    def __init__(self):
        self.operators: tuple = ()

    def add_operators(self, *operators) -> None:
        calls.append(('add_operators', tuple(type(o).__name__ for o in operators)))
        self.operators = operators


class Image:
    def __init__(self, data: np.ndarray, image_format: str, width: int, height: int, device_id: int):
        self.data, self.format, self.width, self.height, self.device_id = data, image_format, width, height, device_id


def create_image(data: np.ndarray, image_format: str, width: int, height: int, device_id: int) -> Image:
    calls.append(('create_image', image_format, width, height, device_id))
    if image_format != ImageFormat.RGB_PLANAR:
        raise ValueError(f'emulation supports RGB_PLANAR only, got {image_format}')
    if data.dtype != np.uint8 or data.shape != (3, height, width):
        raise ValueError(f'RGB_PLANAR image must be uint8 (3, {height}, {width}), got {data.dtype} {data.shape}')
    return Image(data, image_format, width, height, device_id)


class Stream:
    """Runs the graph's VDSP op then its model on each image; outputs are float16 (1, C, H, W) per output."""

    def __init__(self, graph: Graph, balance_mode: str):
        calls.append(('Stream', balance_mode))
        self.graph = graph
        self.outputs: list = []
        self.built = False

    def register_operator_output(self, operator) -> None:
        calls.append(('register_operator_output', type(operator).__name__))
        self.outputs.append(operator)

    def build(self) -> None:
        calls.append(('build',))
        if not self.outputs:
            raise RuntimeError('no operator output registered')
        self.built = True

    def run_sync(self, images: list[Image]) -> list[list[np.ndarray]]:
        calls.append(('run_sync', len(images)))
        if not self.built:
            raise RuntimeError('stream not built')
        fusion, model_op = self.graph.operators
        session = model_op.model.session
        results = []
        for image in images:
            tensor = fusion(image.data)[None].astype(np.float32)
            outputs = session.run(None, {session.get_inputs()[0].name: tensor})
            results.append([o.astype(np.float16) for o in outputs])
        return results


def as_numpy(tensor: np.ndarray) -> np.ndarray:
    return np.asarray(tensor)
