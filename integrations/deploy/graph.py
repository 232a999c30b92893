"""Export the head-cut model to ONNX (and optionally TorchScript), simplified, checked against PyTorch."""
from __future__ import annotations

import warnings
from pathlib import Path

import torch


class RawMapGraph(torch.nn.Module):
    """The detector up to the raw prediction maps, one flat tuple of tensors (a head that returns kinds of
    levels — (cls_scores, bbox_preds, …) — comes out kind by kind); use inside the family's `cut_head` context.
    `group_sizes` says how the last call's output was nested (one entry per kind, its number of levels).

    Built in eval mode: torch.onnx.export restores the wrapper's mode afterwards, recursively, and a wrapper in
    the default training mode would leave the detector's BatchNorm layers training.
    """

    def __init__(self, detector):
        super().__init__()
        self.detector = detector
        self.group_sizes: list[int] = []
        self.eval()

    def forward(self, inputs):
        parts = [part if isinstance(part, (list, tuple)) else [part] for part in self.detector._forward(inputs)]
        self.group_sizes = [len(part) for part in parts]
        return tuple(tensor for part in parts for tensor in part)


def export_onnx(graph: torch.nn.Module, sample: torch.Tensor, path: Path, output_names: list[str], opset: int = 13,
                simplify: bool = True) -> dict:
    """Write `graph` as ONNX with a dynamic batch axis, its outputs named `output_names`; return the input/output
    names and shapes."""
    with torch.no_grad():
        outputs = graph(sample)
    if len(output_names) != len(outputs):
        raise ValueError(f'{len(output_names)} output names for {len(outputs)} outputs')
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # the TorchScript-based exporter is deprecated but reaches opset 13
        torch.onnx.export(graph, (sample,), str(path), input_names=['input'], output_names=output_names,
                          opset_version=opset, dynamo=False,
                          dynamic_axes={name: {0: 'batch'} for name in ['input', *output_names]})
    if simplify:
        import onnx
        import onnxslim
        onnx.save(onnxslim.slim(onnx.load(str(path))), str(path))
    return {'input': {'name': 'input', 'shape': list(sample.shape)},
            'outputs': [{'name': n, 'shape': list(o.shape)} for n, o in zip(output_names, outputs)]}


def export_torchscript(graph: torch.nn.Module, sample: torch.Tensor, path: Path) -> None:
    with torch.no_grad():
        torch.jit.save(torch.jit.trace(graph, sample), str(path))
