# MLCommons RetinaNet (MLPerf inference reference), ResNeXt50-32x4d FPN, 264 OpenImages-MLPerf classes, 800x800,
# as an mmengine/mmdet test config. Data paths and classes are filled in by inloop (conf/data/*.yaml).
default_scope = 'mmdet'
custom_imports = dict(imports=['integrations.models.retinanet', 'evaluators.mm.metrics'], allow_failed_imports=False)

image_size = (800, 800)  # (height, width)
model = dict(
    type='MLPerfRetinaNet',
    num_classes=264,
    image_size=image_size,
    test_cfg=dict(score_thresh=0.05, nms_thresh=0.5, detections_per_img=300, topk_candidates=1000),
    # MLPerf's (x / 255 - ImageNet mean) / std on RGB, here as (x - 255 * mean) / (255 * std)
    data_preprocessor=dict(type='DetDataPreprocessor', mean=[123.675, 116.28, 103.53], std=[58.395, 57.12, 57.375],
                           bgr_to_rgb=True, pad_size_divisor=1))

# MLPerf inference's pre_process_openimages_retinanet, step for step: cv2 decode (BGR, EXIF orientation applied,
# grayscale as 3 channels), float32, cv2.resize to 800x800 INTER_LINEAR on the float image (a stretch); BGR -> RGB
# and the normalization follow in the data preprocessor (a channel swap commutes with the per-channel resize)
test_pipeline = [
    dict(type='LoadImageFromFile', imdecode_backend='cv2', color_type='color', to_float32=True),
    dict(type='Resize', scale=(image_size[1], image_size[0]), keep_ratio=False, backend='cv2',
         interpolation='bilinear'),
    dict(type='LoadAnnotations', with_bbox=True),
    dict(type='PackDetInputs', meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor')),
]
test_dataloader = dict(
    batch_size=1, num_workers=0, persistent_workers=False, drop_last=False,
    sampler=dict(type='DefaultSampler', shuffle=False),
    dataset=dict(type='CocoDataset', data_root='', ann_file='openimages-mlperf.json', data_prefix=dict(img=''),
                 test_mode=True, pipeline=test_pipeline))
test_evaluator = dict(type='mmdet.OpenImagesMLPerfMetric', ann_file='openimages-mlperf.json')
test_cfg = dict(type='TestLoop')

default_hooks = dict(timer=dict(type='IterTimerHook'), logger=dict(type='LoggerHook', interval=50),
                     param_scheduler=dict(type='ParamSchedulerHook'), checkpoint=dict(type='CheckpointHook'),
                     sampler_seed=dict(type='DistSamplerSeedHook'))
env_cfg = dict(cudnn_benchmark=False, mp_cfg=dict(mp_start_method='fork', opencv_num_threads=0),
               dist_cfg=dict(backend='gloo'))
vis_backends = [dict(type='LocalVisBackend')]
visualizer = dict(type='DetLocalVisualizer', vis_backends=vis_backends, name='visualizer')
log_processor = dict(type='LogProcessor', window_size=50, by_epoch=True)
log_level = 'WARNING'
load_from = None
resume = False
