"""COCO bbox evaluation one image at a time, with pycocotools' own matching, in constant memory per image.

pycocotools evaluates a whole results file at once: every detection becomes a Python dict, every (image, category,
area) an `evalImgs` dict, and the process grows by about half a megabyte per image (4 GB for COCO val, 14 GB for
MLPerf's 24,781 OpenImages). Here each image is matched as it arrives, by pycocotools' own `computeIoU` and
`evaluateImg`, and only what `accumulate` reads is kept, packed: per detection its score, its category, its rank
within (image, category) and, per area range, one bit per IoU threshold for "matched" and for "ignored"; per
(image, category, area) the number of ground truths that count. The accumulation is pycocotools' arithmetic on
those arrays (tested equal to COCOeval, stats and precision/recall arrays), and it can weight images, which is
what a bootstrap over images needs: resampling images is re-accumulating with integer weights, no re-matching.
"""
from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass

import numpy as np

# COCOeval's first six stats, by mmdet's names
SUMMARY_KEYS = ('bbox_mAP', 'bbox_mAP_50', 'bbox_mAP_75', 'bbox_mAP_s', 'bbox_mAP_m', 'bbox_mAP_l')


@dataclass
class ImageRecord:
    """What accumulation needs of one image (all arrays small; `bits` packs T <= 16 thresholds).

    cat, score, rank: (D,) per detection kept by evaluateImg (category index, score, rank in its category); the
        score as float32, which is exact for the float32 scores every decoder gives.
    bits: (A, D) uint32, per area range: bit t = matched at IoU threshold t, bit 16 + t = ignored.
    present: (P,) category indices with ground truth or detections in the image; npig: (A, P) the ground truths
    that count, per area range.
    """

    img_id: int
    cat: np.ndarray
    score: np.ndarray
    rank: np.ndarray
    bits: np.ndarray
    present: np.ndarray
    npig: np.ndarray

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.cat, self.score, self.rank, self.bits, self.present, self.npig))


def xyxy_to_coco(bboxes: np.ndarray) -> list[list[float]]:
    """[x1, y1, x2, y2] -> COCO [x, y, w, h] with mmdet's arithmetic (CocoMetric.xyxy2xywh on the float32 boxes'
    Python floats), so results equal mmdet's results file read back by pycocotools."""
    return [[x1, y1, x2 - x1, y2 - y1] for x1, y1, x2, y2 in np.asarray(bboxes).tolist()]


