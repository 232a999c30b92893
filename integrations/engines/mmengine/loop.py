"""The evaluation's mmengine runner and test loop: EvalRunner (a Runner for evaluation on CPU) and DeviceTestLoop
(mmengine's TestLoop with the loop options of integrations/engines/plan.py)."""
from __future__ import annotations

import logging

from mmengine.registry import LOOPS, RUNNERS
from mmengine.runner import Runner, TestLoop

from integrations.engines.plan import LoopOptions
from integrations.engines.prefetch import PrefetchLoader


@RUNNERS.register_module()
class EvalRunner(Runner):
    """mmengine's Runner for evaluation: collects the system environment (seconds of subprocess calls) only when
    the log level will show it, and does not wrap the model for distributed training."""

    def _log_env(self, env_cfg: dict) -> None:
        if self.logger.isEnabledFor(logging.INFO):
            super()._log_env(env_cfg)

    def wrap_model(self, model_wrapper_cfg, model):
        """Evaluation synchronizes no gradients, so every rank keeps the plain model (DistributedDataParallel
        would also insist on a GPU device id); only the device placement of the default path is kept."""
        from mmengine.device import get_device
        return model.to(get_device())


@LOOPS.register_module()
class DeviceTestLoop(TestLoop):
    """mmengine's TestLoop, run with `options` (LoopOptions, public: set them before `runner.test()`): the native
    forward skipped when nothing compares with it (the batch's own data samples go to the evaluator), the
    DataLoader read `prefetch` batches ahead on a thread (integrations/engines/prefetch.py), and the
    DeviceEvaluator's overlap.

    Args:
        native: run the native model's forward. Defaults to True.
        prefetch: batches read ahead. Defaults to 0.
    """

    def __init__(self, runner, dataloader, evaluator, fp16: bool = False, native: bool = True, prefetch: int = 0):
        super().__init__(runner, dataloader, evaluator, fp16)
        self.loader = self.dataloader
        self.options = LoopOptions(native=native, prefetch=prefetch,
                                   overlap=getattr(self.evaluator, 'overlap', True))

    def run(self) -> dict:
        if hasattr(self.evaluator, 'overlap'):  # a DeviceEvaluator
            self.evaluator.overlap = self.options.overlap
        self.dataloader = PrefetchLoader(self.loader, self.options.prefetch)
        return super().run()

    def run_iter(self, idx, data_batch) -> None:
        if self.options.native:
            return super().run_iter(idx, data_batch)
        self.runner.call_hook('before_test_iter', batch_idx=idx, data_batch=data_batch)
        outputs = data_batch['data_samples']
        self.evaluator.process(data_samples=outputs, data_batch=data_batch)
        self.runner.call_hook('after_test_iter', batch_idx=idx, data_batch=data_batch, outputs=outputs)
