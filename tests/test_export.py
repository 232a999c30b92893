"""The head cut and the export: raw maps out, the model untouched afterwards, ONNX equal to PyTorch."""
import numpy as np
import torch

from evaluators.device import compare_maps
from integrations.deploy.graph import RawMapGraph, export_onnx
from integrations.models.yolov5 import cut_head
from runtime.onnx import OrtSession


def test_cut_head_returns_raw_maps_and_restores_forward(yolov5s):
    head_module = yolov5s.bbox_head.head_module
    x = torch.rand(1, 3, 320, 320)
    with torch.no_grad():
        with cut_head(yolov5s):
            raw = yolov5s._forward(x)
        normal = yolov5s._forward(x)
    assert [tuple(m.shape) for m in raw] == [(1, 255, 40, 40), (1, 255, 20, 20), (1, 255, 10, 10)]
    assert 'forward' not in vars(head_module)
    assert len(normal) == 3 and isinstance(normal[0], list)  # (cls_scores, bbox_preds, objectnesses) again
    torch.testing.assert_close(normal[0][0], raw[0].reshape(1, 3, 85, 40, 40)[:, :, 5:].reshape(1, -1, 40, 40))


def test_onnx_export_matches_pytorch_and_keeps_eval_mode(yolov5s, tmp_path):
    sample = torch.rand(2, 3, 640, 640)
    with cut_head(yolov5s):
        graph = RawMapGraph(yolov5s)
        spec = export_onnx(graph, sample[:1], tmp_path / 'm.onnx', [f'raw_map_{i}' for i in range(3)])
        assert not any(m.training for m in yolov5s.modules())  # the exporter restored eval mode
        with torch.no_grad():
            expected = [m.numpy() for m in graph(sample)]
    got = OrtSession(tmp_path / 'm.onnx').run(sample.numpy())  # dynamic batch: 2
    assert [o['name'] for o in spec['outputs']] == ['raw_map_0', 'raw_map_1', 'raw_map_2']
    diff = compare_maps(expected, got)
    assert diff['max_abs_diff'] < 1e-3 and diff['min_cosine'] > 0.99999


def test_compare_maps_measures_difference():
    a = [np.ones((2, 3, 4, 4), np.float32)]
    b = [a[0].copy()]
    b[0][1, 0, 0, 0] = -1.0
    diff = compare_maps(a, b)
    assert diff['max_abs_diff'] == 2.0 and diff['min_cosine'] < 1.0


def test_an_export_that_differs_from_pytorch_is_one_error_line(yolov5s, tmp_path, monkeypatch):
    """ONNX Runtime's maps off by more than the tolerance stop the build with a UserError naming the figure and
    what to try, not a traceback; nothing is built after it."""
    import pytest

    import integrations.deploy.build as build
    from common.errors import UserError
    from integrations.models import get_family

    class Shifted(OrtSession):
        def run(self, batch):
            return [m + 0.01 for m in super().run(batch)]

    monkeypatch.setattr(build, 'OrtSession', Shifted)
    with pytest.raises(UserError, match=r'the ONNX export differs from PyTorch by 0\.01.*export\.simplify=false'):
        build.build_artifacts(yolov5s, get_family('yolov5'), torch.rand(1, 3, 320, 320), tmp_path,
                              {'opset': 13, 'simplify': False, 'torchscript': False}, runtime=None, reference=None,
                              calibration=None, keep_float=[], equalize=[], preprocessing=None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ['model.onnx']
