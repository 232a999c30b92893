"""model=mm: any single-stage mmdet/mmyolo detector, cut at its dense head and decoded by that head's own
predict_by_feat, from the configs mmyolo 0.6.0 and mmdet 3.0.0 ship (random weights: none can be fetched here)."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from common.errors import UserError
from evaluators.device import NativeTaps
from integrations.app.main import run
from integrations.config import ROOT
from tests.conftest import compose_cfg
from tests.parity import differences, lively

CONFIGS = {
    'yolov5_s': 'mmyolo::yolov5/yolov5_s-v61_syncbn_fast_8xb16-300e_coco.py',
    'yolov6_s': 'mmyolo::yolov6/yolov6_s_syncbn_fast_8xb32-400e_coco.py',
    'yolov7_tiny': 'mmyolo::yolov7/yolov7_tiny_syncbn_fast_8x16b-300e_coco.py',
    'yolov8_s': 'mmyolo::yolov8/yolov8_s_syncbn_fast_8xb16-500e_coco.py',
    'yolox_s': 'mmyolo::yolox/yolox_s_fast_8xb8-300e_coco.py',
    'rtmdet_tiny': 'mmyolo::rtmdet/rtmdet_tiny_syncbn_fast_8xb32-300e_coco.py',
    'rtmdet_s': 'mmyolo::rtmdet/rtmdet_s_syncbn_fast_8xb32-300e_coco.py',
    'ppyoloe_plus_s': 'mmyolo::ppyoloe/ppyoloe_plus_s_fast_8xb8-80e_coco.py',
    'retinanet_r50': 'mmdet::retinanet/retinanet_r50_fpn_1x_coco.py',
    'fcos_r50': 'mmdet::fcos/fcos_r50-caffe_fpn_gn-head_1x_coco.py',
    'atss_r50': 'mmdet::atss/atss_r50_fpn_1x_coco.py',
    'yolov3_d53': 'mmdet::yolo/yolov3_d53_8xb8-320-273e_coco.py',
    'yolof_r50': 'mmdet::yolof/yolof_r50-c5_8xb8-1x_coco.py',
    'centernet_r18': 'mmdet::centernet/centernet_r18_8xb16-crop512-140e_coco.py',
}
# YOLOv8's untrained distance head makes every box span most of the image, so neighbouring boxes of nearly equal
# score overlap around the NMS threshold: a 1e-7 difference between PyTorch and ONNX Runtime flips a few of those
# (seen: up to 11 of 600 detections). Its decode is still exact on the same maps (below).
FLIPS_ALLOWED = {'yolov8_s': 0.05}


@pytest.fixture(scope='module')
def textured_images(coco128, tmp_path_factory) -> list[str]:
    """Three 640x480 coco128 images with ±3 grey levels of seeded noise: flat areas would make an untrained
    model score many priors exactly alike, and the order of equal scores is no export's property. At a
    512x384 input they need no padding."""
    import cv2

    coco = json.loads((coco128 / 'instances.json').read_text())
    images = [im for im in coco['images'] if (im['width'], im['height']) == (640, 480)][:3]
    folder = tmp_path_factory.mktemp('textured')
    generator = np.random.default_rng(0)
    for image in images:
        pixels = cv2.imread(str(coco128 / 'images' / image['file_name'])).astype(np.int16)
        pixels = np.clip(pixels + generator.integers(-3, 4, pixels.shape), 0, 255).astype(np.uint8)
        image['file_name'] = Path(image['file_name']).with_suffix('.png').name
        cv2.imwrite(str(folder / image['file_name']), pixels)
    kept = {image['id'] for image in images}
    ann = folder / 'instances.json'
    ann.write_text(json.dumps({**coco, 'images': images,
                               'annotations': [a for a in coco['annotations'] if a['image_id'] in kept]}))
    return ['data=coco', f'data.img_dir={folder}', f'data.ann_file={ann}']


def as_dict(instances) -> dict:
    return {'bboxes': instances.bboxes, 'scores': instances.scores, 'labels': instances.labels}


@pytest.mark.parametrize('size', [None, [384, 512]])
@pytest.mark.parametrize('name', CONFIGS)
def test_the_prepared_pipeline_gives_every_image_the_export_shape(name, size, tmp_path):
    """Portrait, landscape and square images all come out of the prepared test pipeline at the input shape the
    export is built for: a static graph takes no other."""
    import cv2
    from mmengine.dataset import Compose
    from mmengine.registry import DefaultScope

    import evaluators.mm.preprocess  # noqa: F401  registers the ZeroBorder step
    from integrations.models import get_family, load_model_config

    mm_cfg, family = load_model_config(CONFIGS[name]), get_family('mm')
    overrides = [f'model.input_size=[{size[0]},{size[1]}]'] if size else []
    family.prepare_config(mm_cfg, {}, compose_cfg('model=mm', f'model.config={CONFIGS[name]}', *overrides).model)
    shape = family.input_shape(mm_cfg)
    steps = [s for s in mm_cfg.test_dataloader.dataset.pipeline if 'LoadAnnotations' not in s['type']]
    with DefaultScope.overwrite_default_scope(mm_cfg.default_scope):
        pipeline = Compose(steps)
        for height, width in ((300, 700), (700, 300), (500, 500)):
            path = tmp_path / f'{height}x{width}.png'
            cv2.imwrite(str(path), np.full((height, width, 3), 90, np.uint8))
            packed = pipeline({'img_path': str(path), 'img_id': 0, 'ori_shape': (height, width)})
            assert tuple(packed['inputs'].shape) == shape, (height, width)
    if size:
        assert shape == (3, *size)


@pytest.mark.parametrize('name', CONFIGS)
def test_export_decodes_to_the_native_detections_and_int8_builds(name, textured_images, tmp_path):
    """The export stops at the head's outputs; ONNX Runtime fp32's raw maps are the native ones within the export
    tolerance; the head's own decode of the native maps is the native prediction exactly; ONNX Runtime's
    detections are the native model's box for box (labels, scores and boxes within 1e-4; ties aside); an int8
    build (calibrated, raw-map convs kept in float) runs."""
    from integrations.engines import open_engine
    from integrations.engines.plan import make_plan
    from integrations.models import mm

    cfg = compose_cfg('model=mm', f'model.config={CONFIGS[name]}', 'model.input_size=[384,512]', 'precision=int8',
                      'precision.calibration.num_images=2', 'eval.reference=fp32', *textured_images,
                      'eval.compare_native=false', 'eval.score_thr=0.05')
    engine = open_engine(make_plan(cfg, tmp_path, tmp_path / 'export'))
    lively(engine.model, [engine.sample(i)[0] for i in range(3)])
    report = engine.prepare()
    assert Path(report['artifacts']['runtime']).name == 'model_int8.onnx'
    kinds = {o['name'].rsplit('_', 1)[0] for o in report['io']['outputs']}
    assert kinds <= {'cls_scores', 'bbox_preds', 'objectnesses', 'score_factors', 'pred_maps',
                     'center_heatmap_preds', 'wh_preds', 'offset_preds'}, kinds
    assert report['precision']['excluded_nodes']  # precision.raw_map_convs=float found the head's final convs
    fp32, int8 = (engine.evaluator.paths[p].inference for p in ('reference', 'device'))
    taps = NativeTaps(mm.tap_modules(engine.model))
    compared = flips = 0
    for index in range(3):
        inputs, meta = engine.sample(index)
        native = as_dict(engine.native_predictions(index).pred_instances)
        native_maps = taps.take()
        device_maps = fp32.session.run(inputs.numpy())
        for ours, theirs in zip(native_maps, device_maps):
            assert np.all(np.abs(theirs - ours) <= 1e-3 + 1e-3 * np.abs(ours))
        assert differences(native, fp32.decoder([torch.from_numpy(m) for m in native_maps], [meta])[0], 1e-6) == 0
        device = fp32.submit(inputs, [meta]).result()[0]
        assert len(device['scores']) == len(native['scores'])
        flips += differences(native, device)
        compared += len(native['scores'])
        assert all(torch.isfinite(v).all() for v in int8.submit(inputs, [meta]).result()[0].values())
    taps.close()
    assert compared > 0 and flips <= FLIPS_ALLOWED.get(name, 0) * compared, (flips, compared)


def test_yolov5s_fast_decoder_equals_its_heads_predict_by_feat(textured_images, tmp_path):
    """YOLOv5Head's registered decoder (the vectorized one) and the head's own predict_by_feat, on the same raw
    maps of the generic export."""
    from integrations.engines import open_engine
    from integrations.engines.plan import make_plan
    from integrations.models import mm

    cfg = compose_cfg('model=mm', f"model.config={CONFIGS['yolov5_s']}", 'model.input_size=[384,512]',
                      *textured_images, 'eval.compare_native=false')
    engine = open_engine(make_plan(cfg, tmp_path, tmp_path / 'export'))
    lively(engine.model, [engine.sample(i)[0] for i in range(3)])
    engine.prepare()
    inference = engine.evaluator.paths['device'].inference
    assert isinstance(inference.decoder, mm.YOLOv5SplitDecoder)
    generic = mm.build_decoder(engine.model, (3, 384, 512), fast=False)
    for index in range(3):
        inputs, meta = engine.sample(index)
        maps = [torch.from_numpy(m) for m in inference.session.run(inputs.numpy())]
        fast, own = inference.decoder(maps, [meta])[0], generic(maps, [meta])[0]
        assert len(fast['scores']) > 0 and differences(own, fast, 1e-5) == 0


def test_the_generic_path_gives_yolov5s_family_detections_on_real_weights(assets, coco128, tmp_path):
    """model=mm on mmyolo's YOLOv5s config with the real COCO weights: the same detections, file for file, and
    the same mAP on coco128 as model=yolov5."""
    data = ['data=coco', f"data.img_dir={coco128 / 'images'}", f"data.ann_file={coco128 / 'instances.json'}",
            'eval.save_txt=true', 'eval.compare_native=false']
    family = run(compose_cfg(*data), tmp_path / 'family')
    generic = run(compose_cfg('model=mm', f"model.config={CONFIGS['yolov5_s']}",
                              f'model.checkpoint={assets.CHECKPOINT}', *data), tmp_path / 'generic')
    assert generic['device'] == family['device'] and round(generic['device']['bbox_mAP'], 3) == 0.461
    texts = [sorted(Path(r['artifacts']['txt']['device']).glob('*.txt')) for r in (family, generic)]
    assert len(texts[0]) == 96 and [p.name for p in texts[0]] == [p.name for p in texts[1]]
    lines = [[line.split() for p in files for line in p.read_text().splitlines()] for files in texts]
    assert len(lines[0]) == len(lines[1])
    for a, b in zip(*lines):
        assert a[:-5] == b[:-5] and np.allclose([float(v) for v in a[-5:]], [float(v) for v in b[-5:]], atol=1e-3)


@pytest.mark.parametrize('config, why', [
    ('mmdet::faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py', 'a two-stage detector'),
    ('mmdet::detr/detr_r50_8xb2-150e_coco.py', 'a DETR-style detector'),
    ('mmyolo::rtmdet/rtmdet-ins_s_syncbn_fast_8xb32-300e_coco.py', 'an instance-segmentation model'),
])
def test_heads_without_a_dense_host_decode_are_one_line(config, why, tmp_path):
    with pytest.raises(UserError, match=f'model.config={config}: {why}.*model=mm takes single-stage detectors'):
        run(compose_cfg('model=mm', f'model.config={config}'), tmp_path)
    assert not (tmp_path / 'export').exists()


def vacc_files(config: str, size: list[int]) -> tuple[dict, dict]:
    """The VDSP JSON and the vamc YAML runtime=vacc writes for an mm config at an input size."""
    from integrations.config import plain
    from integrations.models import get_family, load_model_config
    from runtime.vacc import Runtime, process_ops, vdsp_params

    mm_cfg, family = load_model_config(config), get_family('mm')
    family.prepare_config(mm_cfg, {}, compose_cfg('model=mm', f'model.config={config}',
                                                  f'model.input_size=[{size[0]},{size[1]}]').model)
    preprocessing = family.device_preprocessing(mm_cfg)
    int8 = plain(compose_cfg('precision=int8').precision)
    runtime = Runtime(int8, compile=False)
    yaml = runtime.build_config('model.onnx', family.input_shape(mm_cfg), preprocessing, './calibration_images')
    assert yaml['dataset']['process_ops'] == process_ops(preprocessing)
    return vdsp_params(preprocessing, preprocessing['resize_type']), yaml


def test_vacc_files_of_yolox_s_have_vastmodelzoos_values():
    """VastModelZOO cv/detection/yolox/build_in/vdsp_params/mmyolo-yolox_s-vdsp_params.json: letterbox op, 640,
    NormaType EQUAL (raw pixels), ColorCvtCode BGR2RGB (the channels swapped: the model takes BGR; inloop writes
    RGB2BGR, the same swap), BILINEAR_CV; build/mmyolo_yolox.yaml: compile data_transport_mode 1, cluster_mode 0,
    process_ops Resize [640, -1] long side, Pad to square, Normalize div255 false, norm_type null."""
    vdsp, yaml = vacc_files(CONFIGS['yolox_s'], [640, 640])
    config = vdsp['OpConfig']
    assert vdsp['OpType'] == 'FUSION_OP_RGB_LETTERBOX_CVTCOLOR_NORM_TENSOR'
    assert (config['OimageWidth'], config['OimageHeight']) == (640, 640)
    assert config['NormaType'] == 'EQUAL' and config['ResizeType'] == 'BILINEAR_CV'
    assert config['ColorCvtCode'] in ('RGB2BGR', 'BGR2RGB')
    assert yaml['backend']['compile'] == {'data_transport_mode': 1, 'cluster_mode': 0}
    ops = {op['type']: op for op in yaml['dataset']['process_ops']}
    assert ops['Resize'] == {'type': 'Resize', 'size': [640, -1], 'adaptive_side': 'long'}
    assert ops['Pad'] == {'type': 'Pad', 'pad_to_square': True}
    assert ops['Normalize'] == {'type': 'Normalize', 'div255': False, 'norm_type': None}


def test_vacc_files_of_mmdet_retinanet_r50_have_vastmodelzoos_values():
    """VastModelZOO cv/detection/retinanet/build_in/vdsp_params/mmdet-retinanet_r50_fpn_1x_coco-vdsp_params.json:
    letterbox op, 1024, DIV255_MINUSMEAN_DIVSTD with Mean 0.485/0.456/0.406 and Std 0.229/0.224/0.225 (stored
    there rounded to fp16), NO_CHANGE, BILINEAR_CV; build/mmdet_retinanet.yaml: compile data_transport_mode 1,
    Normalize div255 true with the same mean/std."""
    vdsp, yaml = vacc_files(CONFIGS['retinanet_r50'], [1024, 1024])
    config = vdsp['OpConfig']
    assert vdsp['OpType'] == 'FUSION_OP_RGB_LETTERBOX_CVTCOLOR_NORM_TENSOR'
    assert (config['OimageWidth'], config['OimageHeight']) == (1024, 1024)
    assert config['NormaType'] == 'DIV255_MINUSMEAN_DIVSTD' and config['ColorCvtCode'] == 'NO_CHANGE'
    assert np.allclose(config['Mean'], [0.485107421875, 0.4560546875, 0.406005859375], atol=1e-3)
    assert np.allclose(config['Std'], [0.22900390625, 0.2239990234375, 0.2249755859375], atol=1e-3)
    assert config['ResizeType'] == 'BILINEAR_CV'
    assert yaml['backend']['compile'] == {'data_transport_mode': 1}
    normalize = next(op for op in yaml['dataset']['process_ops'] if op['type'] == 'Normalize')
    assert normalize['div255'] is True and np.allclose(normalize['mean'], [0.485, 0.456, 0.406], atol=1e-3)


@pytest.mark.parametrize('kind, expected', [
    ('yolov5_s', ['bbox_head.head_module.convs_pred.0', 'bbox_head.head_module.convs_pred.1',
                  'bbox_head.head_module.convs_pred.2']),
    ('retinanet_r50', ['bbox_head.retina_cls', 'bbox_head.retina_reg']),
    ('centernet_r18', ['bbox_head.heatmap_head.2', 'bbox_head.wh_head.2', 'bbox_head.offset_head.2']),
])
def test_the_raw_map_convs_are_found_from_the_graph(kind, expected):
    """precision.raw_map_convs's modules: for each raw map, the nearest convolution upstream of it."""
    from integrations.models import build_model, load_model_config, mm

    model = build_model(load_model_config(CONFIGS[kind]), seed=0)
    names = {id(module): name for name, module in model.named_modules()}
    assert sorted(names[id(m)] for m in mm.raw_map_modules(model)) == sorted(expected)


