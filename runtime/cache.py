"""Content-addressed artifact cache: an export + runtime build is reused by every run whose inputs are the same.

An entry is a directory named by the key (a digest of everything that shapes the artifacts: weights, model
config, export and precision settings, calibration images, runtime and exporter versions). It is built in a
temporary directory and renamed into place, under an exclusive file lock per key, so parallel sweep jobs build
it once and never see half of it. A manifest of file sizes and digests detects damaged entries, which are
rebuilt.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import shutil
import tempfile
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

MANIFEST = 'manifest.json'


def content_key(parts: dict) -> str:
    """A stable digest of a JSON-serializable description."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 20), b''):
            h.update(block)
    return h.hexdigest()


class ArtifactCache:
    """Entries under `root`; `get_or_build(key, build)` returns (entry dir, hit)."""

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser()

    @contextmanager
    def _lock(self, key: str):
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / f'.{key}.lock', 'w') as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def valid(self, entry: Path) -> bool:
        """Every file the manifest lists is there with its size and digest."""
        try:
            manifest = json.loads((entry / MANIFEST).read_text())
            return all((entry / name).stat().st_size == meta['size'] and _file_digest(entry / name) == meta['sha256']
                       for name, meta in manifest['files'].items())
        except (OSError, ValueError, KeyError, TypeError):
            return False

    def get_or_build(self, key: str, build: Callable[[Path], None], describe: dict | None = None) -> tuple[Path, bool]:
        """The entry for `key`; on a miss (or a damaged entry) `build(tmp_dir)` fills a new one."""
        entry = self.root / key
        with self._lock(key):
            if entry.is_dir():
                if self.valid(entry):
                    return entry, True
                shutil.rmtree(entry)
            for stale in self.root.glob(f'.{key}.*'):  # a build of this key killed before its rename
                if stale.is_dir():
                    shutil.rmtree(stale, ignore_errors=True)
            tmp = Path(tempfile.mkdtemp(prefix=f'.{key}.', dir=self.root))
            try:
                build(tmp)
                files = {str(p.relative_to(tmp)): {'size': p.stat().st_size, 'sha256': _file_digest(p)}
                         for p in sorted(tmp.rglob('*')) if p.is_file()}
                manifest = {'key': key, 'created': time.time(), 'describe': describe or {}, 'files': files}
                (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, default=str))
                tmp.rename(entry)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
        return entry, False

    def entries(self) -> list[dict]:
        """What is cached: key, size, creation time, description, and whether the entry is intact."""
        if not self.root.is_dir():
            return []
        rows = []
        for entry in sorted(p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith('.')):
            try:
                manifest = json.loads((entry / MANIFEST).read_text())
            except (OSError, ValueError):
                manifest = {}
            size = sum(p.stat().st_size for p in entry.rglob('*') if p.is_file())
            rows.append({'key': entry.name, 'bytes': size, 'created': manifest.get('created'),
                         'describe': manifest.get('describe', {}), 'valid': self.valid(entry)})
        return rows

    def clean(self, only_invalid: bool = False) -> int:
        """Remove entries (all, or only damaged ones) and stale temporary builds; returns how many."""
        removed = 0
        for row in self.entries():
            if not only_invalid or not row['valid']:
                with self._lock(row['key']):
                    shutil.rmtree(self.root / row['key'], ignore_errors=True)
                removed += 1
        for tmp in [p for p in self.root.glob('.*') if p.is_dir()]:  # builds killed before their rename
            with self._lock(tmp.name.split('.')[1]):
                if tmp.exists():
                    shutil.rmtree(tmp, ignore_errors=True)
                    removed += 1
        return removed
