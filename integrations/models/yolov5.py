"""mmyolo YOLOv5 (P5 n-x, P6): test-time config, the head cut, raw-map taps and the host decoder."""
from __future__ import annotations

from contextlib import contextmanager

LABEL_SPACE = 'coco'  # how labels index the annotation file's categories (the metric's rule)
SHAPE_NOTE = "fixed-shape letterbox for native and device (the config's batch_shapes_cfg is off)"


def prepare_config(mm_cfg, eval_cfg, model_cfg=None) -> None:
    """Make the model config's test setup match a fixed-shape export.

    The config's `batch_shapes_cfg` letterboxes each batch to its own rectangle, which a static export cannot
    follow, so it is switched off: native and device then both see the fixed `img_scale` letterbox. The
    post-processing thresholds set in `eval` replace the config's, so native and device decode alike.
    """
    dataset = mm_cfg.test_dataloader.dataset
    dataset.batch_shapes_cfg = None
    test_cfg = mm_cfg.model.test_cfg
    if eval_cfg.get('score_thr') is not None:
        test_cfg.score_thr = eval_cfg.score_thr
    if eval_cfg.get('nms_iou') is not None:
        test_cfg.nms = {'type': 'nms', 'iou_threshold': eval_cfg.nms_iou}
    if eval_cfg.get('max_per_img') is not None:
        test_cfg.max_per_img = eval_cfg.max_per_img
    if eval_cfg.get('nms_pre') is not None:
        test_cfg.nms_pre = eval_cfg.nms_pre
    if eval_cfg.get('multi_label') is not None:
        test_cfg.multi_label = eval_cfg.multi_label


def input_shape(mm_cfg) -> tuple[int, int, int]:
    """(C, H, W) of the exported input: the config's `img_scale` is (width, height)."""
    width, height = mm_cfg.img_scale
    return 3, height, width


def device_preprocessing(mm_cfg) -> dict:
    """What a device that preprocesses itself (VACC's VDSP op, vamc's calibration) must do to an RGB image to
    give the exported input: the test pipeline's fixed letterbox and the data preprocessor's mean/std."""
    _, height, width = input_shape(mm_cfg)
    letterbox = next(step for step in mm_cfg.test_dataloader.dataset.pipeline if step['type'] == 'LetterResize')
    pad = letterbox.get('pad_val', {}).get('img', 0)
    preprocessor = mm_cfg.model.data_preprocessor
    return {'model_name': 'mmyolo_yolov5', 'kind': 'letterbox', 'height': height, 'width': width,
            'pad': pad if isinstance(pad, (int, float)) else pad[0],
            'mean': list(preprocessor.mean), 'std': list(preprocessor.std),
            # as VastModelZOO's mmyolo_yolov5.yaml and mmyolo-yolov5s-vdsp_params.json have them
            'resize_type': 'BILINEAR_CV', 'vamc_compile': {'cluster_mode': 0}}


def raw_map_modules(model) -> list:
    """Modules whose outputs are the raw maps: the head's final 1x1 convs, one per level."""
    return list(model.bbox_head.head_module.convs_pred)


tap_modules = raw_map_modules  # their outputs, in call order, are the raw maps in export order


def output_names(model, group_sizes: list[int]) -> list[str]:
    return [f'raw_map_{i}' for i in range(sum(group_sizes))]


def prepare_model(model) -> None:
    """Nothing to fuse: YOLOv5 has no reparameterizable blocks."""


@contextmanager
def cut_head(model):
    """Make `model._forward(x)` return the raw maps (N, A*(5+C), H, W) per level; restored on exit."""
    head_module = model.bbox_head.head_module

    def raw_maps(feats):
        return tuple(conv(x) for conv, x in zip(head_module.convs_pred, feats))

    head_module.forward = raw_maps
    try:
        yield
    finally:
        del head_module.forward


def build_decoder(model, shape: tuple[int, int, int]):
    """The vectorized decoder for raw maps of the given input shape, with the model's own anchors and
    post-processing settings (`bbox_head.test_cfg`, which `prepare_config` fills from `eval`)."""
    import torch

    from evaluators.decode.yolov5 import YOLOv5Decoder

    head = model.bbox_head
    _, height, width = shape
    sizes = [(height // s, width // s) for s in head.featmap_strides]
    priors = head.prior_generator.grid_priors(sizes, dtype=torch.float32, device='cpu')
    strides = [torch.full((h * w * head.num_base_priors,), float(s)) for (h, w), s in
               zip(sizes, head.featmap_strides)]
    test_cfg = head.test_cfg
    return YOLOv5Decoder(torch.cat(priors), torch.cat(strides), head.num_classes,
                         score_thr=test_cfg.get('score_thr', 0.001), nms_iou=test_cfg.nms.iou_threshold,
                         max_per_img=test_cfg.max_per_img, nms_pre=test_cfg.get('nms_pre', 30000),
                         multi_label=test_cfg.get('multi_label', True))
