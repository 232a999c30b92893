"""Lightning callbacks around a DetectorModule:

    trainer = Trainer(use_distributed_sampler=False,
                      callbacks=[ExportCallback(family='yolov5', runtime={'name': 'onnx'}),
                                 DeviceEvalCallback(metrics=[dict(type='mmdet.CocoMetric', ann_file=...)])])
    trainer.test(DetectorModule(detector), datamodule=MMDataModule(mm_cfg))

ExportCallback cuts the head, exports, builds and loads the runtime on test start (integrations/deploy/build.py,
the same code as mmengine's ExportHook); DeviceEvalCallback feeds each batch to the same DeviceEvaluator as
mmengine's test loop and logs device and native mAP at epoch end; LoopTimer times the loop as mmengine's
progress bar hook does.
"""
from __future__ import annotations

import time

import lightning.pytorch as pl

from integrations.deploy.build import DeviceBuild


class EvaluatorCallback(pl.Callback):
    """Feeds each test batch and its outputs to an mmengine Evaluator; `metrics` holds the gathered results after
    the epoch (every rank gets them: mmengine's collect_results drops the sampler's padding)."""

    def __init__(self, evaluator):
        self.evaluator = evaluator
        self.metrics: dict = {}

    def on_test_start(self, trainer, pl_module) -> None:
        self.evaluator.dataset_meta = trainer.datamodule.dataset.metainfo

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self.evaluator.process(outputs, batch)

    def on_test_epoch_end(self, trainer, pl_module) -> None:
        self.metrics = self.evaluator.evaluate(len(trainer.datamodule.dataset))


class DeviceEvalCallback(EvaluatorCallback):
    """Runtime + host decode + the config's metrics per test batch (evaluators/mm/evaluator.py's DeviceEvaluator,
    built from these arguments); the mAPs are `self.log`-ed."""

    def __init__(self, metrics, labels: dict | None = None, overlap: bool = True, flat_memory: bool = False,
                 save_txt: str | None = None, explain: dict | None = None):
        from evaluators.mm.evaluator import DeviceEvaluator

        super().__init__(DeviceEvaluator(metrics, labels=labels, overlap=overlap, flat_memory=flat_memory,
                                         save_txt=save_txt, explain=explain))

    def on_test_epoch_end(self, trainer, pl_module) -> None:
        super().on_test_epoch_end(trainer, pl_module)
        pl_module.log_dict({k: float(v) for k, v in self.metrics.items() if isinstance(v, (int, float))},
                           sync_dist=True)  # identical on every rank: the mean is the value


class ExportCallback(pl.Callback):
    """On test start: head cut, export, build (or the artifact cache) and the runtime sessions handed to the
    DeviceEvalCallback of the same trainer. Takes DeviceBuild's options, and `device_session` to serve the device
    path instead of the built runtime; `report` describes what was built."""

    def __init__(self, device_session=None, **options):
        self.device = DeviceBuild(**options)
        self.device_session = device_session
        self.report: dict = {}

    def on_test_start(self, trainer, pl_module) -> None:
        evaluation = next((c for c in trainer.callbacks if isinstance(c, DeviceEvalCallback)), None)
        if evaluation is None:
            raise RuntimeError('ExportCallback needs a DeviceEvalCallback in the same Trainer')
        self.prepare(pl_module.detector, trainer.datamodule.mm_cfg, trainer.datamodule.dataset, evaluation.evaluator)

    def prepare(self, detector, mm_cfg, dataset, evaluator) -> dict:
        """Build (or find in the cache), load and attach the sessions; the report for results.json."""
        self.report = self.device.prepare(detector, mm_cfg, dataset, evaluator, self.device_session)
        return self.report


class LoopTimer(pl.Callback):
    """Times the test loop: `loop_s` from the first batch to the last, and `load_s`, the part of it spent
    waiting for the DataLoader."""

    loop_s = 0.0
    load_s = 0.0

    def on_test_epoch_start(self, trainer, pl_module) -> None:
        self.start = self.last_end = time.perf_counter()
        self.load_s = 0.0

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self.load_s += time.perf_counter() - self.last_end

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self.last_end = time.perf_counter()
        self.loop_s = self.last_end - self.start
