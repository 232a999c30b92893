"""The evaluation's COCO metrics, in constant memory per image: the loop keeps each image's detections as three
small arrays (≈22 bytes a detection), and at the end each image is matched by pycocotools' own code
(evaluators/cocoeval.py) and replaced by its packed match record, one at a time. mmdet's CocoMetric turns every
detection into Python dicts and builds pycocotools' evalImgs for all of them at once (≈0.5 MB per image). The
matching stays at the end, as in mmdet, so the loop's host side does not grow by it.

- `StreamingCocoMetric`: mmdet's CocoMetric (bbox) with the same figures, rounding and printout; the model config's
  `mmdet.CocoMetric` runs as it (integrations/engines/plan.py swaps it in when its options allow).
- `OpenImagesMLPerfMetric`: MLPerf's accuracy script's evaluation (pycocotools, default COCOeval parameters,
  every category of the file, label i = category id i, unrounded), printed with its `mAP=xx.xxx%` line.

After `evaluate`, `metric.stream` and `metric.records` (every image's record, in COCOeval's order) stay on the
metric for what comes after the figures (the bootstrap interval, per-class AP).
"""
from __future__ import annotations

import os
import weakref

import numpy as np
from mmdet.datasets.api_wrappers import COCO
from mmdet.evaluation.metrics import CocoMetric
from mmdet.registry import METRICS

from common.errors import UserError
from evaluators.cocoeval import SUMMARY_KEYS, StreamingCocoEval

_GROUND_TRUTHS: weakref.WeakValueDictionary = weakref.WeakValueDictionary()


def shared_ground_truth(ann_file: str) -> COCO:
    """The annotation file's COCO index, one per process for every streamed metric evaluating that file (native,
    device, reference, explain's passes): each copy holds about 5 KB an image. Keyed by the file's path, size and
    modification time, so a rewritten file is read again."""
    stat = os.stat(ann_file)
    key = (os.path.realpath(ann_file), stat.st_size, stat.st_mtime_ns)
    coco = _GROUND_TRUTHS.get(key)
    if coco is None:
        coco = _GROUND_TRUTHS[key] = COCO(ann_file)
    return coco


class StreamedMetric:
    """What both metrics share: `process` keeps each image's detections compactly; `accumulated_stats` matches
    them image by image, each image's detections replaced by its record as it goes, and accumulates. A local
    annotation file's ground truth is loaded once for all of them (`shared_ground_truth`), and its segmentation
    polygons are dropped: bbox evaluation never reads them, and on COCO they are most of what the annotations
    hold."""

    max_dets: tuple = (1, 10, 100)
    stream: StreamingCocoEval | None = None
    records: list = []

    def __init__(self, *args, ann_file=None, sort_categories: bool = False, backend_args=None, **kwargs):
        local = ann_file is not None and backend_args is None and not sort_categories and os.path.isfile(ann_file)
        super().__init__(*args, ann_file=None if local else ann_file, sort_categories=sort_categories,
                         backend_args=backend_args, **kwargs)
        if local:
            self._coco_api = shared_ground_truth(ann_file)
        if self._coco_api is not None:
            for annotation in self._coco_api.dataset['annotations']:
                annotation.pop('segmentation', None)

    def evaluated_categories(self) -> list[int]:
        raise NotImplementedError

    @property
    def ground_truth(self) -> COCO:
        """The annotation file's COCO index the metric scores against (its categories, each image's boxes)."""
        return self._coco_api

    def _stream(self) -> StreamingCocoEval:
        if self.stream is None:
            self.stream = StreamingCocoEval(self._coco_api, self.evaluated_categories(), self.max_dets,
                                            img_ids=self.img_ids)
        return self.stream

    def process(self, data_batch, data_samples) -> None:
        # copies, not views: a view keeps its torch tensor alive, 5 KB an image more in the loop (docs/bench.md)
        for sample in data_samples:
            self._check_size(sample)
            pred = sample['pred_instances']
            self.results.append((sample['img_id'], np.array(pred['bboxes'].cpu().numpy(), np.float32),
                                 np.array(pred['scores'].cpu().numpy(), np.float32),
                                 pred['labels'].cpu().numpy().astype(np.int16)))

    def _check_size(self, sample: dict) -> None:
        """The ground truth's boxes are in the pixels of the size the file states: an image of another size would
        be scored against misplaced boxes, silently."""
        image = self._coco_api.imgs.get(sample['img_id'], {})
        stated, actual = (image.get('height'), image.get('width')), tuple(sample.get('ori_shape', ())[:2])
        if None not in stated and actual and stated != actual:
            raise UserError(f"data.ann_file: {sample.get('img_path', sample['img_id'])} is {actual[1]}x{actual[0]} "
                            f'but the annotation file states {stated[1]}x{stated[0]} (width x height); fix that '
                            "image's width/height (and its boxes) in the file")

    def accumulated_stats(self, results: list):
        """(stats, accumulated) of the gathered detections; the 12-line summary printed as pycocotools prints it."""
        stream = self._stream()
        self.results.clear()  # `results` (the gathered copy) then holds the only references to the detections
        for i, (img_id, bboxes, scores, labels) in enumerate(results):
            results[i] = stream.evaluate_image(img_id, bboxes, scores, labels)
        self.records = stream.complete(results)
        accumulated = stream.accumulate(self.records)
        return stream.summarize(accumulated), accumulated


@METRICS.register_module()
class StreamingCocoMetric(StreamedMetric, CocoMetric):
    """mmdet's CocoMetric for `metric='bbox'`, image by image: the same figures (tested equal), rounded to 3
    decimals as mmdet rounds them, and the same printout."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.metrics != ['bbox'] or self.format_only or self._coco_api is None:
            raise ValueError('StreamingCocoMetric evaluates bbox against an ann_file (use mmdet.CocoMetric '
                             'for anything else)')
        self.max_dets = tuple(self.proposal_nums)

    def evaluated_categories(self) -> list[int]:
        if self.cat_ids is None:
            self.cat_ids = self._coco_api.get_cat_ids(cat_names=self.dataset_meta['classes'])
        return self.cat_ids

    def compute_metrics(self, results: list) -> dict[str, float]:
        stats, _ = self.accumulated_stats(results)
        names = {'mAP': 0, 'mAP_50': 1, 'mAP_75': 2, 'mAP_s': 3, 'mAP_m': 4, 'mAP_l': 5}
        items = self.metric_items or list(names)
        return {f'bbox_{item}': float(f'{round(stats[names[item]], 3)}') for item in items if item in names}


@METRICS.register_module()
class OpenImagesMLPerfMetric(StreamedMetric, CocoMetric):
    """MLPerf's OpenImages evaluation: COCOeval's default parameters (maxDets 1, 10, 100) over every category of
    the file, where a detection's label is its category id; figures unrounded."""

    def evaluated_categories(self) -> list[int]:
        if self.cat_ids is None:
            self.cat_ids = sorted(self._coco_api.get_cat_ids())
        return self.cat_ids

    def compute_metrics(self, results: list) -> dict[str, float]:
        stats, _ = self.accumulated_stats(results)
        print(f'mAP={100 * stats[0]:.3f}%', flush=True)
        return {key: float(value) for key, value in zip(SUMMARY_KEYS, stats)}