class StreamingCocoEval:
    """pycocotools' COCOeval (bbox) fed one image at a time.

    Args:
        coco_gt: the ground truth (a pycocotools COCO).
        cat_ids: the evaluated categories; label i of a detection is category cat_ids[i].
        max_dets: COCOeval's maxDets (mmdet's CocoMetric: 100, 300, 1000; pycocotools' default 1, 10, 100).
        img_ids: the evaluated images (all of the ground truth's by default).
    """

    def __init__(self, coco_gt, cat_ids, max_dets=(1, 10, 100), img_ids=None):
        from pycocotools.cocoeval import COCOeval

        self.coco_gt = coco_gt
        self.cat_ids = list(cat_ids)
        self.cat_index = {c: k for k, c in enumerate(self.cat_ids)}
        self.evaluator = COCOeval(coco_gt, iouType='bbox')
        params = self.evaluator.params
        params.catIds = sorted(set(self.cat_ids))
        params.imgIds = sorted(set(img_ids if img_ids is not None else coco_gt.getImgIds()))
        params.maxDets = sorted(max_dets)
        self.params = params
        if len(params.iouThrs) > 16:
            raise ValueError('at most 16 IoU thresholds')

    def _ground_truth(self, img_id: int) -> dict[int, list[dict]]:
        """The image's ground truth by category, with the ignore flag COCOeval._prepare sets."""
        by_cat: dict[int, list[dict]] = {}
        for ann in self.coco_gt.imgToAnns.get(img_id, []):
            if ann['category_id'] in self.cat_index:
                ann['ignore'] = 'iscrowd' in ann and ann['iscrowd']
                by_cat.setdefault(ann['category_id'], []).append(ann)
        return by_cat

    def evaluate_image(self, img_id: int, bboxes=(), scores=(), labels=()) -> ImageRecord:
        """Match one image's detections (xyxy boxes, scores, labels indexing cat_ids), as COCOeval.evaluate
        would within a whole results file, and keep what accumulation needs."""
        e, p = self.evaluator, self.params
        gts = self._ground_truth(img_id)
        dts: dict[int, list[dict]] = {}
        for i, (box, score, label) in enumerate(zip(xyxy_to_coco(bboxes), np.asarray(scores).tolist(),
                                                    np.asarray(labels).tolist())):
            category = self.cat_ids[label]
            dts.setdefault(category, []).append({'image_id': img_id, 'category_id': category, 'bbox': box,
                                                 'score': score, 'area': box[2] * box[3], 'id': i + 1,
                                                 'iscrowd': 0})
        present = sorted(set(gts) | set(dts))
        e._gts = {(img_id, c): gts.get(c, []) for c in present}
        e._dts = {(img_id, c): dts.get(c, []) for c in present}
        e.ious = {(img_id, c): e.computeIoU(img_id, c) for c in present}
        areas, thresholds = p.areaRng, len(p.iouThrs)
        weights = (1 << np.arange(thresholds, dtype=np.uint32))[:, None]
        cats, scores_out, ranks, bits, npig = [], [], [], [], np.zeros((len(areas), len(present)), np.uint32)
        for j, c in enumerate(present):
            per_area = [e.evaluateImg(img_id, c, area, p.maxDets[-1]) for area in areas]
            count = len(per_area[0]['dtScores'])
            cats.append(np.full(count, self.cat_index[c], np.int16))
            scores_out.append(np.asarray(per_area[0]['dtScores'], np.float32))
            ranks.append(np.arange(count, dtype=np.uint16))
            packed = np.zeros((len(areas), count), np.uint32)
            for a, result in enumerate(per_area):
                packed[a] = ((result['dtMatches'] != 0) * weights).sum(0) | \
                    ((result['dtIgnore'] != 0) * weights).sum(0) << 16
                npig[a, j] = np.count_nonzero(result['gtIgnore'] == 0)
            bits.append(packed)
        e._gts, e._dts, e.ious = {}, {}, {}
        return ImageRecord(img_id, np.concatenate(cats or [np.zeros(0, np.int16)]),
                           np.concatenate(scores_out or [np.zeros(0, np.float32)]),
                           np.concatenate(ranks or [np.zeros(0, np.uint16)]),
                           np.concatenate(bits, axis=1) if bits else np.zeros((len(areas), 0), np.uint32),
                           np.asarray([self.cat_index[c] for c in present], np.int32), npig.astype(np.uint16))

    def complete(self, records) -> list[ImageRecord]:
        """The records of every evaluated image in COCOeval's order (sorted ids), the first record of an id
        kept; an image that never arrived counts as one without detections, as in a results file without it."""
        by_id: dict[int, ImageRecord] = {}
        for record in records:
            by_id.setdefault(record.img_id, record)
        return [by_id[i] if i in by_id else self.evaluate_image(i) for i in self.params.imgIds]

    def accumulate(self, records: list[ImageRecord]) -> dict:
        """COCOeval.accumulate on complete() records: {'precision': (T, R, K, A, M), 'recall': (T, K, A, M)},
        K in sorted category id order as COCOeval has it."""
        p = self.params
        stacked = Stacked(records, len(self.cat_ids), len(p.areaRng))
        T, R, A, M = len(p.iouThrs), len(p.recThrs), len(p.areaRng), len(p.maxDets)
        order = [self.cat_index[c] for c in p.catIds]
        precision = -np.ones((T, R, len(order), A, M))
        recall = -np.ones((T, len(order), A, M))
        for k_out, k in enumerate(order):
            for a in range(A):
                if not stacked.present[k]:
                    continue
                npig = int(stacked.npig[a, :, k].sum())
                if npig == 0:
                    continue
                for m, max_det in enumerate(p.maxDets):
                    tps, fps = stacked.matches(k, a, max_det, T)
                    precision[:, :, k_out, a, m], recall[:, k_out, a, m] = curves(tps, fps, npig, p.recThrs)
        return {'precision': precision, 'recall': recall}

    def summarize(self, accumulated: dict, printout: bool = True) -> np.ndarray:
        """COCOeval.summarize's 12 stats (its own code), printed as it prints them when `printout`."""
        e = self.evaluator
        e.eval = {**accumulated, 'params': self.params}
        e.params = self.params
        if printout:
            e.summarize()
        else:
            with contextlib.redirect_stdout(io.StringIO()):
                e.summarize()
        return np.asarray(e.stats)

    def per_category_ap(self, accumulated: dict) -> dict[int, float]:
        """AP (IoU 0.50:0.95, all areas, the largest maxDets) per category id, for categories with ground truth."""
        precision = accumulated['precision'][:, :, :, 0, -1]
        return {c: float(precision[:, :, k].mean()) for k, c in enumerate(self.params.catIds)
                if (precision[:, :, k] > -1).all()}


