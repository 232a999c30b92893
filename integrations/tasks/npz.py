"""`task=npz`: vamp's input, one npz per evaluated image, and the datalist naming them."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from omegaconf import DictConfig

from common.errors import UserError
from common.files import write_text_atomic


def run_npz(cfg: DictConfig, output_dir: Path) -> dict:
    """vamp's input: one npz per evaluated image (`input_0`, planar RGB uint8, as VastAI's image2npz.py writes it)
    and the datalist naming them, absolute or relative to `npz.relative_to`. vamp writes its outputs as
    output_%06d.npz by datalist line, which runtime=npz reads back."""
    import numpy as np
    from tqdm import tqdm

    from runtime.vacc import read_planar_rgb

    base = Path(cfg.npz.relative_to).resolve() if cfg.npz.relative_to else None
    if base is not None and not base.is_dir():
        raise UserError(f'npz.relative_to={cfg.npz.relative_to}: directory not found')
    images = json.loads(Path(cfg.data.ann_file).read_text())['images'][:cfg.eval.get('num_images') or None]
    npz_dir, partial = output_dir / 'npz', output_dir / 'npz.partial'
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    lines = []
    try:
        for image in tqdm(images, desc='image -> npz', unit='image'):
            name = f"{Path(image['file_name']).stem}.npz"
            np.savez(partial / name, input_0=read_planar_rgb(Path(cfg.data.img_dir) / image['file_name'])[0])
            target = (npz_dir / name).resolve()
            lines.append(os.path.relpath(target, base) if base else str(target))
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    shutil.rmtree(npz_dir, ignore_errors=True)
    os.replace(partial, npz_dir)
    datalist = output_dir / 'npz_datalist.txt'
    write_text_atomic(datalist, '\n'.join(lines) + '\n')
    print(f'{len(lines)} npz files in {npz_dir}; datalist {datalist}')
    return {'npz_dir': str(npz_dir), 'datalist': str(datalist), 'num_images': len(lines)}
