"""The converted mmyolo YOLOv5s computes what the TF.js graph from npm computes, on real images."""
import cv2
import numpy as np
import pytest
import torch

from integrations.assets.yolov5_tfjs import _mmyolo_name, ultralytics_conv_names
from integrations.models.yolov5 import cut_head
from tests.conftest import DEMO_IMAGES
from tests.tfjs_graph import TfjsGraph


def _input(name: str) -> np.ndarray:
    """A real image as the graph takes it: 1x640x640x3 RGB in [0, 1]."""
    image = cv2.imread(str(DEMO_IMAGES / name))
    image = cv2.resize(image, (640, 640), interpolation=cv2.INTER_AREA)
    return (image[None, :, :, ::-1] / 255.0).astype(np.float32)


def _mmyolo_decoded(model, image_nhwc: np.ndarray) -> np.ndarray:
    """The mmyolo model's decoded output in the graph's layout: (1, 25200, 85) with xywh / 640,
    levels then anchors then rows then columns."""
    head = model.bbox_head
    with torch.no_grad(), cut_head(model):
        raw = model._forward(torch.from_numpy(image_nhwc).permute(0, 3, 1, 2).contiguous())
    rows = []
    for level, (raw_map, stride) in enumerate(zip(raw, head.featmap_strides)):
        n, _, h, w = raw_map.shape
        pred = raw_map.reshape(n, head.num_base_priors, -1, h, w).permute(0, 3, 4, 1, 2)  # (N, H, W, A, 85)
        priors = head.prior_generator.single_level_grid_priors((h, w), level, device='cpu').reshape(h, w, -1, 4)
        boxes = head.bbox_coder.decode(priors, pred[0, ..., :4], stride)  # mmyolo's own decode, xyxy px
        xywh = torch.cat([(boxes[..., :2] + boxes[..., 2:]) / 2, boxes[..., 2:] - boxes[..., :2]], -1) / 640
        out = torch.cat([xywh, pred[0, ..., 4:].sigmoid()], -1)  # (H, W, A, 85)
        rows.append(out.permute(2, 0, 1, 3).reshape(-1, out.shape[-1]))
    return torch.cat(rows)[None].numpy()


@pytest.fixture(scope='module')
def graph(assets):
    return TfjsGraph(assets.TFJS_DIR)


@pytest.mark.parametrize('name', ['bus.jpg', 'zidane.jpg', 'horses.jpg'])
def test_converted_model_matches_tfjs_graph(graph, yolov5s, name):
    image = _input(name)
    expected = graph(image)
    actual = _mmyolo_decoded(yolov5s, image)
    assert expected.shape == actual.shape == (1, 25200, 85)
    box_diff = np.abs(expected[..., :4] - actual[..., :4]).max() * 640  # in pixels
    score_diff = np.abs(expected[..., 4:] - actual[..., 4:]).max()
    assert box_diff <= 1e-3 * 640 and score_diff <= 1e-3, (box_diff, score_diff)
    assert expected[0, :, 4].max() > 0.5  # a real image: something is detected


def test_conv_names_follow_mmyolo_key_mapping():
    names = ultralytics_conv_names([1, 2, 3, 1, 1, 1, 1, 1])
    assert len(names) == 60
    assert _mmyolo_name(names[2]) == 'backbone.stage1.1.main_conv'  # model.2.cv1
    assert _mmyolo_name(names[5]) == 'backbone.stage1.1.blocks.0.conv1'  # model.2.m.0.cv1
    assert _mmyolo_name('model.9.cv2') == 'backbone.stage4.2.conv2'
    assert _mmyolo_name('model.18') == 'neck.downsample_layers.0'
    assert _mmyolo_name(names[-1]) == 'bbox_head.head_module.convs_pred.2'
