"""Hydra/OmegaConf glue that must stay importable without torch (`run.py --help` is instant)."""
from pathlib import Path

from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parent.parent


def register_resolvers() -> None:
    """`${inloop.root:rel/path}`: a path under the project root, wherever the command is run from."""
    if not OmegaConf.has_resolver('inloop.root'):
        OmegaConf.register_new_resolver('inloop.root', lambda rel='': str(ROOT / rel))
