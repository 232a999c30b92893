"""Model families: one module each, named by `model.family` in the config (conf/model/<name>.yaml)."""
from importlib import import_module


def get_family(name: str):
    """The family module `integrations.models.<name>`."""
    return import_module(f'integrations.models.{name}')
