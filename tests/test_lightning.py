"""engine=lightning: the same results as engine=mmengine, the callbacks in a user's own Trainer, and DDP over two
processes giving exactly the one-process result."""
import json
import subprocess
import sys

import pytest

from common.errors import UserError
from integrations.app.main import run
from integrations.config import ROOT
from tests.conftest import DEMO_IMAGES, compose_cfg


def test_lightning_equals_mmengine(assets, demo_subset_data, tmp_path):
    mmengine = run(compose_cfg(*demo_subset_data, 'engine=mmengine'), tmp_path / 'mmengine')
    lightning = run(compose_cfg(*demo_subset_data, 'engine=lightning'), tmp_path / 'lightning')
    assert lightning['engine'] == 'lightning' and (tmp_path / 'lightning' / 'results.json').is_file()
    for key in ('device', 'native', 'fidelity', 'num_images', 'io', 'export_check'):
        assert lightning[key] == mmengine[key], key


def test_callbacks_in_a_users_trainer(assets, yolov5s, tmp_path):
    """The two callbacks around a DetectorModule and the config's own dataset: mAP is self.log-ed."""
    import lightning.pytorch as pl

    from integrations.engines.lightning.callbacks import DeviceEvalCallback, ExportCallback
    from integrations.engines.lightning.modules import DetectorModule, MMDataModule
    from integrations.models import load_model_config

    mm_cfg = load_model_config(assets.YOLOV5S_CONFIG)
    dataset = mm_cfg.test_dataloader.dataset
    dataset.update(data_root='', ann_file=str(ROOT / 'data' / 'demo' / 'annotations.json'),
                   data_prefix={'img': f'{DEMO_IMAGES}/'}, batch_shapes_cfg=None)
    metric = {'type': 'mmdet.CocoMetric', 'ann_file': dataset.ann_file, 'metric': 'bbox'}
    trainer = pl.Trainer(accelerator='cpu', devices=1, logger=False, enable_checkpointing=False,
                         enable_model_summary=False, default_root_dir=str(tmp_path),
                         callbacks=[ExportCallback(family='yolov5', out_dir=str(tmp_path / 'export')),
                                    DeviceEvalCallback([metric])])
    trainer.test(DetectorModule(yolov5s), datamodule=MMDataModule(mm_cfg), verbose=False)
    logged = trainer.callback_metrics
    assert 0.5 < float(logged['device/bbox_mAP']) <= 1.0
    assert abs(float(logged['device/bbox_mAP']) - float(logged['native/bbox_mAP'])) <= 0.002
    assert (tmp_path / 'export' / 'model.onnx').is_file()


def test_ddp_two_processes_equal_one(assets, demo_subset_data, tmp_path):
    """Three images over two ranks: Lightning's DistributedSampler pads one rank with a repeat, which must not
    be counted twice."""
    args = [sys.executable, 'run.py', 'engine=lightning', *demo_subset_data]
    single = subprocess.run([*args, f'hydra.run.dir={tmp_path / "one"}'], cwd=ROOT, capture_output=True,
                            text=True, check=False)
    assert single.returncode == 0, single.stderr[-2000:]
    double = subprocess.run([*args, 'engine.devices=2', 'engine.strategy=ddp', f'hydra.run.dir={tmp_path / "two"}'],
                            cwd=ROOT, capture_output=True, text=True, check=False)
    assert double.returncode == 0, double.stderr[-3000:]
    one, two = (json.loads((tmp_path / d / 'results.json').read_text()) for d in ('one', 'two'))
    assert one['num_images'] == two['num_images'] == 3
    assert one['device'] == two['device'] and one['native'] == two['native']
    assert double.stdout.count('metric ') == 1  # one rank reports


def test_lightning_equals_mmengine_for_retinanet(tmp_path):
    """The other model family (mmdet scope, its own metric) through both engines, one real image at 800x800."""
    common = ['model=retinanet', 'eval.num_images=1']
    mmengine = run(compose_cfg(*common, 'engine=mmengine'), tmp_path / 'mmengine')
    lightning = run(compose_cfg(*common, 'engine=lightning'), tmp_path / 'lightning')
    assert lightning['cache'] == 'hit'  # the same export: the cache key does not depend on the engine
    for key in ('device', 'native', 'fidelity', 'num_images', 'weights'):
        assert lightning[key] == mmengine[key], key


def test_trainer_options_lightning_refuses_are_one_line_errors(assets, tmp_path):
    with pytest.raises(UserError, match=r'engine=lightning \(accelerator=cpu, devices=0.*devices=0'):
        run(compose_cfg('engine=lightning', 'engine.devices=0'), tmp_path)
    assert not (tmp_path / 'export').exists() and not (tmp_path / 'results.json').exists()
