"""MLCommons RetinaNet: torchvision parts, head cut, host decode against torchvision, checkpoints, the
OpenImages-MLPerf converter and metric. No trained weights exist here: the model has seeded random weights whose
final convs are re-drawn wider, so scores spread and there are detections to compare."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from common.errors import UserError
from integrations.app.main import run
from integrations.config import ROOT
from tests.conftest import DEMO_IMAGES, compose_cfg

CONFIG = ROOT / 'configs' / 'mlperf_retinanet_800.py'
# with the classification conv re-drawn (std 6): about 1400 candidates of a 256x320 noise image pass 0.3, and
# of the real demo images at 800x800, 17k (bus) and 270 (horses) pass 0.15 — the top-1000 cut is exercised
DECODE_THR, SCORE_THR = 0.3, 0.15


@pytest.fixture(scope='module')
def mm_cfg():
    from integrations.models import load_model_config
    return load_model_config(str(CONFIG))


@pytest.fixture(scope='module')
def model(mm_cfg):
    """Seeded random weights with the classification conv drawn wider, and a threshold that keeps some."""
    from integrations.models import build_model

    model = build_model(mm_cfg)
    with torch.random.fork_rng():
        torch.manual_seed(1)
        torch.nn.init.normal_(model.head.classification_head.cls_logits.weight, std=6.0)
    model.score_thresh = SCORE_THR
    return model


def checkpointed(mm_cfg, path):
    """The config's RetinaNet with a checkpoint loaded by the app's safe loader."""
    from integrations.deploy.checkpoint import load_checkpoint
    from integrations.models import build_model

    model = build_model(mm_cfg)
    load_checkpoint(model, path)
    return model


def _raw_maps(model, inputs):
    from integrations.models.retinanet import cut_head
    with torch.no_grad(), cut_head(model):
        return list(model._forward(inputs))


def test_structure_matches_the_reference(model):
    from evaluators.decode.retinanet import grid_sizes
    keys = model.state_dict()
    assert 'backbone.body.layer4.2.conv3.weight' in keys and 'backbone.fpn.extra_blocks.p6.weight' in keys
    assert model.backbone.body.layer1[0].conv2.groups == 32  # ResNeXt 32x4d
    assert type(model.backbone.body.bn1).__name__ == 'FrozenBatchNorm2d'
    assert model.box_coder.weights == (1.0, 1.0, 1.0, 1.0)
    assert [len(s) for s in model.anchor_generator.sizes] == [3] * 5
    assert model.anchor_generator.sizes[0] == (32, 40, 50) and model.anchor_generator.sizes[4] == (512, 645, 812)
    maps = _raw_maps(model, torch.zeros(1, 3, 800, 800))
    assert [tuple(m.shape[-2:]) for m in maps[:5]] == grid_sizes((800, 800), 5) == \
        [(100, 100), (50, 50), (25, 25), (13, 13), (7, 7)]
    assert {m.shape[1] for m in maps[:5]} == {9 * 264} and {m.shape[1] for m in maps[5:]} == {9 * 4}


def test_decoder_equals_torchvision_postprocess_detections(model):
    """Our decode of the 10 raw maps against torchvision's own RetinaNet (same modules): its head's outputs,
    its anchors and its postprocess_detections, on a non-square input."""
    from torchvision.models.detection import RetinaNet
    from torchvision.models.detection.image_list import ImageList

    from evaluators.decode.retinanet import RetinaNetDecoder

    torch.manual_seed(0)
    inputs = torch.randn(2, 3, 256, 320)
    reference = RetinaNet(model.backbone, 264, anchor_generator=model.anchor_generator, head=model.head,
                          score_thresh=DECODE_THR, nms_thresh=0.5, detections_per_img=300, topk_candidates=1000)
    with torch.no_grad():
        features = list(model.backbone(inputs).values())
        head_outputs = reference.head(features)
        anchors = reference.anchor_generator(ImageList(inputs, [(256, 320)] * 2), features)
        per_level = [f.shape[2] * f.shape[3] * 9 for f in features]
        split = {k: list(v.split(per_level, dim=1)) for k, v in head_outputs.items()}
        expected = reference.postprocess_detections(split, [list(a.split(per_level)) for a in anchors],
                                                    [(256, 320)] * 2)
    model.score_thresh = DECODE_THR
    try:
        got = RetinaNetDecoder(model, (3, 256, 320))(_raw_maps(model, inputs), [{'scale_factor': (1.0, 1.0)}] * 2)
    finally:
        model.score_thresh = SCORE_THR
    for exp, det in zip(expected, got):
        assert len(exp['boxes']) > 10
        assert torch.equal(exp['labels'], det['labels']) and torch.equal(exp['scores'], det['scores'])
        assert torch.equal(exp['boxes'], det['bboxes'])


def test_device_detections_equal_native_at_800(model, mm_cfg, tmp_path):
    """Real images through the config's MLPerf pipeline at 800x800: ONNX Runtime fp32 on the exported raw maps
    plus the host decode gives the native model's detections."""
    from mmengine.dataset import pseudo_collate

    from evaluators.decode.retinanet import RetinaNetDecoder
    from integrations.deploy.graph import RawMapGraph, export_onnx
    from integrations.deploy.pipeline import image_pipeline
    from integrations.models.retinanet import cut_head
    from runtime.onnx import OrtSession

    pipeline = image_pipeline(mm_cfg)
    data = [pipeline({'img_path': str(DEMO_IMAGES / name), 'img_id': i})
            for i, name in enumerate(['bus.jpg', 'horses.jpg'])]
    batch = model.data_preprocessor(pseudo_collate(data), False)
    with torch.no_grad():
        native = model.predict(batch['inputs'], batch['data_samples'])
    with cut_head(model):
        export_onnx(RawMapGraph(model), torch.rand(1, 3, 800, 800), tmp_path / 'model.onnx',
                    [f'raw_map_{i}' for i in range(10)])
    maps = OrtSession(tmp_path / 'model.onnx').run(batch['inputs'].numpy())
    device = RetinaNetDecoder(model, (3, 800, 800))([torch.from_numpy(m) for m in maps],
                                                    [s.metainfo for s in batch['data_samples']])
    for sample, det in zip(native, device):
        ref = sample.pred_instances
        assert len(ref) > 10 and len(ref) == len(det['labels'])
        assert torch.equal(ref.labels, det['labels'])
        assert (ref.bboxes - det['bboxes']).abs().max() <= 1e-2
        assert (ref.scores - det['scores']).abs().max() <= 1e-4
        height, width = sample.metainfo['ori_shape']
        assert (height, width) != (800, 800)  # boxes are in original pixels: inside the original image
        assert ref.bboxes[:, 0::2].max() <= width + 1e-3 and ref.bboxes[:, 1::2].max() <= height + 1e-3


