"""Host decode + NMS against mmyolo's own `predict_by_feat`, on the same raw maps of real images; and the host
decode time of every model=mm head (its own predict_by_feat, and the fast decoder where one is registered).

    .venv/bin/python benchmarks/decode.py [--images DIR] [--num 32] [--repeats 3] [--mm-num 8] [--mm rtmdet_s …]

Prints ms per image for both, their ratio, and whether the detections are identical (labels and count). The mm
heads run with random weights (none can be fetched here) whose final convs are redrawn so that scores spread as
a trained model's would (tests/parity.py's `lively`): how many candidates reach NMS decides the time, so those
figures are indicative only.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--images', default=str(ROOT.parent / 'shared' / 'data' / 'coco128' / 'images'))
    parser.add_argument('--num', type=int, default=32)
    parser.add_argument('--repeats', type=int, default=3)
    parser.add_argument('--mm-num', type=int, default=8, help='images per model=mm head')
    parser.add_argument('--mm', nargs='*', default=None, help='model=mm configs by test name (default: all)')
    args = parser.parse_args()
    yolov5s(args)
    mm_heads(args)


def median_ms(fn, cases: list, repeats: int) -> tuple[float, list]:
    """Median over `repeats` passes of fn over the cases, in ms per case; the last pass's outputs."""
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        outputs = [fn(case) for case in cases]
        runs.append((time.perf_counter() - start) / len(cases))
    return statistics.median(runs) * 1000, outputs


def mm_heads(args) -> None:
    """Each model=mm head at its config's input size: the generic decode, and the fast one where registered."""
    import torch
    from mmengine.dataset import pseudo_collate

    from integrations.deploy.pipeline import image_pipeline
    from integrations.models import build_model, load_model_config, mm
    from tests.parity import lively
    from tests.test_mm import CONFIGS

    paths = sorted(Path(args.images).glob('*.jpg'))[:args.mm_num]
    print(f'\nmodel=mm heads, {len(paths)} images, random weights (indicative)')
    print(f"{'model':<16}{'input':>10}{'predict_by_feat':>17}{'fast':>10}")
    for name in args.mm or CONFIGS:
        cfg = load_model_config(CONFIGS[name])
        mm.prepare_config(cfg, {})
        model = build_model(cfg, seed=0)
        mm.prepare_model(model)
        shape = mm.input_shape(cfg)
        pipeline = image_pipeline(cfg)
        batches = [model.data_preprocessor(pseudo_collate([pipeline(dict(img_path=str(p), img_id=0))]), False)
                   for p in paths]
        lively(model, [b['inputs'] for b in batches[:4]])
        cases = []
        with torch.no_grad():
            for batch in batches:
                cases.append((mm.flatten(model._forward(batch['inputs'])), [batch['data_samples'][0].metainfo]))
        generic = mm.build_decoder(model, shape, fast=False)
        generic_ms, _ = median_ms(lambda c: generic(*c), cases, args.repeats)
        fast = mm.FAST_DECODERS.get(type(model.bbox_head).__name__)
        fast_ms = f'{median_ms(lambda c, d=fast(model, shape): d(*c), cases, args.repeats)[0]:8.2f}' if fast else \
            '       -'
        print(f"{name:<16}{'x'.join(map(str, shape[1:])):>10}{generic_ms:15.2f}  {fast_ms}", flush=True)


def yolov5s(args) -> None:
    """The real YOLOv5s: the vectorized decoder against mmyolo's predict_by_feat."""
    import torch
    from mmengine.dataset import pseudo_collate

    from integrations import assets
    from integrations.deploy.checkpoint import load_checkpoint
    from integrations.deploy.pipeline import image_pipeline
    from integrations.models import build_model, load_model_config
    from integrations.models.yolov5 import build_decoder, cut_head

    cfg = load_model_config(assets.YOLOV5S_CONFIG)
    model = build_model(cfg)
    load_checkpoint(model, assets.CHECKPOINT)
    head = model.bbox_head
    pipeline = image_pipeline(cfg)
    decoder = build_decoder(model, (3, 640, 640))
    cases = []
    for path in sorted(Path(args.images).glob('*.jpg'))[:args.num]:
        batch = model.data_preprocessor(pseudo_collate([pipeline(dict(img_path=str(path), img_id=0))]), False)
        with torch.no_grad():
            feats = model.extract_feat(batch['inputs'])
            split = head(feats)
            with cut_head(model):
                raw = list(model._forward(batch['inputs']))
        cases.append((split, raw, [batch['data_samples'][0].metainfo]))

    with torch.no_grad():
        ref_ms, ref = median_ms(lambda c: head.predict_by_feat(*c[0], batch_img_metas=c[2], rescale=True)[0], cases,
                                args.repeats)
        ours_ms, ours = median_ms(lambda c: decoder(c[1], c[2])[0], cases, args.repeats)
    same = all(len(r.labels) == len(o['labels']) and torch.equal(r.labels.sort()[0], o['labels'].sort()[0])
               for r, o in zip(ref, ours))
    print(f'{len(cases)} images, median of {args.repeats} passes, {torch.get_num_threads()} torch threads')
    print(f'predict_by_feat  {ref_ms:7.2f} ms/image')
    print(f'inloop decoder   {ours_ms:7.2f} ms/image   ({ours_ms / ref_ms:.2f}x; identical detections: {same})')


if __name__ == '__main__':
    main()
