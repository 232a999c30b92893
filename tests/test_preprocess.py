"""The evaluation loop's one-pass preprocessing gives exactly what the framework's data preprocessor gives."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from mmdet.structures import DetDataSample
from mmengine.dataset import pseudo_collate

from evaluators.mm.preprocess import BatchPreprocessor, fast_packing
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

    from integrations.deploy.pipeline import image_pipeline
    from integrations.models import load_model_config

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


@pytest.mark.parametrize('normalization', [dict(mean=[10., 20., 30.], std=[2., 3., 4.], bgr_to_rgb=True),
                                           dict(mean=[0.5, 1., 0.], std=[0.7, 3., 255.]),
                                           dict(mean=[100.], std=[58.]), {}])
def test_pads_mixed_sizes_with_the_pad_value(normalization):
    """Every uint8 value, normalized per channel (or not at all), padded to the batch shape."""
    from mmdet.models.data_preprocessors import DetDataPreprocessor

    framework = DetDataPreprocessor(**normalization, pad_size_divisor=32, pad_value=7)
    generator = torch.Generator().manual_seed(0)
    images = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=generator)
              for h, w in ((50, 70), (64, 33))]
    images[0].view(3, -1)[:, :256] = torch.arange(256, dtype=torch.uint8)  # every value in each channel
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


def test_reuse_writes_only_over_released_batches():
    """The evaluation loop hands each batch back once every runtime call on it returned; a batch still held
    (released or not by mistake, or lent to another caller) must never be written over."""
    from mmdet.models.data_preprocessors import DetDataPreprocessor

    framework = DetDataPreprocessor(mean=[0., 0., 0.], std=[255., 255., 255.], bgr_to_rgb=True)
    preprocessor = BatchPreprocessor(framework, reuse=True)

    def batch_of(value: int) -> torch.Tensor:
        data = {'inputs': [torch.full((3, 32, 32), value, dtype=torch.uint8)],
                'data_samples': [DetDataSample(metainfo={'img_shape': (32, 32)})]}
        return preprocessor(data, False)['inputs']

    first, second = batch_of(1), batch_of(2)
    preprocessor.release(first)
    preprocessor.release(torch.zeros_like(first))  # not one it lent: ignored
    third = batch_of(3)
    assert third is first and torch.all(third == 3 / 255)
    assert torch.all(second == 2 / 255) and batch_of(4) is not second


def test_the_evaluation_loop_reuses_batches_only_after_their_runtime_calls():
    """Overlapped loop: every runtime call sees its own batch's pixels although the batches' memory is reused."""
    import random
    import time

    from mmdet.models.data_preprocessors import DetDataPreprocessor

    from evaluators.mm.evaluator import DeviceEvaluator

    seen, buffers = [], set()

    class Session:
        def run(self, batch):
            time.sleep(random.uniform(0, 0.005))  # the loop preprocesses the next batches meanwhile
            buffers.add(batch.ctypes.data)
            seen.append(float(batch.max()))
            return [batch]

    framework = DetDataPreprocessor(mean=[0., 0., 0.], std=[1., 1., 1.])
    evaluator = DeviceEvaluator(metrics=[])
    evaluator.attach({'device': Session()}, decoder=lambda maps, metas: [{}] * len(metas),
                     preprocessor=BatchPreprocessor(framework, reuse=True))
    for value in range(30):
        samples = [DetDataSample(metainfo={'img_shape': (16, 16)})]
        evaluator.process(samples, {'inputs': [torch.full((3, 16, 16), value, dtype=torch.uint8)],
                                    'data_samples': samples})
    evaluator.evaluate(30)
    assert seen == [float(v) for v in range(30)]
    assert evaluator.overlap and len(buffers) <= 2 + 2  # the two batches in flight, one being written, one spare
