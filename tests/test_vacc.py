"""runtime=vacc and runtime=npz against the SDK emulation in tests/emulation (nothing here ran on a card)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from integrations.app import check_inputs, run
from common.errors import UserError
from tests.conftest import DEMO_IMAGES, compose_cfg

EMULATION = Path(__file__).parent / 'emulation'
# the structure of the seeds' mmyolo_yolov5.yaml (int8) and vdsp_params JSON files
SEED_YAML_KEYS = {'name': None, 'frontend': {'checkpoint', 'shape', 'type', 'dtype'},
                  'backend': {'type', 'dtype', 'compile', 'quantize'}, 'workspace': {'path'},
                  'dataset': {'type', 'path', 'sampler', 'process_ops'}}
SEED_VDSP_KEYS = {'IimageFormat', 'IimageWidth', 'IimageHeight', 'OimageWidth', 'OimageHeight', 'IimageWidthPitch',
                  'IimageHeightPitch', 'NormaType', 'ColorCvtCode', 'ResizeType'}


@pytest.fixture
def no_sdk(monkeypatch):
    monkeypatch.setitem(sys.modules, 'vaststreamx', None)  # import fails as on a machine without the SDK


@pytest.fixture
def vamc(tmp_path) -> Path:
    """A `vamc` executable that runs the fake compiler."""
    path = tmp_path / 'bin' / 'vamc'
    path.parent.mkdir()
    path.write_text(f'#!/bin/sh\nexec {sys.executable} {EMULATION / "vamc.py"} "$@"\n')
    path.chmod(0o755)
    return path


@pytest.fixture
def vsx(monkeypatch, vamc):
    """The emulated SDK importable and the fake vamc on PATH."""
    monkeypatch.syspath_prepend(str(EMULATION))
    monkeypatch.setenv('PATH', f"{vamc.parent}{os.pathsep}{os.environ['PATH']}")
    import vaststreamx
    vaststreamx.calls.clear()
    return vaststreamx



def test_without_sdk_or_compiler_one_clear_error(no_sdk, assets, tmp_path, monkeypatch, vamc):
    with pytest.raises(UserError, match='vaststreamx SDK is not importable'):
        run(compose_cfg('runtime=vacc', 'precision=fp16'), tmp_path / 'a')
    monkeypatch.syspath_prepend(str(EMULATION))
    monkeypatch.delitem(sys.modules, 'vaststreamx')
    with pytest.raises(UserError, match="compiler 'no-such-vamc' is not on PATH"):
        run(compose_cfg('runtime=vacc', 'precision=fp16', 'runtime.compiler=no-such-vamc'), tmp_path / 'b')
    with pytest.raises(UserError, match='runtime=vacc supports fp16, int8'):
        run(compose_cfg('runtime=vacc', 'precision=fp32'), tmp_path / 'c')
    assert not (tmp_path / 'a' / 'export').exists() and not (tmp_path / 'b' / 'export').exists()


@pytest.mark.parametrize('override, message', [
    ('runtime.batch_size=0', 'runtime.batch_size=0: must be >= 1'),
    ('runtime.device_id=-1', 'runtime.device_id=-1: must be >= 0')])
def test_bad_vacc_options_are_one_line_errors(override, message):
    with pytest.raises(UserError, match=message):
        check_inputs(compose_cfg('runtime=vacc', 'precision=fp16', override))


def test_export_writes_seed_shaped_build_files_without_sdk(no_sdk, assets, demo_subset_data, tmp_path,
                                                          vamc):
    result = run(compose_cfg('task=export', 'runtime=vacc', 'precision=int8', *demo_subset_data,
                             'precision.calibration.num_images=4'), tmp_path)
    export = Path(result['export_dir'])
    config = yaml.safe_load((export / 'vamc.yaml').read_text())
    assert set(config) == set(SEED_YAML_KEYS)
    for section, keys in SEED_YAML_KEYS.items():
        if keys:
            assert set(config[section]) == keys, section
    assert config['frontend']['shape'] == {'input': [1, 3, 640, 640]}
    assert config['backend']['quantize'] == {'calibrate_mode': 'max', 'quantize_per_channel': True}
    assert [op['type'] for op in config['dataset']['process_ops']] == \
        ['DecodeImage', 'Resize', 'Pad', 'Normalize', 'ToTensor']
    assert len(list((export / config['dataset']['path']).glob('*.jpg'))) == 4
    vdsp = json.loads((export / 'vdsp_params.json').read_text())
    assert vdsp['OpType'] == 'FUSION_OP_RGB_LETTERBOX_CVTCOLOR_NORM_TENSOR'
    assert SEED_VDSP_KEYS <= set(vdsp['OpConfig']) and vdsp['OpConfig']['NormaType'] == 'DIV255'
    # the carried directory compiles: the fake vamc checks the YAML against the seeds' schema
    compiled = subprocess.run([str(vamc), 'compile', 'vamc.yaml'], cwd=export, capture_output=True, text=True)
    assert compiled.returncode == 0, compiled.stderr
    assert (export / 'deploy_weights' / config['name'] / 'mod.so').is_file()


def test_emulated_vdsp_letterbox_matches_host_preprocessing(assets, yolov5s):
    """The VDSP op the JSON describes gives the host pipeline's tensor: same geometry, and pixel values within
    mean |diff| 0.01 (mmyolo shrinks with 'area' interpolation, the VDSP with bilinear; fp16 output)."""
    sys.path.insert(0, str(EMULATION))
    try:
        from vaststreamx.vdsp import FusionOp
    finally:
        sys.path.remove(str(EMULATION))
    from integrations.deploy import loop_preprocessing
    from integrations.mmengine.runner import load_model_config
    from integrations.models import yolov5
    from runtime.vacc import read_planar_rgb, vdsp_params

    cfg = load_model_config(assets.YOLOV5S_CONFIG)
    host = loop_preprocessing(cfg, yolov5s)
    device = FusionOp(vdsp_params(yolov5.device_preprocessing(cfg), 'BILINEAR_CV'))
    for path in sorted(DEMO_IMAGES.iterdir()):
        expected, got = host(path)[0], device(read_planar_rgb(path)).astype(np.float32)
        assert got.shape == expected.shape
        assert np.abs(got - expected).mean() <= 0.01, path.name
        if path.name == 'zidane.jpg':  # 1280x720 -> exactly half: no interpolation difference at all
            assert np.abs(got - expected).max() <= 1e-3


def test_vacc_under_emulation_reproduces_onnx_and_npz_path_matches(vsx, assets, demo_subset_data,
                                                                    tmp_path):
    data = demo_subset_data
    onnx = run(compose_cfg(*data), tmp_path / 'onnx')
    vacc = run(compose_cfg('runtime=vacc', 'precision=fp16', *data), tmp_path / 'vacc')
    assert abs(vacc['device']['bbox_mAP'] - onnx['device']['bbox_mAP']) <= 0.02
    assert vacc['native'] == onnx['native'] and vacc['fidelity']['min_cosine'] > 0.99
    assert vacc['precision_details']['compiled'] == 'here'
    prefix = vacc['artifacts']['runtime']
    assert ('set_device', 0) in vsx.calls and ('Model', prefix, 1) in vsx.calls
    assert ('add_operators', ('FusionOp', 'ModelOperator')) in vsx.calls
    images = [c for c in vsx.calls if c[0] == 'create_image']
    assert len(images) == 3 and all(c[1] == 'RGB_PLANAR' for c in images)

    # the vamp path: image -> npz datalist, "vamp" (the emulated stream) writes output_i, runtime=npz decodes
    npz = run(compose_cfg('task=npz', *data), tmp_path / 'npz')
    from runtime.vacc import VaccSession
    session = VaccSession(prefix, vacc['artifacts']['vdsp_params'], 0, 1,
                          vacc['precision_details']['output_shapes'])
    outputs = tmp_path / 'vamp_out'
    outputs.mkdir()
    for i, line in enumerate(Path(npz['datalist']).read_text().split()):
        planar = np.load(line)['input_0']
        image = vsx.create_image(planar, vsx.ImageFormat.RGB_PLANAR, planar.shape[2], planar.shape[1], 0)
        maps = session.stream.run_sync([image])[0]
        np.savez(outputs / f'output_{i:06d}.npz', **{f'output_{k}': m for k, m in enumerate(maps)})
    replayed = run(compose_cfg('runtime=npz', f'runtime.output_dir={outputs}', f"runtime.datalist={npz['datalist']}",
                               'precision=fp16', *data), tmp_path / 'replayed')
    assert replayed['device'] == vacc['device']


def test_model_prefix_skips_compiling_and_ranks_use_their_own_device(vsx, assets, demo_subset_data,
                                                                      tmp_path, monkeypatch):
    first = run(compose_cfg('runtime=vacc', 'precision=fp16', *demo_subset_data), tmp_path / 'a')
    monkeypatch.setenv('LOCAL_RANK', '1')  # as torchrun / Lightning DDP set it for the second process
    given = run(compose_cfg('runtime=vacc', 'precision=fp16', f"runtime.model_prefix={first['artifacts']['runtime']}",
                            'runtime.compiler=no-such-vamc', 'runtime.device_id=2', *demo_subset_data),
                tmp_path / 'b')
    assert given['precision_details']['compiled'] == 'given' and given['device'] == first['device']
    assert ('set_device', 3) in vsx.calls
    with pytest.raises(UserError, match='runtime.model_prefix'):
        run(compose_cfg('runtime=vacc', 'precision=fp16', f'runtime.model_prefix={tmp_path}/nothing/mod'),
            tmp_path / 'c')


def test_bench_runs_vacc_sessions_on_image_files(vsx, assets, demo_subset_data, tmp_path):
    result = run(compose_cfg('task=bench', 'runtime=vacc', 'precision=fp16', *demo_subset_data,
                             'bench.batch_sizes=[1,2]', 'bench.instances=[1]', 'bench.warmup=1',
                             'bench.iterations=2'), tmp_path)
    assert [(b['batch_size'], b['samples']) for b in result['settings']] == [(1, 2), (2, 4)]
    assert result['evaluation']['images_per_s'] > 0 and (tmp_path / 'bench.json').is_file()


def test_export_retinanet_resize_and_imagenet_normalization(no_sdk, tmp_path):
    """The RetinaNet's build files: plain resize to 800x800 and ImageNet mean/std, as the seeds' MLCommons files."""
    result = run(compose_cfg('task=export', 'model=retinanet', 'runtime=vacc', 'precision=int8',
                             'precision.calibration.method=kl_divergence', 'precision.calibration.num_images=2',
                             'eval.num_images=2'), tmp_path)
    export = Path(result['export_dir'])
    config = yaml.safe_load((export / 'vamc.yaml').read_text())
    assert config['frontend']['shape'] == {'input': [1, 3, 800, 800]}
    assert config['backend']['quantize']['calibrate_mode'] == 'kl_divergence'
    ops = config['dataset']['process_ops']
    assert ops[1] == {'type': 'Resize', 'size': [800, 800]}
    assert np.allclose(ops[2]['mean'], [0.485, 0.456, 0.406]) and np.allclose(ops[2]['std'], [0.229, 0.224, 0.225])
    vdsp = json.loads((export / 'vdsp_params.json').read_text())
    assert vdsp['OpType'] == 'FUSION_OP_RGB_RESIZE_CVTCOLOR_NORM_TENSOR'
    assert vdsp['OpConfig']['NormaType'] == 'DIV255_MINUSMEAN_DIVSTD'
    assert np.allclose(vdsp['OpConfig']['Mean'], [0.485, 0.456, 0.406], atol=1e-3)
