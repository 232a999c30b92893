"""Any single-stage mmdet/mmyolo detector (`model=mm`): the export stops at its dense head's forward, whose raw
maps come out kind by kind and level by level (`cls_scores_0, …, bbox_preds_0, …`, named after the head's own
`predict_by_feat` arguments), and the host decodes them with that head's `predict_by_feat` and the config's
`test_cfg`: exact by construction. A faster decoder replaces it where one is registered for the head type and
tested equal to it (`FAST_DECODERS`)."""
from __future__ import annotations

import inspect
from contextlib import nullcontext

import torch

from common.errors import UserError

LABEL_SPACE = 'coco'  # the configs' labels index their dataset's classes, as mmdet's CocoMetric reads them
SHAPE_NOTE = ("fixed-shape test pipeline for native and device: the config's letterbox or fixed resize, a keep-ratio "
              'resize padded to model.input_size otherwise')
GEOMETRY_STEPS = ('Resize', 'mmdet.Resize', 'RandomCenterCropPad', 'mmdet.RandomCenterCropPad', 'Pad', 'mmdet.Pad')
SUPPORTED = ('RTMDet, YOLOv5-v8, YOLOX, PPYOLOE (mmyolo); RetinaNet, FCOS, ATSS, YOLOv3, YOLOF, CenterNet and other '
             'single-stage dense heads (mmdet)')


def _check_supported(mm_cfg, config: str) -> None:
    """One line for a detector this family cannot cut at a dense head: two-stage, DETR-style, or with masks."""
    from importlib import import_module

    from mmdet.models.detectors import DetectionTransformer, SingleStageDetector
    from mmyolo.utils import register_all_modules

    register_all_modules(init_default_scope=False)  # mmyolo's and mmdet's
    detector = import_module(f"{mm_cfg.get('default_scope', 'mmdet')}.registry").MODELS.get(mm_cfg.model.type)
    head = mm_cfg.model.get('bbox_head') or {}
    why = ('a two-stage detector (its boxes come from an RoI head, after proposals)' if 'roi_head' in mm_cfg.model
           else 'a DETR-style detector (its queries are decoded by a transformer, not a dense head)'
           if detector is not None and issubclass(detector, DetectionTransformer)
           else 'an instance-segmentation model (its head also predicts masks)'
           if 'mask_head' in mm_cfg.model or 'mask' in str(head.get('type', '')).lower() or 'Ins' in str(
               head.get('type', ''))
           else None if detector is not None and issubclass(detector, SingleStageDetector) and head
           else f'not a single-stage detector with a bbox_head ({mm_cfg.model.type})')
    if why:
        raise UserError(f'model.config={config}: {why}; model=mm takes single-stage detectors whose dense head '
                        f'decodes its raw maps with predict_by_feat: {SUPPORTED}')


def prepare_config(mm_cfg, eval_cfg, model_cfg=None) -> None:
    """A static export needs one input shape: the config's test pipeline keeps its own letterbox (mmyolo's
    LetterResize) or fixed resize (PPYOLOE's FixShapeResize) at `model.input_size` if given; any other resize
    (mmdet's keep-ratio Resize, YOLOX's with its pad to square, CenterNet's crop) becomes mmdet's keep-ratio
    FixShapeResize into `model.input_size` (else the config's square), padded at the bottom and right with the
    config's pad value or else the mean colour, which the preprocessor normalizes to the 0 its own padding gives (so
    every mmdet head's rescale stays right). The eval thresholds that are set replace the config's test_cfg."""
    _check_supported(mm_cfg, model_cfg['config'] if model_cfg is not None else mm_cfg.filename)
    size = tuple(model_cfg['input_size']) if model_cfg is not None and model_cfg.get('input_size') else None
    dataset = mm_cfg.test_dataloader.dataset
    if 'batch_shapes_cfg' in dataset:
        dataset.batch_shapes_cfg = None
    steps = [dict(step) for step in dataset.pipeline]
    types = [step['type'].split('.')[-1] for step in steps]
    if 'LetterResize' in types or 'FixShapeResize' in types:
        if size is not None:
            _resize_fixed_steps(steps, size)
    else:
        height, width = size or _default_size(steps)
        first = next(i for i, t in enumerate(types) if t in ('Resize', 'RandomCenterCropPad'))
        kept = [s for s in steps if s['type'] not in GEOMETRY_STEPS]
        own_pad = next((s['pad_val'] for s in steps if s['type'].split('.')[-1] == 'Pad' and 'pad_val' in s), None)
        pad = own_pad or dict(img=tuple(round(v) for v in _image_order_mean(mm_cfg.model.data_preprocessor)))
        geometry = [dict(type='mmdet.FixShapeResize', width=width, height=height, keep_ratio=True,
                         pad_val=pad)]  # fits the image inside, unlike a keep-ratio Resize to a non-square scale
        if any('border' in s.get('meta_keys', ()) for s in steps):  # CenterNet's head subtracts the crop's border
            geometry.append(dict(type='mmdet.ZeroBorder'))
        steps = kept[:first] + geometry + kept[first:]
    dataset.pipeline = steps
    test_cfg = mm_cfg.model.setdefault('test_cfg', {})
    for option, key in (('score_thr', 'score_thr'), ('max_per_img', 'max_per_img'), ('nms_pre', 'nms_pre'),
                        ('multi_label', 'multi_label')):
        if eval_cfg.get(option) is not None:
            test_cfg[key] = eval_cfg[option]
    if eval_cfg.get('nms_iou') is not None:
        test_cfg['nms'] = {**test_cfg.get('nms', {'type': 'nms'}), 'iou_threshold': eval_cfg['nms_iou']}


