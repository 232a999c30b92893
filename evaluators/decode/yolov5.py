"""Vectorized host decoding of YOLOv5's raw prediction maps: the same detections as mmyolo's
`YOLOv5Head.predict_by_feat`, with the per-prior work done once per batch and only on surviving priors."""
from __future__ import annotations

import torch
from torchvision.ops import nms

MMCV_SPLIT_THR = 10000  # mmcv.ops.batched_nms: one NMS over class-offset boxes below this, per class above


class YOLOv5Decoder:
    """Raw maps (N, A*(5+C), H, W) per level -> per-image boxes (x1, y1, x2, y2) in original-image pixels.

    Args:
        priors: (P, 4) anchor boxes of all levels in (level, h, w, anchor) order, as mmdet's
            `YOLOAnchorGenerator.grid_priors` gives them for the exported input shape.
        strides: (P,) stride of each prior.
        num_classes: C.
        score_thr: objectness and final-score threshold. Defaults to mmyolo's 0.001.
        nms_iou: IoU above which a lower-scored box of the same class is dropped.
        max_per_img: detections kept per image after NMS.
        nms_pre: candidates kept (highest score first) before NMS.
        multi_label: one candidate per (prior, class) above the threshold, as mmyolo's test_cfg does.
    """

    def __init__(self, priors: torch.Tensor, strides: torch.Tensor, num_classes: int, score_thr: float = 0.001,
                 nms_iou: float = 0.65, max_per_img: int = 300, nms_pre: int = 30000, multi_label: bool = True):
        self.centers = (priors[:, :2] + priors[:, 2:]) * 0.5
        self.sizes = priors[:, 2:] - priors[:, :2]
        self.strides = strides[:, None]
        self.num_classes = num_classes
        self.score_thr = score_thr
        self.nms_iou = nms_iou
        self.max_per_img = max_per_img
        self.nms_pre = nms_pre
        self.multi_label = multi_label and num_classes > 1

    @torch.no_grad()
    def __call__(self, raw_maps: list[torch.Tensor], metas: list[dict]) -> list[dict[str, torch.Tensor]]:
        priors = sum(m.shape[1] // (5 + self.num_classes) * m.shape[2] * m.shape[3] for m in raw_maps)
        if priors != self.centers.shape[0]:
            raise ValueError(f'raw maps hold {priors} priors, the decoder expects {self.centers.shape[0]}')
        return [self._decode_one([m[i] for m in raw_maps], meta) for i, meta in enumerate(metas)]

    def _levels(self, maps: list[torch.Tensor]) -> list[torch.Tensor]:
        """(A*(5+C), H, W) per level -> (A, 5+C, H*W) views, no copy."""
        return [m.reshape(-1, 5 + self.num_classes, m.shape[1] * m.shape[2]) for m in maps]

    def _objectness(self, levels: list[torch.Tensor]) -> torch.Tensor:
        """(P,) objectness logits in prior order (level, h, w, anchor): a copy of one channel, not of 5+C."""
        return torch.cat([level[:, 4].t().reshape(-1) for level in levels])

    def _gather(self, levels: list[torch.Tensor], rows: torch.Tensor) -> torch.Tensor:
        """(K, 5+C) predictions of the priors `rows` (sorted), read from the maps' own layout."""
        out, start = [], 0
        for level in levels:
            anchors, _, cells = level.shape
            end = start + anchors * cells
            local = rows[(rows >= start) & (rows < end)] - start  # (h*W + w)*A + a
            out.append(level[local % anchors, :, local // anchors])
            start = end
        return torch.cat(out)

    def _decode_one(self, maps: list[torch.Tensor], meta: dict) -> dict[str, torch.Tensor]:
        # objectness gate first: only the K priors above the threshold (K << P) are gathered and decoded
        levels = self._levels(maps)
        objectness = self._objectness(levels).sigmoid()
        rows = (objectness > self.score_thr).nonzero()[:, 0] if self.score_thr > 0 else \
            torch.arange(objectness.shape[0])
        pred, objectness = self._gather(levels, rows), objectness[rows]
        scores = pred[:, 5:].sigmoid() * objectness[:, None]  # (K, C)
        # candidates: (prior, class) pairs above the threshold, best nms_pre kept
        if self.multi_label:
            keep = (scores > self.score_thr).nonzero()
            cand_scores = scores[keep[:, 0], keep[:, 1]]
            cand_rows, labels = keep[:, 0], keep[:, 1]
        else:
            cand_scores, labels = scores.max(dim=1)
            cand_rows = torch.arange(scores.shape[0])
            mask = cand_scores > self.score_thr
            cand_scores, labels, cand_rows = cand_scores[mask], labels[mask], cand_rows[mask]
        cand_scores, order = cand_scores.sort(descending=True)
        order = order[:self.nms_pre]
        cand_scores, labels, cand_rows = cand_scores[:self.nms_pre], labels[order], cand_rows[order]
        # box decode (YOLOv5BBoxCoder): xy = (2*sig - 0.5)*s + grid*s, wh = (2*sig)^2 * anchor
        box = pred[cand_rows, :4].sigmoid()
        prior_rows = rows[cand_rows]
        xy = (box[:, :2] - 0.5) * 2 * self.strides[prior_rows] + self.centers[prior_rows]
        wh = (box[:, 2:] * 2) ** 2 * self.sizes[prior_rows]
        bboxes = torch.cat([xy - wh / 2, xy + wh / 2], dim=1)
        # undo the letterbox: remove the padding, then the resize
        if 'pad_param' in meta:
            top, _, left, _ = (float(p) for p in meta['pad_param'])
            bboxes -= bboxes.new_tensor([left, top, left, top])
        bboxes /= bboxes.new_tensor(meta['scale_factor']).repeat(2)
        keep = framework_batched_nms(bboxes, cand_scores, labels, self.nms_iou, self.max_per_img)
        bboxes, cand_scores, labels = bboxes[keep], cand_scores[keep], labels[keep]
        height, width = meta['ori_shape'][:2]
        bboxes[:, 0::2] = bboxes[:, 0::2].clamp(0, width)
        bboxes[:, 1::2] = bboxes[:, 1::2].clamp(0, height)
        return {'bboxes': bboxes, 'scores': cand_scores, 'labels': labels}


def framework_batched_nms(boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor, iou: float,
                          max_keep: int) -> torch.Tensor:
    """mmcv's `batched_nms` decisions with torchvision's NMS kernel: the first `max_keep` kept indices, by
    decreasing score. `scores` must be sorted in decreasing order.

    mmcv separates the classes by offsetting the boxes by label * (max + 1), then runs one NMS below its split
    threshold and one per class above it. In float32 that offset moves IoUs near the threshold, so it is
    reproduced rather than replaced by an exact per-class NMS, which would keep or drop other boxes than mmyolo.
    Greedy NMS decides each box by the higher-scored boxes kept before it, so NMS over the best m candidates
    keeps exactly the first boxes the full NMS keeps; once that prefix holds `max_keep` boxes the rest of the
    candidates cannot change the result, and they are never looked at (the prefix doubles until then).
    """
    if boxes.numel() == 0:
        return torch.empty(0, dtype=torch.int64)
    shifted = boxes + (labels.to(boxes) * (boxes.max() + 1))[:, None]
    per_class = len(boxes) >= MMCV_SPLIT_THR  # decided by the full candidate count, as mmcv does
    prefix = 8 * max_keep  # on coco128 one NMS over this many usually suffices, cheaper than growing from less
    while True:
        keep = _per_class_nms(shifted[:prefix], scores[:prefix], labels[:prefix], iou) if per_class else \
            nms(shifted[:prefix], scores[:prefix], iou)
        if len(keep) >= max_keep or prefix >= len(boxes):
            return keep[:max_keep]
        prefix *= 2


def _per_class_nms(boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor, iou: float) -> torch.Tensor:
    """One NMS per class (mmcv's path above its split threshold); kept indices in decreasing score order."""
    order = labels.argsort(stable=True)  # grouped by class, score order kept within each class
    groups = order.split(torch.bincount(labels[order]).tolist())
    return torch.cat([group[nms(boxes[group], scores[group], iou)] for group in groups if len(group)]).sort()[0]
