"""DeviceEvaluator: an mmengine Evaluator that scores the device path beside the native model in `runner.test()`.

It wraps the config's own metrics twice: the native copy (prefix `native`) sees the model's predictions as
usual, the device copy (prefix `device`) sees the runtime's decoded detections for the same batch.
"""
from __future__ import annotations

import copy

from mmengine.evaluator import Evaluator
from mmengine.registry import EVALUATOR
from mmengine.structures import InstanceData

from evaluators.device import DeviceInference

SUMMARY_KEYS = ('bbox_mAP', 'bbox_mAP_50', 'bbox_mAP_75', 'bbox_mAP_s', 'bbox_mAP_m', 'bbox_mAP_l')


def _with_prefix(metrics, prefix: str) -> list:
    metrics = copy.deepcopy(metrics if isinstance(metrics, (list, tuple)) else [metrics])
    for metric in metrics:
        metric['prefix'] = prefix
    return metrics


@EVALUATOR.register_module()
class DeviceEvaluator(Evaluator):
    """Evaluator for native and device predictions of the same batches.

    Args:
        metrics: metric configs (the model config's test_evaluator metrics, e.g. mmdet.CocoMetric).
        label: shown in the printout, e.g. 'onnx fp32'. Defaults to 'device'.
    """

    def __init__(self, metrics, label: str = 'device'):
        super().__init__(_with_prefix(metrics, 'native'))
        self.device_evaluator = Evaluator(_with_prefix(metrics, 'device'))
        self.label = label
        self.inference: DeviceInference | None = None
        self.preprocessor = None
        self.compare_native = True

    @property
    def dataset_meta(self):
        return self._dataset_meta

    @dataset_meta.setter
    def dataset_meta(self, meta) -> None:
        self._dataset_meta = meta
        for metric in self.metrics:
            metric.dataset_meta = meta
        self.device_evaluator.dataset_meta = meta

    def attach(self, session, decoder, preprocessor, taps=()) -> None:
        """Called by ExportHook before the loop: the runtime session, decoder and the model's preprocessor."""
        self.inference = DeviceInference(session, decoder, taps)
        self.preprocessor = preprocessor
        self.compare_native = bool(taps)

    def process(self, data_samples, data_batch=None) -> None:
        if self.inference is None:
            raise RuntimeError('DeviceEvaluator has no runtime: add ExportHook to custom_hooks')
        batch = self.preprocessor(data_batch, False)
        metas = [sample.metainfo for sample in batch['data_samples']]
        detections = self.inference(batch['inputs'], metas)
        device_samples = []
        for sample, det in zip(batch['data_samples'], detections):
            sample = sample.clone()
            sample.pred_instances = InstanceData(**det)
            device_samples.append(sample)
        self.device_evaluator.process(device_samples, data_batch)
        if self.compare_native:
            super().process(data_samples, data_batch)

    def evaluate(self, size: int) -> dict:
        print(f'==== device ({self.label}) ====', flush=True)
        results = self.device_evaluator.evaluate(size)
        print(_seed_dict(results, 'device'), flush=True)
        if self.compare_native:
            print('==== native (PyTorch) ====', flush=True)
            native = super().evaluate(size)
            print(_seed_dict(native, 'native'), flush=True)
            results.update(native)
            results.update({f'fidelity/{k}': v for k, v in self.inference.fidelity.items()})
        results['timing/device_s'] = self.inference.device_s
        self.inference.close()
        return results


def _seed_dict(results: dict, prefix: str) -> dict:
    """The seeds' printout: {'bbox_mAP': …, …, 'bbox_mAP_copypaste': '…'}."""
    out = {k: round(results[f'{prefix}/{k}'], 3) for k in SUMMARY_KEYS if f'{prefix}/{k}' in results}
    out['bbox_mAP_copypaste'] = ' '.join(f'{v:.3f}' for v in out.values())
    return out
