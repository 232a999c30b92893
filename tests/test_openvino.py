"""runtime=openvino: the IR build at each precision against ONNX Runtime and the native model, NNCF's int8 with
the raw-map convs kept in float (read back from the compiled model), and its errors."""
import json

import numpy as np
import pytest

from common.errors import UserError
from evaluators.device import compare_maps
from integrations.app.main import run
from runtime import get_runtime
from runtime.calibration import CalibrationReader
from tests.conftest import DEMO_IMAGES, compose_cfg
from tests.test_app import run_cli
from tests.test_precision import INT8, RAW_MAP_CONVS

RAW_MAP_NODES = [f'/head_module/convs_pred.{i}/Conv' for i in range(3)]  # the export's names of RAW_MAP_CONVS


def _int8(**calibration) -> dict:
    precision = json.loads(json.dumps(INT8))
    precision['calibration'].update(calibration)
    return precision


def _by_operation(session) -> dict[str, dict]:
    """The compiled model's executed layers by each operation they run."""
    return {name: layer for layer in session.layers() for name in layer['operations']}


def _built(exported, tmp_path, precision: dict, device: str = 'CPU', **build):
    out, preprocess, image, _ = exported
    runtime = get_runtime('openvino', precision=precision, device=device)
    if precision['name'] == 'int8':
        build['calibration'] = CalibrationReader([DEMO_IMAGES / 'zidane.jpg', DEMO_IMAGES / 'horses.jpg'], preprocess)
    artifact = runtime.build(out / 'model.onnx', tmp_path, **build)
    session = runtime.load(artifact)
    return artifact, session, session.run(image)


@pytest.mark.parametrize('device', ['CPU', 'AUTO'])
def test_fp32_runs_the_export_as_onnx_runtime_does(exported, tmp_path, device):
    """At f32 on the device, also through AUTO (which without the hint would run bf16 on this CPU)."""
    artifact, session, maps = _built(exported, tmp_path, {'name': 'fp32'}, device=device)
    assert artifact.path.suffix == '.xml' and artifact.path.with_suffix('.bin').is_file()
    assert [m.shape for m in maps] == [m.shape for m in exported[3]]
    for ours, reference in zip(maps, exported[3]):
        assert np.allclose(ours, reference, atol=2e-3, rtol=1e-3), np.abs(ours - reference).max()
    report = session.report()
    assert report['inference_precision'] == ('f32' if device == 'CPU' else None)
    assert report['execution_devices'] == ['CPU'] and set(report['convolutions_by_precision']) == {'f32'}


def test_fp16_stores_f16_weights_and_says_what_the_device_ran(exported, tmp_path):
    import openvino as ov

    artifact, session, maps = _built(exported, tmp_path, {'name': 'fp16'})
    assert artifact.info['weights'] == 'f16'
    assert compare_maps(exported[3], maps)['min_cosine'] > 0.999
    has_f16 = 'FP16' in ov.Core().get_property('CPU', 'OPTIMIZATION_CAPABILITIES')
    assert session.report()['inference_precision'] == ('f16' if has_f16 else 'f32')


@pytest.mark.parametrize('method', ['max', 'percentile', 'mse'])
def test_int8_keeps_the_raw_map_convs_in_float_and_runs_the_rest_in_int8(exported, tmp_path, method):
    artifact, session, maps = _built(exported, tmp_path, _int8(method=method), keep_float=RAW_MAP_CONVS)
    assert artifact.info['float_nodes'] == RAW_MAP_NODES
    convs = [name for name in artifact.info['ignored_scope'] if name.endswith('/WithoutBiases')]
    assert len(convs) == 3 and set(artifact.info['ignored_scope']) - set(convs) == {f'raw_map_{i}' for i in range(3)}
    assert compare_maps(exported[3], maps)['min_cosine'] > 0.99
    ran = _by_operation(session)
    assert all(ran[node]['layer_type'] == 'Convolution' and ran[node]['precision'] == 'f32' for node in convs), \
        {n: ran[n] for n in convs}
    float_layers = [ran[name] for name in convs]
    others = [name for name, layer in ran.items() if layer['layer_type'] == 'Convolution'
              and not any(layer is kept for kept in float_layers)]
    int8 = [name for name in others if ran[name]['precision'] in ('i8', 'u8')]
    assert len(int8) == len(others) > 50, [(name, ran[name]) for name in others if name not in int8]


