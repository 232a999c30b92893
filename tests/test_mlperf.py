"""task=mlperf: MLPerf LoadGen driving the runtime session, its logs read the way MLCommons' scripts read them."""
import json
import subprocess
import sys

import mlperf_loadgen as lg
import numpy as np
import pytest
import torch

from integrations.app.main import run
from integrations.tasks.mlperf import DeviceSUT, SampleLibrary, decode_accuracy_log, loadgen_settings, response_rows
from tests.conftest import ROOT, compose_cfg

YOLOV5N = ['model.config=mmyolo::yolov5/yolov5_n-v61_syncbn_fast_8xb16-300e_coco.py', 'model.checkpoint=null']


def _score_accuracy_log_as_mlcommons_does(log, ann_file) -> float:
    """accuracy-openimages.py's reading of the log, written out here independently of integrations/tasks/mlperf.py."""
    import contextlib
    import io

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(ann_file))
        image_map = gt.dataset['images']
        detections, image_ids, seen = [], set(), set()
        for entry in json.loads(log.read_text()):
            idx = entry['qsl_idx']
            if idx in seen:
                continue
            seen.add(idx)
            data = np.frombuffer(bytes.fromhex(entry['data']), np.float32)
            image_ids.add(image_map[idx]['id'])
            for i in range(0, len(data), 7):
                image_idx, ymin, xmin, ymax, xmax, score, label = data[i:i + 7]
                assert int(image_idx) == idx
                h, w = image_map[idx]['height'], image_map[idx]['width']
                detections.append({'image_id': image_map[idx]['id'], 'category_id': int(label),
                                   'bbox': [float(xmin * w), float(ymin * h), float((xmax - xmin) * w),
                                            float((ymax - ymin) * h)], 'score': float(score)})
        evaluation = COCOeval(gt, gt.loadRes(detections), iouType='bbox')
        evaluation.params.imgIds = list(image_ids)
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    return float(evaluation.stats[0])


def test_response_rows_round_trip_through_a_loadgen_log(tmp_path):
    """Rows normalized by the image size come back in pixels, with category ids, from LoadGen's uppercase hex;
    an empty response still counts its image."""
    detections = {'bboxes': torch.tensor([[10.0, 20.0, 110.0, 220.0], [0.0, 0.0, 640.0, 480.0]]),
                  'scores': torch.tensor([0.9, 0.25]), 'labels': torch.tensor([0, 2])}
    rows = response_rows(1, detections, height=480, width=640, cat_ids=[1, 5, 7])
    assert rows.dtype == np.float32 and rows.shape == (2, 7)
    np.testing.assert_allclose(rows[0], [1, 20 / 480, 10 / 640, 220 / 480, 110 / 640, 0.9, 1], rtol=1e-6)
    log = tmp_path / 'mlperf_log_accuracy.json'
    log.write_text(json.dumps([{'seq_id': 0, 'qsl_idx': 1, 'data': rows.tobytes().hex().upper()},
                               {'seq_id': 1, 'qsl_idx': 0, 'data': ''},
                               {'seq_id': 2, 'qsl_idx': 1, 'data': rows.tobytes().hex().upper()}]))
    images = [{'id': 3, 'height': 10, 'width': 10}, {'id': 4, 'height': 480, 'width': 640}]
    found, image_ids = decode_accuracy_log(log, images)
    assert image_ids == [4, 3] and len(found) == 2  # the repeated sample is read once
    assert found[0]['image_id'] == 4 and found[0]['category_id'] == 1 and found[1]['category_id'] == 7
    np.testing.assert_allclose(found[0]['bbox'], [10, 20, 100, 200], rtol=1e-5)


def test_official_settings_are_mlperfs_on_every_run():
    """mlperf.official: mlperf.conf (built into LoadGen) each time, not only on a process's first FromConfig."""
    options = compose_cfg('task=mlperf', 'mlperf.official=true', 'mlperf.scenario=Offline').mlperf
    for _ in range(2):
        settings = loadgen_settings(lg, options, 'retinanet', latency_s=0.1, batch_size=1)
        assert settings.min_duration_ms == 600000 and settings.performance_sample_count_override == 64
        assert settings.min_query_count == 24576 and settings.qsl_rng_seed == 2085463073848966840
        assert settings.scenario == lg.TestScenario.Offline
    local = loadgen_settings(lg, compose_cfg('task=mlperf').mlperf, 'retinanet', latency_s=0.1, batch_size=1)
    assert local.min_duration_ms < 600000 and local.single_stream_expected_latency_ns <= 0.1e9


