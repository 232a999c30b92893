"""What the VDSP resize kind does to each model family's input, under the SDK emulation of tests/emulation.

    .venv/bin/python benchmarks/vdsp_resize.py [--images DIR --ann FILE] [--models yolov5 retinanet]
        [--kinds BILINEAR_CV BILINEAR_PILLOW] [--retinanet-checkpoint FILE]

Per family and resize kind: how far the emulated VDSP op's input tensor is from the host pipeline's (mean and max
|difference| in the normalized units the model takes, over the images), and the bbox mAP of runtime=vacc
precision=fp16 beside the native model's. The mAP needs trained weights: YOLOv5s has them; RetinaNet only with
--retinanet-checkpoint (and openimages-mlperf ground truth, --retinanet-ann), otherwise its row shows the tensor
gap alone. Emulated: ONNX Runtime on the tensor the emulated op makes (cv2 for BILINEAR_CV, Pillow for
BILINEAR_PILLOW), not a card.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
EMULATION = ROOT / 'tests' / 'emulation'
sys.path[:0] = [str(ROOT), str(EMULATION)]


def tensor_gap(family: str, config: str, paths: list[Path], kind: str) -> tuple[float, float]:
    """Mean and max |host tensor - emulated VDSP tensor| over `paths`."""
    from vaststreamx.vdsp import FusionOp

    from integrations.deploy.pipeline import loop_preprocessing
    from integrations.models import build_model, get_family, load_model_config
    from runtime.vacc import read_planar_rgb, vdsp_params

    mm_cfg = load_model_config(config)
    host = loop_preprocessing(mm_cfg, build_model(mm_cfg))
    device = FusionOp(vdsp_params(get_family(family).device_preprocessing(mm_cfg), kind))
    means, peak = [], 0.0
    for path in paths:
        gap = np.abs(host(path)[0] - device(read_planar_rgb(path, even_size=True)[0]).astype(np.float32))
        means.append(float(gap.mean()))
        peak = max(peak, float(gap.max()))
    return float(np.mean(means)), peak


def device_map(overrides: list[str], kind: str, tmp: Path, env: dict) -> tuple[float, float]:
    run_dir = tmp / f'run-{len(list(tmp.iterdir()))}'
    subprocess.run([sys.executable, str(ROOT / 'run.py'), 'runtime=vacc', 'precision=fp16',
                    f'runtime.vdsp.resize_type={kind}', *overrides, f'hydra.run.dir={run_dir}'],
                   cwd=ROOT, env=env, check=True, capture_output=True)
    result = json.loads((run_dir / 'results.json').read_text())
    return result['device']['bbox_mAP'], result['native']['bbox_mAP']


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    coco128 = ROOT.parent / 'shared' / 'data' / 'coco128'
    parser.add_argument('--images', default=str(coco128 / 'images'))
    parser.add_argument('--ann', default=str(coco128 / 'instances.json'))
    parser.add_argument('--models', nargs='+', default=['yolov5', 'retinanet'], choices=['yolov5', 'retinanet'])
    parser.add_argument('--kinds', nargs='+', default=['BILINEAR_CV', 'BILINEAR_PILLOW'])
    parser.add_argument('--retinanet-checkpoint', default=None)
    parser.add_argument('--retinanet-ann', default=None, help='openimages-mlperf ground truth of --images')
    parser.add_argument('--gap-images', type=int, default=20, help='images the tensor gap is measured on')
    args = parser.parse_args()
    images = [Path(args.images) / im['file_name'] for im in json.loads(Path(args.ann).read_text())['images']]
    configs = {'yolov5': 'mmyolo::yolov5/yolov5_s-v61_syncbn_fast_8xb16-300e_coco.py',
               'retinanet': str(ROOT / 'configs' / 'mlperf_retinanet_800.py')}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        vamc = tmp / 'bin' / 'vamc'
        vamc.parent.mkdir()
        vamc.write_text(f'#!/bin/sh\nexec {sys.executable} {EMULATION / "vamc.py"} "$@"\n')
        vamc.chmod(0o755)
        runs = tmp / 'runs'
        runs.mkdir()
        env = {**os.environ, 'PATH': f"{vamc.parent}{os.pathsep}{os.environ['PATH']}",
               'PYTHONPATH': str(EMULATION), 'INLOOP_CACHE_DIR': str(tmp / 'cache')}
        print(f"{'model':<11}{'resize kind':<17}{'mean |Δ|':>10}{'max |Δ|':>10}{'device mAP':>12}{'native mAP':>12}")
        for family in args.models:
            overrides = None
            if family == 'yolov5':
                overrides = ['data=coco', f'data.img_dir={args.images}', f'data.ann_file={args.ann}']
            elif args.retinanet_checkpoint and args.retinanet_ann:
                overrides = ['model=retinanet', f'model.checkpoint={args.retinanet_checkpoint}', 'data=openimages',
                             f'data.img_dir={args.images}', f'data.ann_file={args.retinanet_ann}']
            for kind in args.kinds:
                mean_gap, max_gap = tensor_gap(family, configs[family], images[:args.gap_images], kind)
                maps = device_map(overrides, kind, runs, env) if overrides else None
                shown = f'{maps[0]:>12.3f}{maps[1]:>12.3f}' if maps else f"{'no weights':>12}{'':>12}"
                print(f'{family:<11}{kind:<17}{mean_gap:>10.4f}{max_gap:>10.3f}{shown}', flush=True)


if __name__ == '__main__':
    main()