def test_int8_without_float_convs_quantizes_the_raw_map_convs_too(exported, tmp_path):
    _, session, _ = _built(exported, tmp_path, _int8())
    ran = _by_operation(session)
    convs = [name for name in ran if name.endswith('/Conv/WithoutBiases') and '/convs_pred.' in name]
    assert len(convs) == 3 and all(ran[node]['precision'] in ('i8', 'u8') for node in convs), \
        {n: ran[n] for n in convs}


@pytest.mark.parametrize('precision, message', [
    (_int8(method='kl_divergence'), 'precision.calibration.method=kl_divergence: NNCF has no counterpart'),
    ({**_int8(), 'format': 'qoperator'}, 'precision.format=qoperator: runtime=openvino quantizes with NNCF'),
    ({'name': 'bf16'}, 'precision=bf16: runtime=openvino supports fp32, fp16, int8')])
def test_options_without_an_openvino_counterpart_are_errors(precision, message):
    with pytest.raises(UserError, match=message):
        get_runtime('openvino', precision=precision)


@pytest.mark.parametrize('device, message', [
    ('NPU', r'runtime.device=NPU: OpenVINO sees no such device on this machine \(it has CPU'),
    ('TPU', 'runtime.device=TPU: not an OpenVINO device; use one of CPU, GPU, NPU, AUTO')])
def test_a_device_that_is_not_here_is_one_error_line(device, message):
    import openvino as ov

    if device in ov.Core().available_devices:
        pytest.skip(f'this machine has {device}')
    with pytest.raises(UserError, match=message):
        get_runtime('openvino', precision={'name': 'fp32'}, device=device)


@pytest.mark.integration
def test_a_device_that_is_not_here_fails_the_cli_before_anything_runs(tmp_path):
    proc = run_cli('runtime=openvino', 'runtime.device=GPU.3', f'hydra.run.dir={tmp_path / "run"}')
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1].startswith('error: runtime.device=GPU.3: OpenVINO sees no such device')
    assert not (tmp_path / 'run' / 'results.json').exists()


def test_coco128_fp32_equals_native_and_int8_stays_within_the_onnx_runtime_budget(coco128, tmp_path):
    """fp32 scored beside the native model; int8 (NNCF, the default calibration) against OpenVINO's own fp32,
    with the budget test_precision gives ONNX Runtime's int8."""
    data = ['runtime=openvino', 'data=coco', f'data.img_dir={coco128 / "images"}',
            f'data.ann_file={coco128 / "instances.json"}']
    fp32 = run(compose_cfg(*data), tmp_path / 'fp32')
    assert abs(fp32['device']['bbox_mAP'] - fp32['native']['bbox_mAP']) <= 0.001, (fp32['device'], fp32['native'])
    assert fp32['precision_details']['inference_precision'] == 'f32'
    int8 = run(compose_cfg(*data, 'precision=int8', 'eval.compare_native=false', 'eval.reference=fp32'),
               tmp_path / 'int8')
    assert int8['reference']['bbox_mAP'] == fp32['device']['bbox_mAP']
    assert int8['delta']['device_minus_reference'] >= -0.010, int8['delta']
    assert int8['precision_details']['calibration_disjoint']
    assert int8['precision_details']['float_nodes'] == RAW_MAP_NODES
    convolutions = int8['precision_details']['convolutions_by_precision']
    assert convolutions['f32'] == 3 and convolutions.get('u8', 0) + convolutions.get('i8', 0) > 50, convolutions


