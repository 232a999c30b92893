"""Shared fixtures: composed Hydra configs, the converted YOLOv5s model, real images; and the `integration`
marker, put automatically on every test that builds a model, loads the weights or runs the app or its CLI
(`make test-fast` runs the others)."""
from __future__ import annotations

import inspect
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from integrations.config import ROOT, register_resolvers

COCO128 = ROOT.parent / 'shared' / 'data' / 'coco128'
EMULATION = ROOT / 'tests' / 'emulation'  # VastAI's SDK and compiler, emulated (tests/emulation/README.md)
DEMO_IMAGES = ROOT / 'data' / 'demo' / 'images'

register_resolvers()

# fixtures that give the weights, a built model or a finished run (this file's and the test modules' own)
HEAVY_FIXTURES = {'assets', 'yolov5s', 'make_batch', 'demo_results', 'explained', 'searched', 'exported', 'model',
                  'retinanet', 'graph'}
# calls in a test's own body that build a model, export, or run the app or its CLI
HEAVY_CALLS = re.compile(r'(?<![.\w])run\(|build_model\(|open_engine\(|subprocess\.|DeviceBuild\(|export_onnx\(|'
                         r'load_checkpoint\(|Trainer\(|build_runner\(|runpy\.')


def reached_source(function, module) -> str:
    """The function's source and, transitively, that of the test module's own functions it calls."""
    seen, todo, sources = set(), [function], []
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        source = inspect.getsource(current)
        sources.append(source)
        for name in re.findall(r'(?<![.\w])(\w+)\(', source):
            helper = getattr(module, name, None)
            if inspect.isfunction(helper) and helper.__module__ == module.__name__:
                todo.append(helper)
    return '\n'.join(sources)


def pytest_collection_modifyitems(config, items) -> None:
    for item in items:
        function = getattr(item, 'function', None)
        source = reached_source(function, item.module) if function else ''
        if HEAVY_FIXTURES & set(item.fixturenames) or HEAVY_CALLS.search(source):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(autouse=True)
def _integration_guard(request, monkeypatch):
    """A test left unmarked that builds a detector, runs the app or starts run.py fails, naming what it did: the
    marker above missed it (add the call or the fixture to HEAVY_CALLS or HEAVY_FIXTURES)."""
    if request.node.get_closest_marker('integration'):
        return

    def refuse(what):
        def call(*args, **kwargs):
            pytest.fail(f'{request.node.nodeid} {what} but is not marked integration (tests/conftest.py)')
        return call

    import integrations.app.main
    monkeypatch.setattr(integrations.app.main, '_run', refuse('runs the app'))
    from mmengine.registry import MODELS
    monkeypatch.setattr(MODELS, 'build', refuse('builds a model'))
    popen = subprocess.Popen

    class Popen(popen):
        def __init__(self, args, *rest, **kwargs):
            if any('run.py' in str(a) for a in (args if isinstance(args, (list, tuple)) else [args])):
                refuse('starts run.py')()
            super().__init__(args, *rest, **kwargs)

    monkeypatch.setattr(subprocess, 'Popen', Popen)


@pytest.fixture(autouse=True, scope='session')
def _private_artifact_cache(tmp_path_factory):
    """Tests (and the CLI runs they start) use a cache of their own, never the user's."""
    os.environ['INLOOP_CACHE_DIR'] = str(tmp_path_factory.mktemp('artifact-cache'))


def compose_cfg(*overrides: str):
    with initialize_config_dir(str(ROOT / 'conf'), version_base='1.3'):
        return compose('config', overrides=list(overrides))


@pytest.fixture(scope='session')
def coco128() -> Path:
    """../shared/data/coco128; under CI it must be there (an error, not a skip)."""
    if not COCO128.is_dir():
        if os.environ.get('CI') == 'true':
            pytest.fail(f'{COCO128} is missing under CI=true')
        pytest.skip('../shared/data/coco128 not beside the checkout')
    return COCO128


@pytest.fixture(scope='session')
def assets():
    """The setup's assets: converted checkpoint, TF.js graph and demo images (`make setup` writes them)."""
    from integrations import assets as a
    missing = [p for p in (a.CHECKPOINT, a.TFJS_DIR / 'model.json', DEMO_IMAGES) if not p.exists()]
    if missing:
        pytest.fail(f'missing {missing}: run `make setup`')
    return a


@pytest.fixture(scope='session')
def yolov5s(assets):
    """The mmyolo YOLOv5s with the converted COCO weights, in eval mode."""
    from integrations.deploy.checkpoint import load_checkpoint
    from integrations.models import build_model, load_model_config

    model = build_model(load_model_config(assets.YOLOV5S_CONFIG))
    load_checkpoint(model, assets.CHECKPOINT)
    return model


