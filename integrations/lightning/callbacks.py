"""Lightning callbacks around a DetectorModule:

    trainer = Trainer(callbacks=[ExportCallback(family='yolov5', runtime={'name': 'onnx'}),
                                 DeviceEvalCallback(metrics=[dict(type='mmdet.CocoMetric', ann_file=...)])])
    trainer.test(DetectorModule(detector), datamodule=MMDataModule(mm_cfg))

ExportCallback cuts the head, exports, builds and loads the runtime on test start (integrations/deploy.py, the
same code as mmengine's ExportHook); DeviceEvalCallback feeds each batch to the same DeviceEvaluator as mmengine's
test loop and logs device and native mAP at epoch end.
"""
from __future__ import annotations

import lightning.pytorch as pl

from integrations.deploy import DeviceBuild


class DeviceEvalCallback(pl.Callback):
    """Runtime + host decode + the config's metrics per test batch (evaluators.mmengine.DeviceEvaluator);
    `metrics` holds the gathered results after the epoch."""

    def __init__(self, metrics, labels: dict | None = None, overlap: bool = True, flat_memory: bool = False,
                 save_txt: str | None = None, explain: dict | None = None):
        from evaluators.mmengine import DeviceEvaluator

        self.evaluator = DeviceEvaluator(metrics, labels=labels, overlap=overlap, flat_memory=flat_memory,
                                         save_txt=save_txt, explain=explain)
        self.metrics: dict = {}

    def on_test_start(self, trainer, pl_module) -> None:
        self.evaluator.dataset_meta = trainer.datamodule.dataset.metainfo

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self.evaluator.process(outputs, batch)

    def on_test_epoch_end(self, trainer, pl_module) -> None:
        # every rank gets the gathered metrics (mmengine's collect_results drops the sampler's padding)
        self.metrics = self.evaluator.evaluate(len(trainer.datamodule.dataset))
        pl_module.log_dict({k: float(v) for k, v in self.metrics.items() if isinstance(v, (int, float))},
                           sync_dist=True)  # identical on every rank: the mean is the value


class ExportCallback(pl.Callback):
    """On test start: head cut, export, build (or the artifact cache) and the runtime sessions handed to the
    DeviceEvalCallback of the same trainer. Takes DeviceBuild's options; `report` describes what was built."""

    def __init__(self, **options):
        self.device = DeviceBuild(**options)
        self.report: dict = {}

    def on_test_start(self, trainer, pl_module) -> None:
        evaluation = next((c for c in trainer.callbacks if isinstance(c, DeviceEvalCallback)), None)
        if evaluation is None:
            raise RuntimeError('ExportCallback needs a DeviceEvalCallback in the same Trainer')
        datamodule = trainer.datamodule
        self.report = self.device.prepare(pl_module.detector, datamodule.mm_cfg, datamodule.dataset,
                                          evaluation.evaluator)