def curves(tps: np.ndarray, fps: np.ndarray, npig, rec_thrs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """COCOeval.accumulate's precision at each recall threshold (T, R) and final recall (T,), from the
    score-sorted true/false positive indicators (T, D) (or weighted counts) and the number of ground truths.
    One threshold at a time, in place: for COCO's largest category (D of millions of detections) the whole (T, D)
    float cumsums at once set the run's memory peak."""
    T, D = tps.shape
    q, recall = np.zeros((T, len(rec_thrs))), np.zeros(T)
    if D == 0:
        return q, recall
    for t in range(T):
        tp_sum = np.cumsum(tps[t], dtype=float)  # exact: pycocotools' integer cumsum, then float
        fp_sum = np.cumsum(fps[t], dtype=float)
        rc = tp_sum / npig
        recall[t] = rc[-1]
        fp_sum += tp_sum
        fp_sum += np.spacing(1)
        pr = np.divide(tp_sum, fp_sum, out=tp_sum)
        np.maximum.accumulate(pr[::-1], out=pr[::-1])  # the precision envelope
        inds = np.searchsorted(rc, rec_thrs, side='left')
        inside = inds < D
        q[t, inside] = pr[inds[inside]]
    return q, recall


class Stacked:
    """All images' records concatenated in image order and grouped by category (stable, so the image order and
    each image's own order stay: the tie order COCOeval's mergesort sees)."""

    def __init__(self, records: list[ImageRecord], num_cats: int, num_areas: int):
        self.num_images = len(records)
        cat = np.concatenate([r.cat for r in records] or [np.zeros(0, np.int16)])
        total = len(cat)
        order = np.argsort(cat, kind='stable')
        bounds = np.searchsorted(cat[order], np.arange(num_cats + 1))
        place = np.empty(total, np.int32)  # where each detection goes in category order
        place[order] = np.arange(total, dtype=np.int32)
        del cat, order
        # each record written straight to its places, in the records' compact types: no concatenated copy beside
        # the records and this one, the evaluation's largest allocation (about as large as the records)
        self.image = np.empty(total, np.int32)
        self.score = np.empty(total, np.float32)
        self.rank = np.empty(total, np.uint16)
        self.bits = np.empty((num_areas, total), np.uint32)
        # (A, I, K) ground truths that count; (I, K) images where the category has ground truth or detections
        self.npig = np.zeros((num_areas, len(records), num_cats), np.uint16)
        self.present_in = np.zeros((len(records), num_cats), bool)
        start = 0
        for i, r in enumerate(records):
            where = place[start:start + len(r.cat)]
            start += len(r.cat)
            self.image[where], self.score[where], self.rank[where], self.bits[:, where] = i, r.score, r.rank, r.bits
            self.npig[:, i, r.present] = r.npig
            self.present_in[i, r.present] = True
        del place
        self.slices = [slice(bounds[k], bounds[k + 1]) for k in range(num_cats)]
        self.present = self.present_in.any(0)

    def sorted_detections(self, k: int, max_det: int) -> np.ndarray:
        """Indices (into this stack) of category k's detections within each image's first max_det, in
        COCOeval's order: decreasing score, ties in image order."""
        where = np.arange(self.slices[k].start, self.slices[k].stop)
        where = where[self.rank[where] < max_det]
        return where[np.argsort(-self.score[where], kind='mergesort')]

    def matches(self, k: int, a: int, max_det: int, thresholds: int) -> tuple[np.ndarray, np.ndarray]:
        """(T, D) true and false positives of category k in area range a, in COCOeval's order."""
        bits = self.bits[a, self.sorted_detections(k, max_det)]
        shifts = np.arange(thresholds, dtype=np.uint32)[:, None]
        matched = (bits[None] >> shifts) & 1 == 1
        ignored = (bits[None] >> (shifts + 16)) & 1 == 1
        return matched & ~ignored, ~matched & ~ignored


def resample_weights(num_images: int, resamples: int, seed: int) -> np.ndarray:
    """(B, I) multiplicities of a bootstrap over images: each resample draws I images with replacement."""
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, num_images, size=(resamples, num_images))
    return np.stack([np.bincount(d, minlength=num_images) for d in draws])


