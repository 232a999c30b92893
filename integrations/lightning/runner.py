"""`engine=lightning`: the same evaluation inside Lightning's `trainer.test()` (the mmengine config still
describes the model, dataset, pipeline and metrics)."""
from __future__ import annotations

import logging
import time
from pathlib import Path

from omegaconf import DictConfig

from common.errors import UserError


def build_trainer(cfg: DictConfig, mm_cfg):
    """A CPU Trainer with the export and device-evaluation callbacks made from the mmengine config's pieces."""
    import lightning.pytorch as pl
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    from integrations.lightning.callbacks import DeviceEvalCallback, ExportCallback

    export = next(h for h in mm_cfg.custom_hooks if h['type'] == 'ExportHook')
    evaluator = mm_cfg.test_evaluator
    callbacks = [ExportCallback(**{k: v for k, v in export.items() if k != 'type'}),
                 DeviceEvalCallback(evaluator['metrics'], labels=evaluator['labels'], overlap=evaluator['overlap'],
                                    flat_memory=evaluator['flat_memory'], save_txt=evaluator['save_txt'],
                                    explain=evaluator['explain'])]
    logging.getLogger('lightning.pytorch').setLevel(cfg.engine.log_level)
    engine = {k: cfg.engine[k] for k in ('accelerator', 'devices', 'strategy', 'num_nodes')}
    try:
        return pl.Trainer(**engine, logger=False, enable_checkpointing=False, enable_model_summary=False,
                          default_root_dir=mm_cfg.work_dir, callbacks=callbacks)
    except (MisconfigurationException, ValueError) as err:  # Lightning's own check of these options
        raise UserError(f"engine=lightning ({', '.join(f'{k}={v}' for k, v in engine.items())}): {err}") from None


def test(cfg: DictConfig, output_dir: Path, export_dir: Path) -> dict:
    """Evaluate inside `trainer.test()`: metrics, the export report and the loop's seconds."""
    from mmengine.logging import MMLogger
    from mmengine.registry import DefaultScope

    from integrations.lightning.callbacks import DeviceEvalCallback, ExportCallback
    from integrations.lightning.modules import DetectorModule, MMDataModule
    from integrations.mmengine.runner import build_config, build_model

    mm_cfg = build_config(cfg, output_dir, export_dir)
    MMLogger.get_instance('inloop-lightning', log_level=cfg.engine.log_level)  # the metrics' log level
    detector = build_model(mm_cfg, cfg.model.checkpoint, cfg.model.trust_checkpoint)
    trainer = build_trainer(cfg, mm_cfg)
    start = time.perf_counter()
    with DefaultScope.overwrite_default_scope(mm_cfg.get('default_scope', 'mmyolo')):  # for the metrics' registry
        trainer.test(DetectorModule(detector), datamodule=MMDataModule(mm_cfg), verbose=False)
    export = next(c for c in trainer.callbacks if isinstance(c, ExportCallback))
    evaluation = next(c for c in trainer.callbacks if isinstance(c, DeviceEvalCallback))
    timings = export.report['timings']
    eval_s = time.perf_counter() - start - timings['export_s'] - timings['build_s']
    return {'metrics': evaluation.metrics, 'report': export.report, 'eval_s': eval_s, 'rank': trainer.global_rank,
            'outputs': evaluation.evaluator.outputs, 'evaluator': evaluation.evaluator, 'model': detector,
            'ann_file': mm_cfg.test_dataloader.dataset.ann_file}
