"""mmengine pieces: ExportHook (export the head-cut model and hand runtime sessions to the DeviceEvaluator),
EvalRunner (a Runner for evaluation) and a progress bar for the test loop. Usable from any mmyolo config:

    custom_imports = dict(imports=['integrations.mmengine.hooks', 'evaluators.mmengine'])
    custom_hooks = [dict(type='ExportHook', family='yolov5', out_dir='work_dirs/export')]
    test_evaluator = dict(type='DeviceEvaluator', metrics=[dict(type='mmdet.CocoMetric', ann_file=...)])
    runner_type = 'EvalRunner'  # optional; needed for distributed evaluation on CPU
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper
from mmengine.registry import HOOKS, RUNNERS
from mmengine.runner import Runner

from integrations.deploy import DeviceBuild


@HOOKS.register_module()
class ExportHook(Hook):
    """Before the test loop: cut the head, export ONNX (+TorchScript), build and load the runtime, and attach it
    to the test evaluator (integrations.deploy.DeviceBuild; its arguments are this hook's). Runs after the
    checkpoint is loaded, so the export holds the tested weights."""

    priority = 'LOW'  # after checkpoint loading and the framework's own before_test hooks

    def __init__(self, **options):
        self.device = DeviceBuild(**options)
        self.report: dict = {}

    def before_test(self, runner) -> None:
        self.report = self.device.prepare(_plain(runner.model), runner.cfg, runner.test_dataloader.dataset,
                                          runner.test_loop.evaluator)

    def build(self, runner) -> tuple[Path, dict, str, object, object]:
        """Export and build only (task=export): see DeviceBuild.build."""
        return self.device.build(_plain(runner.model), runner.cfg, runner.test_dataloader.dataset)


def _plain(model):
    return model.module if is_model_wrapper(model) else model


@RUNNERS.register_module()
class EvalRunner(Runner):
    """mmengine's Runner for evaluation: collects the system environment (seconds of subprocess calls) only when
    the log level will show it, and does not wrap the model for distributed training."""

    def _log_env(self, env_cfg: dict) -> None:
        if self.logger.isEnabledFor(logging.INFO):
            super()._log_env(env_cfg)

    @staticmethod
    def build_dataloader(dataloader, seed=None, diff_rank_seed=False):
        """mmengine's DataLoader; with `prefetch=N` in its config, iterated on a thread N batches ahead."""
        from integrations.prefetch import PrefetchLoader

        if isinstance(dataloader, dict) and 'prefetch' in dataloader:
            dataloader = dict(dataloader)
            depth = dataloader.pop('prefetch')
            loader = Runner.build_dataloader(dataloader, seed, diff_rank_seed)
            return PrefetchLoader(loader, depth) if depth else loader
        return Runner.build_dataloader(dataloader, seed, diff_rank_seed)

    def wrap_model(self, model_wrapper_cfg, model):
        """Evaluation synchronizes no gradients, so every rank keeps the plain model (DistributedDataParallel
        would also insist on a GPU device id); only the device placement of the default path is kept."""
        from mmengine.device import get_device
        return model.to(get_device())


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