def _v1_state_dict(model) -> dict:
    """The model's weights under the names torchvision v1 heads (and so MLCommons checkpoints) used."""
    state = {}
    for key, value in model.state_dict().items():
        for head in ('classification_head', 'regression_head'):
            prefix = f'head.{head}.conv.'
            if key.startswith(prefix):
                index, rest = key[len(prefix):].split('.0.', 1)
                key = f'{prefix}{2 * int(index)}.{rest}'
        state[key] = value
    return state


def test_mlcommons_checkpoint_plain_state_dict_and_mismatch(model, mm_cfg, tmp_path):
    mlcommons = tmp_path / 'retinanet_model_10.pth'
    torch.save({'model': _v1_state_dict(model), 'epoch': 10}, mlcommons)
    plain = tmp_path / 'plain.pth'
    torch.save(model.state_dict(), plain)
    for path in (mlcommons, plain):
        loaded = checkpointed(mm_cfg, path)
        assert all(torch.equal(v, model.state_dict()[k]) for k, v in loaded.state_dict().items())
    broken = {k: v for k, v in model.state_dict().items() if not k.startswith('head.regression_head')}
    broken['extra.weight'] = torch.zeros(1)
    torch.save({'model': broken}, tmp_path / 'broken.pth')
    with pytest.raises(UserError, match=r'missing keys: head\.regression_head.*unexpected keys: extra\.weight'):
        checkpointed(mm_cfg, tmp_path / 'broken.pth')


REFERENCE_KEYS = ROOT.parent / 'shared' / 'data' / 'mlperf-retinanet' / 'reference_state_dict.json'


