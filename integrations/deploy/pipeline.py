"""The config's test pipeline applied to image files outside the test loop (calibration, the int8 selection set,
benchmarks), giving exactly the tensors the loop gives."""
from __future__ import annotations

from pathlib import Path

import torch

from evaluators.mm.preprocess import BatchPreprocessor


def image_pipeline(cfg):
    """The config's test pipeline for images without annotations (calibration, benchmarks): LoadAnnotations left
    out; its transforms looked up in the config's default scope (mmyolo, mmdet)."""
    from mmcv.transforms import Compose
    from mmengine.registry import DefaultScope

    steps = cfg.test_dataloader.dataset.pipeline
    with DefaultScope.overwrite_default_scope(cfg.get('default_scope', 'mmyolo')):
        return Compose([step for step in steps if 'LoadAnnotations' not in step['type']])


def loop_preprocessing(cfg, model):
    """path -> float32 NCHW batch of one, through the config's test pipeline and the model's preprocessor, as
    the evaluation loop preprocesses (calibration, benchmarks)."""
    from mmengine.dataset import pseudo_collate

    pipeline = image_pipeline(cfg)
    preprocessor = BatchPreprocessor(model.data_preprocessor)

    def preprocess(path: Path):
        data = pipeline(dict(img_path=str(path), img_id=0))
        with torch.no_grad():
            return preprocessor(pseudo_collate([data]), False)['inputs'].numpy()

    return preprocess
