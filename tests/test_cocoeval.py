"""The streaming COCO evaluation against pycocotools' own COCOeval: the same precision/recall arrays and stats on
random ground truth and detections (crowd regions, ties, images without detections, images that never arrive),
records of a few kilobytes per image, and a bootstrap that equals COCOeval recomputed on each resampled set."""
from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from evaluators.cocoeval import Stacked, StreamingCocoEval, resample_weights, weighted_map, xyxy_to_coco


def quiet(function, *args):
    with contextlib.redirect_stdout(io.StringIO()):
        return function(*args)


def coco_of(dataset: dict) -> COCO:
    coco = COCO()
    coco.dataset = json.loads(json.dumps(dataset))
    quiet(coco.createIndex)
    return coco


def random_set(seed: int, images: int = 16, categories: int = 5, ties: str = 'within'):
    """Ground truth (some crowd) and detections near it or anywhere, float32 as the decoders give them; `ties`:
    'within' gives some detections of one image the same score, 'across' only across images, 'quantized' scores
    on eight levels as an int8 model's are (long runs of one image's equal scores)."""
    rng = np.random.default_rng(seed)
    cats = [{'id': 3 * c + 1, 'name': f'c{c}'} for c in range(categories)]
    dataset = {'images': [{'id': i + 1, 'width': 640, 'height': 480, 'file_name': f'{i}.jpg'} for i in range(images)],
               'annotations': [], 'categories': cats}
    predictions = {}
    for image in dataset['images']:
        boxes = []
        for _ in range(rng.integers(0, 6)):
            x, y, w, h = rng.uniform(0, 500), rng.uniform(0, 400), rng.uniform(2, 140), rng.uniform(2, 80)
            dataset['annotations'].append({'id': len(dataset['annotations']) + 1, 'image_id': image['id'],
                                           'category_id': int(rng.choice(cats)['id']), 'bbox': [x, y, w, h],
                                           'area': w * h, 'iscrowd': int(rng.random() < 0.1)})
            boxes.append([x, y, w, h])
        detections = []
        for _ in range(int(rng.integers(0, 40))):
            if boxes and rng.random() < 0.6:
                x, y, w, h = boxes[rng.integers(len(boxes))]
                x, y = x + rng.normal(0, 4), y + rng.normal(0, 4)
                detections.append([x, y, x + w * rng.uniform(0.8, 1.2), y + h * rng.uniform(0.8, 1.2)])
            else:
                x, y = rng.uniform(0, 500), rng.uniform(0, 400)
                detections.append([x, y, x + rng.uniform(2, 100), y + rng.uniform(2, 80)])
        n = len(detections)
        scores = rng.random(n).astype(np.float32)
        if ties == 'within':
            scores[rng.random(n) < 0.2] = 0.5
        elif ties == 'quantized':
            scores = (np.ceil(scores * 8) / 8).astype(np.float32)
        else:
            scores = (np.round(scores, 2) + np.float32(1e-4) * np.arange(n)).astype(np.float32)
        predictions[image['id']] = (np.asarray(detections, np.float32).reshape(-1, 4), scores,
                                    rng.integers(0, categories, n))
    return dataset, predictions


def reference(dataset: dict, predictions: dict, cat_ids: list, max_dets) -> COCOeval:
    """What mmdet's CocoMetric does: a results file (its box arithmetic), loadRes, COCOeval with its params."""
    coco = coco_of(dataset)
    results = [{'image_id': image, 'bbox': box, 'score': float(score), 'category_id': cat_ids[label]}
               for image, (boxes, scores, labels) in predictions.items()
               for box, score, label in zip(xyxy_to_coco(boxes), scores, labels)]
    detections = quiet(coco.loadRes, json.loads(json.dumps(results))) if results else COCO()
    evaluation = COCOeval(coco, detections, 'bbox')
    evaluation.params.catIds, evaluation.params.imgIds = cat_ids, coco.getImgIds()
    evaluation.params.maxDets = list(max_dets)
    for step in (evaluation.evaluate, evaluation.accumulate, evaluation.summarize):
        quiet(step)
    return evaluation


