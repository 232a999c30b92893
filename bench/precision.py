"""Throughput of each precision of the ONNX Runtime path, measured in one process on the same images.

    .venv/bin/python bench/precision.py [--images DIR] [--num 32] [--passes 5] [--threads 0] [--spinning]
                                        [--batch-sizes 1 4] [--int8 "OVERRIDE …"]…

Exports the YOLOv5s once, builds fp32, fp16 and int8 (the default conf/precision/int8.yaml, calibrated on the
demo images; each `--int8` adds a variant with those Hydra overrides) and times `session.run` on the same
preprocessed images at each batch size, after a warm-up, in passes interleaved across precisions and batch
sizes (median pass reported). Prints images/s and the ratio to fp32 at the same batch size, then each
precision's best throughput over the batch sizes and its ratio to fp32's best. No figure here is asserted
anywhere: this is a measurement.
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--images', default=str(ROOT.parent / 'shared' / 'data' / 'coco128' / 'images'))
    parser.add_argument('--num', type=int, default=32)
    parser.add_argument('--passes', type=int, default=5)
    parser.add_argument('--threads', type=int, default=0)
    parser.add_argument('--batch-sizes', type=int, nargs='+', default=[1], metavar='B',
                        help='images per session.run; --num is rounded down to a multiple of each')
    parser.add_argument('--spinning', action='store_true',
                        help="ONNX Runtime's threads busy-wait between calls (its default; the evaluation loop's is off)")
    parser.add_argument('--int8', action='append', default=[], metavar='"OVERRIDE …"',
                        help='an int8 variant to measure too, e.g. "precision.raw_map_convs=float"')
    args = parser.parse_args()

    import numpy as np
    import torch
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from integrations import assets
    from integrations.config import register_resolvers
    from integrations.deploy import loop_preprocessing, raw_map_conv_handling
    from integrations.export import RawMapGraph, export_onnx
    from integrations.mmengine.runner import build_model, load_model_config
    from integrations.models import get_family
    from integrations.models.yolov5 import cut_head
    from runtime import get_runtime
    from runtime.calibration import CalibrationReader, select_images

    register_resolvers()
    mm_cfg = load_model_config(assets.YOLOV5S_CONFIG)
    model = build_model(mm_cfg, assets.CHECKPOINT)
    preprocess = loop_preprocessing(mm_cfg, model)
    images = sorted(Path(args.images).glob('*.jpg'))[:args.num] or sorted((ROOT / 'data/demo/images').iterdir())
    batches = [preprocess(p) for p in images]

    variants = {'fp32': ['precision=fp32'], 'fp16': ['precision=fp16'], 'int8': ['precision=int8']}
    variants.update({f'int8 {v}': ['precision=int8', *v.split()] for v in args.int8})
    with initialize_config_dir(str(ROOT / 'conf'), version_base='1.3'):
        precisions = {name: OmegaConf.to_container(compose('config', overrides).precision, resolve=True)
                      for name, overrides in variants.items()}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        with cut_head(model):
            export_onnx(RawMapGraph(model), torch.rand(1, 3, 640, 640), out / 'model.onnx', 'raw_map')
        sessions = {}
        for i, (name, precision) in enumerate(precisions.items()):
            runtime = get_runtime('onnx', precision=precision, intra_op_threads=args.threads,
                                  allow_spinning=args.spinning)
            calibration = None
            if precision['name'] == 'int8':
                settings = precision['calibration']
                paths, _ = select_images(settings['data'], settings['num_images'], settings['seed'], set(images))
                calibration = CalibrationReader(paths, preprocess)
            keep_float, equalize = raw_map_conv_handling(get_family('yolov5'), model, precision)
            (out / str(i)).mkdir()
            sessions[name] = runtime.load(runtime.build(out / 'model.onnx', out / str(i), calibration, keep_float,
                                                        equalize))

        # passes interleaved across precisions and batch sizes, median pass per setting: drift of the machine
        # (clock, neighbours) then hits every setting alike instead of whichever happened to run at the time
        stacked = {b: [np.concatenate(batches[j:j + b]) for j in range(0, len(batches) - b + 1, b)]
                   for b in args.batch_sizes}
        for session in sessions.values():
            for b in args.batch_sizes:
                session.run(stacked[b][0])  # warm-up
        pass_rates = {(name, b): [] for name in sessions for b in args.batch_sizes}
        for _ in range(args.passes):
            for name, b in pass_rates:
                start = time.perf_counter()
                for batch in stacked[b]:
                    sessions[name].run(batch)
                pass_rates[name, b].append(len(stacked[b]) * b / (time.perf_counter() - start))
        speed = {setting: statistics.median(rates) for setting, rates in pass_rates.items()}

    print(f'onnxruntime CPU, {len(batches)} images x {args.passes} passes, '
          f'threads={args.threads or "auto"}, spinning={"on" if args.spinning else "off"}')
    width = max(len(name) for name in sessions) + 2
    print(f"{'precision':<{width}}{'batch':>6}{'images/s':>10}{'ms/image':>10}{'vs fp32':>9}")
    for (name, b), ips in speed.items():
        print(f"{name:<{width}}{b:>6}{ips:>10.2f}{1000 / ips:>10.1f}{ips / speed['fp32', b]:>8.2f}x")
    if len(args.batch_sizes) > 1:
        best = {name: max((speed[name, b], b) for b in args.batch_sizes) for name in sessions}
        print('best batch size per precision:')
        for name, (ips, b) in best.items():
            print(f"{name:<{width}}{b:>6}{ips:>10.2f}{1000 / ips:>10.1f}{ips / best['fp32'][0]:>8.2f}x")


if __name__ == '__main__':
    main()
