"""The artifact cache: hits and misses by content, atomic and locked writes, damaged entries rebuilt."""
import multiprocessing
import time

import pytest
import torch

from integrations.app.main import run
from runtime.cache import ArtifactCache, content_key
from tests.conftest import DEMO_IMAGES, compose_cfg


def _build(log):
    def build(out):
        with open(log, 'a') as f:
            f.write('built\n')
        (out / 'model.onnx').write_bytes(b'x' * 1000)
        (out / 'sub').mkdir()
        (out / 'sub' / 'ranges.json').write_text('{}')
    return build


def test_miss_then_hit(tmp_path):
    cache = ArtifactCache(tmp_path / 'cache')
    log = tmp_path / 'log'
    first, hit1 = cache.get_or_build('k1', _build(log))
    second, hit2 = cache.get_or_build('k1', _build(log))
    assert (hit1, hit2) == (False, True) and first == second
    assert log.read_text().count('built') == 1 and (first / 'sub' / 'ranges.json').is_file()
    assert [row['key'] for row in cache.entries()] == ['k1'] and cache.entries()[0]['valid']


@pytest.mark.parametrize('damage', ['truncate', 'delete', 'manifest'])
def test_damaged_entry_is_detected_and_rebuilt(tmp_path, damage):
    cache = ArtifactCache(tmp_path / 'cache')
    log = tmp_path / 'log'
    entry, _ = cache.get_or_build('k', _build(log))
    if damage == 'truncate':
        (entry / 'model.onnx').write_bytes(b'x' * 10)
    elif damage == 'delete':
        (entry / 'sub' / 'ranges.json').unlink()
    else:
        (entry / 'manifest.json').write_text('{not json')
    assert not cache.entries()[0]['valid']
    entry, hit = cache.get_or_build('k', _build(log))
    assert not hit and log.read_text().count('built') == 2 and cache.valid(entry)


def test_failed_build_leaves_nothing(tmp_path):
    cache = ArtifactCache(tmp_path / 'cache')

    def broken(out):
        (out / 'half.onnx').write_bytes(b'half')
        raise RuntimeError('export failed')

    with pytest.raises(RuntimeError):
        cache.get_or_build('k', broken)
    assert [p.name for p in (tmp_path / 'cache').iterdir() if not p.name.endswith('.lock')] == []


def _race(root, log, barrier):
    barrier.wait()
    cache = ArtifactCache(root)

    def slow(out):
        time.sleep(0.5)
        _build(log)(out)

    cache.get_or_build('shared', slow)


def test_concurrent_writers_build_once(tmp_path):
    ctx = multiprocessing.get_context('spawn')
    barrier = ctx.Barrier(3)
    log = tmp_path / 'log'
    workers = [ctx.Process(target=_race, args=(tmp_path / 'cache', log, barrier)) for _ in range(3)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(60)
    assert all(w.exitcode == 0 for w in workers)
    assert log.read_text().count('built') == 1
    assert ArtifactCache(tmp_path / 'cache').entries()[0]['valid']


def test_clean_removes_entries_and_stale_builds(tmp_path):
    cache = ArtifactCache(tmp_path / 'cache')
    cache.get_or_build('a', _build(tmp_path / 'log'))
    (tmp_path / 'cache' / '.b.killed').mkdir()
    assert cache.clean() == 2 and cache.entries() == []


def test_content_key_is_order_independent_and_sensitive():
    assert content_key({'a': 1, 'b': [1, 2]}) == content_key({'b': [1, 2], 'a': 1})
    assert content_key({'a': 1}) != content_key({'a': 2})


def test_cache_keys_follow_what_shapes_the_artifacts(assets, demo_subset, tmp_path):
    """An eval threshold reuses the export; other weights or another calibration set rebuild it."""
    cache = f'cache.dir={tmp_path / "cache"}'
    data = ['data=coco', f'data.img_dir={DEMO_IMAGES}', f'data.ann_file={demo_subset}', cache,
            'eval.compare_native=false']
    first = run(compose_cfg(*data), tmp_path / 'a')
    thresholds = run(compose_cfg(*data, 'eval.score_thr=0.05', 'eval.nms_iou=0.5'), tmp_path / 'b')
    assert (first['cache'], thresholds['cache']) == ('miss', 'hit')
    assert thresholds['timings']['export_s'] == thresholds['timings']['build_s'] == 0
    assert first['artifacts']['onnx'] == thresholds['artifacts']['onnx']

    state = torch.load(assets.CHECKPOINT, weights_only=True)
    state['state_dict']['bbox_head.head_module.convs_pred.0.bias'][0] += 1.0
    other = tmp_path / 'other.pth'
    torch.save(state, other)
    assert run(compose_cfg(*data, f'model.checkpoint={other}'), tmp_path / 'c')['cache'] == 'miss'

    int8 = [*data, 'precision=int8', 'precision.calibration.num_images=2']
    assert run(compose_cfg(*int8), tmp_path / 'd')['cache'] == 'miss'
    assert run(compose_cfg(*int8, 'eval.max_per_img=100'), tmp_path / 'e')['cache'] == 'hit'
    assert run(compose_cfg(*int8, 'precision.calibration.seed=1'), tmp_path / 'f')['cache'] == 'miss'
