"""task=mlperf: MLPerf LoadGen drives the runtime session, as MLCommons' inference reference harness does.

The QSL is the config's own dataset and test pipeline (sample index = position in the annotation file's `images`,
as `accuracy-openimages.py` and `accuracy-coco.py` read it); the SUT is the runtime session plus the family's host
decode (DeviceInference), answering each sample with the reference's response rows: float32
`[index, ymin, xmin, ymax, xmax, score, category id]`, the box normalized by the image's size. LoadGen writes its
logs into the run dir; accuracy mode then scores `mlperf_log_accuracy.json` the way the reference's accuracy
scripts do (pycocotools' COCOeval over the images LoadGen issued).
"""
from __future__ import annotations

import array
import json
import queue
import shutil
import statistics
import threading
import time
from pathlib import Path

import numpy as np
from omegaconf import DictConfig

from common.errors import UserError

# MLCommons inference docs: the reference RetinaNet's fp32 mAP on OpenImages-MLPerf validation; the submission
# checker's target is 99 % of it (tools/submission/submission_checker/constants.py)
REFERENCE_MAP = {'retinanet': 0.3755}
TARGET_FRACTION = 0.99
LOG_FILES = ('mlperf_log_summary.txt', 'mlperf_log_detail.txt', 'mlperf_log_accuracy.json')
WARMUP_SAMPLES = 5  # the reference harness runs 5 warm-up predictions before the test


def response_rows(index: int, detections: dict, height: int, width: int, cat_ids: list[int]) -> np.ndarray:
    """The reference harness's rows for one sample: [index, ymin, xmin, ymax, xmax, score, category id]."""
    boxes = detections['bboxes'].numpy().astype(np.float64)
    rows = np.empty((len(boxes), 7), np.float32)
    rows[:, 0] = index
    rows[:, 1], rows[:, 2] = boxes[:, 1] / height, boxes[:, 0] / width
    rows[:, 3], rows[:, 4] = boxes[:, 3] / height, boxes[:, 2] / width
    rows[:, 5] = detections['scores'].numpy()
    rows[:, 6] = np.asarray(cat_ids)[detections['labels'].numpy()] if len(boxes) else []
    return rows


def decode_accuracy_log(path: Path, images: list[dict]) -> tuple[list[dict], list[int]]:
    """COCO detections and the evaluated image ids from an `mlperf_log_accuracy.json`, read as
    `accuracy-openimages.py` reads it (qsl_idx -> images[qsl_idx]; boxes scaled by the file's height/width)."""
    detections, seen, image_ids = [], set(), []
    for entry in json.loads(path.read_text()):
        index = entry['qsl_idx']
        if index in seen:
            continue
        seen.add(index)
        image = images[index]
        image_ids.append(image['id'])
        data = np.frombuffer(bytes.fromhex(entry['data']), np.float32).reshape(-1, 7)
        for row_index, ymin, xmin, ymax, xmax, score, label in data.tolist():
            if int(row_index) != index:
                raise ValueError(f'{path}: a response of sample {index} carries index {int(row_index)}')
            h, w = image['height'], image['width']
            detections.append({'image_id': image['id'], 'category_id': int(label), 'score': score,
                               'bbox': [xmin * w, ymin * h, (xmax - xmin) * w, (ymax - ymin) * h]})
    return detections, image_ids


def coco_map(ann_file: str, detections: list[dict], image_ids: list[int]) -> dict:
    """pycocotools' bbox figures of `detections` over `image_ids` (the reference accuracy scripts' scoring)."""
    import contextlib
    import io

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    from evaluators.cocoeval import SUMMARY_KEYS

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(ann_file)
        if not detections:
            return {key: 0.0 for key in SUMMARY_KEYS}
        evaluation = COCOeval(gt, gt.loadRes(detections), iouType='bbox')
        evaluation.params.imgIds = sorted(image_ids)
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    return {key: float(evaluation.stats[i]) for i, key in enumerate(SUMMARY_KEYS)}