def _resize_fixed_steps(steps: list[dict], size: tuple[int, int]) -> None:
    height, width = size
    for step in steps:
        kind = step['type'].split('.')[-1]
        if kind in ('YOLOv5KeepRatioResize', 'LetterResize', 'Resize'):
            step['scale'] = (width, height)
        elif kind == 'FixShapeResize':
            step.update(width=width, height=height)


def _default_size(steps: list[dict]) -> tuple[int, int]:
    """The square the config's keep-ratio resize fits its short side to (mmdet's (1333, 800): 800)."""
    scales = [s['scale'] for s in steps if s['type'].split('.')[-1] == 'Resize' and 'scale' in s]
    side = min(scales[0]) if scales else 512
    return side, side


def _image_order_mean(preprocessor) -> list[float]:
    """The preprocessor's mean in the channel order of the loaded (BGR) image."""
    mean = list(preprocessor.get('mean') or [0, 0, 0])
    return mean[::-1] if preprocessor.get('bgr_to_rgb') else mean


def _fixed_size(steps) -> tuple[int, int]:
    """(height, width) the prepared pipeline gives every image."""
    for step in steps:
        kind = step['type'].split('.')[-1]
        if kind == 'LetterResize':
            width, height = step['scale']
            return height, width
        if kind == 'FixShapeResize':
            return step['height'], step['width']
        if kind == 'Pad' and step.get('size'):
            width, height = step['size']
            return height, width
    raise UserError('model=mm: the test pipeline gives no fixed input shape (set model.input_size=[H,W])')


def input_shape(mm_cfg) -> tuple[int, int, int]:
    return (3, *_fixed_size(mm_cfg.test_dataloader.dataset.pipeline))


def device_preprocessing(mm_cfg) -> dict:
    """What a device that preprocesses itself must do, from the pipeline and the data preprocessor: letterbox (a
    centred one on VACC, as VastModelZOO's mm files have it) or plain resize, the pad value, mean/std and the
    channel order the model takes."""
    steps = mm_cfg.test_dataloader.dataset.pipeline
    kinds = {step['type'].split('.')[-1]: step for step in steps}
    height, width = _fixed_size(steps)
    preprocessor = mm_cfg.model.data_preprocessor
    pad = next((step.get('pad_val', {}).get('img', 114) for kind, step in kinds.items()
                if kind in ('LetterResize', 'Pad', 'FixShapeResize')), 114)
    mmyolo = mm_cfg.get('default_scope') == 'mmyolo'
    bicubic = kinds.get('FixShapeResize', {}).get('interpolation') == 'bicubic'
    return {'model_name': f"mm_{mm_cfg.model.bbox_head.type.lower()}",
            'kind': 'resize' if 'FixShapeResize' in kinds and not kinds['FixShapeResize'].get('keep_ratio')
            else 'letterbox', 'height': height, 'width': width,
            'pad': pad if isinstance(pad, (int, float)) else pad[0],
            'mean': list(preprocessor.get('mean') or [0, 0, 0]), 'std': list(preprocessor.get('std') or [1, 1, 1]),
            'channels': 'rgb' if preprocessor.get('bgr_to_rgb') else 'bgr',
            'resize_type': 'BICUBIC_PILLOW' if bicubic else 'BILINEAR_CV',
            # VastModelZOO's mmyolo_yolox.yaml and mmdet_retinanet.yaml
            'vamc_compile': {'data_transport_mode': 1, **({'cluster_mode': 0} if mmyolo else {})}}


def prepare_model(model) -> None:
    """The deploy form of reparameterizable blocks (mmyolo's RepVGG in YOLOv6, YOLOv7, PPYOLOE): fused once, for
    the native model and the export alike."""
    for module in model.modules():
        if hasattr(module, 'switch_to_deploy') and not getattr(module, 'deploy', False):
            module.switch_to_deploy()


cut_head = nullcontext  # the detector's _forward already stops at the head's outputs


def tap_modules(model) -> list:
    """The head: its forward's outputs, flattened, are the raw maps in export order."""
    return [model.bbox_head]