def _reference_checkpoint(path, seed: int = 3) -> dict:
    """A checkpoint in MLCommons training's layout whose state dict has exactly the reference's 301 keys, shapes
    and dtypes (from running the reference's own model code); seeded values, variances positive."""
    import argparse

    listing = json.loads(REFERENCE_KEYS.read_text())['keys']
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape, dtype in listing:
        value = torch.randn(shape, generator=generator, dtype=getattr(torch, dtype)) * 0.05
        state[key] = value.abs() + 0.5 if key.endswith(('running_var', 'bn1.weight', 'bn2.weight', 'bn3.weight')) \
            else value
    args = argparse.Namespace(backbone='resnext50_32x4d', dataset='openimages-mlperf', epochs=26, lr=0.0001,
                              batch_size=2, image_size=[800, 800], output_dir='/results', amp=True)
    torch.save({'model': state, 'optimizer': {'state': {}, 'param_groups': [{'lr': 0.0001, 'params': [0, 1]}]},
                'epoch': 10, 'args': args}, path)
    return state


def test_reference_layout_checkpoint_loads_safely_with_the_reference_key_names(mm_cfg, tmp_path):
    """The training script's checkpoint (`args` an argparse.Namespace, plain-conv FPN keys, v1 head keys) loads
    with weights_only; every tensor lands where torchvision's own RetinaNet puts it; a plain state dict of the
    loaded model gives the same detections."""
    from mmengine.dataset import pseudo_collate
    from torchvision.models import resnext50_32x4d
    from torchvision.models.detection import RetinaNet
    from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
    from torchvision.ops import FrozenBatchNorm2d
    from torchvision.ops.feature_pyramid_network import LastLevelP6P7

    from integrations.deploy.pipeline import image_pipeline

    path = tmp_path / 'retinanet_model_10.pth'
    state = _reference_checkpoint(path)
    assert len(state) == 301 and 'backbone.fpn.inner_blocks.0.weight' in state
    with pytest.raises(Exception, match='Namespace'):  # torch alone refuses it: our allow-list is what loads it
        torch.load(path, weights_only=True)
    loaded = checkpointed(mm_cfg, path)
    # torchvision's RetinaNet, loading the same dict with its own v1 -> v2 upgrade, is the independent reference
    body = resnext50_32x4d(weights=None, norm_layer=FrozenBatchNorm2d)
    reference = RetinaNet(_resnet_fpn_extractor(body, 5, returned_layers=[2, 3, 4],
                                                extra_blocks=LastLevelP6P7(256, 256)), num_classes=264)
    reference.load_state_dict(state, strict=True)
    ours = loaded.state_dict()
    assert all(torch.equal(ours[key], value) for key, value in reference.state_dict().items())

    torch.save(ours, tmp_path / 'plain.pth')
    again = checkpointed(mm_cfg, tmp_path / 'plain.pth')
    pipeline = image_pipeline(mm_cfg)
    data = pseudo_collate([pipeline({'img_path': str(DEMO_IMAGES / 'bus.jpg'), 'img_id': 0})])
    with torch.no_grad():
        first, second = (m.test_step(data)[0].pred_instances for m in (loaded, again))
    assert torch.equal(first.bboxes, second.bboxes) and torch.equal(first.scores, second.scores)


def _mlperf_preprocessing(path) -> np.ndarray:
    """MLCommons inference's pre_process_openimages_retinanet (python/dataset.py), written out from its steps:
    cv2.imread, float32, gray -> RGB, BGR -> RGB, cv2.resize 800x800 INTER_LINEAR on the float image, /255; then
    the ImageNet mean/std the reference model applies first."""
    import cv2

    img = np.array(cv2.imread(str(path)), dtype=np.float32)
    if len(img.shape) < 3 or img.shape[2] != 3:
        img = cv2.cvtColor(img, cv2.COLOR_GRAY2RGB)
    img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    img = cv2.resize(img, (800, 800), interpolation=cv2.INTER_LINEAR)
    img /= 255.0
    img = (img - np.array([0.485, 0.456, 0.406], np.float32)) / np.array([0.229, 0.224, 0.225], np.float32)
    return img.transpose([2, 0, 1])


