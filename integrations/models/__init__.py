"""Model families, one module each (`integrations.models.<family>`, named by `model.family`: conf/model/), and
the detector of any mmdet/mmyolo config, built from its config file.

A family module has: `prepare_config(mm_cfg, eval)`, `input_shape(mm_cfg)`, `cut_head(model)` (a context manager
that makes `model._forward` return the raw maps), `raw_map_modules(model)`, `build_decoder(model, shape)`,
`device_preprocessing(mm_cfg)`, `shape_note`, `OUTPUT_PREFIX` and `LABEL_SPACE` (docs/ARCHITECTURE.md).
"""
from __future__ import annotations

import copy
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


def build_model(mm_cfg):
    """The detector of an mmyolo/mmdet config (in the config's default scope) in eval mode, with its initial
    weights (integrations/deploy/checkpoint.py loads a checkpoint into it)."""
    from mmengine.registry import MODELS, DefaultScope
    from mmyolo.utils import register_all_modules

    register_all_modules(init_default_scope=False)
    with DefaultScope.overwrite_default_scope(mm_cfg.get('default_scope', 'mmyolo')):
        model = MODELS.build(copy.deepcopy(mm_cfg.model))  # detectors write test_cfg into their heads' configs
    return model.eval()
