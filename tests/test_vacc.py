"""runtime=vacc and runtime=npz against the SDK emulation in tests/emulation (nothing here ran on a card).

The SDK runs in the device worker, a separate interpreter process (runtime/vacc_worker.py) that finds the emulated
vaststreamx on its PYTHONPATH; the tests read the SDK calls it made from the emulation's log."""
from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from common.errors import UserError
from integrations.app.checks import check_inputs
from integrations.app.main import run
from integrations.config import ROOT
from tests.conftest import DEMO_IMAGES, EMULATION, coco128_subset, compose_cfg

WORKER = ROOT / 'runtime' / 'vacc_worker.py'
# the structure of the seeds' mmyolo_yolov5.yaml (int8) and vdsp_params JSON files
SEED_YAML_KEYS = {'name': None, 'frontend': {'checkpoint', 'shape', 'type', 'dtype'},
                  'backend': {'type', 'dtype', 'compile', 'quantize'}, 'workspace': {'path'},
                  'dataset': {'type', 'path', 'sampler', 'process_ops'}}
SEED_VDSP_KEYS = {'IimageFormat', 'IimageWidth', 'IimageHeight', 'OimageWidth', 'OimageHeight', 'IimageWidthPitch',
                  'IimageHeightPitch', 'NormaType', 'ColorCvtCode', 'ResizeType'}


# standard modules that Python 3.12 no longer has (PEP 594 and PEP 632 removals up to 3.12)
REMOVED_BY_3_12 = {'asynchat', 'asyncore', 'distutils', 'imp', 'smtpd'}