def _sample(index):
    """A preprocessed sample of one, as an engine gives it."""
    return torch.zeros(1, 3, 4, 4), {'ori_shape': (4, 4), 'img_path': str(index)}


class _FailingInference:
    reads_paths = False

    def __init__(self, fail_at):
        self.calls, self.fail_at = 0, fail_at

    def submit(self, inputs, metas):
        from concurrent.futures import Future
        self.calls += 1
        if self.calls == self.fail_at:
            raise RuntimeError('card error')
        done = Future()
        done.set_result([{'bboxes': torch.zeros(0, 4), 'scores': torch.zeros(0), 'labels': torch.zeros(0, dtype=int)}
                         for _ in metas])
        return done


def test_a_failing_sut_lets_loadgen_finish_and_reports_the_error(tmp_path):
    """An error in the SUT must not hang LoadGen: every later sample is answered empty and the error kept."""
    samples = SampleLibrary(_sample, reads_paths=False)
    sut = DeviceSUT(lg, _FailingInference(fail_at=3), samples, batch_size=1, cat_ids=[0])
    settings = lg.TestSettings()
    settings.mode = lg.TestMode.AccuracyOnly
    log_settings = lg.LogSettings()
    log_settings.enable_trace = False
    log_settings.log_output.outdir = str(tmp_path)
    lg_sut, lg_qsl = lg.ConstructSUT(sut.issue, sut.flush), lg.ConstructQSL(6, 6, samples.load, samples.unload)
    lg.StartTestWithLogSettings(lg_sut, lg_qsl, settings, log_settings, str(tmp_path / 'no-audit.config'))
    sut.close()
    lg.DestroyQSL(lg_qsl)
    lg.DestroySUT(lg_sut)
    assert isinstance(sut.error, RuntimeError)
    entries = json.loads((tmp_path / 'mlperf_log_accuracy.json').read_text())
    assert len(entries) == 6 and all(e['data'] == '' for e in entries)


def test_accuracy_mode_scores_its_log_like_the_eval_loop(demo_subset_data, demo_subset, tmp_path):
    """The accuracy log, decoded here as MLCommons' script does, gives the reported mAP, and that mAP is the one
    the evaluation loop reports for the same device on the same images."""
    result = run(compose_cfg('task=mlperf', 'mlperf.mode=accuracy', 'eval.compare_native=false',
                             *demo_subset_data), tmp_path / 'mlperf')
    block = result['mlperf']
    log = tmp_path / 'mlperf' / 'mlperf_log_accuracy.json'
    assert block['mode'] == 'accuracy' and log.is_file() and (tmp_path / 'mlperf' / 'results.json').is_file()
    assert not (tmp_path / 'mlperf' / '.mlperf.partial').exists()
    mlcommons_map = _score_accuracy_log_as_mlcommons_does(log, demo_subset)
    assert block['accuracy']['bbox_mAP'] == pytest.approx(mlcommons_map, abs=1e-9) and mlcommons_map > 0.2
    evaluated = run(compose_cfg('eval.compare_native=false', *demo_subset_data), tmp_path / 'eval')
    assert block['accuracy']['bbox_mAP'] == pytest.approx(evaluated['device']['bbox_mAP'], abs=2e-3)
    assert block['target'] is None and block['meets_target'] is None  # no native run, no MLPerf reference


def test_performance_mode_single_stream_and_offline_are_valid(demo_subset_data, tmp_path):
    """Short local settings give VALID results with the scenario's figures; the logs land in the run dir."""
    for scenario in ('SingleStream', 'Offline'):
        run_dir = tmp_path / scenario
        result = run(compose_cfg('task=mlperf', f'mlperf.scenario={scenario}', 'mlperf.min_duration_ms=1000',
                                 *YOLOV5N, *demo_subset_data), run_dir)
        block = result['mlperf']
        summary = (run_dir / 'mlperf_log_summary.txt').read_text()
        assert block['result'] == 'VALID' and 'Result is : VALID' in summary, summary
        assert block['samples_per_s'] > 0 and block['latency_us']['p90'] > 0
        assert json.loads((run_dir / 'results.json').read_text())['mlperf'] == block


def test_mlperf_task_cli_bad_option_one_line(tmp_path):
    done = subprocess.run([sys.executable, 'run.py', 'task=mlperf', 'mlperf.scenario=Batch',
                           f'hydra.run.dir={tmp_path}'], cwd=ROOT, capture_output=True, text=True, check=False)
    assert done.returncode == 2 and done.stderr.strip().count('\n') == 0 and 'mlperf.scenario' in done.stderr
