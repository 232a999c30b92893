"""What `eval.explain=true` finds and costs on coco128 (YOLOv5s, ONNX Runtime): the breakdown of each setting, and
the explained run's wall time against the plain run's, both measured in this one invocation.

    python benchmarks/breakdown.py                       # fp16, int8, int8 raw_map_convs=float, the seeds' decode
    python benchmarks/breakdown.py --settings precision=int8 --num-images 32

Each run is a fresh `python run.py` with a warm artifact cache (a first run of each setting builds it), so
the ratio compares evaluation with evaluation. Prints a markdown table per setting.
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
COCO128 = ROOT.parent / 'shared' / 'data' / 'coco128'
SETTINGS = ['precision=fp16', 'precision=int8', 'precision=int8 precision.raw_map_convs=float',
            'precision=fp32 eval.multi_label=false eval.score_thr=0.01']


def run(overrides: list[str], run_dir: Path) -> tuple[dict, float]:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, str(ROOT / 'run.py'), *overrides, f'hydra.run.dir={run_dir}'], cwd=ROOT,
                          capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(f'run failed: {" ".join(overrides)}\n{done.stderr[-2000:]}')
    return json.loads((run_dir / 'results.json').read_text()), wall


def table(results: dict) -> str:
    lines = ['| stage | bbox mAP | delta | 95 % interval |', '|---|---|---|---|']
    for e in results['breakdown']:
        delta = '' if e['delta'] is None else f"{e['delta']:+.4f}"
        ci = '' if e['delta_ci95'] is None else f"[{e['delta_ci95'][0]:+.4f}, {e['delta_ci95'][1]:+.4f}]"
        lines.append(f"| {e['stage']}: {e['label']} | {e['bbox_mAP']:.4f} | {delta} | {ci} |")
    low, high = results['delta_ci95']
    lines.append(f"\ndevice - native {results['delta']['device_minus_native']:+.4f}, 95 % interval "
                 f"[{low:+.4f}, {high:+.4f}] (width {high - low:.4f})")
    return '\n'.join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--settings', nargs='+', default=SETTINGS, help='override sets, each one quoted string')
    parser.add_argument('--num-images', type=int, default=None, help='the first N of coco128 (default: all)')
    args = parser.parse_args()
    data = ['data=coco', f'data.img_dir={COCO128 / "images"}', f'data.ann_file={COCO128 / "instances.json"}']
    if args.num_images:
        data.append(f'eval.num_images={args.num_images}')
    with tempfile.TemporaryDirectory(prefix='inloop-explain-') as tmp:
        tmp = Path(tmp)
        for n, setting in enumerate(args.settings):
            overrides = [*data, *setting.split()]
            if n == 0:  # the cost, on the first setting: the cache warmed, then plain and explained
                run(overrides, tmp / 'warm')
                _, plain_s = run(overrides, tmp / 'plain')
            results, explained_s = run([*overrides, 'eval.explain=true'], tmp / f'explain{n}')
            print(f'### {setting}\n\n{table(results)}\n', flush=True)
            if n == 0:
                t = results['explain']['timings']
                print(f'cost: plain run {plain_s:.1f} s, explained {explained_s:.1f} s, ratio '
                      f'{explained_s / plain_s:.2f}; of it the config-pipeline pass {t["config_pass_s"]:.1f} s, '
                      f'the bootstrap ({results["explain"]["resamples"]} resamples) {t["bootstrap_s"]:.1f} s '
                      f'({t["bootstrap_s"] / results["timings"]["eval_s"]:.0%} of the evaluation\'s '
                      f'{results["timings"]["eval_s"]:.1f} s), the report {t["report_s"]:.1f} s\n', flush=True)


if __name__ == '__main__':
    main()
