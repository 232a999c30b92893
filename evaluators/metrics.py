"""OpenImages-MLPerf mAP: pycocotools over the MLPerf-format ground truth, as MLPerf's accuracy script computes
it (standard COCOeval parameters, all categories), printed with its `mAP=xx.xxx%` line."""
from __future__ import annotations

import tempfile
from pathlib import Path

from mmdet.evaluation.metrics import CocoMetric
from mmdet.registry import METRICS

from evaluators.mmengine import SUMMARY_KEYS


@METRICS.register_module()
class OpenImagesMLPerfMetric(CocoMetric):
    """mmdet's CocoMetric collects the predictions (label i -> category id i); the evaluation is MLPerf's:
    COCOeval with its default maxDets (1, 10, 100) over every category of the file, unrounded figures."""

    def compute_metrics(self, results: list) -> dict[str, float]:
        from pycocotools.cocoeval import COCOeval

        _, predictions = zip(*results)
        if self.cat_ids is None:
            self.cat_ids = self._coco_api.get_cat_ids(cat_names=self.dataset_meta['classes'])
        with tempfile.TemporaryDirectory() as tmp:
            files = self.results2json(predictions, str(Path(tmp) / 'results'))
            detections = self._coco_api.loadRes(files['bbox']) if any(len(p['labels']) for p in predictions) \
                else None
        if detections is None:
            print('no detections at all: mAP=0.000%', flush=True)
            return dict.fromkeys(SUMMARY_KEYS, 0.0)
        evaluation = COCOeval(self._coco_api, detections, iouType='bbox')
        evaluation.params.imgIds = self._coco_api.get_img_ids()
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
        print(f'mAP={100 * evaluation.stats[0]:.3f}%', flush=True)
        return {key: float(value) for key, value in zip(SUMMARY_KEYS, evaluation.stats)}
