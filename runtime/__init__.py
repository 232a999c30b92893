"""Runtimes: one module each (`runtime.<name>`, named by `runtime.name` in the config) with a `Runtime` class.

A Runtime turns an exported ONNX file into a runnable `Artifact` (`build`) and opens it (`load`) as a Session
whose `run(batch)` maps a float32 NCHW batch to the list of raw maps, in the export's output order. A runtime
that preprocesses on the device (VACC's VDSP op, vamp's outputs) has a Session with `reads = 'paths'` and
`run_paths(image_paths)` instead: it takes the original images. A Session that can say what the device actually
runs (OpenVINO's compiled precisions) has `report()`, added to results.json's `precision`.
"""
from dataclasses import dataclass, field
from importlib import import_module
from pathlib import Path


@dataclass
class Artifact:
    """What a runtime built: the file to load and what was done to get it (reported in results.json)."""

    path: Path
    info: dict = field(default_factory=dict)
    root: Path | None = None  # the build directory, where files named in `info` are
    files: dict = field(default_factory=dict)  # more files it wrote, by name, relative to the build directory


def get_runtime(name: str, **options):
    """Instantiate `runtime.<name>.Runtime(**options)`."""
    try:
        module = import_module(f'runtime.{name}')
    except ModuleNotFoundError as err:
        if err.name != f'runtime.{name}':
            raise
        from common.errors import UserError
        raise UserError(f'runtime={name}: no such runtime (see conf/runtime/)') from None
    return module.Runtime(**options)
