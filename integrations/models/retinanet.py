"""MLCommons RetinaNet (ResNeXt50-32x4d FPN, 264 OpenImages-MLPerf classes, 800x800) from torchvision's parts,
as an mmdet detector that mmengine's runner can test; and the family functions (head cut, decoder, …)."""
from __future__ import annotations

from contextlib import contextmanager

import torch
from mmdet.models.detectors.base import BaseDetector
from mmdet.registry import MODELS
from mmengine.structures import InstanceData

from evaluators.decode.retinanet import RetinaNetDecoder, level_anchors, postprocess

LABEL_SPACE = 'openimages_mlperf'  # how labels index the annotation file's categories (the metric's rule)
SHAPE_NOTE = "plain resize to the fixed input size for native and device, as MLPerf's preprocessing does"
ANCHOR_BASES = (32, 64, 128, 256, 512)


@MODELS.register_module()
class MLPerfRetinaNet(BaseDetector):
    """The MLPerf inference reference's `retinanet_resnext50_32x4d_fpn`: torchvision's resnext50_32x4d with
    FrozenBatchNorm, an FPN over layers 2-4 with P6/P7 from P5, 9 anchors per cell (sizes x, x*2^(1/3),
    x*2^(2/3) for x = 32..512, ratios 0.5/1/2), 4-conv heads and BoxCoder weights (1, 1, 1, 1).

    The submodules carry the reference's names (`backbone.body.*`, `backbone.fpn.*`, `head.*`), so an MLCommons
    checkpoint's state dict loads as it is. Input normalization belongs to the data preprocessor and the resize
    to the pipeline (MLPerf's: RGB, bilinear to 800x800, /255, ImageNet mean/std); the native predictions go
    through torchvision's own `RetinaNet.postprocess_detections`.

    Args:
        num_classes: 264 for OpenImages-MLPerf.
        image_size: (height, width) the model runs at.
        test_cfg: score_thresh, nms_thresh, detections_per_img, topk_candidates (the reference's 0.05, 0.5,
            300, 1000 by default).
        init_seed: the seed of the random initialization (used when no checkpoint is loaded).
    """

    def __init__(self, num_classes: int = 264, image_size=(800, 800), test_cfg: dict | None = None,
                 init_seed: int = 0, data_preprocessor=None, init_cfg=None):
        super().__init__(data_preprocessor=data_preprocessor, init_cfg=init_cfg)
        from torchvision.models import resnext50_32x4d
        from torchvision.models.detection import _utils as det_utils
        from torchvision.models.detection.anchor_utils import AnchorGenerator
        from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
        from torchvision.models.detection.retinanet import RetinaNetHead
        from torchvision.ops import FrozenBatchNorm2d
        from torchvision.ops.feature_pyramid_network import LastLevelP6P7

        self.num_classes = num_classes
        self.image_size = tuple(image_size)
        with torch.random.fork_rng():
            torch.manual_seed(init_seed)
            body = resnext50_32x4d(weights=None, norm_layer=FrozenBatchNorm2d)
            self.backbone = _resnet_fpn_extractor(body, trainable_layers=3, returned_layers=[2, 3, 4],
                                                  extra_blocks=LastLevelP6P7(256, 256))
            sizes = tuple((x, int(x * 2 ** (1 / 3)), int(x * 2 ** (2 / 3))) for x in ANCHOR_BASES)
            self.anchor_generator = AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * len(sizes))
            self.head = RetinaNetHead(256, self.anchor_generator.num_anchors_per_location()[0], num_classes)
        self.box_coder = det_utils.BoxCoder(weights=(1.0, 1.0, 1.0, 1.0))
        # what torchvision's RetinaNet.postprocess_detections reads from its `self`
        cfg = {'score_thresh': 0.05, 'nms_thresh': 0.5, 'detections_per_img': 300, 'topk_candidates': 1000,
               **(test_cfg or {})}
        self.score_thresh = cfg['score_thresh']
        self.nms_thresh = cfg['nms_thresh']
        self.detections_per_img = cfg['detections_per_img']
        self.topk_candidates = cfg['topk_candidates']
        self.raw_maps = False  # cut_head sets it: _forward then returns the 10 raw maps

    @staticmethod
    def adapt_state_dict(state_dict: dict) -> dict:
        """MLCommons checkpoints hold torchvision's v1 names: plain FPN convs (`backbone.fpn.inner_blocks.0.weight`,
        now `….0.0.weight`) and head convs conv.0, conv.2, … (now conv.0.0, conv.1.0, …), renamed as torchvision's
        own loading upgrades them; current names pass unchanged."""
        import re

        from torchvision.models.detection.retinanet import _v1_to_v2_weights

        plain_fpn_conv = re.compile(r'^(backbone\.fpn\.(?:inner|layer)_blocks\.\d+)\.(weight|bias)$')
        state_dict = {plain_fpn_conv.sub(r'\1.0.\2', key): value for key, value in state_dict.items()}
        for prefix in ('head.classification_head.', 'head.regression_head.'):
            _v1_to_v2_weights(state_dict, prefix)
        return state_dict

    def extract_feat(self, batch_inputs: torch.Tensor) -> list[torch.Tensor]:
        return list(self.backbone(batch_inputs).values())

    def _forward(self, batch_inputs: torch.Tensor, batch_data_samples=None):
        features = self.extract_feat(batch_inputs)
        if not self.raw_maps:
            return self.head(features)
        cls_head, reg_head = self.head.classification_head, self.head.regression_head
        return (*(cls_head.cls_logits(cls_head.conv(f)) for f in features),
                *(reg_head.bbox_reg(reg_head.conv(f)) for f in features))

    def predict(self, batch_inputs: torch.Tensor, batch_data_samples, rescale: bool = True):
        features = self.extract_feat(batch_inputs)
        head_outputs = self.head(features)
        anchors = level_anchors(self, [f.shape[-2:] for f in features], batch_inputs.shape[-2:])
        metas = [sample.metainfo for sample in batch_data_samples]
        detections = postprocess(self, head_outputs, anchors, tuple(batch_inputs.shape[-2:]), metas)
        return self.add_pred_to_datasample(batch_data_samples, [InstanceData(**d) for d in detections])

    def loss(self, batch_inputs, batch_data_samples):
        raise NotImplementedError('MLPerfRetinaNet is wrapped for evaluation; train with the MLCommons reference')


