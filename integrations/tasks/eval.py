"""`task=eval`: the plan's test loop in the chosen engine (device and native side by side), then eval.explain's
breakdown when asked; an interrupted or failed run leaves no export folder or half-written txt folders behind."""
from __future__ import annotations

import shutil
from pathlib import Path

from omegaconf import DictConfig


def run_eval(cfg: DictConfig, output_dir: Path):
    """(the loop's Outcome, eval.explain's results block or None)."""
    from integrations.engines import open_engine
    from integrations.engines.plan import make_plan
    from integrations.tasks.explain import explain

    export_dir = output_dir / 'export'
    output_dir.mkdir(parents=True, exist_ok=True)
    try:
        engine = open_engine(make_plan(cfg, output_dir, export_dir))
        outcome = engine.test()
    except BaseException:
        shutil.rmtree(export_dir, ignore_errors=True)
        for partial in (output_dir / 'txt').glob('*.partial'):
            shutil.rmtree(partial, ignore_errors=True)
        raise
    return outcome, explain(cfg, engine, outcome, output_dir) if cfg.eval.explain else None