def weighted_map(stacked: Stacked, weights: np.ndarray, rec_thrs: np.ndarray, thresholds: int, max_det: int,
                 area: int = 0, cells: int = 1 << 22) -> np.ndarray:
    """bbox mAP (COCOeval's stats[0]: IoU 0.50:0.95, area range `area`, `max_det`) of each weighting of the images
    (B, I), equal to COCOeval on the resampled set with each image repeated as often as its weight (tested).
    Resamples go in chunks of about `cells` / (the category's detections) at once: few numpy calls, bounded memory."""
    per_category = []
    for k in np.flatnonzero(stacked.present):
        order = stacked.sorted_detections(k, max_det)
        bits = stacked.bits[area, order]
        shifts = np.arange(thresholds, dtype=np.uint32)[:, None]
        matched = (bits[None] >> shifts) & 1 == 1
        ignored = (bits[None] >> (shifts + 16)) & 1 == 1
        tps, fps = (matched & ~ignored).astype(np.int64), (~matched & ~ignored).astype(np.int64)
        images, scores = stacked.image[order], stacked.score[order]
        npig_images = stacked.npig[area, :, k]
        run_start = np.flatnonzero(np.r_[True, (images[1:] != images[:-1]) | (scores[1:] != scores[:-1])]) \
            if len(order) else order  # a category with ground truth only: AP 0
        ap = np.full(len(weights), np.nan)
        chunk = max(16, cells // max(len(order), 1))
        for start in range(0, len(weights), chunk):
            w = weights[start:start + chunk].astype(np.int64)
            npig = w @ npig_images
            valid = (w @ stacked.present_in[:, k] > 0) & (npig > 0)
            values = _weighted_ap(w[:, images[run_start]], run_start, tps, fps, npig, rec_thrs)
            ap[start:start + chunk] = np.where(valid, values, np.nan)
        per_category.append(ap)
    if not per_category:
        return np.full(len(weights), -1.0)
    values = np.stack(per_category)  # (K, B)
    counted = ~np.isnan(values)
    return np.where(counted.any(0), np.nansum(values, 0) / np.maximum(counted.sum(0), 1), -1.0)


def _weighted_ap(run_weight: np.ndarray, run_start: np.ndarray, tps: np.ndarray, fps: np.ndarray, npig: np.ndarray,
                 rec_thrs: np.ndarray) -> np.ndarray:
    """AP of one category for each weighting: run_weight (B, N) the weight of each run's image, where a run is a
    stretch of one image's detections with the same score starting at run_start (N,); tps/fps (T, D); npig (B,).

    An image repeated w times puts its copies right after it among equal scores, so a run comes w times as a block.
    Only true positives matter: the point a recall threshold r picks, the first with recall >= r, is where the
    true-positive count first reaches J(r) = min{j : j / npig >= r} (the float division COCOeval does), and the
    precision envelope is the highest precision at or after it, which is reached at a true positive. A run of one
    detection is then one point, its last copy (the copies before it have the same envelope); a run of several
    interleaves its copies, so each of its true positives is a point per copy 1..max weight, and a copy its image
    does not have takes precision 0 and the run's final count, which changes neither envelope nor lookup."""
    B, D = len(run_weight), tps.shape[1]
    R = len(rec_thrs)
    if D == 0:
        return np.zeros(B)
    n = np.maximum(npig, 1).astype(float)[:, None]
    j = np.ceil(rec_thrs[None] * n)
    j = np.where((j - 1) / n >= rec_thrs[None], j - 1, j)
    j = np.where(j / n >= rec_thrs[None], j, j + 1).astype(np.int64)  # (B, R)
    run_length = np.diff(np.r_[run_start, D])
    run_of = np.repeat(np.arange(len(run_start)), run_length)
    copies = np.arange(1, int(run_weight.max(initial=0)) + 1)
    counted = run_weight * run_length
    base_all = np.cumsum(counted, axis=1) - counted  # (B, N) detections before each run, whatever they are
    del counted
    ap, previous, value = np.zeros(B), None, 0.0
    for tp_t, fp_t in zip(tps, fps):
        if previous is not None and np.array_equal(tp_t, previous[0]) and np.array_equal(fp_t, previous[1]):
            ap += value  # the same matches as at the IoU threshold before (often): the same precisions
            continue
        previous, value = (tp_t, fp_t), 0.0
        hits = np.flatnonzero(tp_t)
        if len(hits) == 0:
            continue  # no true positive: precision 0 at every recall threshold
        run_tp, run_fp = np.add.reduceat(tp_t, run_start), np.add.reduceat(fp_t, run_start)
        tp_in_run = np.cumsum(tp_t) - np.repeat(np.cumsum(run_tp) - run_tp, run_length)  # up to each detection
        fp_in_run = np.cumsum(fp_t) - np.repeat(np.cumsum(run_fp) - run_fp, run_length)
        tied = run_length[run_of[hits]] > 1
        column = np.r_[hits[~tied], np.repeat(hits[tied], len(copies))]  # the true positive of each point
        copy = np.r_[np.zeros(np.count_nonzero(~tied), np.int64), np.tile(copies, np.count_nonzero(tied))]
        arranged = np.lexsort((column, copy, run_of[column]))  # the expanded set's order: run, copy, detection
        column, copy = column[arranged], copy[arranged]
        run = run_of[column]
        weight = run_weight[:, run]  # (B, H)
        # true positives and ignored detections before each point's run, summed over the few that are either
        # (false positives: all the rest)
        special = np.flatnonzero(tp_t | (fp_t == 0))
        special_run = run_of[special]
        special_weight = run_weight[:, special_run]
        before = np.searchsorted(special_run, run, side='left')  # specials in earlier runs

        def in_earlier_runs(flags):  # (B, H) weighted count of the flagged specials before each point's run
            counts = np.cumsum(special_weight * flags, axis=1)
            return np.where(before > 0, counts[:, np.maximum(before - 1, 0)], 0)

        base_tp = in_earlier_runs(tp_t[special])
        base_fp = base_all[:, run] - base_tp - in_earlier_runs(1 - tp_t[special])
        copy = np.where(copy == 0, weight, copy)  # a run of one: its last copy
        present = (copy <= weight) & (weight > 0)
        tp_sum = base_tp + np.where(present, (copy - 1) * run_tp[run] + tp_in_run[column], weight * run_tp[run])
        fp_sum = base_fp + (copy - 1) * run_fp[run] + fp_in_run[column]
        pr = np.where(present, tp_sum / (fp_sum + tp_sum + np.spacing(1)), 0.0)
        pr = np.maximum.accumulate(pr[:, ::-1], axis=1)[:, ::-1]
        H = len(column)
        span = int(tp_sum[:, -1].max()) + int(j.max()) + 2
        rows = np.arange(B, dtype=np.int64)[:, None] * span
        found = np.searchsorted((tp_sum + rows).ravel(), (j + rows).ravel(), side='left').reshape(B, R)
        position = found - np.arange(B)[:, None] * H
        inside = position < H
        value = np.where(inside, np.take_along_axis(pr, np.minimum(position, H - 1), axis=1), 0.0).sum(1)
        ap += value
    return ap / (len(tps) * R)
