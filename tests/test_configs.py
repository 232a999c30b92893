"""Every config group composes, and the CLI's help/config paths stay free of heavy imports."""
import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from integrations.config import ROOT
from tests.conftest import DEMO_IMAGES, compose_cfg

GROUPS = {group: sorted(p.stem for p in (ROOT / 'conf' / group).glob('*.yaml'))
          for group in ('model', 'precision', 'runtime', 'data', 'engine')}


def instantiate(group: str, cfg, tmp_path):
    """What the group's option configures, built from the composed config (no model is built)."""
    from common.annotations import check_dataset
    from integrations.config import plain
    from integrations.models import get_family, load_model_config
    from runtime import get_runtime

    if group == 'model':
        family, mm_cfg = get_family(cfg.model.family), load_model_config(cfg.model.config)
        family.prepare_config(mm_cfg, plain(cfg.eval), cfg.model)
        return family.LABEL_SPACE, family.input_shape(mm_cfg)
    if group == 'precision':
        return get_runtime('onnx', precision=plain(cfg.precision)).precision['name']
    if group == 'runtime':
        options = plain(cfg.runtime)
        name = options.pop('name')
        if name == 'npz':
            options = {'output_dir': str(tmp_path), 'datalist': str(tmp_path / 'datalist.txt')}
            (tmp_path / 'datalist.txt').write_text('')
        if name == 'vacc':
            options['compile'] = False  # no SDK or vamc here: the build files only, as task=export does
        return get_runtime(name, precision={'name': 'fp16' if name == 'vacc' else 'fp32'}, **options).name
    if group == 'data':
        if cfg.data.name == 'coco':  # a COCO-format set the user names
            cfg.data.img_dir, cfg.data.ann_file = str(DEMO_IMAGES), str(ROOT / 'data' / 'demo' / 'annotations.json')
        return len(check_dataset(cfg.data.img_dir, cfg.data.ann_file)['images'])
    if cfg.engine.name == 'lightning':
        from integrations.engines.lightning.runner import build_trainer
        return type(build_trainer(plain(cfg.engine), tmp_path, [])).__name__
    from integrations.engines.mmengine.runner import runner_config
    mm_cfg = runner_config(load_model_config(cfg.model.config), plain(cfg.engine), tmp_path, [], [], {})
    return mm_cfg.runner_type, mm_cfg.launcher


INSTANTIATED = {('model', 'retinanet'): ('openimages_mlperf', (3, 800, 800)),
                ('model', 'yolov5'): ('coco', (3, 640, 640)), ('model', 'mm'): ('coco', (3, 640, 640)),
                ('precision', 'fp16'): 'fp16', ('precision', 'fp32'): 'fp32', ('precision', 'int8'): 'int8',
                ('runtime', 'npz'): 'npz', ('runtime', 'onnx'): 'onnx', ('runtime', 'openvino'): 'openvino',
                ('runtime', 'vacc'): 'vacc',
                ('data', 'coco'): 13, ('data', 'demo'): 13, ('data', 'openimages'): 13,
                ('engine', 'lightning'): 'Trainer', ('engine', 'mmengine'): ('EvalRunner', 'none')}


@pytest.mark.parametrize('group,option', [(g, o) for g, options in GROUPS.items() for o in options])
def test_every_group_option_composes_and_instantiates(group, option, tmp_path):
    """Each YAML composes against its schema and configures what it names (the runtime, the precision of a
    runtime, the model config and family, the data set, the engine's runner or trainer)."""
    overrides = [f'{group}={option}']
    if group == 'data' and option == 'openimages':
        overrides += [f'data.img_dir={DEMO_IMAGES}',
                      f"data.ann_file={ROOT / 'data' / 'demo' / 'openimages-mlperf.json'}"]
    cfg = compose_cfg(*overrides)
    OmegaConf.resolve(cfg)
    assert instantiate(group, cfg, tmp_path) == INSTANTIATED[group, option]


def test_every_group_option_has_its_expected_instance():
    assert set(INSTANTIATED) == {(g, o) for g, options in GROUPS.items() for o in options}  # a new option: add it


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
