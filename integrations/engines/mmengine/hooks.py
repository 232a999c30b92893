"""mmengine hooks of the evaluation: ExportHook (export the head-cut model and hand runtime sessions to the
DeviceEvaluator) and a progress bar that also times the test loop. Usable from any mmyolo/mmdet config:

    custom_imports = dict(imports=['integrations.engines.mmengine.hooks', 'integrations.engines.mmengine.loop',
                                   'evaluators.mm.evaluator'])
    custom_hooks = [dict(type='ExportHook', family='yolov5', out_dir='work_dirs/export')]
    test_evaluator = dict(type='DeviceEvaluator', metrics=[dict(type='mmdet.CocoMetric', ann_file=...)])
    runner_type = 'EvalRunner'           # optional; needed for distributed evaluation on CPU
    test_cfg = dict(type='DeviceTestLoop', native=False)  # optional, with compare_native=False: no native forward
"""
from __future__ import annotations

import time
from pathlib import Path

from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper
from mmengine.registry import HOOKS

from integrations.deploy.build import DeviceBuild


@HOOKS.register_module()
class ExportHook(Hook):
    """Before the test loop: cut the head, export ONNX (+TorchScript), build and load the runtime, and attach it
    to the test evaluator (integrations/deploy/build.py's DeviceBuild; its arguments are this hook's). Runs after
    the checkpoint is loaded, so the export holds the tested weights. Under a DeviceTestLoop whose options carry
    a `device_session`, that session serves the device path."""

    priority = 'LOW'  # after checkpoint loading and the framework's own before_test hooks

    def __init__(self, **options):
        self.device = DeviceBuild(**options)
        self.report: dict = {}

    def before_test(self, runner) -> None:
        options = getattr(runner.test_loop, 'options', None)
        self.prepare(runner, getattr(options, 'device_session', None))

    def prepare(self, runner, device_session=None) -> dict:
        """Build (or find in the cache), load and attach the sessions; the report for results.json."""
        self.report = self.device.prepare(_plain(runner.model), runner.cfg, runner.test_dataloader.dataset,
                                          runner.test_loop.evaluator, device_session)
        return self.report

    def build(self, runner) -> tuple[Path, dict, str, object, object]:
        """Export and build only (task=export): see DeviceBuild.build."""
        return self.device.build(_plain(runner.model), runner.cfg, runner.test_dataloader.dataset)


def _plain(model):
    return model.module if is_model_wrapper(model) else model


@HOOKS.register_module()
class ProgressBarHook(Hook):
    """A tqdm bar over the test iterations; also times the loop itself (`loop_s`: first batch to last, without
    the set-up before it and the final metric computation after it) and the part of it spent waiting for the
    DataLoader (`load_s`: image loading and the pipeline, or only the wait when a thread or worker reads ahead)."""

    priority = 'VERY_LOW'
    bar = None
    loop_s = 0.0
    load_s = 0.0

    def before_test_epoch(self, runner) -> None:
        from tqdm import tqdm
        self.bar = tqdm(total=len(runner.test_dataloader), desc='evaluating', unit='batch')
        self.start = self.last_iter_end = time.perf_counter()
        self.load_s = 0.0

    def before_test_iter(self, runner, batch_idx, data_batch=None) -> None:
        self.load_s += time.perf_counter() - self.last_iter_end

    def after_test_iter(self, runner, batch_idx, data_batch=None, outputs=None) -> None:
        self.last_iter_end = time.perf_counter()
        self.bar.update(1)
        if self.bar.n >= self.bar.total:
            self.loop_s = time.perf_counter() - self.start
            self.close()  # before the metrics print their summaries

    def close(self) -> None:
        """End the bar's line; also called when the loop fails, so an error message starts on its own line."""
        if self.bar is not None:
            self.bar.close()
