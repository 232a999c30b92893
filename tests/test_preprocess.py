"""The evaluation loop's one-pass preprocessing gives exactly what the framework's data preprocessor gives."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from mmdet.structures import DetDataSample
from mmengine.dataset import pseudo_collate

from evaluators.preprocess import BatchPreprocessor, fast_packing
from integrations.config import ROOT

DEMO_IMAGES = ROOT / 'data' / 'demo' / 'images'


def _assert_same(framework, data, training=False):
    expected = framework(copy.deepcopy(data), training)
    got = BatchPreprocessor(framework)(copy.deepcopy(data), training)
    assert got['inputs'].dtype == expected['inputs'].dtype
    assert torch.equal(got['inputs'], expected['inputs'])
    for ours, theirs in zip(got['data_samples'], expected['data_samples']):
        assert ours.metainfo.keys() == theirs.metainfo.keys()
        assert all(np.array_equal(ours.metainfo[k], theirs.metainfo[k]) for k in ours.metainfo)
    return got


@pytest.mark.parametrize('config', ['yolov5', 'retinanet'])
def test_equals_the_config_preprocessor_on_real_images(config, assets):
    """YOLOv5's letterbox (mean 0, std 255, BGR->RGB) and the MLPerf RetinaNet's ImageNet normalization, with
    the images packed by mmdet's PackDetInputs and by PackDetInputsFast (equal tensors)."""
    from mmengine.registry import MODELS, DefaultScope

    from integrations.deploy import image_pipeline
    from integrations.mmengine.runner import load_model_config

    path = assets.YOLOV5S_CONFIG if config == 'yolov5' else str(ROOT / 'configs' / 'mlperf_retinanet_800.py')
    cfg = load_model_config(path)
    with DefaultScope.overwrite_default_scope(cfg.get('default_scope', 'mmyolo')):
        framework = MODELS.build(cfg.model.data_preprocessor)
    images = [DEMO_IMAGES / 'bus.jpg', DEMO_IMAGES / 'zidane.jpg']
    packed = {}
    for packing in ('mmdet', 'fast'):
        if packing == 'fast':
            dataset = cfg.test_dataloader.dataset
            dataset.pipeline = fast_packing(dataset.pipeline)
        pipeline = image_pipeline(cfg)
        packed[packing] = pseudo_collate([pipeline(dict(img_path=str(p), img_id=i)) for i, p in enumerate(images)])
        _assert_same(framework, packed[packing])
    for theirs, ours in zip(packed['mmdet']['inputs'], packed['fast']['inputs']):
        assert ours.is_contiguous() and ours.dtype == theirs.dtype and torch.equal(ours, theirs)
    for theirs, ours in zip(packed['mmdet']['data_samples'], packed['fast']['data_samples']):
        assert ours.metainfo.keys() == theirs.metainfo.keys()
        assert all(np.array_equal(ours.metainfo[k], theirs.metainfo[k]) for k in ours.metainfo)


def test_pads_mixed_sizes_with_the_pad_value():
    from mmdet.models.data_preprocessors import DetDataPreprocessor

    framework = DetDataPreprocessor(mean=[10., 20., 30.], std=[2., 3., 4.], bgr_to_rgb=True, pad_size_divisor=32,
                                    pad_value=7)
    generator = torch.Generator().manual_seed(0)
    images = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=generator)
              for h, w in ((50, 70), (64, 33))]
    data = {'inputs': images, 'data_samples': [DetDataSample(metainfo={'img_shape': x.shape[1:]}) for x in images]}
    got = _assert_same(framework, data)
    assert got['inputs'].shape == (2, 3, 64, 96)
    assert got['data_samples'][0].metainfo['pad_shape'] == (64, 96)


def test_other_inputs_go_to_the_framework():
    """Float images and training-time calls are the framework's business (batch augments, other dtypes)."""
    from mmdet.models.data_preprocessors import DetDataPreprocessor

    framework = DetDataPreprocessor(mean=[0., 0., 0.], std=[255., 255., 255.], bgr_to_rgb=True)
    images = [torch.rand(3, 32, 32) * 255]
    data = {'inputs': images, 'data_samples': [DetDataSample(metainfo={'img_shape': (32, 32)})]}
    preprocessor = BatchPreprocessor(framework)
    assert not preprocessor._fast_path(data, False)
    _assert_same(framework, data)
    uint8 = {'inputs': [torch.zeros(3, 32, 32, dtype=torch.uint8)], 'data_samples': data['data_samples']}
    assert preprocessor._fast_path(uint8, False) and not preprocessor._fast_path(uint8, True)
