"""The pieces work from a user's own mmyolo config, and the app takes any mmyolo YOLOv5 config + checkpoint."""
import torch

from integrations.app.main import run
from tests.conftest import DEMO_IMAGES, compose_cfg

USER_CONFIG = """
_base_ = 'mmyolo::yolov5/yolov5_s-v61_syncbn_fast_8xb16-300e_coco.py'
custom_imports = dict(imports=['integrations.engines.mmengine.hooks', 'evaluators.mm.evaluator'],
                      allow_failed_imports=False)
custom_hooks = [dict(type='ExportHook', family='yolov5', out_dir='{tmp}/export', torchscript=True)]
test_dataloader = dict(batch_size=1, num_workers=0, persistent_workers=False,
                       dataset=dict(data_root='', ann_file='{ann}', data_prefix=dict(img='{images}/'),
                                    batch_shapes_cfg=None))
test_evaluator = dict(_delete_=True, type='DeviceEvaluator',
                      metrics=[dict(type='mmdet.CocoMetric', ann_file='{ann}', metric='bbox')])
load_from = '{checkpoint}'
work_dir = '{tmp}/work'
"""


def test_hook_and_evaluator_from_a_plain_mmyolo_config(assets, demo_subset, tmp_path):
    """What a user adds to their own config (custom_imports, custom_hooks, test_evaluator) is enough for
    mmyolo's own runner.test() to report device and native mAP."""
    from mmengine.config import Config
    from mmengine.runner import Runner

    config = tmp_path / 'user_config.py'
    config.write_text(USER_CONFIG.format(tmp=tmp_path, ann=demo_subset, images=DEMO_IMAGES,
                                         checkpoint=assets.CHECKPOINT))
    metrics = Runner.from_cfg(Config.fromfile(str(config))).test()
    assert abs(metrics['device/bbox_mAP'] - metrics['native/bbox_mAP']) <= 0.001
    assert metrics['device/bbox_mAP'] > 0.3 and metrics['device/raw_max_abs_diff'] < 1e-3
    traced = torch.jit.load(str(tmp_path / 'export' / 'model.torchscript.pt'))
    assert len(traced(torch.rand(1, 3, 640, 640))) == 3


def test_other_yolov5_config_and_checkpoint(demo_subset, tmp_path):
    """A P6 config (four levels, 1280 input) with a checkpoint of its own runs the same flow."""
    from integrations.models import build_model, load_model_config

    config = 'mmyolo::yolov5/yolov5_n-p6-v62_syncbn_fast_8xb16-300e_coco.py'
    torch.manual_seed(0)
    checkpoint = tmp_path / 'yolov5n6_random.pth'
    torch.save({'state_dict': build_model(load_model_config(config)).state_dict()}, checkpoint)
    results = run(compose_cfg(f'model.config={config}', f'model.checkpoint={checkpoint}',
                              'data=coco', f'data.img_dir={DEMO_IMAGES}', f'data.ann_file={demo_subset}'),
                  tmp_path / 'run')
    assert results['input_shape'] == [3, 1280, 1280] and results['variant'] == 'n-p6'
    assert [o['shape'][2] for o in results['io']['outputs']] == [160, 80, 40, 20]
    assert results['fidelity']['max_abs_diff'] < 1e-3
    assert results['device'] == results['native']