def test_preprocessing_is_mlperfs_step_for_step(mm_cfg, model, coco128, tmp_path):
    """The host pipeline's normalized tensor equals MLPerf's on real images of several sizes, a grayscale JPEG
    and an EXIF-rotated one (max abs <= 1e-5)."""
    from PIL import Image

    from integrations.deploy.pipeline import loop_preprocessing

    bus = DEMO_IMAGES / 'bus.jpg'
    rotated = tmp_path / 'rotated.jpg'
    exif = Image.open(bus).getexif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise on display
    Image.open(bus).save(rotated, exif=exif.tobytes())
    gray = tmp_path / 'gray.jpg'
    Image.open(coco128 / 'images' / sorted((coco128 / 'images').iterdir())[0].name).convert('L').save(gray)
    paths = [bus, DEMO_IMAGES / 'zidane.jpg', *sorted((coco128 / 'images').iterdir())[:4], gray, rotated]
    sizes = {Image.open(p).size for p in paths}
    assert len(sizes) >= 4 and Image.open(gray).mode == 'L'
    preprocess = loop_preprocessing(mm_cfg, model)
    for path in paths:
        ours, theirs = preprocess(path)[0], _mlperf_preprocessing(path)
        assert ours.shape == theirs.shape == (3, 800, 800)
        assert np.abs(ours - theirs).max() <= 1e-5, path
    upright, turned = _mlperf_preprocessing(bus), preprocess(rotated)[0]
    assert np.abs(upright - turned).mean() > 0.1  # the rotation was applied, not ignored


def test_categories_out_of_id_order_are_refused(tmp_path):
    """pycocotools and mmdet keep the file's order of categories: in any other order than by id every label would
    shift, so such a file is refused with the fix."""
    from integrations.app.checks import check_inputs

    committed = json.loads((ROOT / 'data' / 'demo' / 'openimages-mlperf.json').read_text())
    committed['categories'] = committed['categories'][::-1]
    ann = tmp_path / 'reversed.json'
    ann.write_text(json.dumps(committed))
    with pytest.raises(UserError, match='not listed in id order'):
        check_inputs(compose_cfg('model=retinanet', 'data=openimages', f'data.img_dir={DEMO_IMAGES}',
                                 f'data.ann_file={ann}'))


def test_converter_maps_shared_classes(coco128, tmp_path):
    from evaluators.openimages_mlperf import CLASSES, coco_to_mlperf

    assert len(CLASSES) == 264 and list(CLASSES) == sorted(CLASSES)
    assert coco_to_mlperf('cow') == 'Cattle' and coco_to_mlperf('cell phone') == 'Mobile phone'
    assert coco_to_mlperf('airplane') == 'Airplane' and coco_to_mlperf('person') is None
    out = tmp_path / 'openimages-mlperf.json'
    tool = [sys.executable, str(ROOT / 'tools' / 'coco_to_openimages_mlperf.py')]
    done = subprocess.run([*tool, str(coco128 / 'instances.json'), str(out)], capture_output=True, text=True,
                          check=False)
    assert done.returncode == 0, done.stderr
    coco, converted = json.loads((coco128 / 'instances.json').read_text()), json.loads(out.read_text())
    assert [c['id'] for c in converted['categories']] == list(range(264))
    assert converted['images'] == coco['images']
    names = {c['id']: c['name'] for c in coco['categories']}
    expected = [a for a in coco['annotations'] if coco_to_mlperf(names[a['category_id']])]
    assert 0 < len(converted['annotations']) == len(expected) < len(coco['annotations'])
    assert all(CLASSES[a['category_id']] == coco_to_mlperf(names[e['category_id']])
               for a, e in zip(converted['annotations'], expected))
    bad = subprocess.run([*tool, str(tmp_path / 'missing.json'), str(tmp_path / 'x.json')], capture_output=True,
                         text=True, check=False)
    assert bad.returncode == 2 and bad.stderr.startswith('error:') and not (tmp_path / 'x.json').exists()


