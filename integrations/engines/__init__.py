"""The engines that run the evaluation's test loop: mmengine's Runner and Lightning's Trainer, each built from the
same engine-neutral Plan (plan.py) and seen by the tasks through one face (base.py's EngineRun)."""
from __future__ import annotations

from importlib import import_module


def open_engine(plan):
    """`integrations.engines.<plan.engine['name']>.runner.Run(plan)`: the model, dataset and evaluator built by that
    engine."""
    return import_module(f"integrations.engines.{plan.engine['name']}.runner").Run(plan)