class SampleLibrary:
    """The QSL: LoadGen loads and unloads samples by index; a loaded sample is the preprocessed batch of one
    (or only its file, for runtimes that preprocess on the device) and its metainfo. `sample(index)` gives
    (inputs, metainfo): the engine's dataset item through the model's data preprocessor."""

    def __init__(self, sample, reads_paths: bool):
        self.sample = sample
        self.reads_paths = reads_paths
        self.loaded: dict[int, tuple] = {}

    def load(self, indices) -> None:
        for index in indices:
            if index not in self.loaded:
                inputs, meta = self.sample(index)
                self.loaded[index] = (None if self.reads_paths else inputs, meta)

    def unload(self, indices) -> None:
        for index in indices:
            self.loaded.pop(index, None)


class DeviceSUT:
    """The SUT: LoadGen's queries go to one worker thread that runs them through the session and the decode in
    chunks of the runtime's batch size and completes each sample with its response rows. An error or Ctrl-C
    (`stop`) completes every later sample empty, so LoadGen finishes and the error is raised after it."""

    def __init__(self, lg, inference, samples: SampleLibrary, batch_size: int, cat_ids: list[int]):
        import torch

        self.lg, self.torch = lg, torch
        self.inference, self.samples = inference, samples
        self.batch_size, self.cat_ids = batch_size, cat_ids
        self.queries: queue.Queue = queue.Queue()
        self.error: BaseException | None = None
        self.stopped = False
        self.worker = threading.Thread(target=self._work, name='mlperf-sut', daemon=True)
        self.worker.start()

    def issue(self, query_samples) -> None:
        self.queries.put(list(query_samples))

    def flush(self) -> None:
        pass

    def stop(self) -> None:
        self.stopped = True

    def close(self) -> None:
        self.queries.put(None)
        self.worker.join(timeout=30)

    def _work(self) -> None:
        while (query := self.queries.get()) is not None:
            for start in range(0, len(query), self.batch_size):
                chunk = query[start:start + self.batch_size]
                if self.error is None and not self.stopped:
                    try:
                        self._answer(chunk)
                        continue
                    except BaseException as err:  # reported by run_mlperf once LoadGen has finished
                        self.error = err
                self.lg.QuerySamplesComplete([self.lg.QuerySampleResponse(s.id, 0, 0) for s in chunk])

    def infer(self, indices: list[int]) -> list[dict]:
        loaded = [self.samples.loaded[i] for i in indices]
        metas = [meta for _, meta in loaded]
        inputs = None if self.samples.reads_paths else self.torch.cat([batch for batch, _ in loaded])
        with self.torch.no_grad():
            return self.inference.submit(inputs, metas).result()

    def _answer(self, chunk) -> None:
        detections = self.infer([s.index for s in chunk])
        buffers, responses = [], []
        for sample, found in zip(chunk, detections):
            height, width = self.samples.loaded[sample.index][1]['ori_shape'][:2]
            buffer = array.array('B', response_rows(sample.index, found, height, width, self.cat_ids).tobytes())
            buffers.append(buffer)  # alive until QuerySamplesComplete has copied it
            address, _ = buffer.buffer_info()
            responses.append(self.lg.QuerySampleResponse(sample.id, address, len(buffer)))
        self.lg.QuerySamplesComplete(responses)


