"""eval.explain: the breakdown telescopes, the paired bootstrap is reproducible and equals COCOeval recomputed on
every resampled set, the detection diff counts hand-made detections right, and a real run's report renders in
headless Chromium."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from evaluators.breakdown import DetectionDiff, breakdown, interval, match, stage_maps
from evaluators.cocoeval import StreamingCocoEval
from integrations.config import ROOT
from tests.test_cocoeval import coco_of, random_set, reference


def _records(stream, predictions):
    return stream.complete([stream.evaluate_image(i, *p) for i, p in predictions.items()])


def _two_stages(seed: int):
    """A small set and two detectors on it: the second the first with boxes jittered and some dropped."""
    dataset, first = random_set(seed, images=10, categories=4)
    rng = np.random.default_rng(seed + 100)
    second = {}
    for image, (boxes, scores, labels) in first.items():
        keep = rng.random(len(scores)) > 0.2
        second[image] = ((boxes + rng.normal(0, 3, boxes.shape)).astype(np.float32)[keep],
                         (scores * rng.uniform(0.8, 1.0, len(scores))).astype(np.float32)[keep], labels[keep])
    return dataset, first, second


@pytest.mark.parametrize('seed', range(2))
def test_paired_bootstrap_equals_cocoeval_on_each_resampled_set(seed):
    """The slow reference: for every resample, both detectors scored by COCOeval on the resampled images (each
    as often as drawn, under new ids); the fast path re-weights records matched once."""
    from evaluators.cocoeval import resample_weights

    dataset, first, second = _two_stages(seed)
    cat_ids = [c['id'] for c in dataset['categories']]
    coco = coco_of(dataset)
    stream = StreamingCocoEval(coco, cat_ids, (100, 300, 1000))
    point, resampled = stage_maps(stream, [_records(stream, first), _records(stream, second)], 8, seed)
    for s, predictions in enumerate((first, second)):
        assert point[s] == pytest.approx(reference(dataset, predictions, cat_ids, (100, 300, 1000)).stats[0],
                                         abs=1e-12)
    image_ids = sorted(coco.getImgIds())
    for b, weights in enumerate(resample_weights(len(image_ids), 8, seed)):  # stage_maps' draws, in order
        images, annotations, drawn = [], [], ({}, {})
        for img_id, count in zip(image_ids, weights):
            for _ in range(count):
                images.append({**coco.imgs[img_id], 'id': len(images) + 1})
                annotations += [{**{k: v for k, v in a.items() if not k.endswith('ignore')},
                                 'image_id': len(images), 'id': len(annotations) + j + 1}
                                for j, a in enumerate(coco.imgToAnns.get(img_id, []))]
                for stage, predictions in zip(drawn, (first, second)):
                    stage[len(images)] = predictions[img_id]
        resampled_set = {'images': images, 'annotations': annotations, 'categories': dataset['categories']}
        expected = [reference(resampled_set, d, cat_ids, (100, 300, 1000)).stats[0] for d in drawn]
        assert resampled[:, b] == pytest.approx(expected, abs=1e-12)


def test_bootstrap_is_reproducible_and_the_deltas_add_up():
    dataset, first, second = _two_stages(0)
    stream = StreamingCocoEval(coco_of(dataset), [c['id'] for c in dataset['categories']], (100, 300, 1000))
    records = [_records(stream, first), _records(stream, second), _records(stream, first)]
    a = stage_maps(stream, records, 50, 7)
    b = stage_maps(stream, records, 50, 7)
    c = stage_maps(stream, records, 50, 8)
    assert np.array_equal(a[1], b[1]) and not np.array_equal(a[1], c[1])
    entries = breakdown([('one', ''), ('two', ''), ('three', '')], *a)
    assert entries[0]['delta'] is None
    assert sum(e['delta'] for e in entries[1:]) == pytest.approx(entries[-1]['bbox_mAP'] - entries[0]['bbox_mAP'],
                                                                abs=2e-6)
    assert entries[2]['delta'] == pytest.approx(-entries[1]['delta'], abs=2e-6)
    assert entries[1]['delta_ci95'][0] <= entries[1]['delta_ci95'][1]
    # a stage against itself: every resample's delta is 0
    assert interval(a[1][2] - a[1][0]) == [0.0, 0.0]


def _dets(*rows):
    """(x1, y1, x2, y2, score, label) rows -> a detections dict."""
    array = np.asarray(rows, np.float32).reshape(-1, 6)
    return {'bboxes': array[:, :4], 'scores': array[:, 4], 'labels': array[:, 5].astype(np.int64)}


def test_match_is_greedy_by_score_one_to_one_and_by_class():
    native = _dets((0, 0, 10, 10, 0.9, 0), (1, 1, 11, 11, 0.8, 0), (50, 50, 60, 60, 0.7, 1))
    device = _dets((1, 1, 11, 11, 0.85, 0), (50, 50, 60, 60, 0.6, 2))
    pairs, lost, new = match(native, device, 0.5)
    # the 0.9 native takes the only class-0 device box (IoU 0.68); the class-1 box finds only a class-2 one
    assert pairs == [(0, 0)] and lost == [1, 2] and new == [1]


def test_detection_diff_counts_hand_made_detections():
    diff = DetectionDiff(['cat', 'dog', 'bird'], score_thr=0.3, iou_thr=0.5, keep=1)
    small, large = (0, 0, 20, 20), (0, 0, 200, 200)  # 400 px² (small), 40,000 px² (large)
    # image 1: a cat matched (score 0.9 -> 0.7), a dog lost, a low-score bird ignored on both sides
    diff.add(1, 'a.jpg', _dets((*small, 0.9, 0), (*large, 0.8, 1), (*small, 0.1, 2)),
             _dets((*small, 0.7, 0), (*small, 0.2, 2)))
    # image 2: nothing native, a new bird and a new dog
    diff.add(2, 'b.jpg', _dets(), _dets((*large, 0.5, 2), (*small, 0.4, 1)))
    s = diff.summary()
    assert (s['images'], s['native'], s['device'], s['matched'], s['lost'], s['new']) == (2, 2, 3, 1, 1, 2)
    assert s['mean_score_shift'] == pytest.approx(-0.2, abs=1e-6)
    assert s['by_size']['small'] == {'native': 1, 'device': 2, 'matched': 1, 'lost': 0, 'new': 1,
                                     'mean_score_shift': pytest.approx(-0.2, abs=1e-6)}
    assert s['by_size']['large'] == {'native': 1, 'device': 1, 'matched': 0, 'lost': 1, 'new': 1,
                                     'mean_score_shift': None}
    assert s['by_class']['dog'] == {'native': 1, 'device': 1, 'matched': 0, 'lost': 1, 'new': 1,
                                    'mean_score_shift': None}
    assert 'bird' in s['by_class'] and s['by_class']['bird']['new'] == 1
    # the image kept for pictures: image 2 (2 new) beats image 1 (1 lost)
    assert [e['img_id'] for e in diff.largest()] == [2] and s['largest_difference'][0]['new'] == 2


@pytest.fixture(scope='module')
def explained(assets, coco128, tmp_path_factory):
    """A real run with every stage that applies on ONNX Runtime: the config's rectangular pipeline, the export
    shape, the seeds' single-label decode, fp32 numerics, fp16."""
    out = tmp_path_factory.mktemp('explain')
    command = [sys.executable, str(ROOT / 'run.py'), 'data=coco', f'data.img_dir={coco128 / "images"}',
               f'data.ann_file={coco128 / "instances.json"}', 'precision=fp16', 'eval.explain=true',
               'eval.num_images=6', 'eval.multi_label=false', 'explain.resamples=200', 'explain.images=2',
               f'hydra.run.dir={out}']
    process = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    assert process.returncode == 0, process.stderr[-3000:]
    return out, json.loads((out / 'results.json').read_text()), process.stdout