# ---- family interface (see integrations/models/__init__.py)

def prepare_config(mm_cfg, eval_cfg, model_cfg=None) -> None:
    """The eval thresholds that are set replace the reference's post-processing settings; without a checkpoint
    the weights are drawn with `model.init_seed`."""
    from common.errors import UserError
    from evaluators.openimages_mlperf import CLASSES

    if eval_cfg.get('multi_label') is False:
        raise UserError('eval.multi_label=false: RetinaNet\'s post-processing (torchvision\'s) scores every class '
                        'of every anchor; remove the option')
    mm_cfg.test_dataloader.dataset.metainfo = {'classes': CLASSES}
    test_cfg = mm_cfg.model.setdefault('test_cfg', {})
    for option, key in (('score_thr', 'score_thresh'), ('nms_iou', 'nms_thresh'),
                        ('max_per_img', 'detections_per_img'), ('nms_pre', 'topk_candidates')):
        if eval_cfg.get(option) is not None:
            test_cfg[key] = eval_cfg[option]
    if model_cfg is not None and model_cfg.get('init_seed') is not None and not model_cfg.get('checkpoint'):
        mm_cfg.model.init_seed = model_cfg.init_seed  # random weights, reproducibly


def input_shape(mm_cfg) -> tuple[int, int, int]:
    height, width = mm_cfg.model.image_size
    return 3, height, width


def device_preprocessing(mm_cfg) -> dict:
    """MLPerf's preprocessing for a device that does it itself: plain resize, ImageNet mean/std."""
    _, height, width = input_shape(mm_cfg)
    preprocessor = mm_cfg.model.data_preprocessor
    return {'model_name': 'mlcommons_retinanet', 'kind': 'resize', 'height': height, 'width': width,
            'mean': list(preprocessor.mean), 'std': list(preprocessor.std),
            # as VastModelZOO's mlcommons_retinanet.yaml and its VDSP JSON have them (the deploy doc's tip:
            # BILINEAR_PILLOW gives the best accuracy)
            'resize_type': 'BILINEAR_PILLOW', 'vamc_compile': {'data_transport_mode': 1}}


def raw_map_modules(model) -> list:
    """The final convs of the two heads; each runs once per level, classification levels first."""
    return [model.head.classification_head.cls_logits, model.head.regression_head.bbox_reg]


tap_modules = raw_map_modules  # their outputs, in call order, are the raw maps in export order


def output_names(model, group_sizes: list[int]) -> list[str]:
    return [f'raw_map_{i}' for i in range(sum(group_sizes))]


def prepare_model(model) -> None:
    """Nothing to fuse (FrozenBatchNorm stays as the reference has it)."""


@contextmanager
def cut_head(model):
    """Make `model._forward(x)` return the 10 raw maps: (N, 9*264, H, W) x 5, then (N, 9*4, H, W) x 5."""
    model.raw_maps = True
    try:
        yield
    finally:
        model.raw_maps = False


def build_decoder(model, shape: tuple[int, int, int]) -> RetinaNetDecoder:
    return RetinaNetDecoder(model, shape)
