"""task=bench, the overlapped evaluation loop and the replayed runtime."""
import json
import random
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from common.errors import UserError
from evaluators.device import DeviceInference
from integrations.app.checks import check_bench
from integrations.app.main import run
from integrations.tasks.bench import ReplaySession, bench_settings, latency_stats, measure
from tests.conftest import DEMO_IMAGES, compose_cfg


class _SlowSession:
    """Returns its input's mean as a raw map after a random delay, so out-of-order completion would show."""

    def run(self, batch):
        time.sleep(random.uniform(0, 0.01))
        return [np.full((1, 2), batch.mean(), np.float32)]


def test_submitted_batches_finish_in_order_with_their_own_results():
    inference = DeviceInference(_SlowSession(), decoder=lambda maps, metas: [float(maps[0][0, 0])])
    futures = [inference.submit(torch.full((1, 3, 2, 2), float(i)), [{}]) for i in range(20)]
    assert [f.result()[0] for f in futures] == [float(i) for i in range(20)]
    assert inference.runtime_s > 0


def test_runtime_runs_the_next_batch_while_the_host_decodes():
    """The device must not sit idle while the host decodes: batch 1's runtime call happens during batch 0's
    decoding (on one thread for both, batch 0's decoding would wait for it in vain)."""
    import threading

    second_call = threading.Event()

    class Session:
        calls = 0

        def run(self, batch):
            Session.calls += 1
            if Session.calls == 2:
                second_call.set()
            return [batch]

    def decoder(maps, metas):
        return [second_call.wait(timeout=10)]

    inference = DeviceInference(Session(), decoder)
    futures = [inference.submit(torch.zeros(1, 3, 2, 2), [{}]) for _ in range(2)]
    assert futures[0].result() == [True]


def test_overlapped_loop_equals_sequential_loop(assets, demo_subset, tmp_path):
    data = ['data=coco', f'data.img_dir={DEMO_IMAGES}', f'data.ann_file={demo_subset}']
    overlapped = run(compose_cfg(*data, 'eval.overlap=true', 'eval.prefetch=2'), tmp_path / 'a')
    sequential = run(compose_cfg(*data, 'eval.overlap=false', 'eval.prefetch=0'), tmp_path / 'b')
    assert overlapped['device'] == sequential['device'] and overlapped['native'] == sequential['native']
    assert overlapped['fidelity'] == sequential['fidelity']


def test_latency_stats_and_measure():
    stats = latency_stats([0.001, 0.002, 0.003, 0.004])
    assert stats['min'] == 1000 and stats['max'] == 4000 and stats['avg'] == 2500 and stats['p50'] == 2500
    replay = ReplaySession([[np.zeros(1)], [np.ones(1)]], latency_ms=1.0)
    assert [float(replay.run(None)[0][0]) for _ in range(3)] == [0.0, 1.0, 0.0]
    figures = measure([replay, ReplaySession([[np.zeros(1)]], 1.0)], np.ascontiguousarray,
                      [np.zeros((4, 3, 2, 2))], iterations=10)
    assert figures['samples'] == 40 and figures['model_latency_us']['min'] >= 1000
    assert figures['throughput_qps'] > 0 and figures['peak_memory_mb'] > 0


def test_bench_task_writes_vamp_figures(assets, tmp_path):
    result = run(compose_cfg('task=bench', 'eval.num_images=4', 'bench.batch_sizes=[1,2]', 'bench.instances=[1,2]',
                             'bench.iterations=4', 'bench.warmup=1', 'bench.replay_latency_ms=2.5'), tmp_path)
    saved = json.loads((tmp_path / 'bench.json').read_text())
    assert saved == json.loads(json.dumps(result))
    assert [(s['batch_size'], s['instances']) for s in saved['settings']] == [(1, 1), (1, 2), (2, 1), (2, 2)]
    assert saved['settings'][2]['samples'] == 8
    for key in ('qps', 'p50', 'p90', 'p99', 'offline_samples_per_s'):
        assert saved[key] > 0
    assert set(saved['settings'][0]['e2e_latency_us']) == {'avg', 'min', 'max', 'p50', 'p90', 'p99'}
    evaluation = saved['evaluation']
    assert evaluation['overhead_ratio'] > 0 and evaluation['host_ms_per_image'] > 0
    stages = evaluation['host_ms_per_image_by_stage']
    assert set(stages) == {'load', 'preprocess', 'decode', 'metric', 'other'}
    assert all(stages[k] > 0 for k in ('load', 'preprocess', 'decode', 'metric'))
    assert sum(stages.values()) == pytest.approx(evaluation['host_ms_per_image'])
    assert saved['num_images'] == 4 and len(saved['replay']['images_per_s_passes']) == 3
    assert saved['replay']['images_per_s'] == sorted(saved['replay']['images_per_s_passes'])[1]


