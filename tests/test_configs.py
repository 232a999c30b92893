"""Every config group composes, and the CLI's help/config paths stay free of heavy imports."""
import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from integrations.config import ROOT
from tests.conftest import compose_cfg

GROUPS = {group: sorted(p.stem for p in (ROOT / 'conf' / group).glob('*.yaml'))
          for group in ('model', 'precision', 'runtime', 'data', 'engine')}


@pytest.mark.parametrize('group,option', [(g, o) for g, options in GROUPS.items() for o in options])
def test_every_group_option_composes(group, option):
    cfg = compose_cfg(f'{group}={option}', 'data.img_dir=/x', 'data.ann_file=/x.json')
    OmegaConf.resolve(cfg)
    assert cfg[group].name if group != 'model' else cfg.model.family


def test_default_paths_are_under_the_project_root():
    cfg = compose_cfg()
    assert cfg.model.checkpoint == str(ROOT / 'checkpoints' / 'yolov5s_coco_tfjs.pth')
    assert cfg.data.img_dir == str(ROOT / 'data' / 'demo' / 'images')


@pytest.mark.parametrize('config, variant', [
    ('mmyolo::yolov5/yolov5_s-v61_syncbn_fast_8xb16-300e_coco.py', 's'),
    ('mmyolo::yolov5/yolov5_n-v61_syncbn_fast_8xb16-300e_coco.py', 'n'),
    ('mmyolo::yolov5/yolov5_x-p6-v62_syncbn_fast_8xb16-300e_coco.py', 'x-p6'),
    ('/configs/my_detector.py', 'my_detector')])
def test_yolov5_variant_follows_the_config(config, variant):
    """results.json's `variant` is the model actually built, not a label that a config override leaves behind."""
    assert compose_cfg(f'model.config={config}').model.variant == variant


@pytest.mark.parametrize('args', [['--help'], ['--cfg', 'job']])
def test_cli_help_does_not_import_torch(args):
    code = ('import runpy, sys\n'
            f'sys.argv = ["run.py", *{args!r}]\n'
            'try:\n    runpy.run_path("run.py", run_name="__main__")\n'
            'except SystemExit:\n    pass\n'
            'print("HEAVY" if {"torch", "mmengine", "onnxruntime"} & set(sys.modules) else "LIGHT")\n')
    out = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip().endswith('LIGHT'), out.stdout[-500:]