@pytest.fixture(scope='session')
def make_batch(assets, yolov5s):
    """Real images through the config's own test pipeline and data preprocessor (fixed 640 letterbox)."""
    from mmengine.dataset import pseudo_collate

    from integrations.deploy.pipeline import image_pipeline
    from integrations.models import load_model_config

    pipeline = image_pipeline(load_model_config(assets.YOLOV5S_CONFIG))

    def make(paths):
        data = [pipeline(dict(img_path=str(p), img_id=i)) for i, p in enumerate(paths)]
        return yolov5s.data_preprocessor(pseudo_collate(data), False)

    return make


@pytest.fixture(scope='session')
def exported(yolov5s, assets, tmp_path_factory):
    """The YOLOv5s raw-map export (one for the session), a real image preprocessed as the test loop does, and
    its fp32 raw maps on ONNX Runtime."""
    import torch

    from integrations.deploy.graph import RawMapGraph, export_onnx
    from integrations.deploy.pipeline import loop_preprocessing
    from integrations.models import load_model_config
    from integrations.models.yolov5 import cut_head
    from runtime import get_runtime

    out = tmp_path_factory.mktemp('export')
    with cut_head(yolov5s):
        export_onnx(RawMapGraph(yolov5s), torch.rand(1, 3, 640, 640), out / 'model.onnx',
                    [f'raw_map_{i}' for i in range(3)])
    preprocess = loop_preprocessing(load_model_config(assets.YOLOV5S_CONFIG), yolov5s)
    image = preprocess(DEMO_IMAGES / 'bus.jpg')
    fp32 = get_runtime('onnx', precision={'name': 'fp32'})
    return out, preprocess, image, fp32.load(fp32.build(out / 'model.onnx', out)).run(image)


def coco128_subset(coco128: Path, start: int, stop: int, path: Path) -> Path:
    """A COCO file of coco128's images [start:stop] and their annotations (a selection set, say)."""
    import json
    coco = json.loads((coco128 / 'instances.json').read_text())
    images = coco['images'][start:stop]
    ids = {im['id'] for im in images}
    path.write_text(json.dumps({**coco, 'images': images,
                                'annotations': [a for a in coco['annotations'] if a['image_id'] in ids]}))
    return path


@pytest.fixture(scope='session')
def demo_subset(tmp_path_factory):
    """A COCO file holding three of the demo images, for runs where the figure is not the point."""
    import json
    coco = json.loads((ROOT / 'data' / 'demo' / 'annotations.json').read_text())
    names = {'bus.jpg', 'zidane.jpg', 'horses.jpg'}
    images = [im for im in coco['images'] if im['file_name'] in names]
    ids = {im['id'] for im in images}
    coco.update(images=images, annotations=[a for a in coco['annotations'] if a['image_id'] in ids])
    path = tmp_path_factory.mktemp('subset') / 'subset.json'
    path.write_text(json.dumps(coco))
    return path


@pytest.fixture(scope='session')
def demo_subset_data(demo_subset) -> list[str]:
    """The overrides that evaluate `demo_subset`."""
    return ['data=coco', f'data.img_dir={DEMO_IMAGES}', f'data.ann_file={demo_subset}']


@pytest.fixture
def vamc(tmp_path) -> Path:
    """A `vamc` executable that runs the fake compiler."""
    path = tmp_path / 'bin' / 'vamc'
    path.parent.mkdir()
    path.write_text(f'#!/bin/sh\nexec {sys.executable} {EMULATION / "vamc.py"} "$@"\n')
    path.chmod(0o755)
    return path


class SdkLog:
    """The emulated SDK's calls, as the device worker made them."""

    def __init__(self, path: Path):
        self.path = path

    @property
    def entries(self) -> list[dict]:
        return [json.loads(line) for line in self.path.read_text().splitlines()] if self.path.exists() else []

    def calls(self, name: str | None = None) -> list[list]:
        return [e['call'] for e in self.entries if name is None or e['call'][0] == name]


@pytest.fixture
def vsx(monkeypatch, vamc, tmp_path) -> SdkLog:
    """The emulated SDK importable by the device worker and the fake vamc on PATH."""
    monkeypatch.setenv('PYTHONPATH', os.pathsep.join([str(EMULATION), os.environ.get('PYTHONPATH', '')]))
    monkeypatch.setenv('PATH', f"{vamc.parent}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv('VSX_EMULATION_LOG', str(tmp_path / 'vsx.log'))
    return SdkLog(tmp_path / 'vsx.log')