def test_the_worker_is_python_3_8_to_3_12_and_imports_only_the_stdlib_numpy_and_the_sdk():
    """VastAI's wheels are cp38 (VastStreamX-Samples' image) and cp312 (xinference_vacc's Dockerfiles): the worker
    parses as 3.8 and as 3.12, needs nothing newer than 3.8 (vermin) and imports no module 3.12 removed."""
    source = WORKER.read_text()
    tree = ast.parse(source, feature_version=(3, 8))
    ast.parse(source, feature_version=(3, 12))
    imported = {alias.name.split('.')[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module.split('.')[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert imported - set(sys.stdlib_module_names) == {'numpy', 'vaststreamx'}
    assert not imported & REMOVED_BY_3_12
    checked = subprocess.run([str(Path(sys.executable).with_name('vermin')), '--no-tips', '--violations',
                              '--target=3.8-', str(WORKER)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_without_the_sdk_one_line_names_runtime_python(tmp_path, vamc):
    with pytest.raises(UserError, match=r'cannot import the vaststreamx SDK.*runtime.python=PATH'):
        check_inputs(compose_cfg('runtime=vacc', 'precision=fp16'))
    with pytest.raises(UserError, match=r'runtime.python=/no/python3.8: no such interpreter'):
        check_inputs(compose_cfg('runtime=vacc', 'precision=fp16', 'runtime.python=/no/python3.8'))
    with pytest.raises(UserError, match=rf'runtime.python={sys.executable} cannot import the vaststreamx SDK'):
        check_inputs(compose_cfg('runtime=vacc', 'precision=fp16', f'runtime.python={sys.executable}'))
    with pytest.raises(UserError, match='runtime=vacc supports fp16, int8'):
        check_inputs(compose_cfg('runtime=vacc', 'precision=fp32'))


def test_without_the_compiler_one_line(vsx, tmp_path):
    with pytest.raises(UserError, match="compiler 'no-such-vamc' is not on PATH"):
        run(compose_cfg('runtime=vacc', 'precision=fp16', 'runtime.compiler=no-such-vamc'), tmp_path / 'b')
    assert not (tmp_path / 'b' / 'export').exists()


@pytest.mark.parametrize('override, message', [
    ('runtime.batch_size=0', 'runtime.batch_size=0: must be >= 1'),
    ('runtime.device_id=-1', 'runtime.device_id=-1: must be >= 0')])
def test_bad_vacc_options_are_one_line_errors(override, message):
    with pytest.raises(UserError, match=message):
        check_inputs(compose_cfg('runtime=vacc', 'precision=fp16', 'runtime.compile=false', override))


def test_export_writes_seed_shaped_build_files_at_batch_1(assets, demo_subset_data, tmp_path, vamc):
    """Compiled at batch 1 whatever runtime.batch_size is (every VastModelZOO CV YAML has [1, C, H, W])."""
    result = run(compose_cfg('task=export', 'runtime=vacc', 'precision=int8', 'runtime.batch_size=4',
                             *demo_subset_data, 'precision.calibration.num_images=4'), tmp_path)
    export = Path(result['export_dir'])
    config = yaml.safe_load((export / 'vamc.yaml').read_text())
    assert set(config) == set(SEED_YAML_KEYS)
    for section, keys in SEED_YAML_KEYS.items():
        if keys:
            assert set(config[section]) == keys, section
    assert config['frontend']['shape'] == {'input': [1, 3, 640, 640]}
    assert config['backend']['compile'] == {'cluster_mode': 0}
    assert config['backend']['quantize'] == {'calibrate_mode': 'max', 'quantize_per_channel': True}
    assert [op['type'] for op in config['dataset']['process_ops']] == \
        ['DecodeImage', 'Resize', 'Pad', 'Normalize', 'ToTensor']
    assert len(list((export / config['dataset']['path']).glob('*.jpg'))) == 4
    vdsp = json.loads((export / 'vdsp_params.json').read_text())
    assert vdsp['OpType'] == 'FUSION_OP_RGB_LETTERBOX_CVTCOLOR_NORM_TENSOR'
    assert set(vdsp['OpConfig']) == SEED_VDSP_KEYS and vdsp['OpConfig']['NormaType'] == 'DIV255'
    assert vdsp['OpConfig']['ResizeType'] == 'BILINEAR_CV'
    # the carried directory compiles: the fake vamc checks the YAML against the seeds' schema
    compiled = subprocess.run([str(vamc), 'compile', 'vamc.yaml'], cwd=export, capture_output=True, text=True)
    assert compiled.returncode == 0, compiled.stderr
    assert (export / 'deploy_weights' / config['name'] / 'mod.so').is_file()


def test_export_retinanet_resize_pillow_and_its_compile_section(tmp_path):
    """RetinaNet's build files as VastModelZOO's: plain resize to 800x800, BILINEAR_PILLOW, ImageNet mean/std,
    data_transport_mode 1."""
    result = run(compose_cfg('task=export', 'model=retinanet', 'runtime=vacc', 'precision=int8',
                             'precision.calibration.method=kl_divergence', 'precision.calibration.num_images=2',
                             'eval.num_images=2'), tmp_path)
    export = Path(result['export_dir'])
    config = yaml.safe_load((export / 'vamc.yaml').read_text())
    assert config['frontend']['shape'] == {'input': [1, 3, 800, 800]}
    assert config['backend']['compile'] == {'data_transport_mode': 1}
    assert config['backend']['quantize']['calibrate_mode'] == 'kl_divergence'
    ops = config['dataset']['process_ops']
    assert ops[1] == {'type': 'Resize', 'size': [800, 800]}
    assert np.allclose(ops[2]['mean'], [0.485, 0.456, 0.406]) and np.allclose(ops[2]['std'], [0.229, 0.224, 0.225])
    vdsp = json.loads((export / 'vdsp_params.json').read_text())
    assert vdsp['OpType'] == 'FUSION_OP_RGB_RESIZE_CVTCOLOR_NORM_TENSOR'
    assert vdsp['OpConfig']['NormaType'] == 'DIV255_MINUSMEAN_DIVSTD'
    assert vdsp['OpConfig']['ResizeType'] == 'BILINEAR_PILLOW'
    assert np.allclose(vdsp['OpConfig']['Mean'], [0.485, 0.456, 0.406], atol=1e-3)


def test_emulated_vdsp_letterbox_matches_host_preprocessing(assets, yolov5s):
    """The VDSP op the JSON describes gives the host pipeline's tensor: same geometry, and pixel values within
    mean |diff| 0.01 (mmyolo shrinks with 'area' interpolation, the VDSP with bilinear; fp16 output)."""
    sys.path.insert(0, str(EMULATION))
    try:
        from vaststreamx.vdsp import FusionOp
    finally:
        sys.path.remove(str(EMULATION))
    from integrations.deploy.pipeline import loop_preprocessing
    from integrations.models import load_model_config, yolov5
    from runtime.vacc import read_planar_rgb, vdsp_params

    cfg = load_model_config(assets.YOLOV5S_CONFIG)
    host = loop_preprocessing(cfg, yolov5s)
    device = FusionOp(vdsp_params(yolov5.device_preprocessing(cfg), 'BILINEAR_CV'))
    for path in sorted(DEMO_IMAGES.iterdir()):
        expected, got = host(path)[0], device(read_planar_rgb(path)[0]).astype(np.float32)
        assert got.shape == expected.shape
        assert np.abs(got - expected).mean() <= 0.01, path.name
        if path.name == 'zidane.jpg':  # 1280x720 -> exactly half: no interpolation difference at all
            assert np.abs(got - expected).max() <= 1e-3


def score_txt_folder(folder: Path, ann_file: Path) -> float:
    """The seeds' eval_map.py, step for step: parse `<name> <score> x1 y1 x2 y2`, image id int(stem), the class
    name to its category id, xyxy -> xywh as it converts, pycocotools; its bbox mAP."""
    import contextlib
    import io

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        truth = COCO(str(ann_file))
    by_name = {c['name']: c['id'] for c in truth.loadCats(truth.getCatIds())}
    results = []
    for path in sorted(folder.glob('*.txt')):
        for line in path.read_text().splitlines():
            parts = line.strip().split()
            box = np.asarray([float(v) for v in parts[-4:]])
            centre = np.r_[(box[:2] + box[2:]) / 2, box[2:] - box[:2]]  # xyxy2xywh, then x, y -= w/2, h/2
            centre[:2] -= centre[2:] / 2
            results.append({'image_id': int(path.stem), 'category_id': by_name[' '.join(parts[:-5])],
                            'bbox': centre.tolist(), 'score': float(parts[-5])})
    with contextlib.redirect_stdout(io.StringIO()):
        evaluation = COCOeval(truth, truth.loadRes(results), 'bbox')
        evaluation.params.imgIds = sorted(truth.getImgIds())
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    return float(evaluation.stats[0])


def test_vacc_in_a_worker_process_reproduces_onnx(vsx, assets, demo_subset_data, tmp_path):
    """The SDK in another process: every thread that touched the card called set_device first (0 returned), the
    stream's batch is runtime.batch_size and run_sync never gets more, the mAP is ONNX Runtime's."""
    onnx = run(compose_cfg(*demo_subset_data), tmp_path / 'onnx')
    vacc = run(compose_cfg('runtime=vacc', 'precision=fp16', 'runtime.batch_size=2', 'eval.batch_size=3',
                           *demo_subset_data), tmp_path / 'vacc')
    assert abs(vacc['device']['bbox_mAP'] - onnx['device']['bbox_mAP']) <= 0.02
    assert vacc['native'] == onnx['native'] and vacc['fidelity']['min_cosine'] > 0.99
    assert vacc['precision_details']['compiled'] == 'here'
    entries = vsx.entries
    assert entries and {e['pid'] for e in entries}.isdisjoint({os.getpid()})
    for thread in {e['thread'] for e in entries}:
        calls = [e['call'][0] for e in entries if e['thread'] == thread]
        assert calls[0] == 'set_device', calls[:3]
    assert ['Model', vacc['artifacts']['runtime'], 2] in vsx.calls('Model')
    assert ['add_operators', ['Operator', 'ModelOperator']] in vsx.calls()
    assert sorted(c[1] for c in vsx.calls('run_sync')) == [1, 2]  # one batch of 3 images, in runs of <= 2
    assert all(c[1] == 'RGB_PLANAR' for c in vsx.calls('create_image')) and len(vsx.calls('create_image')) == 3


def test_the_emulation_refuses_a_thread_without_set_device(monkeypatch):
    monkeypatch.syspath_prepend(str(EMULATION))
    import threading

    import vaststreamx as emulated

    errors = []
    thread = threading.Thread(target=lambda: errors.append(
        pytest.raises(RuntimeError, emulated.create_image, np.zeros((3, 2, 2), np.uint8), 'RGB_PLANAR', 2, 2, 0)))
    thread.start()
    thread.join()
    assert 'did not call vsx.set_device' in str(errors[0].value)
    assert emulated.set_device(0) == 0


def test_odd_sized_images_give_boxes_in_original_pixels_and_txt_scores_as_eval_map(vsx, assets, tmp_path):
    """An image with odd sides is resized to even before create_image (as VastAI's scripts do): the device sees
    exactly the pixels of that even image, and its boxes come back scaled to the odd original's pixels. The txt
    folders written for device and native score as VastAI's eval_map.py scores them: the reported mAPs."""
    import cv2

    images = tmp_path / 'images'
    images.mkdir()
    source = json.loads((ROOT / 'data' / 'demo' / 'annotations.json').read_text())
    bus = next(i for i in source['images'] if i['file_name'] == 'bus.jpg')
    odd = cv2.imread(str(DEMO_IMAGES / 'bus.jpg'))[:-1, :-3]  # 807 x 1079
    even = cv2.resize(odd, (806, 1078))  # what the runtime hands the SDK for it
    entries = []
    for number, image in ((1, odd), (2, even)):
        cv2.imwrite(str(images / f'{number:012d}.png'), image)
        entries.append({**bus, 'id': number, 'file_name': f'{number:012d}.png', 'width': image.shape[1],
                        'height': image.shape[0]})
    annotations = [{**a, 'image_id': number, 'id': number * 1000 + a['id']} for number in (1, 2)
                   for a in source['annotations'] if a['image_id'] == bus['id']]
    ann = tmp_path / 'odd.json'
    ann.write_text(json.dumps({**source, 'images': entries, 'annotations': annotations}))
    data = ['data=coco', f'data.img_dir={images}', f'data.ann_file={ann}', 'eval.save_txt=true']
    vacc = run(compose_cfg('runtime=vacc', 'precision=fp16', *data), tmp_path / 'vacc')
    assert [c[2:4] for c in vsx.calls('create_image')] == [[806, 1078], [806, 1078]]

    def numbers(path: Path) -> np.ndarray:  # score x1 y1 x2 y2 of each line (class names may hold spaces)
        return np.asarray([[float(v) for v in line.split()[-5:]] for line in path.read_text().splitlines()])

    folder = Path(vacc['artifacts']['txt']['device'])
    from_odd, from_even = numbers(folder / '000000000001.txt'), numbers(folder / '000000000002.txt')
    np.testing.assert_array_equal(from_odd[:, 0], from_even[:, 0])
    np.testing.assert_allclose(from_odd[:, 1:], from_even[:, 1:] * np.tile([807 / 806, 1079 / 1078], 2), atol=1e-3)

    onnx = run(compose_cfg(*data), tmp_path / 'onnx')
    for result in (onnx, vacc):
        for path, reported in (('device', result['device']), ('native', result['native'])):
            folder = Path(result['artifacts']['txt'][path])
            assert round(score_txt_folder(folder, ann), 3) == reported['bbox_mAP'], path
            beside = folder.with_name(f'{path}.pred.json')
            assert json.loads(beside.read_text()) and result['artifacts']['pred_json'][path] == str(beside)


def score_txt_folder_as_mlperf_eval_map(folder: Path, ann_file: Path) -> float:
    """VastModelZOO's MLPerf eval_map.py (cv/detection/retinanet/source_code/mlcommons/), step for step: the image
    found by `<txt stem>.jpg` among the ground truth's file_names, the category by its name, `x1 y1 x2 y2` turned
    into `x1 y1 w h`, pycocotools with its default parameters; its bbox mAP."""
    import contextlib
    import io

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        truth = COCO(str(ann_file))
    image_of = {image['file_name']: image['id'] for image in truth.dataset['images']}
    category_of = {category['name']: category['id'] for category in truth.dataset['categories']}
    results = []
    for path in sorted(folder.glob('*.txt')):
        image_id = image_of[path.name.replace('.txt', '.jpg')]
        for line in path.read_text().splitlines():
            parts = line.strip().split(' ')
            x1, y1, x2, y2 = (float(v) for v in parts[-4:])
            results.append({'image_id': image_id, 'category_id': category_of[' '.join(parts[:-5])],
                            'bbox': [x1, y1, x2 - x1, y2 - y1], 'score': float(parts[-5]), 'iscrowd': 0.0})
    with contextlib.redirect_stdout(io.StringIO()):
        evaluation = COCOeval(truth, truth.loadRes(results), 'bbox')
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    return float(evaluation.stats[0])


def test_openimages_txt_files_score_as_the_mlperf_eval_map_reads_them(assets, coco128, tmp_path):
    """RetinaNet on OpenImages-MLPerf-format data: the txt files name each image by its stem (the script adds .jpg)
    and each class by its OpenImages name; scored as VastModelZOO's MLPerf eval_map.py scores them they give the
    reported mAP. inloop's pred.json lies beside each folder, where the script's own pred.json cannot overwrite it."""
    from evaluators.openimages_mlperf import convert

    coco = json.loads((coco128 / 'instances.json').read_text())
    names = {c['id']: c['name'] for c in coco['categories']}
    images = [im for im in coco['images'] if any(a['image_id'] == im['id'] and names[a['category_id']] == 'bus'
                                                 for a in coco['annotations'])][:2]  # 'Bus' exists in both spaces
    kept = {image['id'] for image in images}
    ann = tmp_path / 'openimages-mlperf.json'
    ann.write_text(json.dumps(convert({**coco, 'images': images,
                                       'annotations': [a for a in coco['annotations'] if a['image_id'] in kept]})))
    result = run(compose_cfg('model=retinanet', 'data=openimages', f"data.img_dir={coco128 / 'images'}",
                             f'data.ann_file={ann}', 'eval.save_txt=true', 'eval.compare_native=false',
                             'eval.score_thr=0.0'), tmp_path / 'run')
    folder = Path(result['artifacts']['txt']['device'])
    assert sorted(p.suffix for p in folder.iterdir()) == ['.txt', '.txt']
    assert score_txt_folder_as_mlperf_eval_map(folder, ann) == pytest.approx(result['device']['bbox_mAP'], abs=1e-9)
    beside = Path(result['artifacts']['pred_json']['device'])
    assert beside == folder.with_name('device.pred.json') and json.loads(beside.read_text())


@pytest.mark.parametrize('kind', ['letterbox', 'resize'])
def test_device_geometry_maps_the_model_input_back_to_original_pixels(kind):
    """An image of 1079x807 (h, w) given to the VDSP op as 1078x806: the letterboxed (or resized) picture's corners
    in the 640x640 input land on the original image's corners."""
    from runtime.vacc import device_geometry

    original, given = (1079, 807), (1078, 806)
    meta = device_geometry({'kind': kind, 'height': 640, 'width': 640}, original, given)
    gain = min(640 / given[0], 640 / given[1])
    top, _, left, _ = meta.get('pad_param', [0, 0, 0, 0])
    corners = (np.array([[left, top], [left + given[1] * gain, top + given[0] * gain]]) if kind == 'letterbox'
               else np.array([[0, 0], [640, 640]]))
    back = (corners - [left, top]) / np.asarray(meta['scale_factor'])
    np.testing.assert_allclose(back, [[0, 0], [original[1], original[0]]], atol=1e-9)


def test_a_card_error_or_a_dead_worker_is_one_line_and_leaves_no_results(vsx, assets, demo_subset_data,
                                                                          tmp_path, monkeypatch):
    from runtime.cache import ArtifactCache

    for failure, message in (('card_error@2', 'the card reported RuntimeError: emulated card error'),
                             ('crash@2', r'the device worker stopped \(exit 3\).*injected crash')):
        monkeypatch.setenv('VSX_EMULATION_FAIL', failure)
        with pytest.raises(UserError, match=message):
            run(compose_cfg('runtime=vacc', 'precision=fp16', *demo_subset_data), tmp_path / failure)
        assert not (tmp_path / failure / 'results.json').exists()
    assert all(row['valid'] for row in ArtifactCache(os.environ['INLOOP_CACHE_DIR']).entries())


def test_the_workers_stderr_reaches_the_log_with_a_prefix(vsx, assets, demo_subset_data, tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / 'run.py'), 'runtime=vacc', 'precision=fp16',
                           *demo_subset_data, 'eval.compare_native=false', f'hydra.run.dir={tmp_path}'],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert '[vacc] vaststreamx (emulated): model ' in proc.stderr


def test_seeds_decode_option_equals_their_detector_mmyolo_decode(yolov5s, make_batch, coco128):
    """eval.multi_label=false eval.score_thr=0.01 is VastModelZOO's detector_mmyolo.py decode: objectness > 0.001,
    conf = obj * cls, best class only, per-class NMS 0.65 (class offsets), 300 kept, then their 0.01 txt filter."""
    import torch
    from torchvision.ops import nms

    from integrations.models.yolov5 import build_decoder, cut_head

    def seeds_decode(maps, meta):
        strides, anchors = (8, 16, 32), torch.tensor([[10, 13, 16, 30, 33, 23], [30, 61, 62, 45, 59, 119],
                                                      [116, 90, 156, 198, 373, 326]], dtype=torch.float32)
        rows = []
        for level, m in enumerate(maps):
            _, _, ny, nx = m.shape
            y = m.view(1, 3, 85, ny, nx).permute(0, 1, 3, 4, 2).sigmoid()
            gy, gx = torch.meshgrid(torch.arange(ny), torch.arange(nx), indexing='ij')
            grid = torch.stack((gx, gy), 2).view(1, 1, ny, nx, 2).float()
            xy = (y[..., :2] * 2 - 0.5 + grid) * strides[level]
            wh = (y[..., 2:4] * 2) ** 2 * anchors[level].view(1, 3, 1, 1, 2)
            rows.append(torch.cat([xy, wh, y[..., 4:]], -1).view(-1, 85))
        x = torch.cat(rows)
        x = x[x[:, 4] > 0.001]
        x[:, 5:] *= x[:, 4:5]
        box = torch.cat([x[:, :2] - x[:, 2:4] / 2, x[:, :2] + x[:, 2:4] / 2], 1)
        conf, label = x[:, 5:].max(1)
        keep = conf > 0.001
        box, conf, label = box[keep], conf[keep], label[keep]
        box, conf, label = box[conf.argsort(descending=True)[:30000]], conf.sort(descending=True)[0][:30000], \
            label[conf.argsort(descending=True)[:30000]]
        kept = nms(box + label[:, None].float() * 4096, conf, 0.65)[:300]
        box, conf, label = box[kept], conf[kept], label[kept]
        top, _, left, _ = meta['pad_param']
        box = (box - torch.tensor([left, top, left, top])) / torch.tensor(meta['scale_factor']).repeat(2)
        h, w = meta['ori_shape']
        box[:, 0::2] = box[:, 0::2].clamp(0, w)
        box[:, 1::2] = box[:, 1::2].clamp(0, h)
        strong = conf >= 0.01
        return box[strong], conf[strong], label[strong]

    head = yolov5s.bbox_head
    saved = head.test_cfg
    head.test_cfg = type(saved)({**saved.to_dict(), 'multi_label': False, 'score_thr': 0.01})
    try:
        decoder = build_decoder(yolov5s, (3, 640, 640))
    finally:
        head.test_cfg = saved
    compared = 0
    for path in sorted(coco128.glob('images/*.jpg'))[:6]:
        batch = make_batch([path])
        meta = batch['data_samples'][0].metainfo
        with torch.no_grad(), cut_head(yolov5s):
            maps = list(yolov5s._forward(batch['inputs']))
        ours = decoder(maps, [meta])[0]
        box, conf, label = seeds_decode(maps, meta)
        strong = ours['scores'] >= 0.05
        for b, s, c in zip(ours['bboxes'][strong], ours['scores'][strong], ours['labels'][strong]):
            match = (label == c) & ((box - b).abs().max(1).values <= 0.5)
            assert match.any() and (conf[match] - s).abs().min() <= 1e-5
            compared += 1
    assert compared > 50


def test_npz_path_reads_vamps_output_naming_and_refuses_other_outputs(vsx, assets, demo_subset_data, tmp_path):
    """task=npz's datalist relative to a base; outputs named output_%06d.npz by datalist line (vamp's naming)
    give runtime=vacc's mAP; outputs of another model (e.g. compiled with yolov5_nms) are one line."""
    vacc = run(compose_cfg('runtime=vacc', 'precision=fp16', *demo_subset_data), tmp_path / 'vacc')
    npz = run(compose_cfg('task=npz', *demo_subset_data, f'npz.relative_to={tmp_path}'), tmp_path / 'npz')
    lines = Path(npz['datalist']).read_text().split()
    assert all(not Path(line).is_absolute() and (tmp_path / line).is_file() for line in lines)
    sys.path.insert(0, str(EMULATION))  # "vamp": the emulated stream over the npz inputs, in this process
    try:
        import vaststreamx as emulated
    finally:
        sys.path.remove(str(EMULATION))
    assert emulated.set_device(0) == 0
    model = emulated.Model(vacc['artifacts']['runtime'], 1)
    graph = emulated.Graph()
    graph.add_operators(emulated.Operator.load_ops_from_json_file(vacc['artifacts']['vdsp_params'])[0],
                        emulated.ModelOperator(model))
    stream = emulated.Stream(graph, emulated.StreamBalanceMode.ONCE)
    stream.register_operator_output(graph.operators[1])
    stream.build()
    outputs = tmp_path / 'vamp_out'
    outputs.mkdir()
    for i, line in enumerate(lines):
        planar = np.load(tmp_path / line)['input_0']
        if planar.shape[1] % 2 or planar.shape[2] % 2:
            planar = planar[:, :planar.shape[1] // 2 * 2, :planar.shape[2] // 2 * 2]
        image = emulated.create_image(planar, 'RGB_PLANAR', planar.shape[2], planar.shape[1], 0)
        maps = stream.run_sync([image])[0]
        np.savez(outputs / f'output_{i:06d}.npz', **{f'output_{k}': m for k, m in enumerate(maps)})
    data = [f'runtime.output_dir={outputs}', f"runtime.datalist={npz['datalist']}", 'precision=fp16',
            *demo_subset_data]
    replayed = run(compose_cfg('runtime=npz', *data), tmp_path / 'replayed')
    assert abs(replayed['device']['bbox_mAP'] - vacc['device']['bbox_mAP']) <= 0.01
    for i in range(len(lines)):  # what a model compiled with extra_ops: yolov5_nms writes instead
        np.savez(outputs / f'output_{i:06d}.npz', output_0=np.zeros((1, 300, 1), np.float16),
                 output_1=np.zeros((1, 300, 1), np.float16), output_2=np.zeros((1, 300, 4), np.float16))
    with pytest.raises(UserError, match=r'output_000000.npz holds float16\[1, 300, 1\].*extra_ops'):
        run(compose_cfg('runtime=npz', *data), tmp_path / 'nms')
    shapes = vacc['io']['outputs']
    for i in range(len(lines)):  # the right sizes in an integer dtype
        np.savez(outputs / f'output_{i:06d}.npz',
                 **{f'output_{k}': np.zeros(o['shape'], np.int32) for k, o in enumerate(shapes)})
    with pytest.raises(UserError, match=r'output_000000.npz holds int32'):
        run(compose_cfg('runtime=npz', *data), tmp_path / 'int')
    (outputs / f'output_{len(lines) - 1:06d}.npz').unlink()  # vamp stopped early
    with pytest.raises(UserError, match=f'{len(lines) - 1} npz files for {len(lines)} datalist lines'):
        run(compose_cfg('runtime=npz', *data), tmp_path / 'short')


def test_model_prefix_skips_compiling_and_ranks_use_their_own_device(vsx, assets, demo_subset_data,
                                                                      tmp_path, monkeypatch):
    first = run(compose_cfg('runtime=vacc', 'precision=fp16', *demo_subset_data), tmp_path / 'a')
    monkeypatch.setenv('LOCAL_RANK', '1')  # as torchrun / Lightning DDP set it for the second process
    given = run(compose_cfg('runtime=vacc', 'precision=fp16', f"runtime.model_prefix={first['artifacts']['runtime']}",
                            'runtime.compiler=no-such-vamc', 'runtime.device_id=2', *demo_subset_data),
                tmp_path / 'b')
    assert given['precision_details']['compiled'] == 'given' and given['device'] == first['device']
    assert [3] in [c[1:] for c in vsx.calls('set_device')]
    with pytest.raises(UserError, match='runtime.model_prefix'):
        run(compose_cfg('runtime=vacc', 'precision=fp16', f'runtime.model_prefix={tmp_path}/nothing/mod'),
            tmp_path / 'c')


def test_bench_runs_the_worker_on_image_files_and_measures_its_transfer(vsx, assets, demo_subset_data, tmp_path):
    result = run(compose_cfg('task=bench', 'runtime=vacc', 'precision=fp16', *demo_subset_data,
                             'bench.batch_sizes=[1,2]', 'bench.instances=[1]', 'bench.warmup=1',
                             'bench.iterations=2'), tmp_path)
    assert [(b['batch_size'], b['samples']) for b in result['settings']] == [(1, 2), (2, 4)]
    assert all(0 < b['worker_transfer_ms_per_image'] < 1000 for b in result['settings'])
    assert result['evaluation']['images_per_s'] > 0 and (tmp_path / 'bench.json').is_file()
    assert max(c[1] for c in vsx.calls('run_sync')) == 1  # batch 2 requests, in run_sync calls of the stream's 1


def test_mlperf_loadgen_drives_the_card(vsx, assets, demo_subset_data, tmp_path):
    """task=mlperf runtime=vacc: LoadGen's samples go to the device worker (it reads the image files), and the
    accuracy log scores as runtime=vacc's evaluation does."""
    evaluated = run(compose_cfg('runtime=vacc', 'precision=fp16', 'eval.compare_native=false', *demo_subset_data),
                    tmp_path / 'eval')
    mlperf = run(compose_cfg('task=mlperf', 'mlperf.mode=accuracy', 'runtime=vacc', 'precision=fp16',
                             'eval.compare_native=false', *demo_subset_data), tmp_path / 'mlperf')
    assert mlperf['mlperf']['accuracy']['bbox_mAP'] == pytest.approx(evaluated['device']['bbox_mAP'], abs=2e-3)
    assert len(vsx.calls('run_sync')) >= 3


def test_explain_on_the_card_separates_its_preprocessing_from_its_numerics(vsx, assets, demo_subset_data, tmp_path):
    """eval.explain with runtime=vacc: a stage for the card's VDSP op alone (run by itself in a second worker, its
    output read back for ONNX Runtime fp32 on the host), then the device; the breakdown ends at the reported
    device mAP, and the numerics stage is said to be merged."""
    result = run(compose_cfg('runtime=vacc', 'precision=fp16', *demo_subset_data, 'eval.explain=true',
                             'explain.resamples=50', 'explain.images=1'), tmp_path / 'vacc')
    stages = {e['stage']: e for e in result['breakdown']}
    assert list(stages) == ['native_config', 'export_shape', 'device_preprocessing', 'device']
    assert round(stages['device']['bbox_mAP'], 3) == result['device']['bbox_mAP']
    # the emulated card differs from its own preprocessing only by its float16 raw maps
    assert abs(stages['device']['delta']) <= 0.005
    skipped = {s['stage']: s['why'] for s in result['explain']['skipped']}
    assert 'runtime=vacc' in skipped['numerics']
    executed = vsx.calls('execute')
    # the op's fp16 tensor asked for in the card's tiled layout, [1, W/8, H/8, ceil(3/4), 256]
    assert len(executed) == result['num_images'] and all(c[2] == [[[1, 80, 80, 1, 256], 'FLOAT16']] for c in executed)
    # its output size set once, then each image's own size before it runs (the emulated op refuses another size)
    attributes = [dict(c[1]) for c in vsx.calls('set_attribute')]
    assert attributes[0] == {'OimageHeight': 640, 'OimageWidth': 640}
    sizes = [a for a in attributes if 'IimageWidth' in a]
    assert len(sizes) == len(executed) and all(s['IimageWidth'] % 2 == 0 for s in sizes)
    assert Path(result['artifacts']['report']).is_file()


def reference_tiling(tensor: np.ndarray) -> np.ndarray:
    """(C, H, W) in the card's fp16 activation layout, written element by element from VastStreamX-Samples'
    common/utils.py (get_activation_aligned): element (c, y, x) lands at [x // 8][y // 8][c // 4] of a
    (W/8, H/8, C/4) grid of 256-blocks, at (c % 4) * 64 + (y % 8) * 8 + x % 8 inside its block; the rest is 0."""
    channels, height, width = tensor.shape
    wb, hb, cb = -(-width // 8), -(-height // 8), -(-channels // 4)
    flat = np.zeros(wb * hb * cb * 256, tensor.dtype)
    for c in range(channels):
        for y in range(height):
            for x in range(width):
                flat[(((x // 8) * hb + y // 8) * cb + c // 4) * 256 + (c % 4) * 64 + (y % 8) * 8 + x % 8] = \
                    tensor[c, y, x]
    return flat.reshape(1, wb, hb, cb, 256)


def test_the_cards_tiled_layout_is_untiled_and_emulated_as_the_samples_define_it(monkeypatch):
    """The host's un-tiling and the emulated op's tiling both agree with an element-by-element reading of the
    samples' layout, on a non-square size that is no multiple of the 8x8 tile."""
    monkeypatch.syspath_prepend(str(EMULATION))
    from vaststreamx import _tiled

    from runtime.vacc import tiled_shape, untile

    tensor = np.random.default_rng(0).standard_normal((3, 13, 21)).astype(np.float16)
    reference = reference_tiling(tensor)
    assert list(reference.shape) == tiled_shape(3, 13, 21) == [1, 3, 2, 1, 256]
    np.testing.assert_array_equal(_tiled(tensor), reference)
    np.testing.assert_array_equal(untile(reference[None], 3, 13, 21)[0], tensor)


def test_the_emulated_fusion_op_alone_is_no_more_forgiving_than_the_sample(monkeypatch):
    """Run by itself, the op takes its input size and its output size from its attributes and writes the tiled
    layout: another image size, an unset output size and the plain (3, H, W) request are refused."""
    monkeypatch.syspath_prepend(str(EMULATION))
    import vaststreamx as vsx

    from runtime.vacc import tiled_shape, untile, vdsp_params

    vsx.set_device(0)
    spec = vdsp_params({'kind': 'letterbox', 'height': 64, 'width': 64, 'mean': [0] * 3, 'std': [255] * 3},
                       'BILINEAR_CV')
    op = vsx.Operator(spec).cast_to_buildin_operator()
    image = vsx.create_image(np.zeros((3, 32, 48), np.uint8), vsx.ImageFormat.RGB_PLANAR, 48, 32, 0)
    tiled = [(tiled_shape(3, 64, 64), vsx.TypeFlag.FLOAT16)]
    with pytest.raises(RuntimeError, match='48x32 image'):
        op.execute(tensors=[image], output_info=tiled)
    op.set_attribute({vsx.AttrKey.IIMAGE_WIDTH: 48, vsx.AttrKey.IIMAGE_HEIGHT: 32})
    with pytest.raises(RuntimeError, match='output size is not set'):
        op.execute(tensors=[image], output_info=tiled)
    op.set_attribute({vsx.AttrKey.OIMAGE_WIDTH: 64, vsx.AttrKey.OIMAGE_HEIGHT: 64})
    with pytest.raises(RuntimeError, match=r'output_info \[3, 64, 64\] FLOAT16, the op writes \[1, 8, 8, 1, 256\]'):
        op.execute(tensors=[image], output_info=[([3, 64, 64], vsx.TypeFlag.FLOAT16)])
    (out,) = op.execute(tensors=[image], output_info=tiled)
    assert out.dtype == np.float16
    plane = untile(out[None], 3, 64, 64)[0]  # the black 48x32 image letterboxed to 64x42, rows 11-52, grey around
    assert plane.shape == (3, 64, 64) and np.all(plane[:, 11:53] == 0)
    assert np.allclose(plane[:, :11], 114 / 255, atol=1e-3) and np.allclose(plane[:, 53:], 114 / 255, atol=1e-3)


def test_max_drop_on_the_card_searches_on_onnx_and_writes_the_choice_beside_vamc_yaml(vsx, assets, coco128,
                                                                                     demo_subset_data, tmp_path):
    """precision.max_drop under runtime=vacc: the search runs on ONNX Runtime's int8 build (a proxy), its choice
    goes to float_layers.json beside vamc.yaml with each conv's index among the export's Conv nodes, and vamc.yaml
    itself is the one without a search (nothing applied)."""
    import onnx

    selection = coco128_subset(coco128, 48, 50, tmp_path / 'selection.json')
    int8 = ['runtime=vacc', 'precision=int8', 'precision.calibration.num_images=1', 'eval.num_images=1',
            'eval.compare_native=false', 'cache.enabled=false', *demo_subset_data]
    plain = run(compose_cfg(*int8), tmp_path / 'plain')
    searched = run(compose_cfg(*int8, 'precision.max_drop=0.1', f'precision.selection.img_dir={coco128 / "images"}',
                               f'precision.selection.ann_file={selection}'), tmp_path / 'searched')
    build = Path(searched['artifacts']['vamc_yaml']).parent
    written = json.loads((build / 'float_layers.json').read_text())
    assert written['applied'] is False and searched['precision_details']['float_layers_applied'] is False
    assert written['search']['steps'][0]['float_layers'] == 0
    assert written['search'] == searched['precision_details']['search']
    convs = [n.name for n in onnx.load(str(build / 'model.onnx')).graph.node if n.op_type == 'Conv']
    layers = written['float_layers']
    assert layers == searched['precision_details']['float_layers']
    for layer in layers:
        assert (layer['node'] in convs) == (layer['conv_index'] is not None)
        assert layer['conv_index'] is None or convs[layer['conv_index']] == layer['node']
    assert written['conv_indices'] == [layer['conv_index'] for layer in layers if layer['node'] in convs]
    assert written['conv_indices'] or not written['search']['float_modules']
    assert yaml.safe_load((build / 'vamc.yaml').read_text()) == \
        yaml.safe_load(Path(plain['artifacts']['vamc_yaml']).read_text())
    assert not (build / 'onnx_int8_proxy').exists()


CHECK = ['task=check', 'runtime=vacc', 'precision=int8', 'precision.calibration.num_images=2']
CHECK_STEPS = ['sdk', 'set_device', 'vamc', 'compile_fp16', 'compile_int8', 'vdsp_op', 'raw_maps_fp16',
               'raw_maps_int8', 'batch_4', 'odd_size', 'mixed_sizes', 'skip_conv_layers', 'throughput']


def test_check_runs_every_step_and_passes_under_the_emulation(vsx, assets, demo_subset_data, tmp_path, capsys):
    """task=check on the emulated card: every step runs and passes; the table and check.json say so; the op's
    tensor is asked for tiled and its output size set; the numbering check builds one model per raw map."""
    result = run(compose_cfg(*CHECK, *demo_subset_data), tmp_path / 'check')
    assert [(s['name'], s['result']) for s in result['steps']] == [(name, 'PASS') for name in CHECK_STEPS]
    assert json.loads((tmp_path / 'check' / 'check.json').read_text()) == json.loads(json.dumps(result))
    printed = capsys.readouterr().out
    assert all(f'{name:<18}PASS' in printed for name in CHECK_STEPS) and '13 PASS' in printed
    steps = {s['name']: s for s in result['steps']}
    assert steps['skip_conv_layers']['figures']['conv_indices'] == [46, 53, 59]  # YOLOv5s's three head convs
    skip_yamls = sorted((tmp_path / 'check' / 'check').glob('int8_skip_*/vamc.yaml'))
    assert len(skip_yamls) == 4 and all('skip_conv_layers' in yaml.safe_load(p.read_text())['backend']['quantize']
                                        for p in skip_yamls)
    assert all(c[2] == [[[1, 80, 80, 1, 256], 'FLOAT16']] for c in vsx.calls('execute'))
    assert set(steps['vdsp_op']['figures']['by_kind']) == {'BILINEAR_CV', 'BILINEAR', 'BILINEAR_PILLOW', 'NEAREST',
                                                           'BICUBIC_PILLOW'}
    assert (tmp_path / 'check' / 'check' / 'throughput.txt').read_text().startswith('- number of instances: 1')


@pytest.mark.parametrize('misbehaviour, reported', [
    ('layout', {'vdsp_op': 'DIFF'}),                           # the op's tiles in another order
    ('tile16', {'vdsp_op': 'FAIL'}),                           # another tile size: its output is not the shape asked
    ('batch', {'batch_4': 'DIFF', 'mixed_sizes': 'DIFF'}),     # one run_sync of several images mixes them up
    ('skip_numbering', {'skip_conv_layers': 'DIFF'}),          # vamc counts its conv layers from 1
])
def test_check_reports_each_way_a_card_can_differ(misbehaviour, reported, vsx, monkeypatch, assets,
                                                   demo_subset_data, tmp_path):
    monkeypatch.setenv('VSX_EMULATION_MISBEHAVE', misbehaviour)
    result = run(compose_cfg(*CHECK, *demo_subset_data), tmp_path / 'check')
    steps = {s['name']: s for s in result['steps']}
    assert {name: steps[name]['result'] for name in reported} == reported
    assert all(steps[name]['note'] for name in reported)  # why, in words
    assert steps['sdk']['result'] == steps['compile_int8']['result'] == 'PASS'


def test_check_without_the_sdk_reports_it_and_skips_what_needs_the_card(vamc, monkeypatch, demo_subset_data,
                                                                        tmp_path):
    monkeypatch.setenv('PATH', f"{vamc.parent}{os.pathsep}{os.environ['PATH']}")
    result = run(compose_cfg(*CHECK, *demo_subset_data), tmp_path / 'check')
    steps = {s['name']: s for s in result['steps']}
    assert steps['sdk']['result'] == 'FAIL' and 'vaststreamx' in steps['sdk']['note']
    assert steps['set_device']['result'] == 'SKIP' and steps['vdsp_op']['note'].startswith('needs')
    assert steps['vamc']['result'] == 'PASS'


def test_check_is_for_the_card():
    with pytest.raises(UserError, match='task=check checks a VastAI card and its software: add runtime=vacc'):
        check_inputs(compose_cfg('task=check'))