def output_names(model, group_sizes: list[int]) -> list[str]:
    """`<predict_by_feat argument>_<level>`: cls_scores_0, …, bbox_preds_0, …, objectnesses_0, …"""
    kinds = list(inspect.signature(model.bbox_head.predict_by_feat).parameters)[:len(group_sizes)]
    return [f'{kind}_{level}' for kind, size in zip(kinds, group_sizes) for level in range(size)]


def raw_map_modules(model, shape: tuple[int, int, int] = (3, 64, 64)) -> list:
    """The head's final prediction convs, found from the graph: for each raw map, the nearest convolution upstream
    of it (what an exp, a scale or a split leave in between does not matter)."""
    produced, modules = {}, []

    def record(module, args, output):
        produced[output.grad_fn] = module

    convs = [m for m in model.bbox_head.modules() if isinstance(m, torch.nn.modules.conv._ConvNd)]
    handles = [m.register_forward_hook(record) for m in convs]
    try:
        with torch.enable_grad():
            outputs = flatten(model._forward(torch.zeros(1, *shape, requires_grad=True)))
    finally:
        for handle in handles:
            handle.remove()
    for output in outputs:
        queue, seen = [output.grad_fn], set()
        while queue:
            node = queue.pop(0)
            if node is None or node in seen:
                continue
            seen.add(node)
            if node in produced:
                if produced[node] not in modules:
                    modules.append(produced[node])
                break
            queue += [parent for parent, _ in node.next_functions]
    return modules


def flatten(outputs) -> list:
    """A head's (kinds of (levels of tensors)) as one list, kind by kind."""
    return [t for part in outputs for t in (part if isinstance(part, (list, tuple)) else [part])]


class HeadDecoder:
    """Raw maps in export order -> per-image detections in original-image pixels, by the head's own
    `predict_by_feat(…, rescale=True)`, as the detector's own predict calls it. For a device that letterboxes with
    centred padding (VACC's VDSP op) an mmdet head, which knows no `pad_param`, gets the padding taken off after."""

    def __init__(self, model, group_sizes: list[int]):
        self.head = model.bbox_head
        self.group_sizes = group_sizes
        self.pad_aware = type(self.head).__module__.startswith('mmyolo')

    @torch.no_grad()
    def __call__(self, raw_maps: list[torch.Tensor], metas: list[dict]) -> list[dict[str, torch.Tensor]]:
        groups, start = [], 0
        for size in self.group_sizes:
            groups.append(list(raw_maps[start:start + size]))
            start += size
        results = self.head.predict_by_feat(*groups, batch_img_metas=metas, rescale=True)
        out = []
        for result, meta in zip(results, metas):
            bboxes = result.bboxes
            if 'pad_param' in meta and not self.pad_aware:
                top, _, left, _ = (float(p) for p in meta['pad_param'])
                bboxes = bboxes - bboxes.new_tensor([left, top, left, top]) / bboxes.new_tensor(
                    meta['scale_factor']).repeat(2)
            out.append({'bboxes': bboxes, 'scores': result.scores, 'labels': result.labels})
        return out


class YOLOv5SplitDecoder:
    """YOLOv5Head's three kinds of raw maps (cls, bbox, objectness per level) put back into the (N, A*(5+C), H, W)
    maps its head module split them from, for the vectorized YOLOv5 decoder (evaluators/decode/yolov5.py)."""

    def __init__(self, model, shape: tuple[int, int, int]):
        from integrations.models.yolov5 import build_decoder

        self.decoder = build_decoder(model, shape)
        self.levels = len(model.bbox_head.featmap_strides)
        self.anchors = model.bbox_head.num_base_priors

    def __call__(self, raw_maps: list[torch.Tensor], metas: list[dict]) -> list[dict[str, torch.Tensor]]:
        joined = []
        for level in range(self.levels):
            cls, bbox, obj = (raw_maps[kind * self.levels + level] for kind in range(3))
            n, _, h, w = cls.shape
            parts = [m.reshape(n, self.anchors, -1, h, w) for m in (bbox, obj, cls)]
            joined.append(torch.cat(parts, dim=2).reshape(n, -1, h, w))
        return self.decoder(joined, metas)


FAST_DECODERS = {'YOLOv5Head': YOLOv5SplitDecoder}  # head type -> decoder tested equal to its predict_by_feat


def group_sizes(model, shape: tuple[int, int, int]) -> list[int]:
    """How many levels each kind of the head's outputs has."""
    with torch.no_grad():
        outputs = model._forward(torch.zeros(1, *shape))
    return [len(part) if isinstance(part, (list, tuple)) else 1 for part in outputs]


def build_decoder(model, shape: tuple[int, int, int], fast: bool = True):
    """The registered fast decoder of the head's type, else the head's own predict_by_feat."""
    decoder = FAST_DECODERS.get(type(model.bbox_head).__name__) if fast else None
    return decoder(model, shape) if decoder else HeadDecoder(model, group_sizes(model, shape))
