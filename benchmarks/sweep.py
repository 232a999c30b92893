"""How much a sweep over eval-only settings costs next to one job, with the artifact cache.

    .venv/bin/python benchmarks/sweep.py [--images DIR --ann FILE] [--precision int8] [--launcher basic|parallel]

Times, in one process and against a fresh cache: one job, then a 4-job multirun over eval thresholds (its first
job misses the cache, the others hit), then the same single job warm. Prints seconds and the ratio sweep/one.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def timed(args: list[str], env_cache: Path) -> float:
    import os
    start = time.perf_counter()
    subprocess.run([sys.executable, str(ROOT / 'run.py'), *args], cwd=ROOT, check=True, capture_output=True,
                   env={**os.environ, 'INLOOP_CACHE_DIR': str(env_cache)})
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--images', default=str(ROOT / 'data' / 'demo' / 'images'))
    parser.add_argument('--ann', default=str(ROOT / 'data' / 'demo' / 'annotations.json'))
    parser.add_argument('--precision', default='int8')
    parser.add_argument('--launcher', default='basic', choices=['basic', 'parallel'])
    args = parser.parse_args()
    common = ['data=coco', f'data.img_dir={args.images}', f'data.ann_file={args.ann}',
              f'precision={args.precision}', 'eval.compare_native=false']
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        one = timed([*common, f'hydra.run.dir={tmp / "one"}'], tmp / 'cache-a')
        sweep = timed(['-m', *common, 'eval.score_thr=0.001,0.01,0.02,0.05', f'hydra/launcher={args.launcher}',
                       f'hydra.sweep.dir={tmp / "sweep"}'], tmp / 'cache-b')
        warm = timed([*common, f'hydra.run.dir={tmp / "warm"}'], tmp / 'cache-a')
        states = [json.loads((tmp / 'sweep' / str(i) / 'results.json').read_text())['cache'] for i in range(4)]
        warm_results = json.loads((tmp / 'warm' / 'results.json').read_text())
    print(f'precision={args.precision}, launcher={args.launcher}, images from {args.images}')
    print(f'one job, cold cache:      {one:7.1f} s')
    print(f'4-job eval-only sweep:    {sweep:7.1f} s   ({sweep / one:.2f}x one job; cache {", ".join(states)})')
    print(f"one job, warm cache:      {warm:7.1f} s   (cache {warm_results['cache']}, export_s "
          f"{warm_results['timings']['export_s']}, build_s {warm_results['timings']['build_s']})")


if __name__ == '__main__':
    main()
