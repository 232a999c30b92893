"""Host decode + NMS against mmyolo's own `predict_by_feat`, on the same raw maps of real images.

    .venv/bin/python benchmarks/decode.py [--images DIR] [--num 32] [--repeats 3]

Prints ms per image for both, their ratio, and whether the detections are identical (labels and count).
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
    args = parser.parse_args()

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

    def time_all(fn):
        runs = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            outputs = [fn(case) for case in cases]
            runs.append((time.perf_counter() - start) / len(cases))
        return statistics.median(runs) * 1000, outputs

    with torch.no_grad():
        ref_ms, ref = time_all(lambda c: head.predict_by_feat(*c[0], batch_img_metas=c[2], rescale=True)[0])
        ours_ms, ours = time_all(lambda c: decoder(c[1], c[2])[0])
    same = all(len(r.labels) == len(o['labels']) and torch.equal(r.labels.sort()[0], o['labels'].sort()[0])
               for r, o in zip(ref, ours))
    print(f'{len(cases)} images, median of {args.repeats} passes, {torch.get_num_threads()} torch threads')
    print(f'predict_by_feat  {ref_ms:7.2f} ms/image')
    print(f'inloop decoder   {ours_ms:7.2f} ms/image   ({ours_ms / ref_ms:.2f}x; identical detections: {same})')


if __name__ == '__main__':
    main()
