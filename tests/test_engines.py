"""Every task honours `engine=`: under each engine the task's model, dataset and device come from that engine's own
pieces (mmengine's Runner, Lightning's Trainer), its loops run in that engine's own test loop, and the two
engines give the same figures. Small data: three demo images, one where a task evaluates."""
import json

import mmengine.runner
import pytest
from lightning.pytorch import Trainer

import integrations.engines
from integrations.app.main import run
from tests.conftest import compose_cfg

ENGINES = ('mmengine', 'lightning')
# a task's own options, and how many test loops it runs in the engine (npz and cache open no engine)
TASKS = {
    'eval': (['eval.num_images=1'], 1),
    'explain': (['precision=fp16', 'eval.explain=true', 'eval.num_images=1', 'explain.resamples=20'], 2),
    'bench': (['task=bench', 'bench.scenario=single_stream', 'bench.iterations=2', 'bench.warmup=0',
               'bench.replay_latency_ms=1'], 5),
    'export': (['task=export'], 0),
    'mlperf': (['task=mlperf', 'mlperf.mode=accuracy', 'eval.num_images=2'], 0),
    'npz': (['task=npz', 'eval.num_images=2'], 0),
    'cache': (['task=cache'], 0),
    'check': (['task=check', 'runtime=vacc', 'precision=int8', 'precision.calibration.num_images=2'], 0),
}


@pytest.fixture
def spied(monkeypatch):
    """Which engine each task opened, and how many test loops each engine's own loop ran."""
    seen = {'opened': [], 'mmengine': 0, 'lightning': 0}
    open_engine, runner_test, trainer_test = (integrations.engines.open_engine, mmengine.runner.Runner.test,
                                              Trainer.test)

    def opening(plan):
        engine = open_engine(plan)
        seen['opened'].append(type(engine).__module__.split('.')[2])
        return engine

    def counted(name, test):
        def call(self, *args, **kwargs):
            seen[name] += 1
            return test(self, *args, **kwargs)
        return call

    monkeypatch.setattr(integrations.engines, 'open_engine', opening)
    monkeypatch.setattr(mmengine.runner.Runner, 'test', counted('mmengine', runner_test))
    monkeypatch.setattr(Trainer, 'test', counted('lightning', trainer_test))
    return seen


def comparable(task: str, result: dict) -> dict:
    """What must not depend on the engine (speeds, paths and timings may)."""
    if task in ('eval', 'explain'):
        keys = ['device', 'native', 'fidelity', 'num_images', 'precision_details']
        return {k: result[k] for k in keys + (['breakdown', 'delta_ci95', 'detections_diff'] if task == 'explain'
                                               else [])}
    if task == 'bench':
        return {'num_images': result['num_images'], 'settings': [s['samples'] for s in result['settings']]}
    if task == 'export':
        return {'io': result['io'], 'export_check': result['export_check'], 'files': sorted(result['files'])}
    if task == 'mlperf':
        return {k: result['mlperf'][k] for k in ('accuracy', 'native', 'samples', 'target', 'meets_target')}
    if task == 'npz':
        return {'num_images': result['num_images']}
    if task == 'check':
        return {step['name']: step['result'] for step in result['steps']}
    return {'entries': len(result['entries'])}


@pytest.mark.parametrize('task', TASKS)
def test_each_task_runs_in_each_engine_and_both_agree(task, spied, demo_subset_data, tmp_path, request):
    options, loops = TASKS[task]
    if task == 'check':
        request.getfixturevalue('vsx')  # the emulated card
    results = {}
    for engine in ENGINES:
        before = {name: spied[name] for name in ENGINES}
        results[engine] = run(compose_cfg(*demo_subset_data, *options, f'engine={engine}'), tmp_path / engine)
        ran = {name: spied[name] - before[name] for name in ENGINES}
        other = next(name for name in ENGINES if name != engine)
        assert ran == {engine: loops, other: 0}, (task, engine, ran)
        if task not in ('npz', 'cache'):
            assert spied['opened'][-1] == engine
            files = {'bench': 'bench.json', 'export': 'export.json', 'check': 'check.json'}
            written = json.loads((tmp_path / engine / files.get(task, 'results.json')).read_text())
            assert written['engine'] == engine
    assert spied['opened'].count('mmengine') == spied['opened'].count('lightning')
    assert comparable(task, results['mmengine']) == comparable(task, results['lightning'])
