"""`engine=mmengine`: a Plan run inside mmengine's own `runner.test()` (the model config's dataset, pipeline, data
preprocessor and metrics, with ExportHook, DeviceTestLoop and DeviceEvaluator added)."""
from __future__ import annotations

from pathlib import Path

from integrations.engines.base import EngineRun, load_weights, unreadable_images_as_user_errors
from integrations.engines.plan import LoopOptions, Plan

CUSTOM_IMPORTS = ['integrations.engines.mmengine.hooks', 'integrations.engines.mmengine.loop',
                  'evaluators.mm.evaluator']


def runner_config(mm_cfg, engine: dict, work_dir: Path, hooks: list, test_evaluator, test_cfg: dict):
    """`mm_cfg` as an EvalRunner's config: its own custom hooks but training ones, then `hooks`; the given
    evaluator and test loop; logs by a progress bar; weights loaded by us, not by `load_from`."""
    # training hooks of the config (EMAHook swaps parameters at test time) would change the evaluated weights:
    # the evaluation tests exactly the checkpoint's state_dict
    kept_hooks = [h for h in mm_cfg.get('custom_hooks', []) if 'EMAHook' not in h['type']]
    mm_cfg.custom_hooks = [*kept_hooks, *hooks, dict(type='ProgressBarHook')]
    own_imports = mm_cfg.get('custom_imports', {}).get('imports', [])
    mm_cfg.custom_imports = dict(imports=[*own_imports, *CUSTOM_IMPORTS], allow_failed_imports=False)
    mm_cfg.test_evaluator = test_evaluator
    mm_cfg.test_cfg = test_cfg
    mm_cfg.runner_type = 'EvalRunner'
    mm_cfg.default_hooks.logger.interval = 10 ** 9  # the progress bar replaces per-iteration log lines
    mm_cfg.default_hooks.pop('visualization', None)
    mm_cfg.visualizer.vis_backends = [dict(type='LocalVisBackend')]
    mm_cfg.work_dir = str(work_dir)
    mm_cfg.load_from = None  # loaded by integrations/deploy/checkpoint.py, without unpickling arbitrary objects
    mm_cfg.launcher = engine.get('launcher', 'none')
    mm_cfg.env_cfg = dict(mm_cfg.get('env_cfg', {}), dist_cfg=dict(backend=engine.get('dist_backend', 'gloo')))
    mm_cfg.log_level = engine['log_level']
    return mm_cfg


def build_runner(mm_cfg, engine: dict, prepare=None, state_dict=None):
    """The EvalRunner of a config made by `runner_config`; `prepare(model)` then runs on its model, and a state
    dict is loaded into it."""
    from mmengine.registry import RUNNERS
    from mmengine.utils import import_modules_from_strings
    from mmyolo.utils import register_all_modules

    register_all_modules(init_default_scope=True)
    import_modules_from_strings(CUSTOM_IMPORTS)  # registers EvalRunner, ExportHook, DeviceEvaluator, …
    if engine.get('launcher') == 'pytorch' and engine.get('dist_backend') == 'gloo':
        # mmengine's pytorch launcher selects a CUDA device first, which fails without one; a process group
        # that already exists is used as it is
        import torch.distributed as dist
        if not dist.is_initialized():
            dist.init_process_group(backend='gloo')
    runner = RUNNERS.build(mm_cfg)
    if prepare is not None:
        prepare(runner.model)
    if state_dict is not None:
        runner.model.load_state_dict(state_dict)
    return runner


def hook_of(runner, kind: str):
    """The runner's hook of class `kind` (ExportHook, ProgressBarHook)."""
    return next(h for h in runner.hooks if type(h).__name__ == kind)


class Run(EngineRun):
    """A Plan as an mmengine EvalRunner: ExportHook(plan.build), DeviceEvaluator(plan.evaluator),
    DeviceTestLoop(plan.loop)."""

    def __init__(self, plan: Plan):
        from mmengine.dist import get_rank
        from mmengine.model import is_model_wrapper

        self.plan = plan
        mm_cfg = runner_config(plan.mm_cfg, plan.engine, plan.work_dir,
                               hooks=[dict(type='ExportHook', **plan.build)],
                               test_evaluator=dict(type='DeviceEvaluator', **plan.evaluator),
                               test_cfg=dict(type='DeviceTestLoop', native=plan.loop.native,
                                             prefetch=plan.loop.prefetch))
        self.runner = build_runner(mm_cfg, plan.engine, prepare=lambda model: load_weights(model, plan))
        self.mm_cfg = self.runner.cfg
        model = self.runner.model
        self.model = model.module if is_model_wrapper(model) else model
        self.dataset = self.runner.test_dataloader.dataset
        self.evaluator = self.runner.test_loop.evaluator
        self.rank = get_rank()

    def build(self):
        return hook_of(self.runner, 'ExportHook').build(self.runner)

    def prepare(self, device_session=None) -> dict:
        return hook_of(self.runner, 'ExportHook').prepare(self.runner, device_session)

    def _test(self, options: LoopOptions):
        self.runner.test_loop.options = options
        progress = hook_of(self.runner, 'ProgressBarHook')
        with unreadable_images_as_user_errors():
            try:
                metrics = self.runner.test()
            finally:
                progress.close()
        return metrics, hook_of(self.runner, 'ExportHook').report, progress.loop_s, progress.load_s

    def native_pass(self, mm_cfg, metrics: list):
        from integrations.models import get_family

        engine = {**self.plan.engine, 'launcher': 'none'}
        config = runner_config(mm_cfg, engine, self.plan.work_dir / 'native_config', hooks=[],
                               test_evaluator=metrics, test_cfg=dict(type='TestLoop'))
        config.experiment_name = f'native_config_{id(config)}'  # beside this run's own logger and visualizer
        runner = build_runner(config, engine, prepare=get_family(self.plan.build['family']).prepare_model,
                              state_dict=self.model.state_dict())
        with unreadable_images_as_user_errors():
            try:
                runner.test()
            finally:
                hook_of(runner, 'ProgressBarHook').close()
        return runner.test_loop.evaluator.metrics[0]
