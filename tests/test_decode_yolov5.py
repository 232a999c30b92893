"""The vectorized decoder gives mmyolo's own `predict_by_feat` detections on the same raw maps."""
import pytest
import torch
from mmengine.config import ConfigDict

from integrations.models.yolov5 import build_decoder, cut_head
from tests.conftest import DEMO_IMAGES


def _reference_and_decoded(model, batch, test_cfg):
    head = model.bbox_head
    metas = [s.metainfo for s in batch['data_samples']]
    with torch.no_grad():
        feats = model.extract_feat(batch['inputs'])
        reference = head.predict_by_feat(*head(feats), batch_img_metas=metas, cfg=test_cfg, rescale=True)
        with cut_head(model):
            raw = model._forward(batch['inputs'])
    old_cfg, head.test_cfg = head.test_cfg, test_cfg
    try:
        decoder = build_decoder(model, tuple(batch['inputs'].shape[1:]))
    finally:
        head.test_cfg = old_cfg
    return reference, decoder(list(raw), metas)


def _sorted(boxes, scores, labels):
    """A canonical order (label, then box corners rounded to 0.01 px, then score) to pair detections."""
    import numpy as np
    keys = [scores.numpy().round(5), *(boxes.numpy().round(2).T[::-1]), labels.numpy()]
    order = torch.from_numpy(np.lexsort(keys))
    return boxes[order], scores[order], labels[order]


@pytest.mark.parametrize('multi_label', [True, False])
def test_decoder_equals_predict_by_feat(yolov5s, make_batch, coco128, multi_label):
    images = sorted(coco128.glob('images/*.jpg'))[:6] + [DEMO_IMAGES / 'bus.jpg', DEMO_IMAGES / 'astronaut.png']
    test_cfg = ConfigDict(yolov5s.bbox_head.test_cfg.to_dict(), multi_label=multi_label)
    total = 0
    for path in images:
        batch = make_batch([path])
        (reference,), (decoded,) = _reference_and_decoded(yolov5s, batch, test_cfg)
        ref = _sorted(reference.bboxes, reference.scores, reference.labels)
        got = _sorted(decoded['bboxes'], decoded['scores'], decoded['labels'])
        assert len(ref[0]) == len(got[0]), path.name
        assert torch.equal(ref[2], got[2]), path.name
        assert torch.allclose(ref[1], got[1], atol=1e-6, rtol=0), path.name
        assert (ref[0] - got[0]).abs().max() <= 1e-3, path.name
        total += len(ref[0])
    assert total > 100  # real detections were compared


def test_decoder_batch_equals_single_images(yolov5s, make_batch, coco128):
    paths = sorted(coco128.glob('images/*.jpg'))[:3]
    batch = make_batch(paths)
    with torch.no_grad(), cut_head(yolov5s):
        raw = yolov5s._forward(batch['inputs'])
    decoder = build_decoder(yolov5s, tuple(batch['inputs'].shape[1:]))
    together = decoder(list(raw), [s.metainfo for s in batch['data_samples']])
    for i, sample in enumerate(batch['data_samples']):
        alone = decoder([m[i:i + 1] for m in raw], [sample.metainfo])[0]
        assert torch.equal(alone['labels'], together[i]['labels'])
        assert torch.allclose(alone['bboxes'], together[i]['bboxes'])


def test_decoder_handles_no_detections(yolov5s):
    decoder = build_decoder(yolov5s, (3, 640, 640))
    raw = [torch.full((1, 255, 640 // s, 640 // s), -20.0) for s in (8, 16, 32)]
    meta = dict(ori_shape=(480, 640), scale_factor=(1.0, 1.0), pad_param=[80.0, 80.0, 0.0, 0.0])
    (out,) = decoder(raw, [meta])
    assert out['bboxes'].shape == (0, 4) and out['scores'].numel() == 0 and out['labels'].numel() == 0


def test_decoder_rejects_maps_of_another_shape(yolov5s):
    decoder = build_decoder(yolov5s, (3, 640, 640))
    raw = [torch.zeros((1, 255, 320 // s, 320 // s)) for s in (8, 16, 32)]
    with pytest.raises(ValueError, match='priors'):
        decoder(raw, [dict(ori_shape=(320, 320), scale_factor=(1.0, 1.0))])


@pytest.mark.parametrize('count', [5000, 12000])  # mmcv: one class-offset NMS below 10000 boxes, per class above
def test_prefix_nms_keeps_what_mmcv_batched_nms_keeps(count):
    """Stopping once max_keep boxes are kept gives the first max_keep boxes of mmcv's full batched NMS."""
    from mmcv.ops import batched_nms

    from evaluators.decode.yolov5 import framework_batched_nms

    generator = torch.Generator().manual_seed(0)
    xy = torch.rand(count, 2, generator=generator) * 600 - 20  # some corners outside the image, as decoded boxes
    boxes = torch.cat([xy, xy + 5 + torch.rand(count, 2, generator=generator) * 80], dim=1)
    scores = torch.rand(count, generator=generator).sort(descending=True)[0]
    labels = torch.randint(0, 3, (count,), generator=generator)
    _, full = batched_nms(boxes, scores, labels, dict(type='nms', iou_threshold=0.5))
    for max_keep in (10, 300, 4000):
        assert torch.equal(framework_batched_nms(boxes, scores, labels, 0.5, max_keep), full[:max_keep])