def test_random_initialization_leaves_the_output_readable(capfd):
    """mmengine's init_weights logs every parameter's initializer; without a log file that floods the console."""
    from integrations.models import build_model, load_model_config

    build_model(load_model_config(CONFIGS['retinanet_r50']), seed=0)
    printed = ''.join(capfd.readouterr())
    assert 'torch.Size' not in printed and 'Init' not in printed, printed[:500]


FEATURES = {
    'fp16': ['precision=fp16'],
    'int8 max_drop and layers_report': ['precision=int8', 'precision.calibration.num_images=1',
                                        'precision.max_drop=100', 'precision.layers_report=true'],
    'explain': ['eval.explain=true', 'explain.resamples=20'],
    'lightning': ['engine=lightning'],
    'bench': ['task=bench', 'bench.scenario=single_stream', 'bench.iterations=2', 'bench.warmup=0'],
    'mlperf': ['task=mlperf', 'mlperf.mode=accuracy'],
    'export vacc': ['task=export', 'runtime=vacc', 'precision=int8', 'precision.calibration.num_images=1'],
}


@pytest.mark.parametrize('feature', FEATURES)
def test_every_feature_runs_on_the_generic_path(feature, coco128, demo_subset_data, tmp_path):
    """RTMDet-tiny at 320x320 through each feature of the tool (a multirun: tests/test_sweep.py's way below)."""
    model = ['model=mm', f"model.config={CONFIGS['rtmdet_tiny']}", 'model.input_size=[320,320]']
    selection = [f"precision.selection.img_dir={coco128 / 'images'}",
                 f"precision.selection.ann_file={coco128 / 'instances.json'}", 'precision.selection.num_images=2']
    extra = selection if 'max_drop' in feature else []
    result = run(compose_cfg(*model, *demo_subset_data, 'eval.num_images=2', *FEATURES[feature], *extra),
                 tmp_path / 'run')
    if feature == 'export vacc':
        assert {'onnx', 'vamc_yaml', 'vdsp_params'} <= set(result['files'])
    elif feature == 'bench':
        assert result['model'] == 'mm' and result['evaluation']['host_ms_per_image'] > 0
    elif feature == 'mlperf':
        assert result['mlperf']['samples'] == 2 and 'bbox_mAP' in result['mlperf']['accuracy']
    else:
        closest = 0.95 if 'int8' in feature else 0.999  # int8's raw maps are an approximation
        assert result['weights'].startswith('random') and result['fidelity']['min_cosine'] > closest
    if 'max_drop' in feature:
        assert result['precision_details']['search']['met'] and result['layers_report']
    if feature == 'explain':
        assert [s['stage'] for s in result['breakdown']][:2] == ['native_config', 'export_shape']


def test_a_sweep_of_the_generic_path(demo_subset_data, tmp_path):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, str(ROOT / 'run.py'), '-m', 'model=mm', 'model.input_size=[320,320]',
                           *demo_subset_data, 'eval.num_images=1', 'precision=fp32,fp16',
                           f'hydra.sweep.dir={tmp_path}'], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert len((tmp_path / 'summary.csv').read_text().splitlines()) == 3
    assert proc.stdout.count('weights: random (init_seed 0): detections and mAP are meaningless') == 2
