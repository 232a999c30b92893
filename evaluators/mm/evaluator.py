"""DeviceEvaluator: an mmengine Evaluator that scores runtime paths beside the native model in `runner.test()`.

It wraps the config's own metrics once per path: the native copy (prefix `native`) sees the model's
predictions as usual; each runtime path (`device`, and `reference` when a reference precision is evaluated
in the same run) sees that runtime's decoded detections for the same batch. With `explain`, the native model's
raw maps are also decoded with the model's own settings (`native_own_decode`, when the deployed ones differ) and
every image's native and device detections are diffed (evaluators/breakdown.py).

Both engines use it: mmengine's test loop as its `test_evaluator`, Lightning's through a callback
(integrations/engines/).
"""
from __future__ import annotations

import copy
import time
from collections import deque
from dataclasses import dataclass

import torch
from mmengine.evaluator import Evaluator
from mmengine.registry import EVALUATOR
from mmengine.structures import InstanceData

import evaluators.mm.metrics  # noqa: F401 -- registers the streamed metrics the configs name
from common.memory import keep_large_buffers_mapped
from evaluators.cocoeval import SUMMARY_KEYS
from evaluators.device import DeviceInference, NativeTaps


def _with_prefix(metrics, prefix: str) -> list:
    metrics = copy.deepcopy(metrics if isinstance(metrics, (list, tuple)) else [metrics])
    for metric in metrics:
        metric['prefix'] = prefix
    return metrics


@dataclass
class DevicePath:
    """One runtime path of the loop: the session with its decoder, and the metrics scoring its detections."""

    inference: DeviceInference
    evaluator: Evaluator


@dataclass
class OwnDecodePath:
    """eval.explain: the native raw maps decoded a second time, with the model's own post-processing settings."""

    decoder: object
    evaluator: Evaluator


