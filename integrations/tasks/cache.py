"""`task=cache`: list the artifact cache, or clean it."""
from __future__ import annotations

from omegaconf import DictConfig


def run_cache(cfg: DictConfig) -> dict:
    """List the artifact cache, or clean it (cache.clean=all|invalid)."""
    from runtime.cache import ArtifactCache

    cache = ArtifactCache(cfg.cache.dir)
    if cfg.cache.clean:
        print(f'removed {cache.clean(only_invalid=cfg.cache.clean == "invalid")} entries from {cache.root}')
    rows = cache.entries()
    print(f'{len(rows)} entries in {cache.root}')
    for row in rows:
        d = row['describe']
        print(f"{row['key']}  {row['bytes'] / 2**20:8.1f} MiB  {'ok' if row['valid'] else 'DAMAGED':7s}  "
              f"{d.get('model')} {d.get('runtime')} {d.get('precision')}  {d.get('config')}")
    return {'cache_dir': str(cache.root), 'entries': rows}