def test_explained_run_breaks_the_delta_down(explained):
    out, results, stdout = explained
    stages = [e['stage'] for e in results['breakdown']]
    assert stages == ['native_config', 'export_shape', 'decode', 'numerics', 'precision']
    first, *rest = results['breakdown']
    assert sum(e['delta'] for e in rest) == pytest.approx(rest[-1]['bbox_mAP'] - first['bbox_mAP'], abs=1e-5)
    # the reported figures are stages of the breakdown: native (deployed decode), fp32 reference, the device
    by_stage = {e['stage']: e['bbox_mAP'] for e in results['breakdown']}
    assert round(by_stage['decode'], 3) == results['native']['bbox_mAP']
    assert round(by_stage['numerics'], 3) == results['reference']['bbox_mAP']
    assert round(by_stage['precision'], 3) == results['device']['bbox_mAP']
    low, high = results['delta_ci95']
    assert low <= high and all(e['delta_ci95'][0] <= e['delta_ci95'][1] for e in rest)
    diff = results['detections_diff']
    assert diff['images'] == 6 and diff['native'] == diff['matched'] + diff['lost']
    assert diff['device'] == diff['matched'] + diff['new']
    assert sum(c['native'] for c in diff['by_size'].values()) == diff['native']
    assert sum(c['lost'] for c in diff['by_class'].values()) == diff['lost']
    assert [s['stage'] for s in results['explain']['skipped']] == ['device_preprocessing']
    assert 'where the mAP went' in stdout and len(list((out / 'explain').glob('*.png'))) == 2


