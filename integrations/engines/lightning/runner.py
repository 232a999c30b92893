"""`engine=lightning`: a Plan run inside Lightning's own `trainer.test()` (the model config still describes the
model, dataset, pipeline and metrics)."""
from __future__ import annotations

import logging

from common.errors import UserError
from integrations.engines.base import EngineRun, load_weights, unreadable_images_as_user_errors
from integrations.engines.plan import LoopOptions, Plan


def build_trainer(engine: dict, root_dir, callbacks: list):
    """A Trainer with the engine's options (accelerator, devices, strategy, num_nodes) and `callbacks`."""
    import lightning.pytorch as pl
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    logging.getLogger('lightning.pytorch').setLevel(engine['log_level'])
    options = {k: engine[k] for k in ('accelerator', 'devices', 'strategy', 'num_nodes')}
    try:
        return pl.Trainer(**options, logger=False, enable_checkpointing=False, enable_model_summary=False,
                          use_distributed_sampler=False,  # MMDataModule shards the dataset itself
                          default_root_dir=str(root_dir), callbacks=callbacks)
    except (MisconfigurationException, ValueError) as err:  # Lightning's own check of these options
        raise UserError(f"engine=lightning ({', '.join(f'{k}={v}' for k, v in options.items())}): {err}") from None


class Run(EngineRun):
    """A Plan as Lightning pieces: DetectorModule (the native detector), MMDataModule (the config's dataset),
    ExportCallback(plan.build), DeviceEvalCallback(plan.evaluator); each test loop is one `trainer.test()`."""

    def __init__(self, plan: Plan):
        from mmengine.logging import MMLogger

        from integrations.engines.lightning.callbacks import DeviceEvalCallback, ExportCallback
        from integrations.engines.lightning.modules import MMDataModule
        from integrations.models import build_model

        self.plan = plan
        self.mm_cfg = plan.mm_cfg
        MMLogger.get_instance('inloop-lightning', log_level=plan.engine['log_level'])  # the metrics' log level
        self.model = build_model(self.mm_cfg)
        load_weights(self.model, plan)
        data = MMDataModule(self.mm_cfg)
        data.setup('test')
        self.dataset = data.dataset
        self.evaluation = DeviceEvalCallback(**plan.evaluator)
        self.evaluator = self.evaluation.evaluator
        self.export = ExportCallback(**plan.build)
        self.rank = 0

    def build(self):
        return self.export.device.build(self.model, self.mm_cfg, self.dataset)

    def prepare(self, device_session=None) -> dict:
        self.export.device_session = device_session
        return self.export.prepare(self.model, self.mm_cfg, self.dataset, self.evaluator)

    def _test(self, options: LoopOptions):
        from mmengine.registry import DefaultScope

        from integrations.engines.lightning.callbacks import LoopTimer
        from integrations.engines.lightning.modules import DetectorModule, MMDataModule

        self.export.device_session = options.device_session
        self.evaluator.overlap = options.overlap
        timer = LoopTimer()
        trainer = build_trainer(self.plan.engine, self.plan.work_dir, [self.export, self.evaluation, timer])
        # the metrics' registry is the config's scope
        with DefaultScope.overwrite_default_scope(self.mm_cfg.get('default_scope', 'mmyolo')), \
                unreadable_images_as_user_errors():
            trainer.test(DetectorModule(self.model, native=options.native),
                         datamodule=MMDataModule(self.mm_cfg, options.prefetch, self.dataset), verbose=False)
        self.rank = trainer.global_rank
        return self.evaluation.metrics, self.export.report, timer.loop_s, timer.load_s

    def native_pass(self, mm_cfg, metrics: list):
        from mmengine.evaluator import Evaluator
        from mmengine.registry import DefaultScope

        from integrations.engines.lightning.callbacks import EvaluatorCallback
        from integrations.engines.lightning.modules import DetectorModule, MMDataModule
        from integrations.models import build_model, get_family

        native = build_model(mm_cfg)
        get_family(self.plan.build['family']).prepare_model(native)
        native.load_state_dict(self.model.state_dict())
        with DefaultScope.overwrite_default_scope(mm_cfg.get('default_scope', 'mmyolo')):
            evaluation = EvaluatorCallback(Evaluator(metrics))
            trainer = build_trainer({**self.plan.engine, 'devices': 1, 'strategy': 'auto'},
                                    self.plan.work_dir / 'native_config', [evaluation])
            with unreadable_images_as_user_errors():
                trainer.test(DetectorModule(native), datamodule=MMDataModule(mm_cfg), verbose=False)
        return evaluation.evaluator.metrics[0]