@EVALUATOR.register_module()
class DeviceEvaluator(Evaluator):
    """Evaluator for native and runtime predictions of the same batches.

    Args:
        metrics: metric configs (the model config's test_evaluator metrics, e.g. mmdet.CocoMetric).
        labels: printed name of each runtime path, e.g. {'device': 'onnx int8'}. Defaults to the path names.
        overlap: run batch k on the device while batch k-1 is decoded and k-2 scored; the attribute may change
            between loops (task=bench times the loop both ways).
        flat_memory: fix glibc's mmap threshold, so peak RSS stays flat over many images (common/memory.py).
        save_txt: a folder: every path's detections also go to <save_txt>/txt/<path>/ (evaluators/outputs.py).
        explain: DetectionDiff's options (score_thr, iou_thr, keep): diff native and device per image.
    """

    def __init__(self, metrics, labels: dict | None = None, overlap: bool = True, flat_memory: bool = False,
                 save_txt: str | None = None, explain: dict | None = None):
        super().__init__(_with_prefix(metrics, 'native'))
        if flat_memory:
            keep_large_buffers_mapped()
        self.metric_cfgs = metrics
        self.labels = dict(labels or {})
        self.save_txt = save_txt
        self.writers: dict = {}  # path -> DetectionWriter
        self.outputs: dict = {}  # path -> the files written (after evaluate)
        self.paths: dict[str, DevicePath] = {}
        self.taps = NativeTaps()
        self.preprocessor = None
        self.compare_native = True
        self.host_s = {'preprocess': 0.0, 'metric': 0.0}  # the loop's host work, besides loading and decoding
        self.overlap = overlap
        self.pending: deque = deque()
        self.explain = dict(explain) if explain is not None else None
        self.diff = None  # DetectionDiff, with explain
        self.own_decode: OwnDecodePath | None = None

    @property
    def dataset_meta(self):
        return self._dataset_meta

    @dataset_meta.setter
    def dataset_meta(self, meta) -> None:
        self._dataset_meta = meta
        for metric in self.metrics:
            metric.dataset_meta = meta
        for _, evaluator in self._path_evaluators():
            evaluator.dataset_meta = meta

    def _path_evaluators(self):
        yield from ((name, path.evaluator) for name, path in self.paths.items())
        if self.own_decode:
            yield 'native_own_decode', self.own_decode.evaluator

    def attach(self, sessions: dict, decoder, preprocessor, taps=(), own_decoder=None) -> None:
        """Called by ExportHook before the loop: one session per path, the decoder, the model's preprocessor
        and the native raw-map modules (none: native predictions are not scored); with explain, `own_decoder` decodes
        the native raw maps with the model's own post-processing settings."""
        for path in self.paths.values():  # a second test loop (task=bench) replaces the first's sessions
            path.inference.close()
        self.paths = {}
        for name, session in sessions.items():
            evaluator = Evaluator(_with_prefix(self.metric_cfgs, name))
            evaluator.dataset_meta = getattr(self, '_dataset_meta', None)
            self.paths[name] = DevicePath(DeviceInference(session, decoder, self.labels.get(name, name)), evaluator)
        self.preprocessor = preprocessor
        self.host_s = dict.fromkeys(self.host_s, 0.0)
        self.taps = NativeTaps(taps)
        self.compare_native = bool(taps)
        self.own_decode, self.diff = None, None
        if self.explain is not None:
            if not self.compare_native:
                raise ValueError('explain needs the native model (compare_native)')
            if own_decoder is not None:
                evaluator = Evaluator(_with_prefix(self.metric_cfgs, 'native_own_decode'))
                evaluator.dataset_meta = getattr(self, '_dataset_meta', None)
                self.own_decode = OwnDecodePath(own_decoder, evaluator)

    def _open_writers(self) -> None:
        """One DetectionWriter per path, with the labels' class names and category ids of the path's metric."""
        from pathlib import Path

        from mmengine.dist import get_rank

        from evaluators.outputs import DetectionWriter

        names = [*self.paths, *(['native'] if self.compare_native else [])]
        metrics = {name: (self.metrics if name == 'native' else self.paths[name].evaluator.metrics)[0]
                   for name in names}
        for name, metric in metrics.items():
            metric.dataset_meta = self._dataset_meta
            self.writers[name] = DetectionWriter(Path(self.save_txt) / 'txt' / name, self._dataset_meta['classes'],
                                                 metric.evaluated_categories(), rank=get_rank())

    def process(self, data_samples, data_batch=None) -> None:
        if not self.paths:
            raise RuntimeError('DeviceEvaluator has no runtime: add ExportHook to custom_hooks')
        if self.save_txt and not self.writers:
            self._open_writers()
        start = time.perf_counter()
        batch = self.preprocessor(data_batch, False)
        self.host_s['preprocess'] += time.perf_counter() - start
        metas = [sample.metainfo for sample in batch['data_samples']]
        native_maps = self.taps.take()
        futures = {name: path.inference.submit(batch['inputs'], metas, native_maps)
                   for name, path in self.paths.items()}
        native = None
        if self.explain is not None:
            if self.diff is None:
                from evaluators.breakdown import DetectionDiff
                self.diff = DetectionDiff(self._dataset_meta['classes'], **self.explain)
            native = [{k: getattr(s.pred_instances, k).cpu().numpy() for k in ('bboxes', 'scores', 'labels')}
                      for s in data_samples]
        if self.own_decode:
            own = self.own_decode.decoder([torch.from_numpy(m) for m in native_maps], metas)
            self.own_decode.evaluator.process(_with_detections(batch['data_samples'], own), data_batch)
        self.pending.append((futures, batch, data_batch, native))
        if self.compare_native:
            super().process(data_samples, data_batch)
            if 'native' in self.writers:
                for sample in data_samples:
                    pred = sample.pred_instances
                    self.writers['native'].write(sample.img_id, sample.img_path, pred.bboxes.cpu().numpy(),
                                                 pred.scores.cpu().numpy(), pred.labels.cpu().numpy())
        # overlap: batch k runs while batch k-1 is decoded and the loop scores batch k-2 and loads batch k+1
        while len(self.pending) > (2 if self.overlap else 0):
            self._finish_oldest()

    def _finish_oldest(self) -> None:
        """Feed each path's metrics with the oldest batch's detections, in batch order."""
        futures, batch, data_batch, native = self.pending.popleft()
        for name, path in self.paths.items():
            detections = futures[name].result()
            start = time.perf_counter()
            samples = _with_detections(batch['data_samples'], detections)
            if name in self.writers:
                for sample, det in zip(samples, detections):
                    self.writers[name].write(sample.img_id, sample.img_path, det['bboxes'].numpy(),
                                             det['scores'].numpy(), det['labels'].numpy())
            if name == 'device' and native is not None:
                for sample, own, det in zip(samples, native, detections):
                    self.diff.add(sample.img_id, sample.img_path, own, {k: v.numpy() for k, v in det.items()})
            path.evaluator.process(samples, data_batch)
            self.host_s['metric'] += time.perf_counter() - start
        self.preprocessor.release(batch['inputs'])  # every path's runtime call on it has returned

    def evaluate(self, size: int) -> dict:
        from mmengine.dist import all_gather_object, is_main_process

        while self.pending:
            self._finish_oldest()
        for writer in self.writers.values():  # before the metrics gather: every rank has written its images
            writer.close()
        results = {}
        if self.own_decode:
            if is_main_process():
                print('==== native, the model\'s own post-processing settings ====', flush=True)
            results.update(self.own_decode.evaluator.evaluate(size))
        for name, path in self.paths.items():
            if is_main_process():
                print(f'==== {name} ({self.labels.get(name, name)}) ====', flush=True)
            results.update(path.evaluator.evaluate(size))
            if is_main_process():
                print(_seed_dict(results, name), flush=True)
            # every rank saw its own shard: runtime seconds add up, fidelity is the worst over ranks
            per_rank = all_gather_object((path.inference.runtime_s, path.inference.fidelity))
            results[f'{name}/runtime_s'] = sum(runtime_s for runtime_s, _ in per_rank)
            fidelities = [f for _, f in per_rank if f]
            if fidelities:
                results[f'{name}/raw_max_abs_diff'] = max(f['max_abs_diff'] for f in fidelities)
                results[f'{name}/raw_min_cosine'] = min(f['min_cosine'] for f in fidelities)
        if self.compare_native:
            if is_main_process():
                print('==== native (PyTorch) ====', flush=True)
            results.update(super().evaluate(size))
            if is_main_process():
                print(_seed_dict(results, 'native'), flush=True)
        self.taps.close()
        for path in self.paths.values():
            path.inference.close()
        if is_main_process():
            self.outputs = {name: writer.finish() for name, writer in self.writers.items()}
        self.writers = {}
        return results


def _with_detections(data_samples, detections: list[dict]) -> list:
    """Copies of the batch's data samples carrying a path's detections as their predictions."""
    samples = []
    for sample, det in zip(data_samples, detections):
        sample = sample.clone()
        sample.pred_instances = InstanceData(**det)
        samples.append(sample)
    return samples


def _seed_dict(results: dict, prefix: str) -> dict:
    """The seeds' printout: {'bbox_mAP': …, …, 'bbox_mAP_copypaste': '…'}."""
    out = {k: round(results[f'{prefix}/{k}'], 3) for k in SUMMARY_KEYS if f'{prefix}/{k}' in results}
    out['bbox_mAP_copypaste'] = ' '.join(f'{v:.3f}' for v in out.values())
    return out