def loadgen_settings(lg, options: DictConfig, model_name: str, latency_s: float, batch_size: int):
    """LoadGen's TestSettings: MLPerf's own rules (`mlperf.official`, mlperf.conf built into LoadGen, then the
    user.conf if given) or the short local ones; the expected latency / QPS from the warm-up unless set (LoadGen
    schedules its queries from them: an expected latency above the real one, or an expected QPS below it, ends
    the run early as INVALID)."""
    scenario = getattr(lg.TestScenario, options.scenario)
    settings = lg.TestSettings()
    if options.official:
        # conf_type 0 is the built-in mlperf.conf (also its RNG seeds); 2 reads a file without the once-per-process
        # counter behind conf_type 1, so several runs in one process all get mlperf.conf
        settings.FromConfig('', model_name, options.scenario, 0)
        if options.user_conf and settings.FromConfig(str(options.user_conf), model_name, options.scenario, 2) != 0:
            raise UserError(f'mlperf.user_conf={options.user_conf}: not readable by LoadGen')
    else:
        settings.min_duration_ms = options.min_duration_ms
        settings.min_query_count = options.min_query_count
        settings.multi_stream_samples_per_query = options.samples_per_query
    settings.scenario = scenario
    settings.mode = lg.TestMode.AccuracyOnly if options.mode == 'accuracy' else lg.TestMode.PerformanceOnly
    per_query_s = latency_s * (options.samples_per_query / batch_size if options.scenario == 'MultiStream' else 1)
    if options.target_latency_ms is not None:
        latency_ns = options.target_latency_ms * 1e6
        settings.single_stream_expected_latency_ns = int(latency_ns)
        settings.multi_stream_expected_latency_ns = int(latency_ns)
        settings.server_target_latency_ns = int(latency_ns)
    elif not options.official or not options.user_conf:
        settings.single_stream_expected_latency_ns = int(latency_s * 1e9 / 2)
        settings.multi_stream_expected_latency_ns = int(per_query_s * 1e9 / 2)
        if not options.official:
            settings.server_target_latency_ns = int(max(4 * latency_s, 0.1) * 1e9)
    samples_per_s = batch_size / latency_s
    if options.target_qps is not None:
        settings.server_target_qps = settings.offline_expected_qps = float(options.target_qps)
    elif not options.official or not options.user_conf:
        settings.server_target_qps = samples_per_s / 2
        settings.offline_expected_qps = samples_per_s * 1.5
    return settings


def read_detail_log(path: Path) -> dict:
    """The `:::MLLOG {...}` records of mlperf_log_detail.txt, key -> value (the last one of each key)."""
    records = {}
    for line in path.read_text().splitlines():
        if line.startswith(':::MLLOG '):
            record = json.loads(line[len(':::MLLOG '):])
            records[record['key']] = record['value']
    return records


def performance_figures(records: dict, scenario: str) -> dict:
    """The scenario's figures as LoadGen's detail log states them."""
    figures = {'result': records.get('result_validity')}
    latencies = {f'p{p}': records[f'result_{p}.00_percentile_latency_ns'] / 1000
                 for p in (50, 90, 99) if f'result_{p}.00_percentile_latency_ns' in records}
    if scenario == 'MultiStream':
        latencies = {f'p{p}': records[f'result_{p}.00_percentile_per_query_latency_ns'] / 1000
                     for p in (50, 90, 99) if f'result_{p}.00_percentile_per_query_latency_ns' in records} \
            or latencies
    figures['latency_us'] = latencies
    for key in ('result_samples_per_second', 'result_completed_samples_per_sec',
                'result_qps_with_loadgen_overhead'):
        if key in records:
            figures['samples_per_s'] = records[key]
            break
    return figures


