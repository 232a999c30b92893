"""`task=export`: export and write the runtime's build files without running anything (runtime=vacc: model.onnx,
vamc.yaml, vdsp_params.json and the calibration images, to compile with vamc where the SDK is)."""
from __future__ import annotations

import shutil
from pathlib import Path

from omegaconf import DictConfig


def run_export(cfg: DictConfig, output_dir: Path) -> dict:
    """The files written into <output_dir>/export, their io and the export check: export.json's content."""
    from integrations.engines import open_engine
    from integrations.engines.plan import make_plan

    export_dir = output_dir / 'export'
    try:
        _, built, *_ = open_engine(make_plan(cfg, output_dir, export_dir)).build()
    except BaseException:
        shutil.rmtree(export_dir, ignore_errors=True)
        raise
    files = {name: str(export_dir / file) for name, file in built['files'].items()
             if (export_dir / file).exists() or name != 'runtime'}
    return {'export_dir': str(export_dir), 'files': files, 'io': built['io'], 'export_check': built['export_check'],
            'precision': built['device']['info'], 'engine': cfg.engine.name}
