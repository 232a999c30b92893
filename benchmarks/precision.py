"""Throughput of each precision of each runtime, measured in one process on the same images.

    .venv/bin/python benchmarks/precision.py [--images DIR] [--num 32] [--passes 5] [--threads 0] [--spinning]
                                        [--batch-sizes 1 4] [--instances 1 2] [--int8 "OVERRIDE …"]…
                                        [--runtimes onnx openvino] [--precisions fp32 int8]

Exports the YOLOv5s once, builds fp32, fp16 and int8 for each runtime (the default conf/precision/int8.yaml with
conf/runtime/<runtime>.yaml, calibrated on the demo images; each `--int8` adds a variant with those Hydra
overrides) and times `session.run` on the same preprocessed images for each batch size and number of concurrent
sessions, after a warm-up, in passes interleaved across all settings (median pass reported). Prints images/s and
the ratios to the same runtime's fp32 and to the first runtime at the same precision in the same setting, then each
build's best throughput over the settings and its ratio to the first runtime's fp32 best. No figure here is
asserted anywhere: this is a measurement.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
THREAD_OPTION = {'onnx': 'intra_op_threads', 'openvino': 'threads'}  # each runtime's inference threads


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--images', default=str(ROOT.parent / 'shared' / 'data' / 'coco128' / 'images'))
    parser.add_argument('--num', type=int, default=32)
    parser.add_argument('--passes', type=int, default=5)
    parser.add_argument('--threads', type=int, default=0)
    parser.add_argument('--batch-sizes', type=int, nargs='+', default=[1], metavar='B',
                        help='images per session.run; --num is rounded down to a multiple of each')
    parser.add_argument('--instances', type=int, nargs='+', default=[1, 2], metavar='K',
                        help='sessions running at once, each on its share of the batches; more than one: one '
                             'thread each (as task=bench), so they do not fight over the cores')
    parser.add_argument('--spinning', action='store_true',
                        help="ONNX Runtime's threads busy-wait between calls "
                             "(its default; the evaluation loop's is off)")
    parser.add_argument('--int8', action='append', default=[], metavar='"OVERRIDE …"',
                        help='an int8 variant to measure too, e.g. "precision.raw_map_convs=float"')
    parser.add_argument('--runtimes', nargs='+', default=['onnx'], choices=sorted(THREAD_OPTION),
                        help='the first is the one the others are compared with')
    parser.add_argument('--precisions', nargs='+', default=['fp32', 'fp16', 'int8'], choices=['fp32', 'fp16', 'int8'])
    args = parser.parse_args()

    from concurrent.futures import ThreadPoolExecutor

    import numpy as np
    import torch
    from hydra import compose, initialize_config_dir

    from integrations import assets
    from integrations.config import plain, register_resolvers
    from integrations.deploy.build import raw_map_conv_handling
    from integrations.deploy.checkpoint import load_checkpoint
    from integrations.deploy.graph import RawMapGraph, export_onnx
    from integrations.deploy.pipeline import loop_preprocessing
    from integrations.models import build_model, get_family, load_model_config
    from integrations.models.yolov5 import cut_head
    from runtime import get_runtime
    from runtime.calibration import CalibrationReader, select_images

    register_resolvers()
    mm_cfg = load_model_config(assets.YOLOV5S_CONFIG)
    model = build_model(mm_cfg)
    load_checkpoint(model, assets.CHECKPOINT)
    preprocess = loop_preprocessing(mm_cfg, model)
    images = sorted(Path(args.images).glob('*.jpg'))[:args.num] or sorted((ROOT / 'data/demo/images').iterdir())
    batches = [preprocess(p) for p in images]

    variants = {name: [f'precision={name}'] for name in dict.fromkeys(['fp32', *args.precisions])}
    variants.update({f'int8 {v}': ['precision=int8', *v.split()] for v in args.int8})
    with initialize_config_dir(str(ROOT / 'conf'), version_base='1.3'):
        configs = {f'{runtime} {name}': plain(compose('config', [f'runtime={runtime}', *overrides]))
                   for runtime in args.runtimes for name, overrides in variants.items()}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        with cut_head(model):
            export_onnx(RawMapGraph(model), torch.rand(1, 3, 640, 640), out / 'model.onnx',
                        [f'raw_map_{i}' for i in range(3)])
        sessions = {}  # (name, instances) -> that many sessions of one build
        for i, (name, cfg) in enumerate(configs.items()):
            precision = cfg['precision']
            options = {**cfg['runtime'], THREAD_OPTION[cfg['runtime']['name']]: args.threads}
            if 'allow_spinning' in options:
                options['allow_spinning'] = args.spinning
            runtime = get_runtime(options.pop('name'), precision=precision, **options)
            calibration = None
            if precision['name'] == 'int8':
                settings = precision['calibration']
                paths, _ = select_images(settings['data'], settings['num_images'], settings['seed'], set(images))
                calibration = CalibrationReader(paths, preprocess)
            keep_float, equalize = raw_map_conv_handling(get_family('yolov5'), model, precision)
            (out / str(i)).mkdir()
            artifact = runtime.build(out / 'model.onnx', out / str(i), calibration, keep_float, equalize)
            for k in args.instances:
                setattr(runtime, THREAD_OPTION[runtime.name], args.threads if k == 1 else 1)
                sessions[name, k] = [runtime.load(artifact) for _ in range(k)]

        # passes interleaved across all settings, median pass per setting: drift of the machine (clock,
        # neighbours) then hits every setting alike instead of whichever happened to run at the time
        stacked = {b: [np.concatenate(batches[j:j + b]) for j in range(0, len(batches) - b + 1, b)]
                   for b in args.batch_sizes}
        for group in sessions.values():
            for session in group:
                for b in args.batch_sizes:
                    session.run(stacked[b][0])  # warm-up

        def run_share(session, share):
            for batch in share:
                session.run(batch)

        pass_rates = {(name, b, k): [] for name, k in sessions for b in args.batch_sizes}
        with ThreadPoolExecutor(max(args.instances)) as pool:
            for _ in range(args.passes):
                for name, b, k in pass_rates:
                    start = time.perf_counter()
                    shares = [pool.submit(run_share, session, stacked[b][j::k])
                              for j, session in enumerate(sessions[name, k])]
                    for share in shares:
                        share.result()
                    pass_rates[name, b, k].append(len(stacked[b]) * b / (time.perf_counter() - start))
        speed = {setting: statistics.median(rates) for setting, rates in pass_rates.items()}

    print(f"{', '.join(args.runtimes)} on the CPU, {len(batches)} images x {args.passes} passes, threads="
          f"{args.threads or 'auto'} (1 per session when several run), ONNX Runtime's spinning "
          f"{'on' if args.spinning else 'off'}")
    first = args.runtimes[0]

    def against(name: str, b: int, k: int) -> str:
        """Ratios to the same runtime's fp32 and to the first runtime's same build, in the same setting."""
        runtime, variant = name.split(' ', 1)
        ips = speed[name, b, k]
        return f"{ips / speed[f'{runtime} fp32', b, k]:>8.2f}x{ips / speed[f'{first} {variant}', b, k]:>8.2f}x"

    width = max(len(name) for name in configs) + 2
    print(f"{'build':<{width}}{'batch':>6}{'sessions':>9}{'images/s':>10}{'ms/image':>10}{'vs fp32':>9}"
          f"{'vs ' + first:>9}")
    for (name, b, k), ips in speed.items():
        print(f"{name:<{width}}{b:>6}{k:>9}{ips:>10.2f}{1000 / ips:>10.1f}{against(name, b, k)}")
    if len(speed) > len(configs):
        best = {name: max((ips, b, k) for (n, b, k), ips in speed.items() if n == name) for name in configs}
        print(f"best setting per build (its throughput against {first} fp32's best):")
        for name, (ips, b, k) in best.items():
            print(f"{name:<{width}}{b:>6}{k:>9}{ips:>10.2f}{1000 / ips:>10.1f}"
                  f"{ips / best[f'{first} fp32'][0]:>8.2f}x")

if __name__ == '__main__':
    main()