def run_mlperf(cfg: DictConfig, output_dir: Path) -> dict:
    """Build (or reuse) the runtime in the chosen engine, run LoadGen over the config's dataset, and return the
    `mlperf` block."""
    import mlperf_loadgen as lg

    from integrations.engines import open_engine
    from integrations.engines.plan import make_plan

    options = cfg.mlperf
    # the native model runs apart from LoadGen's queries (native_detections), so the loop compares nothing
    engine = open_engine(make_plan(cfg, output_dir, output_dir / 'export', compare_native=False))
    engine.prepare()
    dataset = engine.dataset
    ann_file = dataset.ann_file
    images = json.loads(Path(ann_file).read_text())['images']
    for index in range(len(dataset)):  # LoadGen's index is the file position the accuracy scripts look up
        if dataset.get_data_info(index)['img_id'] != images[index]['id']:
            raise UserError(f'data.ann_file={cfg.data.ann_file}: the dataset does not keep the file\'s image order '
                            f'(index {index}); MLPerf\'s accuracy scripts need it')
    inference = engine.evaluator.paths['device'].inference
    samples = SampleLibrary(engine.sample, inference.reads_paths)
    batch_size = cfg.runtime.get('batch_size') or cfg.eval.batch_size
    sut = DeviceSUT(lg, inference, samples, batch_size, list(dataset.cat_ids))

    count = len(dataset)
    performance_count = min(count, options.performance_sample_count)
    warmup = list(range(min(WARMUP_SAMPLES, count)))
    samples.load(warmup)
    latencies = []
    for index in warmup:
        start = time.perf_counter()
        sut.infer([index])
        latencies.append(time.perf_counter() - start)
    samples.unload(warmup)
    latency_s = statistics.median(latencies[1:] or latencies)
    settings = loadgen_settings(lg, options, cfg.model.family, latency_s, batch_size)

    logs = output_dir / '.mlperf.partial'  # LoadGen's logs, moved into the run dir once the test has finished
    shutil.rmtree(logs, ignore_errors=True)
    logs.mkdir(parents=True)
    log_output = lg.LogOutputSettings()
    log_output.outdir = str(logs)
    log_output.copy_summary_to_stdout = False
    log_settings = lg.LogSettings()
    log_settings.log_output = log_output
    log_settings.enable_trace = False  # its trace file grows large; the reference enables it only with --debug
    lg_sut = lg.ConstructSUT(sut.issue, sut.flush)
    lg_qsl = lg.ConstructQSL(count, performance_count, samples.load, samples.unload)
    # LoadGen blocks in C++ while it runs: it runs on a thread so Ctrl-C reaches this one, which then stops the
    # SUT (every later sample answered empty) and lets LoadGen finish
    no_audit = str(logs / 'audit.config')  # a file that never exists: an audit.config in the cwd is not read
    test = threading.Thread(target=lg.StartTestWithLogSettings, name='loadgen',
                            args=(lg_sut, lg_qsl, settings, log_settings, no_audit), daemon=True)
    print(f'mlperf: {options.scenario} {options.mode}, {count} samples ({performance_count} loaded for '
          f'performance), warm-up latency {1000 * latency_s:.1f} ms', flush=True)
    try:
        test.start()
        while test.is_alive():
            test.join(timeout=0.2)
    except BaseException:
        sut.stop()
        test.join(timeout=5)  # a performance run still waits out its schedule: the process ends without it
        shutil.rmtree(logs, ignore_errors=True)
        raise
    finally:
        sut.close()
        if not test.is_alive():
            lg.DestroyQSL(lg_qsl)
            lg.DestroySUT(lg_sut)
        inference.close()
    if sut.error is not None:
        shutil.rmtree(logs, ignore_errors=True)
        raise sut.error
    for name in LOG_FILES:
        (logs / name).replace(output_dir / name)
    shutil.rmtree(logs, ignore_errors=True)

    block = {'scenario': options.scenario, 'mode': options.mode, 'official': options.official,
             'samples': count, 'performance_sample_count': performance_count,
             'logs': {name: str(output_dir / name) for name in LOG_FILES}}
    if options.mode == 'performance':
        block.update(performance_figures(read_detail_log(output_dir / 'mlperf_log_detail.txt'), options.scenario))
        summary = (output_dir / 'mlperf_log_summary.txt').read_text().splitlines()
        # why a run is INVALID, in the summary's words (e.g. "Early stopping satisfied: NO")
        block['not_satisfied'] = [line.strip() for line in summary if line.rstrip().endswith(': NO')]
        return block
    detections, image_ids = decode_accuracy_log(output_dir / 'mlperf_log_accuracy.json', images)
    block['accuracy'] = coco_map(ann_file, detections, image_ids)
    if cfg.eval.compare_native:
        block['native'] = coco_map(ann_file, native_detections(engine, list(dataset.cat_ids)), image_ids)
    reference = REFERENCE_MAP.get(cfg.model.family) or (block.get('native') or {}).get('bbox_mAP')
    block['target'] = None if reference is None else round(TARGET_FRACTION * reference, 6)
    block['meets_target'] = None if reference is None else block['accuracy']['bbox_mAP'] >= block['target']
    return block


def native_detections(engine, cat_ids: list[int]) -> list[dict]:
    """The native PyTorch model's detections over the engine's dataset, as COCO results (the same scoring as the
    SUT's)."""
    from tqdm import tqdm

    out = []
    for index in tqdm(range(len(engine.dataset)), desc='native model', unit='image'):
        sample = engine.native_predictions(index)
        pred = sample.pred_instances
        for box, score, label in zip(pred.bboxes.tolist(), pred.scores.tolist(), pred.labels.tolist()):
            out.append({'image_id': sample.img_id, 'category_id': cat_ids[label], 'score': score,
                        'bbox': [box[0], box[1], box[2] - box[0], box[3] - box[1]]})
    return out
