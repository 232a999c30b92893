"""Property-based tests: random raw maps of any valid input shape, scale and batch, decoded by our host decoders,
against the frameworks' own post-processing (mmyolo's predict_by_feat, torchvision's postprocess_detections) —
including empty, all-below-threshold and saturated-score maps."""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mmengine.config import ConfigDict

FUZZ = settings(max_examples=20, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

# logits: (scale, offset) of a normal draw; the offsets reach all-below-threshold (-12), near-saturated scores
# (+10) and saturation (+40: every score is exactly 1.0, so NMS meets ties)
SATURATED = 40.0
LOGITS = st.sampled_from([(1.0, -4.0), (3.0, -6.0), (0.5, -12.0), (8.0, 0.0), (2.0, 10.0), (2.0, SATURATED),
                          (0.0, -30.0)])
SIDES = st.integers(min_value=2, max_value=8).map(lambda k: 32 * k)


def _letterbox_meta(height: int, width: int, ori_h: int, ori_w: int) -> dict:
    """mmyolo's metainfo for an ori_h x ori_w image letterboxed into height x width."""
    ratio = min(height / ori_h, width / ori_w)
    pad_h, pad_w = height - round(ori_h * ratio), width - round(ori_w * ratio)
    return {'ori_shape': (ori_h, ori_w), 'img_shape': (height, width), 'scale_factor': (ratio, ratio),
            'pad_param': [pad_h // 2, pad_h - pad_h // 2, pad_w // 2, pad_w - pad_w // 2]}


def _canonical(boxes, scores, labels):
    import numpy as np
    order = torch.from_numpy(np.lexsort([scores.numpy().round(5), *boxes.numpy().round(2).T[::-1],
                                         labels.numpy()]))
    return boxes[order], scores[order], labels[order]


@FUZZ
@given(height=SIDES, width=SIDES, batch=st.integers(1, 2), logits=LOGITS, box_scale=st.sampled_from([0.5, 2.0, 6.0]),
       multi_label=st.booleans(), ori=st.tuples(st.integers(20, 900), st.integers(20, 900)), seed=st.integers(0, 99))
def test_yolov5_decoder_equals_predict_by_feat(yolov5s, height, width, batch, logits, box_scale, multi_label, ori,
                                               seed):
    from integrations.models.yolov5 import build_decoder

    head = yolov5s.bbox_head
    generator = torch.Generator().manual_seed(seed)
    scale, offset = logits
    raw = []
    for stride in head.featmap_strides:
        shape = (batch, head.num_base_priors, 5 + head.num_classes, height // stride, width // stride)
        level = torch.randn(shape, generator=generator) * scale + offset
        level[:, :, :4] = torch.randn(level[:, :, :4].shape, generator=generator) * box_scale
        raw.append(level.reshape(batch, -1, *shape[-2:]))
    metas = [_letterbox_meta(height, width, *ori)] * batch
    test_cfg = ConfigDict(head.test_cfg.to_dict(), multi_label=multi_label)
    # mmyolo's YOLOv5HeadModule.forward_single: view (N, anchors, 5 + classes, H, W), then split the attributes
    parts = [m.view(batch, head.num_base_priors, -1, *m.shape[-2:]) for m in raw]
    cls = [p[:, :, 5:].reshape(batch, -1, *p.shape[-2:]) for p in parts]
    box = [p[:, :, :4].reshape(batch, -1, *p.shape[-2:]) for p in parts]
    obj = [p[:, :, 4:5].reshape(batch, -1, *p.shape[-2:]) for p in parts]
    reference = head.predict_by_feat(cls, box, obj, batch_img_metas=metas, cfg=test_cfg, rescale=True)
    old_cfg, head.test_cfg = head.test_cfg, test_cfg
    try:
        decoded = build_decoder(yolov5s, (3, height, width))(raw, metas)
    finally:
        head.test_cfg = old_cfg
    if offset == SATURATED:  # which of equal-score boxes NMS keeps is each implementation's own order
        for got, meta in zip(decoded, metas):
            assert 0 < len(got['scores']) <= test_cfg.max_per_img and bool((got['scores'] == 1).all())
            assert torch.isfinite(got['bboxes']).all() and (got['bboxes'] >= 0).all()
            assert (got['bboxes'][:, 0::2] <= meta['ori_shape'][1]).all()
            assert (got['bboxes'][:, 1::2] <= meta['ori_shape'][0]).all()
        return
    for ref, got in zip(reference, decoded):
        ref = _canonical(ref.bboxes, ref.scores, ref.labels)
        got = _canonical(got['bboxes'], got['scores'], got['labels'])
        assert len(ref[0]) == len(got[0])
        assert torch.equal(ref[2], got[2])
        assert torch.allclose(ref[1], got[1], atol=1e-6, rtol=0)
        assert len(ref[0]) == 0 or (ref[0] - got[0]).abs().max() <= 1e-3


@pytest.fixture(scope='module')
def retinanet():
    from integrations.config import ROOT
    from integrations.models import build_model, load_model_config

    return build_model(load_model_config(str(ROOT / 'configs' / 'mlperf_retinanet_800.py')))


@FUZZ
@given(height=SIDES, width=SIDES, batch=st.integers(1, 2), logits=LOGITS, box_scale=st.sampled_from([0.1, 1.0, 4.0]),
       seed=st.integers(0, 99))
def test_retinanet_decoder_equals_torchvision_postprocess(retinanet, height, width, batch, logits, box_scale, seed):
    from torchvision.models.detection import RetinaNet
    from torchvision.models.detection.image_list import ImageList

    from evaluators.decode.retinanet import RetinaNetDecoder, grid_sizes

    generator = torch.Generator().manual_seed(seed)
    scale, offset = logits
    anchors_per_cell, classes = 9, retinanet.num_classes
    sizes = grid_sizes((height, width), 5)
    cls = [torch.randn(batch, anchors_per_cell * classes, h, w, generator=generator) * scale + offset for h, w in sizes]
    reg = [torch.randn(batch, anchors_per_cell * 4, h, w, generator=generator) * box_scale for h, w in sizes]

    def flat(maps, k):  # torchvision's RetinaNet{Classification,Regression}Head.forward: (N, HWA, K)
        return torch.cat([m.view(batch, -1, k, *m.shape[-2:]).permute(0, 3, 4, 1, 2).reshape(batch, -1, k)
                          for m in maps], dim=1)

    reference = RetinaNet(retinanet.backbone, classes, anchor_generator=retinanet.anchor_generator,
                          head=retinanet.head, score_thresh=retinanet.score_thresh, nms_thresh=retinanet.nms_thresh,
                          detections_per_img=retinanet.detections_per_img,
                          topk_candidates=retinanet.topk_candidates)
    features = [torch.zeros(batch, 256, h, w) for h, w in sizes]
    anchors = reference.anchor_generator(ImageList(torch.zeros(batch, 3, height, width), [(height, width)] * batch),
                                         features)
    per_level = [h * w * anchors_per_cell for h, w in sizes]
    split = {'cls_logits': list(flat(cls, classes).split(per_level, dim=1)),
             'bbox_regression': list(flat(reg, 4).split(per_level, dim=1))}
    expected = reference.postprocess_detections(split, [list(a.split(per_level)) for a in anchors],
                                                [(height, width)] * batch)
    got = RetinaNetDecoder(retinanet, (3, height, width))([*cls, *reg], [{'scale_factor': (1.0, 1.0)}] * batch)
    for exp, det in zip(expected, got):
        assert torch.equal(exp['labels'], det['labels']) and torch.equal(exp['scores'], det['scores'])
        assert torch.equal(exp['boxes'], det['bboxes'])
