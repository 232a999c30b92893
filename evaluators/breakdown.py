"""What `eval.explain=true` computes from an evaluation, engine-independent: the stage-by-stage mAP with paired
bootstrap intervals, re-accumulated from each stage's COCOeval records (evaluators/cocoeval.py: the images are
matched once, every resample only re-weights them), and the detection-level diff of native and device on the
same image."""
from __future__ import annotations

import heapq

import numpy as np
import torch
from torchvision.ops import box_iou

from evaluators.cocoeval import Stacked, StreamingCocoEval, resample_weights, weighted_map

SIZES = {'small': (0, 32 ** 2), 'medium': (32 ** 2, 96 ** 2), 'large': (96 ** 2, float('inf'))}  # COCO's areas


def stage_maps(stream: StreamingCocoEval, stage_records: list[list], resamples: int, seed: int):
    """(point, resampled): each stage's bbox mAP (COCOeval's stats[0]) on the evaluated images, shape (S,), and
    on `resamples` bootstrap resamples of them, shape (S, B) — the same resampled images for every stage, so
    differences between stages are paired."""
    p = stream.params
    max_det = 100 if 100 in p.maxDets else p.maxDets[-1]  # stats[0] is COCOeval's maxDets=100 figure
    num_images = len(stage_records[0])
    weights = np.vstack([np.ones((1, num_images), np.int64), resample_weights(num_images, resamples, seed)])
    maps = np.stack([weighted_map(Stacked(records, len(stream.cat_ids), len(p.areaRng)), weights, p.recThrs,
                                  len(p.iouThrs), max_det) for records in stage_records])
    return maps[:, 0], maps[:, 1:]


def interval(values: np.ndarray) -> list[float]:
    """The 95 % percentile interval of bootstrap values."""
    low, high = np.percentile(values, [2.5, 97.5])
    return [round(float(low), 6), round(float(high), 6)]


def breakdown(stages: list[tuple[str, str]], point: np.ndarray, resampled: np.ndarray) -> list[dict]:
    """One entry per (stage, label): its mAP and, from the second on, its delta to the stage before with that
    delta's interval. The deltas telescope: they sum to the last stage's mAP minus the first's."""
    entries = []
    for s, (stage, label) in enumerate(stages):
        entry = {'stage': stage, 'label': label, 'bbox_mAP': round(float(point[s]), 6), 'delta': None,
                 'delta_ci95': None}
        if s:
            entry['delta'] = round(float(point[s] - point[s - 1]), 6)
            entry['delta_ci95'] = interval(resampled[s] - resampled[s - 1])
        entries.append(entry)
    return entries


def match(native: dict, device: dict, iou_thr: float) -> tuple[list[tuple[int, int]], list[int], list[int]]:
    """Greedy one-to-one matching, native detections by decreasing score, each to the unmatched device detection
    of the same class with the highest IoU >= iou_thr: (pairs (native, device), lost native, new device)."""
    iou = box_iou(torch.from_numpy(native['bboxes']), torch.from_numpy(device['bboxes'])).numpy()
    same = native['labels'][:, None] == device['labels'][None]
    iou = np.where(same & (iou >= iou_thr), iou, -1.0)
    pairs, taken = [], np.zeros(len(device['bboxes']), bool)
    for i in np.argsort(-native['scores'], kind='stable'):
        candidates = np.where(taken, -1.0, iou[i])
        if len(candidates) and candidates.max() >= 0:
            j = int(candidates.argmax())
            taken[j] = True
            pairs.append((int(i), j))
    matched = {i for i, _ in pairs}
    return pairs, [i for i in range(len(native['bboxes'])) if i not in matched], np.flatnonzero(~taken).tolist()


def size_of(box: np.ndarray) -> str:
    area = float((box[2] - box[0]) * (box[3] - box[1]))
    return next(name for name, (low, high) in SIZES.items() if low <= area < high)


def _counts() -> dict:
    return {'native': 0, 'device': 0, 'matched': 0, 'lost': 0, 'new': 0, 'score_shift_sum': 0.0}


class DetectionDiff:
    """Native against device detections, image by image: detections scoring at least `score_thr` (what a user
    would draw) are matched by class and IoU >= `iou_thr`; counted overall, by object size (COCO's areas, of the
    native box, or of the device box for a new one) and by class; the `keep` images with the most lost + new
    detections are kept with their detections, for pictures."""

    def __init__(self, classes, score_thr: float = 0.3, iou_thr: float = 0.5, keep: int = 4):
        self.classes = list(classes)
        self.score_thr, self.iou_thr, self.keep = score_thr, iou_thr, keep
        self.total = _counts()
        self.by_size = {name: _counts() for name in SIZES}
        self.by_class: dict[int, dict] = {}
        self.worst: list = []  # heap of (difference, -order, entry)
        self.images = 0

    def _shown(self, detections: dict) -> dict:
        keep = np.asarray(detections['scores']) >= self.score_thr
        return {k: np.asarray(detections[k])[keep] for k in ('bboxes', 'scores', 'labels')}

    def add(self, img_id, img_path: str, native: dict, device: dict) -> None:
        """One image's detections (dicts of bboxes xyxy, scores, labels as arrays, in original pixels)."""
        native, device = self._shown(native), self._shown(device)
        pairs, lost, new = match(native, device, self.iou_thr)

        def count(label: int, size: str, key: str, value=1) -> None:
            for counts in (self.total, self.by_size[size], self.by_class.setdefault(int(label), _counts())):
                counts[key] += value

        for i, box in enumerate(native['bboxes']):
            count(native['labels'][i], size_of(box), 'native')
        for j, box in enumerate(device['bboxes']):
            count(device['labels'][j], size_of(box), 'device')
        shift = 0.0
        for i, j in pairs:
            size, label = size_of(native['bboxes'][i]), native['labels'][i]
            count(label, size, 'matched')
            count(label, size, 'score_shift_sum', float(device['scores'][j] - native['scores'][i]))
            shift += abs(float(device['scores'][j] - native['scores'][i]))
        for i in lost:
            count(native['labels'][i], size_of(native['bboxes'][i]), 'lost')
        for j in new:
            count(device['labels'][j], size_of(device['bboxes'][j]), 'new')
        self.images += 1
        difference = (len(lost) + len(new), shift)
        entry = {'img_id': img_id, 'img_path': img_path, 'matched': len(pairs), 'lost': len(lost), 'new': len(new),
                 'abs_score_shift': round(shift, 6), 'native': native, 'device': device}
        item = (difference, -self.images, entry)
        if len(self.worst) < self.keep:
            heapq.heappush(self.worst, item)
        elif self.keep:
            heapq.heappushpop(self.worst, item)

    def largest(self) -> list[dict]:
        """The kept images, largest difference first."""
        return [entry for _, _, entry in sorted(self.worst, key=lambda item: (item[0], item[1]), reverse=True)]

    def summary(self) -> dict:
        def finish(counts: dict) -> dict:
            out = {k: v for k, v in counts.items() if k != 'score_shift_sum'}
            out['mean_score_shift'] = round(counts['score_shift_sum'] / counts['matched'], 6) \
                if counts['matched'] else None
            return out

        by_class = {self.classes[label] if label < len(self.classes) else str(label): finish(counts)
                    for label, counts in sorted(self.by_class.items())}
        return {'score_thr': self.score_thr, 'iou_thr': self.iou_thr, 'images': self.images,
                **finish(self.total), 'by_size': {name: finish(c) for name, c in self.by_size.items()},
                'by_class': by_class,
                'largest_difference': [{k: v for k, v in e.items() if k not in ('native', 'device')}
                                       for e in self.largest()]}
