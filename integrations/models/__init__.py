"""Model families, one module each (`integrations.models.<family>`, named by `model.family`: conf/model/), and
the detector of any mmdet/mmyolo config, built from its config file.

A family module has: `prepare_config(mm_cfg, eval, model)`, `input_shape(mm_cfg)`, `prepare_model(model)`,
`cut_head(model)` (a context manager that makes `model._forward` return the raw maps), `output_names(model,
group_sizes)`, `tap_modules(model)`, `raw_map_modules(model)`, `build_decoder(model, shape)`,
`device_preprocessing(mm_cfg)`, `SHAPE_NOTE` and `LABEL_SPACE` (docs/ARCHITECTURE.md).
"""
from __future__ import annotations

import contextlib
import copy
import logging
from importlib import import_module
from pathlib import Path

from common.errors import UserError


def get_family(name: str):
    """The family module `integrations.models.<name>`."""
    return import_module(f'integrations.models.{name}')


def load_model_config(config: str):
    """An mmengine config from a path or from an installed package (`mmyolo::yolov5/….py`)."""
    from mmengine.config import Config
    from mmengine.utils import get_installed_path

    path = config
    if '::' in config:
        package, relative = config.split('::', 1)
        try:
            path = str(Path(get_installed_path(package)) / '.mim' / 'configs' / relative)
        except Exception:  # get_installed_path raises whatever importlib does for a missing package
            raise UserError(f'model.config={config}: package {package} is not installed') from None
    if not Path(path).is_file():
        raise UserError(f'model.config={config}: config file not found')
    # yapf-formatting the config text (the Runner dumps and logs it four times) costs ~10 s per run; plain text
    # does. mmengine 0.10.7's fromfile drops its own format_python_code argument for non-lazy configs, so it is set
    # on the result.
    cfg = Config.fromfile(path)
    object.__setattr__(cfg, '_format_python_code', False)
    if not all(key in cfg for key in ('model', 'test_dataloader')):
        raise UserError(f'model.config={config}: not a detector config (an mmdet/mmyolo config with model and '
                        'test_dataloader)')
    return cfg


def build_model(mm_cfg, seed: int | None = None):
    """The detector of an mmyolo/mmdet config (in the config's default scope) in eval mode. With a seed, its
    weights are the config's own random initialization (`init_weights`), drawn after `torch.manual_seed(seed)`;
    integrations/deploy/checkpoint.py loads a checkpoint into it."""
    import torch
    from mmengine.registry import MODELS, DefaultScope
    from mmyolo.utils import register_all_modules

    register_all_modules(init_default_scope=False)
    with DefaultScope.overwrite_default_scope(mm_cfg.get('default_scope', 'mmyolo')), torch.random.fork_rng():
        if seed is not None:
            torch.manual_seed(seed)
        # a copy, as detectors write test_cfg into their heads' configs; nothing is downloaded at run time
        model = MODELS.build(without_pretrained(copy.deepcopy(mm_cfg.model)))
        if seed is not None:  # the config's own initialization (init_cfg: e.g. the classifier's prior bias)
            with quiet_init_log():
                model.init_weights()
    return model.eval()


@contextlib.contextmanager
def quiet_init_log():
    """mmengine's init_weights logs every parameter's initializer (thousands of lines) at INFO when no log file
    takes them: kept at WARNING for the call. A runner's log file still gets them."""
    from mmengine.logging import MMLogger

    logger = MMLogger.get_current_instance()
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


def without_pretrained(cfg):
    """The model config without `init_cfg=dict(type='Pretrained', …)` at any depth: those fetch weights from the
    network (torchvision://, open-mmlab://, https://) when the model initializes."""
    if isinstance(cfg, dict):
        kept = {k: without_pretrained(v) for k, v in cfg.items()
                if not (k == 'init_cfg' and isinstance(v, dict) and v.get('type') == 'Pretrained')}
        return type(cfg)(kept)
    if isinstance(cfg, (list, tuple)):
        return type(cfg)(without_pretrained(v) for v in cfg)
    return cfg
