"""Interruptions lose nothing: a real run stopped by Ctrl-C (SIGINT to its process group, as a terminal sends it),
SIGTERM or SIGKILL during export, calibration and build, evaluation, or results writing leaves no results.json and
no half-built cache entry, and the same command then runs to the end."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from common.files import write_json_atomic
from runtime.cache import ArtifactCache
from tests.conftest import ROOT

COMMAND = ['precision=int8', 'precision.calibration.num_images=3', 'eval.num_images=6', 'eval.prefetch=0']


def _start(run_dir, cache_dir, *extra):
    env = {**os.environ, 'INLOOP_CACHE_DIR': str(cache_dir), 'PYTHONUNBUFFERED': '1'}
    # Ctrl-C as a terminal's foreground job gets it: a suite started in the background (`make test &`) passes on an
    # ignored SIGINT, which Python then keeps ignoring
    return subprocess.Popen([sys.executable, str(ROOT / 'run.py'), *COMMAND, *extra, f'hydra.run.dir={run_dir}'],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _stop_at(process, marker: str, sig) -> str:
    """Read the run's stderr until `marker`, then signal its process group; the whole stderr."""
    seen, deadline = b'', time.monotonic() + 600
    while marker.encode() not in seen:
        chunk = os.read(process.stderr.fileno(), 4096)
        assert chunk and time.monotonic() < deadline, f'run ended before {marker!r}: {seen[-2000:]!r}'
        seen += chunk
    time.sleep(0.3)  # into the stage, not between the two writes of the marker's own line
    os.killpg(process.pid, sig)
    _, rest = process.communicate(timeout=300)
    return (seen + rest).decode(errors='replace')


def _cache_is_whole(cache_dir) -> None:
    """Only complete entries: every entry's manifest checks out, and no temporary build is left."""
    cache = ArtifactCache(cache_dir)
    assert all(row['valid'] for row in cache.entries())
    assert not [p for p in cache.root.glob('.*') if p.is_dir()] if cache.root.is_dir() else True


@pytest.mark.slow
@pytest.mark.parametrize('marker, sig', [
    ('exporting the raw-map graph', signal.SIGINT),   # during export
    ('calibration images:', signal.SIGINT),          # during calibration (the int8 build)
    ('building for runtime', signal.SIGKILL),        # the build, killed outright
    ('evaluating:', signal.SIGTERM),                 # during evaluation
])
def test_a_stopped_run_leaves_nothing_half_done_and_the_rerun_completes(tmp_path, marker, sig):
    run_dir, cache_dir = tmp_path / 'run', tmp_path / 'cache'
    process = _start(run_dir, cache_dir)
    stderr = _stop_at(process, marker, sig)
    if sig == signal.SIGKILL:
        assert process.returncode == -signal.SIGKILL
    else:
        assert process.returncode == (130 if sig == signal.SIGINT else 143), stderr[-2000:]
        assert 'Traceback' not in stderr and stderr.rstrip().splitlines()[-1].startswith('interrupted'), \
            stderr[-2000:]
    assert not (run_dir / 'results.json').exists()
    if sig != signal.SIGKILL:  # a killed process cannot tidy; the next run removes its temporary build
        _cache_is_whole(cache_dir)
    again = _start(run_dir, cache_dir)
    _, stderr = again.communicate(timeout=900)
    assert again.returncode == 0, stderr.decode()[-2000:]
    assert json.loads((run_dir / 'results.json').read_text())['device']['bbox_mAP'] >= 0
    _cache_is_whole(cache_dir)


def test_results_writing_interrupted_leaves_the_old_file_or_none(tmp_path, monkeypatch):
    """Ctrl-C while results.json is being written: the previous file stays whole, no temporary file remains."""
    target = tmp_path / 'results.json'
    write_json_atomic(target, {'run': 1})

    def interrupted(self, text, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr('pathlib.Path.write_text', interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_json_atomic(target, {'run': 2})
    monkeypatch.undo()
    assert json.loads(target.read_text()) == {'run': 1} and [p.name for p in tmp_path.iterdir()] == ['results.json']