@pytest.mark.parametrize('task', [['engine=lightning'], ['task=bench', 'bench.scenario=single_stream',
                                  'bench.iterations=2', 'bench.warmup=0'], ['task=mlperf', 'mlperf.mode=accuracy']],
                         ids=['lightning', 'bench', 'mlperf'])
def test_the_other_tasks_and_the_lightning_engine_run_it(task, demo_subset_data, tmp_path):
    result = run(compose_cfg('runtime=openvino', *demo_subset_data, 'eval.num_images=2', *task), tmp_path / 'run')
    if 'task=bench' in task:
        assert result['runtime'] == 'openvino' and result['evaluation']['host_ms_per_image'] > 0
    elif 'task=mlperf' in task:
        assert result['mlperf']['samples'] == 2 and 'bbox_mAP' in result['mlperf']['accuracy']
    else:
        assert result['fidelity']['min_cosine'] > 0.999 and result['precision_details']['inference_precision'] == 'f32'


def test_a_sweep_over_both_runtimes_compares_them(demo_subset_data, tmp_path):
    import csv
    import subprocess
    import sys

    from integrations.config import ROOT

    proc = subprocess.run([sys.executable, str(ROOT / 'run.py'), '-m', 'runtime=onnx,openvino', *demo_subset_data,
                           'eval.num_images=1', f'hydra.sweep.dir={tmp_path}'],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    with open(tmp_path / 'summary.csv') as f:
        rows = list(csv.DictReader(f))
    assert [row['overrides'].split()[0] for row in rows] == ['runtime=onnx', 'runtime=openvino']
    assert all(abs(float(row['device_mAP']) - float(row['native_mAP'])) <= 0.001 for row in rows), rows


def test_the_profile_has_every_executed_layer_and_shows_the_float_convs(exported, tmp_path):
    """bench.profile on OpenVINO: one row per layer of the runtime model, from its performance counters, the
    raw-map convs (kept in float) in f32 and the other convolutions in int8 kernels."""
    from integrations.tasks.bench import profile_summary

    artifact, session, _ = _built(exported, tmp_path, _int8(), keep_float=RAW_MAP_CONVS)
    runtime = get_runtime('openvino', precision=_int8())
    layers = runtime.profile(artifact, exported[2], 2)
    executed = [layer for layer in session.layers() if layer['layer_type'] == 'Convolution']
    assert {row['node'] for row in layers} >= {layer['name'] for layer in executed} and len(executed) == 60
    assert len(layers) == len(session.request.profiling_info)
    summary = profile_summary(layers, artifact.info)
    assert summary['total_ms'] > 0 and abs(sum(row['share'] for row in summary['layers']) - 1) < 1e-3
    assert [row['ran_in'] for row in summary['planned_float']] == ['f32'] * 6
    convolutions = [row for row in layers if row['layer_type'] == 'Convolution']
    assert sorted({row['precision'] for row in convolutions}) == ['f32', 'u8'] and all(
        row['kernel'].endswith('f32') == (row['precision'] == 'f32') for row in convolutions)


def test_the_onnx_runtime_profile_has_every_node_it_ran(exported, tmp_path):
    """bench.profile on ONNX Runtime: one row per node of the graph ONNX Runtime optimized and ran (the graph it
    writes with optimized_model_filepath), with the operator and its input type."""
    import onnx
    import onnxruntime as ort

    out = exported[0]
    runtime = get_runtime('onnx', precision={'name': 'fp32'})
    artifact = runtime.build(out / 'model.onnx', tmp_path)
    layers = runtime.profile(artifact, exported[2], 2)
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / 'optimized.onnx')
    ort.InferenceSession(str(artifact.path), options, providers=['CPUExecutionProvider'])
    ran = {node.name for node in onnx.load(str(tmp_path / 'optimized.onnx')).graph.node}
    assert {row['node'] for row in layers} == ran
    assert {row['precision'] for row in layers if row['layer_type'] == 'Conv'} == {'float'}