def test_run_model_retinanet_in_runner_test(model, tmp_path, capsys):
    """`model=retinanet data=openimages` inside mmengine's runner.test(): device and native side by side,
    the MLPerf-style mAP line printed, an MLCommons checkpoint loaded."""
    from evaluators.openimages_mlperf import convert

    ann = tmp_path / 'openimages-mlperf.json'
    ann.write_text(json.dumps(convert(json.loads((ROOT / 'data' / 'demo' / 'annotations.json').read_text()))))
    checkpoint = tmp_path / 'retinanet_model_10.pth'
    torch.save({'model': _v1_state_dict(model)}, checkpoint)
    data = ['model=retinanet', 'data=openimages', f'data.img_dir={DEMO_IMAGES}', f'data.ann_file={ann}',
            'eval.num_images=2']
    result = run(compose_cfg(*data, f'model.checkpoint={checkpoint}', f'eval.score_thr={SCORE_THR}'),
                 tmp_path / 'run')
    assert result['weights'] == 'checkpoint' and result['io']['outputs'][0]['shape'] == [1, 9 * 264, 100, 100]
    assert len(result['io']['outputs']) == 10 and result['input_shape'] == [3, 800, 800]
    assert result['fidelity']['max_abs_diff'] < 1e-3
    assert abs(result['device']['bbox_mAP'] - result['native']['bbox_mAP']) <= 1e-3
    printed = capsys.readouterr().out
    assert printed.count('mAP=') == 2 and 'weights:' not in printed
    assert np.isfinite(result['device']['bbox_mAP'])


def test_demo_data_in_the_models_label_space(tmp_path):
    """`python run.py model=retinanet` evaluates the demo images against the same boxes in MLPerf's labels; a
    COCO-format file is refused with the way to convert it."""
    from evaluators.openimages_mlperf import convert
    from integrations.app.checks import check_inputs

    committed = json.loads((ROOT / 'data' / 'demo' / 'openimages-mlperf.json').read_text())
    assert committed == convert(json.loads((ROOT / 'data' / 'demo' / 'annotations.json').read_text()))
    assert compose_cfg('model=retinanet').data.ann_file.endswith('data/demo/openimages-mlperf.json')
    assert compose_cfg().data.ann_file.endswith('data/demo/annotations.json')
    with pytest.raises(UserError, match='not in the openimages-mlperf format'):
        check_inputs(compose_cfg('model=retinanet', 'data=coco', f'data.img_dir={DEMO_IMAGES}',
                                 f"data.ann_file={ROOT / 'data' / 'demo' / 'annotations.json'}"))


def test_mlperf_accuracy_run_for_retinanet(model, tmp_path):
    """task=mlperf model=retinanet: the label is the category id, the target MLPerf's 0.99 x 0.3755."""
    from evaluators.openimages_mlperf import convert

    ann = tmp_path / 'openimages-mlperf.json'
    coco = convert(json.loads((ROOT / 'data' / 'demo' / 'annotations.json').read_text()))
    ann.write_text(json.dumps(coco))
    checkpoint = tmp_path / 'retinanet_model_10.pth'
    torch.save({'model': _v1_state_dict(model)}, checkpoint)
    result = run(compose_cfg('task=mlperf', 'mlperf.mode=accuracy', 'model=retinanet', 'data=openimages',
                             f'data.img_dir={DEMO_IMAGES}', f'data.ann_file={ann}', 'eval.num_images=1',
                             f'model.checkpoint={checkpoint}', f'eval.score_thr={SCORE_THR}'), tmp_path / 'run')
    block = result['mlperf']
    # MLCommons' submission checker: "retinanet": ("mAP", 37.55 * 0.99), in percent
    assert block['target'] == pytest.approx(37.55 * 0.99 / 100)
    # random weights score far below it, and the verdict says so
    assert block['accuracy']['bbox_mAP'] < 0.05 and block['meets_target'] is False
    assert block['accuracy']['bbox_mAP'] == pytest.approx(block['native']['bbox_mAP'], abs=1e-3)
    rows = json.loads((tmp_path / 'run' / 'mlperf_log_accuracy.json').read_text())
    data = np.frombuffer(bytes.fromhex(rows[0]['data']), np.float32).reshape(-1, 7)
    assert len(data) > 0 and set(data[:, 6].astype(int)) <= {c['id'] for c in coco['categories']}
    assert (data[:, 1:5] >= 0).all() and (data[:, 1:5] <= 1).all()  # normalized ymin, xmin, ymax, xmax