@pytest.mark.parametrize('seed', range(4))
@pytest.mark.parametrize('max_dets', [(100, 300, 1000), (1, 10, 100)])
def test_streaming_equals_cocoeval(seed, max_dets):
    dataset, predictions = random_set(seed)
    cat_ids = [c['id'] for c in dataset['categories']]
    arrived = list(predictions)[::-1][2:]  # out of order; two images never arrive (no detections for them)
    expected = reference(dataset, {i: predictions[i] for i in arrived}, cat_ids, max_dets)
    stream = StreamingCocoEval(coco_of(dataset), cat_ids, max_dets)
    records = [stream.evaluate_image(i, *predictions[i]) for i in arrived]
    accumulated = stream.accumulate(stream.complete(records))
    np.testing.assert_array_equal(accumulated['precision'], expected.eval['precision'])
    np.testing.assert_array_equal(accumulated['recall'], expected.eval['recall'])
    np.testing.assert_array_equal(stream.summarize(accumulated, printout=False), expected.stats)
    assert max(r.nbytes for r in records) < 40 * 60  # a few dozen bytes per detection


def test_a_record_holds_a_few_kilobytes_for_300_detections():
    dataset, _ = random_set(0, images=1)
    stream = StreamingCocoEval(coco_of(dataset), [c['id'] for c in dataset['categories']])
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 400, (300, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(5, 100, (300, 2))], 1).astype(np.float32)
    record = stream.evaluate_image(1, boxes, rng.random(300).astype(np.float32), rng.integers(0, 5, 300))
    assert len(record.score) == 300 and record.nbytes <= 300 * 40


@pytest.mark.parametrize('ties', ['within', 'across', 'quantized'])
@pytest.mark.parametrize('seed', range(3))
def test_bootstrap_equals_cocoeval_on_each_resampled_set(seed, ties):
    """Each resample as COCOeval sees it: the drawn images, each as often as drawn, under new ids."""
    dataset, predictions = random_set(seed, images=10, categories=4, ties=ties)
    cat_ids = [c['id'] for c in dataset['categories']]
    coco = coco_of(dataset)
    stream = StreamingCocoEval(coco, cat_ids, (100, 300, 1000))
    records = stream.complete([stream.evaluate_image(i, *predictions[i]) for i in predictions])
    weights = resample_weights(len(records), 12, seed)
    fast = weighted_map(Stacked(records, len(cat_ids), 4), weights, stream.params.recThrs, 10, 100)
    for w, got in zip(weights, fast):
        images, annotations, drawn = [], [], {}
        for record, count in zip(records, w):
            for _ in range(count):
                images.append({**coco.imgs[record.img_id], 'id': len(images) + 1})
                annotations += [{**{k: v for k, v in a.items() if not k.endswith('ignore')},
                                 'image_id': len(images), 'id': len(annotations) + j + 1}
                                for j, a in enumerate(coco.imgToAnns.get(record.img_id, []))]
                drawn[len(images)] = predictions[record.img_id]
        expected = reference({'images': images, 'annotations': annotations, 'categories': dataset['categories']},
                             drawn, cat_ids, (100, 300, 1000))
        assert got == pytest.approx(expected.stats[0], abs=1e-12)


def test_bootstrap_is_reproducible_with_its_seed():
    assert np.array_equal(resample_weights(20, 5, 3), resample_weights(20, 5, 3))
    assert not np.array_equal(resample_weights(20, 5, 3), resample_weights(20, 5, 4))
    assert (resample_weights(20, 5, 3).sum(1) == 20).all()


def _samples(coco: COCO, seed: int, labels: int) -> list[dict]:
    """Detections near coco's ground truth (and some anywhere), as data samples the metrics process."""
    import torch

    rng = np.random.default_rng(seed)
    label_of = {c: i for i, c in enumerate(coco.getCatIds())}
    samples = []
    for img_id in coco.getImgIds():
        image = coco.imgs[img_id]
        truth = coco.imgToAnns.get(img_id, [])
        n = int(rng.integers(0, 60))
        xy = rng.uniform(0, 0.8, (n, 2)) * [image['width'], image['height']]
        dets = np.concatenate([xy, xy + rng.uniform(5, 150, (n, 2))], 1)
        classes = rng.integers(0, labels, n)
        for i in range(min(n, len(truth))):
            x, y, w, h = truth[i]['bbox']
            dets[i] = [x + rng.normal(0, 3), y + rng.normal(0, 3), x + w + rng.normal(0, 3), y + h + rng.normal(0, 3)]
            classes[i] = label_of[truth[i]['category_id']]
        samples.append({'img_id': img_id, 'ori_shape': (image['height'], image['width']), 'pred_instances': {
            'bboxes': torch.from_numpy(dets.astype(np.float32)),
            'scores': torch.from_numpy(rng.random(n).astype(np.float32)),
            'labels': torch.from_numpy(classes)}})
    return samples


