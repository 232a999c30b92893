"""End to end, as a user runs it: `python run.py …` on the demo set and on real COCO images."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from common.errors import UserError
from integrations.app.checks import check_inputs
from integrations.app.main import run
from integrations.config import ROOT
from tests.conftest import compose_cfg

RESULT_KEYS = {'model', 'variant', 'runtime', 'precision', 'engine', 'num_images', 'device', 'native',
               'fidelity', 'timings', 'artifacts'}
METRIC_KEYS = {'bbox_mAP', 'bbox_mAP_50', 'bbox_mAP_75', 'bbox_mAP_s', 'bbox_mAP_m', 'bbox_mAP_l'}


def run_cli(*args, cwd=ROOT):
    return subprocess.run([sys.executable, str(ROOT / 'run.py'), *args], cwd=cwd, capture_output=True, text=True)


@pytest.fixture(scope='module')
def demo_results(assets, tmp_path_factory):
    out = tmp_path_factory.mktemp('demo')
    return run(compose_cfg(), out), out


def test_demo_results_json(demo_results):
    results, out = demo_results
    assert json.loads((out / 'results.json').read_text()) == results
    assert RESULT_KEYS <= set(results)
    assert set(results['device']) == set(results['native']) == METRIC_KEYS
    assert results['num_images'] == 13 and results['input_shape'] == [3, 640, 640]
    assert Path(results['artifacts']['onnx']).is_file() and results['cache'] in ('miss', 'hit')
    assert [o['shape'] for o in results['io']['outputs']] == [[1, 255, 80, 80], [1, 255, 40, 40], [1, 255, 20, 20]]
    assert results['fidelity']['max_abs_diff'] < 1e-3 and results['fidelity']['min_cosine'] > 0.99999
    assert results['device']['bbox_mAP'] > 0.3  # real weights on real photographs
    assert abs(results['device']['bbox_mAP'] - results['native']['bbox_mAP']) <= 0.001
    assert all(results['timings'][k] > 0 for k in ('eval_s', 'images_per_s'))
    assert (results['timings']['export_s'] > 0) == (results['cache'] == 'miss')  # an earlier test may have built it


def test_compare_native_false_skips_native(demo_results, tmp_path):
    results = run(compose_cfg('eval.compare_native=false'), tmp_path)
    assert results['native'] is None and results['fidelity'] is None
    assert results['device'] == demo_results[0]['device']


def test_coco128_device_equals_native_in_published_range(coco128, tmp_path):
    """Real COCO train2017 images and ground truth, through the CLI as a user runs it."""
    proc = run_cli('data=coco', f'data.img_dir={coco128 / "images"}', f'data.ann_file={coco128 / "instances.json"}',
                   f'hydra.run.dir={tmp_path}')
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads((tmp_path / 'results.json').read_text())
    device, native = results['device']['bbox_mAP'], results['native']['bbox_mAP']
    assert results['num_images'] == 96
    assert abs(device - native) <= 0.001, (device, native)
    assert 0.40 <= device <= 0.55, device
    printed = proc.stdout + proc.stderr
    assert printed.count('Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ]') == 2
    assert printed.count("'bbox_mAP_copypaste'") == 2


def _corrupt_demo(tmp_path):
    images = tmp_path / 'images'
    shutil.copytree(ROOT / 'data' / 'demo' / 'images', images)
    (images / 'zidane.jpg').write_bytes(b'not a jpeg')
    return images


def _mismatched_checkpoint(tmp_path):
    import torch
    path = tmp_path / 'other.pth'
    torch.save({'state_dict': torch.nn.Conv2d(3, 3, 1).state_dict()}, path)
    return path


@pytest.mark.parametrize('case', ['img_dir', 'ann_file', 'checkpoint', 'unreadable', 'mismatch', 'coco_no_paths',
                                  'vacc_without_sdk', 'npz_without_outputs', 'negative_prefetch'])
def test_bad_input_is_one_line_and_leaves_nothing(assets, tmp_path, case):
    run_dir = tmp_path / 'run'
    args = {
        'img_dir': ['data.img_dir=/no/such/dir'],
        'ann_file': [f'data.ann_file={tmp_path}/missing.json'],
        'checkpoint': [f'model.checkpoint={tmp_path}/missing.pth'],
        'unreadable': lambda: [f'data.img_dir={_corrupt_demo(tmp_path)}'],
        'mismatch': lambda: [f'model.checkpoint={_mismatched_checkpoint(tmp_path)}'],
        'coco_no_paths': ['data=coco'],
        'vacc_without_sdk': ['runtime=vacc', 'precision=int8'],
        'npz_without_outputs': ['runtime=npz'],
        'negative_prefetch': ['eval.prefetch=-1'],
    }[case]
    args = args() if callable(args) else args
    proc = run_cli(*args, f'hydra.run.dir={run_dir}')
    expected = {'img_dir': 'data.img_dir', 'ann_file': 'data.ann_file', 'checkpoint': 'model.checkpoint',
                'unreadable': 'zidane.jpg', 'mismatch': 'missing keys', 'coco_no_paths': 'data.img_dir',
                'vacc_without_sdk': 'vaststreamx', 'npz_without_outputs': 'runtime.output_dir',
                'negative_prefetch': 'eval.prefetch=-1'}[case]
    assert proc.returncode == 2, proc.stderr[-2000:]
    error_lines = [line for line in proc.stderr.splitlines() if line.startswith('error:')]
    assert len(error_lines) == 1 and expected in error_lines[0], proc.stderr[-2000:]
    assert 'Traceback' not in proc.stderr
    assert not (run_dir / 'results.json').exists() and not (run_dir / 'export').exists()


@pytest.mark.parametrize('override, message', [
    ('eval.score_thr=-1', r'eval.score_thr=-1.0: must be a score in \[0, 1\)'),
    ('eval.nms_iou=1.5', r'eval.nms_iou=1.5: must be an IoU in \(0, 1\]'),
    ('eval.nms_iou=0', r'eval.nms_iou=0.0: must be an IoU'),
    ('eval.max_per_img=0', r'eval.max_per_img=0: must be >= 1'),
    ('eval.nms_pre=0', r'eval.nms_pre=0: must be >= 1'),
    ('eval.num_images=0', r'eval.num_images=0: must be >= 1'),
    ('eval.host_threads=-1', r'eval.host_threads=-1: must be >= 1'),
    ('eval.batch_size=0', r'eval.batch_size=0: must be >= 1'),
    ('eval.prefetch=-1', r'eval.prefetch=-1: must be >= 0'),
    ('export.opset=30', r'export.opset=30: use 11-20'),
    ('export.opset=7', r'export.opset=7: use 11-20'),
    ('runtime.intra_op_threads=-1', r'runtime.intra_op_threads=-1: must be >= 0'),
    ('runtime=openvino runtime.threads=-1', r'runtime.threads=-1: must be >= 0'),
    ('task=bench bench.profile=true runtime=vacc precision=fp16', r"bench.profile reads the runtime's own profiler: "
     'runtime=onnx or openvino, not vacc'),
])
def test_bad_options_fail_before_the_run(override, message):
    with pytest.raises(UserError, match=message):
        check_inputs(compose_cfg(*override.split()))


def test_in_range_eval_options_pass():
    assert check_inputs(compose_cfg('eval.score_thr=0', 'eval.nms_iou=1', 'eval.max_per_img=1', 'eval.nms_pre=1',
                                    'eval.num_images=2', 'eval.host_threads=2', 'eval.reference=fp16',
                                    'export.opset=11')) == 2


def test_unknown_group_value_fails_clearly(tmp_path):
    proc = run_cli('model=nope', f'hydra.run.dir={tmp_path}')
    assert proc.returncode != 0
    assert "Could not find 'model/nope'" in proc.stderr and 'Traceback' not in proc.stderr


def test_the_same_command_twice_gives_identical_bytes_and_detections(demo_subset_data, tmp_path):
    """Determinism: two uncached int8 runs export and quantize to the same bytes, score the same metrics and
    write the same per-image detections."""
    runs = [run(compose_cfg('precision=int8', 'precision.calibration.num_images=3', 'cache.enabled=false',
                            'eval.save_txt=true', *demo_subset_data), tmp_path / name) for name in ('a', 'b')]
    assert runs[0]['device'] == runs[1]['device'] and runs[0]['native'] == runs[1]['native']
    assert runs[0]['precision_details']['calibration_digest'] == runs[1]['precision_details']['calibration_digest']
    built = [sorted((tmp_path / name / 'export').rglob('*.onnx')) for name in ('a', 'b')]
    assert [p.name for p in built[0]] == [p.name for p in built[1]] and len(built[0]) >= 2
    assert all(x.read_bytes() == y.read_bytes() for x, y in zip(*built))
    texts = [sorted((tmp_path / name / 'txt').rglob('*')) for name in ('a', 'b')]
    files = [[p for p in t if p.is_file()] for t in texts]
    assert len(files[0]) == len(files[1]) >= 6  # device and native, per image, and pred.json
    assert all(x.read_bytes() == y.read_bytes() for x, y in zip(*files))
