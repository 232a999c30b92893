"""Hydra callback that turns a multirun's results.json files into one answer: summary.csv, summary.md and
summary.png (mAP against latency, Pareto front marked) in the sweep directory, and the table printed."""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from hydra.experimental.callback import Callback

from common.files import write_atomic, write_text_atomic
from integrations.tasks.mlperf import REFERENCE_MAP, TARGET_FRACTION

COLUMNS = ['job', 'overrides', 'device_mAP', 'native_mAP', 'delta_native', 'delta_native_ci95', 'delta_reference',
           'meets_99', 'meets_mlperf', 'images_per_s', 'latency_ms', 'cache']


def meets(device: float, reference: float | None) -> bool | None:
    """MLPerf's accuracy rule: at least 99 % of the reference's mAP (None when there is no reference)."""
    return None if reference is None else device >= TARGET_FRACTION * reference


def collect(sweep_dir: Path) -> list[dict]:
    """One row per job that wrote a results.json (failed jobs have none and are left out)."""
    rows = []
    for results_file in sorted(sweep_dir.glob('*/results.json'), key=lambda p: int(p.parent.name)
                               if p.parent.name.isdigit() else p.parent.name):
        results = json.loads(results_file.read_text())
        overrides_file = results_file.parent / '.hydra' / 'overrides.yaml'
        overrides = ' '.join(line.removeprefix('- ').strip() for line in overrides_file.read_text().splitlines()
                             if line.strip()) if overrides_file.is_file() else ''
        timings = results['timings']
        native = results['native']['bbox_mAP'] if results.get('native') else None
        rows.append({
            'job': results_file.parent.name, 'overrides': overrides,
            'device_mAP': results['device']['bbox_mAP'],
            'native_mAP': native,
            'delta_native': results.get('delta', {}).get('device_minus_native'),
            # eval.explain's paired bootstrap interval of delta_native
            'delta_native_ci95': ' '.join(f'{v:+.4f}' for v in results['delta_ci95'])
                                 if results.get('delta_ci95') else None,
            'delta_reference': results.get('delta', {}).get('device_minus_reference'),
            'meets_99': meets(results['device']['bbox_mAP'], native),  # device >= 0.99 x native
            'meets_mlperf': meets(results['device']['bbox_mAP'], REFERENCE_MAP.get(results.get('model'))),
            'images_per_s': round(timings['images_per_s'], 3),
            'latency_ms': round(1000 * timings['runtime_s'] / results['num_images'], 3),
            'cache': results.get('cache'),
        })
    return rows


def pareto_front(rows: list[dict]) -> set[str]:
    """Jobs that no other job beats on both mAP (higher) and latency (lower)."""
    front = set()
    for row in rows:
        dominated = any(o['device_mAP'] >= row['device_mAP'] and o['latency_ms'] <= row['latency_ms']
                        and (o['device_mAP'] > row['device_mAP'] or o['latency_ms'] < row['latency_ms'])
                        for o in rows)
        if not dominated:
            front.add(row['job'])
    return front


def markdown(rows: list[dict], front: set[str]) -> str:
    lines = ['| ' + ' | '.join([*COLUMNS, 'pareto']) + ' |', '|' + '---|' * (len(COLUMNS) + 1)]
    for row in rows:
        cells = ['' if row[c] is None else str(row[c]) for c in COLUMNS]
        lines.append('| ' + ' | '.join([*cells, '*' if row['job'] in front else '']) + ' |')
    return '\n'.join(lines) + '\n'


def plot(rows: list[dict], front: set[str], path: Path) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.scatter([r['latency_ms'] for r in rows], [r['device_mAP'] for r in rows], color='tab:blue', label='job')
    best = sorted((r for r in rows if r['job'] in front), key=lambda r: r['latency_ms'])
    ax.plot([r['latency_ms'] for r in best], [r['device_mAP'] for r in best], 'o-', color='tab:red',
            label='Pareto front')
    for row in rows:
        ax.annotate(row['job'], (row['latency_ms'], row['device_mAP']), textcoords='offset points',
                    xytext=(4, 4), fontsize=8)
    ax.set_xlabel('runtime latency per image (ms)')
    ax.set_ylabel('device bbox mAP')
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_summary(sweep_dir: Path) -> list[dict]:
    rows = collect(sweep_dir)
    if not rows:
        print(f'no results.json under {sweep_dir}: nothing to summarize')
        return rows
    front = pareto_front(rows)
    text = io.StringIO(newline='')
    writer = csv.DictWriter(text, fieldnames=[*COLUMNS, 'pareto'])
    writer.writeheader()
    writer.writerows({**row, 'pareto': row['job'] in front} for row in rows)
    write_text_atomic(sweep_dir / 'summary.csv', text.getvalue())
    table = markdown(rows, front)
    write_text_atomic(sweep_dir / 'summary.md', table)
    write_atomic(sweep_dir / 'summary.png', lambda tmp: plot(rows, front, Path(tmp)))
    print(table)
    print(f'summary: {sweep_dir / "summary.csv"}, summary.md, summary.png')
    return rows


class SummaryCallback(Callback):
    """At the end of a multirun, summarize every job's results.json in the sweep directory."""

    def on_multirun_end(self, config, **kwargs) -> None:
        write_summary(Path(config.hydra.sweep.dir))