def test_streaming_coco_metric_equals_mmdets_coco_metric(coco128):
    from mmdet.evaluation.metrics import CocoMetric

    from evaluators.mm.metrics import StreamingCocoMetric

    ann_file = str(coco128 / 'instances.json')
    coco = quiet(COCO, ann_file)
    meta = {'classes': tuple(c['name'] for c in coco.loadCats(coco.getCatIds()))}
    samples = _samples(coco, 0, len(meta['classes']))
    figures = []
    for metric in (CocoMetric(ann_file=ann_file, proposal_nums=(100, 1, 10)),
                   StreamingCocoMetric(ann_file=ann_file, proposal_nums=(100, 1, 10))):
        metric.dataset_meta = meta
        metric.process({}, samples)
        figures.append(quiet(metric.evaluate, len(samples)))
    assert figures[0] == figures[1] and figures[0]['coco/bbox_mAP'] > 0.1


def test_the_metric_keeps_its_own_copies_of_the_detections(coco128):
    """A numpy view of a decoder's tensor keeps the tensor alive with it: 5 KB an image more over a long run."""
    from evaluators.mm.metrics import StreamingCocoMetric

    metric = StreamingCocoMetric(ann_file=str(coco128 / 'instances.json'))
    coco = metric._coco_api
    samples = _samples(coco, 1, len(coco.getCatIds()))[:4]
    metric.process({}, samples)
    for (img_id, *arrays), sample in zip(metric.results, samples):
        pred = sample['pred_instances']
        assert img_id == sample['img_id'] and all(a.base is None and a.flags.owndata for a in arrays)
        np.testing.assert_array_equal(arrays[0], pred['bboxes'].numpy())
        np.testing.assert_array_equal(arrays[1], pred['scores'].numpy())


def test_metrics_of_one_annotation_file_share_its_ground_truth(coco128, tmp_path):
    """Native, device and reference each evaluate the same file: one index for all (about 5 KB an image each);
    a rewritten file is read again."""
    from mmdet.evaluation.metrics import CocoMetric

    from evaluators.mm.metrics import OpenImagesMLPerfMetric, StreamingCocoMetric

    ann_file = tmp_path / 'instances.json'
    ann_file.write_bytes((coco128 / 'instances.json').read_bytes())
    native, device = (StreamingCocoMetric(ann_file=str(ann_file)) for _ in range(2))
    assert native._coco_api is device._coco_api is OpenImagesMLPerfMetric(ann_file=str(ann_file))._coco_api
    assert CocoMetric(ann_file=str(ann_file))._coco_api is not native._coco_api  # mmdet's own stays its own
    assert not any('segmentation' in a for a in native._coco_api.dataset['annotations'])
    dataset = json.loads(ann_file.read_text())
    dataset['images'] = dataset['images'][:5]
    ann_file.write_text(json.dumps(dataset))
    assert len(StreamingCocoMetric(ann_file=str(ann_file))._coco_api.imgs) == 5 != len(native._coco_api.imgs)


def test_openimages_metric_equals_mlperfs_cocoeval(tmp_path):
    """MLPerf's accuracy script: COCOeval with its default parameters, label = category id."""
    from evaluators.mm.metrics import OpenImagesMLPerfMetric

    dataset, predictions = random_set(1, images=12, categories=6)
    for i, category in enumerate(dataset['categories']):  # MLPerf's format: category ids 0.. = labels
        for annotation in dataset['annotations']:
            if annotation['category_id'] == category['id']:
                annotation['category_id'] = -i - 1
        category['id'] = -i - 1
    for annotation in dataset['annotations']:
        annotation['category_id'] = -annotation['category_id'] - 1
    for category in dataset['categories']:
        category['id'] = -category['id'] - 1
    ann_file = tmp_path / 'openimages-mlperf.json'
    ann_file.write_text(json.dumps(dataset))
    expected = reference(dataset, predictions, list(range(6)), (1, 10, 100))
    metric = OpenImagesMLPerfMetric(ann_file=str(ann_file))
    metric.dataset_meta = {'classes': tuple(c['name'] for c in dataset['categories'])}
    import torch
    metric.process({}, [{'img_id': i, 'pred_instances': {'bboxes': torch.from_numpy(b), 'scores': torch.from_numpy(s),
                                                         'labels': torch.from_numpy(l)}}
                        for i, (b, s, l) in predictions.items()])
    got = quiet(metric.evaluate, len(predictions))
    assert [got[f'coco/{k}'] for k in ('bbox_mAP', 'bbox_mAP_50', 'bbox_mAP_l')] == list(expected.stats[[0, 1, 5]])
