"""fp16 and int8 for ONNX Runtime: valid models, reproducible calibration, bounded mAP cost, clear errors."""
import json

import numpy as np
import pytest
import torch

from integrations.app import run
from integrations.deploy import loop_preprocessing
from integrations.errors import UserError
from integrations.export import RawMapGraph, compare_maps, export_onnx
from integrations.models.yolov5 import cut_head
from runtime import get_runtime
from runtime.calibration import CalibrationReader
from tests.conftest import DEMO_IMAGES, compose_cfg

INT8 = dict(name='int8', calibration=dict(method='max', percentile=99.999, num_images=2, seed=0, data=''),
            per_channel=True, format='qdq', activation_symmetric=False, keep_raw_map_convs_float=True, exclude=[])


@pytest.fixture(scope='module')
def exported(yolov5s, assets, tmp_path_factory):
    """The YOLOv5s export, a real image preprocessed as the test loop does, and its fp32 raw maps."""
    from integrations.mmengine.runner import load_model_config

    out = tmp_path_factory.mktemp('precision')
    with cut_head(yolov5s):
        export_onnx(RawMapGraph(yolov5s), torch.rand(1, 3, 640, 640), out / 'model.onnx', 'raw_map')
    preprocess = loop_preprocessing(load_model_config(assets.YOLOV5S_CONFIG), yolov5s)
    image = preprocess(DEMO_IMAGES / 'bus.jpg')
    fp32 = get_runtime('onnx', precision={'name': 'fp32'})
    return out, preprocess, image, fp32.load(fp32.build(out / 'model.onnx', out)).run(image)


def _int8(exported, tmp_dir, **changes):
    out, preprocess, _, _ = exported
    precision = json.loads(json.dumps(INT8))
    for key, value in changes.items():
        target = precision['calibration'] if key in precision['calibration'] else precision
        target[key] = value
    runtime = get_runtime('onnx', precision=precision)
    reader = CalibrationReader([DEMO_IMAGES / 'zidane.jpg', DEMO_IMAGES / 'horses.jpg'], preprocess)
    return runtime, runtime.build(out / 'model.onnx', tmp_dir, calibration=reader,
                                  keep_float=[f'bbox_head.head_module.convs_pred.{i}' for i in range(3)])


@pytest.mark.parametrize('method', ['max', 'kl_divergence', 'percentile'])
def test_each_method_gives_a_model_close_to_fp32(exported, tmp_path, method):
    runtime, artifact = _int8(exported, tmp_path, method=method)
    maps = runtime.load(artifact).run(exported[2])
    assert [m.shape for m in maps] == [m.shape for m in exported[3]]
    assert compare_maps(exported[3], maps)['min_cosine'] > 0.99
    assert artifact.info['method'] == method and len(artifact.info['excluded_nodes']) == 3


def test_calibration_is_reproducible(exported, tmp_path):
    (tmp_path / 'a').mkdir()
    (tmp_path / 'b').mkdir()
    first = _int8(exported, tmp_path / 'a')[1].path.read_bytes()
    second = _int8(exported, tmp_path / 'b')[1].path.read_bytes()
    assert first == second


def test_fp16_model_runs_close_to_fp32(exported, tmp_path):
    out = exported[0]
    runtime = get_runtime('onnx', precision={'name': 'fp16'})
    maps = runtime.load(runtime.build(out / 'model.onnx', tmp_path)).run(exported[2])
    assert maps[0].dtype == np.float32
    assert compare_maps(exported[3], maps)['min_cosine'] > 0.9999


@pytest.mark.parametrize('changes,message', [
    (dict(method='mse'), 'runtime=onnx supports max, kl_divergence, percentile'),
    (dict(percentile=100.5), 'percentile=100.5'), (dict(format='qlinear'), 'precision.format=qlinear')])
def test_bad_int8_options(changes, message):
    precision = json.loads(json.dumps(INT8))
    for key, value in changes.items():
        (precision['calibration'] if key in precision['calibration'] else precision)[key] = value
    with pytest.raises(UserError, match=message):
        get_runtime('onnx', precision=precision)


def test_unknown_exclude_name_is_an_error(exported, tmp_path):
    with pytest.raises(UserError, match="'no.such.module' matches no node"):
        _int8(exported, tmp_path, exclude=['no.such.module'])


def test_fp16_and_int8_cost_on_coco128(coco128, tmp_path):
    """The accuracy goals measured in one run each against an fp32 reference of the same runtime."""
    data = ['data=coco', f'data.img_dir={coco128 / "images"}', f'data.ann_file={coco128 / "instances.json"}',
            'eval.compare_native=false', 'eval.reference=fp32']
    fp16 = run(compose_cfg('precision=fp16', *data), tmp_path / 'fp16')
    assert abs(fp16['delta']['device_minus_reference']) <= 0.002
    int8 = run(compose_cfg('precision=int8', *data), tmp_path / 'int8')
    assert int8['precision_details']['calibration_disjoint']
    assert int8['delta']['device_minus_reference'] >= -0.010, int8['delta']
    assert int8['reference']['bbox_mAP'] == fp16['reference']['bbox_mAP']
