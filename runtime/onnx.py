"""ONNX Runtime on the CPU: the reference runtime, runs anywhere."""
from __future__ import annotations

from pathlib import Path

import numpy as np


class OrtSession:
    """An onnxruntime InferenceSession behind the runtime Session interface."""

    def __init__(self, path: Path, intra_op_threads: int = 0):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_threads
        self.session = ort.InferenceSession(str(path), options, providers=['CPUExecutionProvider'])
        self.input_name = self.session.get_inputs()[0].name
        self.output_names = [o.name for o in self.session.get_outputs()]

    def run(self, batch: np.ndarray) -> list[np.ndarray]:
        return self.session.run(self.output_names, {self.input_name: np.ascontiguousarray(batch, np.float32)})


class Runtime:
    """Builds nothing at fp32: the exported ONNX file is the artifact."""

    name = 'onnx'

    def __init__(self, precision: str = 'fp32', intra_op_threads: int = 0):
        self.precision = precision
        self.intra_op_threads = intra_op_threads

    @staticmethod
    def version() -> str:
        import onnxruntime
        return onnxruntime.__version__

    def build(self, onnx_path: Path, out_dir: Path) -> Path:
        if self.precision != 'fp32':
            from integrations.errors import UserError
            raise UserError(f'precision={self.precision}: runtime=onnx supports fp32 only so far')
        return onnx_path

    def load(self, artifact: Path) -> OrtSession:
        return OrtSession(artifact, self.intra_op_threads)
