"""Memory and speed against the number of evaluated images: peak RSS and images/s of `python run.py` on the same
images repeated under new ids (coco128's 96 images, so every image is real and the mAP stays the same).

    python benchmarks/scale.py                                   # YOLOv5s, 1,000 and 5,000 images, with and without
                                                            # the native model, engine=mmengine and lightning
    python benchmarks/scale.py --sizes 500 2000 --family retinanet --engines mmengine --native off
    python benchmarks/scale.py --engines lightning --native on --flat-memory    # eval.flat_memory=true

Each run is a fresh process; its peak RSS comes from the kernel (wait4). A short first run builds the model, so
that every measured run is a cache hit (building peaks higher than evaluating). The growth per image between the two
largest sizes is what the evaluation holds per image. RetinaNet runs at 160x160 by default (a config inheriting
MLPerf's, only the input size changed; --retinanet-size) with eval.score_thr=0, so each image keeps 300 detections
as the real model's do, at a speed this machine can repeat thousands of times (13.7 images/s here; 0.9 at 320).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COCO128 = ROOT.parent / 'shared' / 'data' / 'coco128'
RETINANET_CONFIG = """_base_ = '{base}'
image_size = ({size}, {size})
model = dict(image_size=image_size)
test_pipeline = [
    dict(type='LoadImageFromFile', imdecode_backend='cv2', color_type='color', to_float32=True),
    dict(type='Resize', scale=({size}, {size}), keep_ratio=False, backend='cv2', interpolation='bilinear'),
    dict(type='LoadAnnotations', with_bbox=True),
    dict(type='PackDetInputs', meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor')),
]
test_dataloader = dict(dataset=dict(pipeline=test_pipeline))
"""


def repeated(source: dict, size: int) -> dict:
    """`size` images cycling through `source`'s, each copy under a new image id, with its annotations."""
    by_image: dict = {}
    for annotation in source['annotations']:
        by_image.setdefault(annotation['image_id'], []).append(annotation)
    images, annotations = [], []
    for n in range(size):
        image = source['images'][n % len(source['images'])]
        images.append({**image, 'id': n + 1})
        annotations += [{**a, 'image_id': n + 1, 'id': len(annotations) + j + 1}
                        for j, a in enumerate(by_image.get(image['id'], []))]
    return {**source, 'images': images, 'annotations': annotations}


def measure(overrides: list[str], run_dir: Path) -> dict:
    """Run `python run.py overrides`; its peak RSS (MB) and images/s."""
    run_dir.mkdir(parents=True)
    log = run_dir / 'output.log'  # a file, not a pipe: a pipe nobody reads fills up and stops the run
    start = time.perf_counter()
    with open(log, 'w') as out:
        process = subprocess.Popen([sys.executable, str(ROOT / 'run.py'), *overrides, f'hydra.run.dir={run_dir}'],
                                   cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - start
    if status != 0:
        raise SystemExit(f'run failed: {" ".join(overrides)}\n{log.read_text()[-2000:]}')
    results = json.loads((run_dir / 'results.json').read_text())
    return {'peak_rss_mb': usage.ru_maxrss / 1024, 'images_per_s': results['timings']['images_per_s'],
            'wall_s': wall, 'device_mAP': results['device']['bbox_mAP']}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--sizes', type=int, nargs='+', default=[1000, 5000])
    parser.add_argument('--family', choices=['yolov5', 'retinanet'], default='yolov5')
    parser.add_argument('--engines', nargs='+', default=['mmengine', 'lightning'])
    parser.add_argument('--native', choices=['both', 'on', 'off'], default='both')
    parser.add_argument('--flat-memory', action='store_true', help='eval.flat_memory=true (common/memory.py)')
    parser.add_argument('--retinanet-size', type=int, default=160, help='RetinaNet input side (MLPerf: 800)')
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix='inloop-scale-') as tmp:
        tmp = Path(tmp)
        source = json.loads((COCO128 / 'instances.json').read_text())
        model = [f'eval.flat_memory={str(args.flat_memory).lower()}']
        if args.family == 'retinanet':
            sys.path.insert(0, str(ROOT))
            from evaluators.openimages_mlperf import convert
            source = convert(source)
            config = tmp / f'retinanet_{args.retinanet_size}.py'
            config.write_text(RETINANET_CONFIG.format(base=ROOT / 'configs' / 'mlperf_retinanet_800.py',
                                                      size=args.retinanet_size))
            model += ['model=retinanet', f'model.config={config}', 'eval.score_thr=0', 'data=openimages']
        else:
            model += ['data=coco']
        natives = {'both': [True, False], 'on': [True], 'off': [False]}[args.native]
        rows = []
        for engine in args.engines:
            for native in natives:
                figures = {}
                for size in sorted(args.sizes):
                    ann = tmp / f'repeated{size}.json'
                    ann.write_text(json.dumps(repeated(source, size)))
                    overrides = [*model, f'data.img_dir={COCO128 / "images"}', f'data.ann_file={ann}',
                                 f'engine={engine}', f'eval.compare_native={str(native).lower()}']
                    if not figures:  # a run that builds the model peaks higher than any evaluation: build first
                        measure([*overrides, 'eval.num_images=2'], tmp / f'warm-{engine}-{native}')
                    figures[size] = measure(overrides, tmp / f'run-{engine}-{native}-{size}')
                    row = {'family': args.family, 'engine': engine, 'native': native,
                           'flat_memory': args.flat_memory, 'images': size, **figures[size]}
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                small, large = sorted(figures)[-2:] if len(figures) > 1 else (None, None)
                if small:
                    growth = (figures[large]['peak_rss_mb'] - figures[small]['peak_rss_mb']) * 1024 / (large - small)
                    print(f'{args.family} engine={engine} native={native} flat_memory={args.flat_memory}: '
                          f'{growth:.1f} KB more peak RSS per image ({small} -> {large} images)', flush=True)


if __name__ == '__main__':
    main()