def test_report_renders_in_headless_chromium(explained, tmp_path):
    browser = shutil.which('chromium') or shutil.which('chromium-browser')
    if browser is None:
        pytest.fail('chromium is not installed: `make setup` installs it (apt-get install chromium)')
    out, results, _ = explained
    report = out / 'report.html'
    flags = [browser, '--headless', '--no-sandbox', '--disable-gpu', '--hide-scrollbars']
    dom = subprocess.run([*flags, '--dump-dom', report.as_uri()], capture_output=True, text=True, timeout=120).stdout
    for entry in results['breakdown']:
        assert f"<td>{entry['stage']}</td>" in dom
    images = dom.count('<img ')
    assert images >= 4 and f'data-images-loaded="{images}/{images}"' in dom  # waterfall, classes, 2 pictures
    shot = tmp_path / 'report.png'
    subprocess.run([*flags, f'--screenshot={shot}', '--window-size=1300,2600', report.as_uri()],
                   capture_output=True, timeout=120, check=True)
    from PIL import Image
    pixels = np.asarray(Image.open(shot).convert('L'))
    assert pixels.shape == (2600, 1300) and pixels.std() > 10  # drawn, not a blank page


def test_explain_refuses_what_it_cannot_explain(tmp_path):
    for overrides, message in ((['eval.compare_native=false'], 'eval.compare_native=false'),
                               (['precision=int8', 'eval.reference=fp16'], 'eval.reference=fp16')):
        process = subprocess.run([sys.executable, str(ROOT / 'run.py'), 'eval.explain=true', *overrides,
                                  f'hydra.run.dir={tmp_path}'], cwd=ROOT, capture_output=True, text=True)
        lines = process.stderr.strip().splitlines()
        assert process.returncode == 2 and lines[-1].startswith('error: ') and message in lines[-1]
        assert not (tmp_path / 'results.json').exists()


def test_bootstrap_of_a_category_with_ground_truth_and_no_detections():
    """Such a category counts with AP 0, in every resample as in COCOeval."""
    dataset, predictions = random_set(1, images=6, categories=3)
    cat_ids = [c['id'] for c in dataset['categories']]
    only_two = {i: tuple(a[p[2] != 0] for a in p) for i, p in predictions.items()}  # no label-0 detections
    assert any(a['category_id'] == cat_ids[0] for a in dataset['annotations'])
    stream = StreamingCocoEval(coco_of(dataset), cat_ids, (100, 300, 1000))
    point, resampled = stage_maps(stream, [_records(stream, only_two)], 4, 0)
    assert point[0] == pytest.approx(reference(dataset, only_two, cat_ids, (100, 300, 1000)).stats[0], abs=1e-12)
    assert np.isfinite(resampled).all()