def test_host_work_single_threaded_without_native_forward():
    """Idle torch threads spin on the runtime's cores: one thread when no native forward needs more."""
    from integrations.app.main import host_threads

    before = torch.get_num_threads()
    with host_threads(compose_cfg('eval.compare_native=false')):
        assert torch.get_num_threads() == 1
    with host_threads(compose_cfg('eval.compare_native=true')):
        assert torch.get_num_threads() == before
    with host_threads(compose_cfg('eval.compare_native=true', 'eval.host_threads=1')):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before


def test_bench_of_an_int8_build_times_the_int8_model_the_evaluation_built(assets, tmp_path):
    """The bench loads its sessions from the same (resolved) precision the build used, int8's list options too:
    it times the int8 model, the very file an evaluation of the same settings builds and finds in the cache."""
    options = ['precision=int8', 'precision.calibration.num_images=2', 'eval.num_images=2']
    result = run(compose_cfg('task=bench', *options, 'bench.scenario=single_stream', 'bench.iterations=2',
                             'bench.warmup=0'), tmp_path / 'bench')
    evaluated = run(compose_cfg(*options, 'eval.compare_native=false'), tmp_path / 'eval')
    assert Path(result['artifact']).name == 'model_int8.onnx'
    assert result['artifact'] == evaluated['artifacts']['runtime'] and evaluated['cache'] == 'hit'


@pytest.mark.parametrize('override, message', [
    ('bench.batch_sizes=[0]', r'bench.batch_sizes=\[0\]: must be a non-empty list'),
    ('bench.instances=[]', r'bench.instances=\[\]: must be a non-empty list'),
    ('bench.warmup=-1', r'bench.warmup=-1: must be >= 0'),
    ('bench.iterations=0', r'bench.iterations=0: must be >= 1'),
    ('bench.replay_latency_ms=-2.5', r'bench.replay_latency_ms=-2.5: must be >= 0'),
])
def test_bad_bench_options_are_one_line_errors(override, message):
    with pytest.raises(UserError, match=message):
        check_bench(compose_cfg('task=bench', override).bench)


def test_bad_bench_option_fails_before_any_export(tmp_path):
    with pytest.raises(UserError, match='bench.iterations'):
        run(compose_cfg('task=bench', 'bench.iterations=0'), tmp_path)
    assert not any(tmp_path.iterdir())


def test_bench_settings_follow_the_scenario_and_the_lists():
    assert [(s['batch_size'], s['instances']) for s in bench_settings(compose_cfg('task=bench').bench)] == \
        [(1, 1), (1, 2), (4, 1), (4, 2), (8, 1), (8, 2)]  # offline: every combination of the defaults
    single = compose_cfg('task=bench', 'bench.scenario=single_stream', 'bench.batch_sizes=[4]').bench
    assert bench_settings(single) == [{'batch_size': 1, 'instances': 1}]  # MLPerf SingleStream: batch 1, one
    check_bench(single)  # the lists it ignores are still checked, and these pass


@pytest.mark.parametrize('bad', [np.nan, np.inf, -np.inf])
def test_non_finite_raw_maps_stop_with_the_runtime_and_map_named(bad):
    """NaN/inf from a broken device must not decode into a silent mAP."""
    class Broken:
        def run(self, batch):
            maps = [np.zeros((1, 4, 2, 2), np.float32), np.zeros((1, 4, 1, 1), np.float32)]
            maps[1][0, 2, 0, 0] = bad
            return maps

    decoded = []
    inference = DeviceInference(Broken(), lambda maps, metas: decoded.append(maps), label='onnx int8')
    with pytest.raises(UserError, match=r'onnx int8: raw map 1 \[1, 4, 1, 1\] holds (NaN|inf) values.*a.jpg'):
        inference.submit(torch.zeros(1, 3, 2, 2), [{'img_path': 'a.jpg'}]).result()
    assert not decoded
