"""Hydra/OmegaConf glue that must stay importable without torch (`run.py --help` is instant)."""
import re
from pathlib import Path

from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parent.parent


def yolov5_variant(config: str) -> str:
    """The size (and P6) of an mmyolo YOLOv5 config, from its name: `…/yolov5_n-p6-v62_….py` -> `n-p6`; the file
    name itself for a config named otherwise."""
    name = Path(str(config).split('::')[-1]).name
    match = re.match(r'yolov5_([nsmlx])(-p6)?-', name)
    return match.group(1) + (match.group(2) or '') if match else Path(name).stem


def register_resolvers() -> None:
    """`${inloop.root:rel/path}`: a path under the project root, wherever the command is run from;
    `${inloop.yolov5_variant:${model.config}}`: the variant a YOLOv5 config builds."""
    if not OmegaConf.has_resolver('inloop.root'):
        OmegaConf.register_new_resolver('inloop.root', lambda rel='': str(ROOT / rel))
    if not OmegaConf.has_resolver('inloop.yolov5_variant'):
        OmegaConf.register_new_resolver('inloop.yolov5_variant', yolov5_variant)
