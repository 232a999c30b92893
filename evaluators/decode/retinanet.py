"""Host decoding of the MLCommons RetinaNet's raw maps by torchvision's own `RetinaNet.postprocess_detections`
(the reference's post-processing), and the anchors it decodes against.

`model` below is anything with torchvision RetinaNet's decoding attributes (`anchor_generator`, `box_coder`,
`num_classes`, `score_thresh`, `nms_thresh`, `detections_per_img`, `topk_candidates`): the family's
`MLPerfRetinaNet`, whose own `predict` decodes through the same `postprocess`.
"""
from __future__ import annotations

import torch


def level_anchors(model, grid_sizes, image_size) -> list[torch.Tensor]:
    """torchvision's anchors for one image, split per level ((H*W*A, 4) each, in (h, w, anchor) order); strides
    are the reference's image_size // grid."""
    from torchvision.models.detection.image_list import ImageList

    height, width = (int(s) for s in image_size)
    images = ImageList(torch.empty(1, 3, height, width), [(height, width)])
    features = [torch.empty(1, 1, int(h), int(w)) for h, w in grid_sizes]
    anchors = model.anchor_generator(images, features)[0]
    per_level = [int(h) * int(w) * model.anchor_generator.num_anchors_per_location()[0] for h, w in grid_sizes]
    return list(anchors.split(per_level))


def postprocess(model, head_outputs: dict, anchors: list[torch.Tensor], image_size: tuple, metas: list[dict]):
    """torchvision's RetinaNet.postprocess_detections on (N, HWA, K)/(N, HWA, 4) head outputs, then the boxes
    scaled back to each original image (the pipeline's scale_factor)."""
    from torchvision.models.detection import RetinaNet

    per_level = [len(a) for a in anchors]
    split = {k: list(v.split(per_level, dim=1)) for k, v in head_outputs.items()}
    detections = RetinaNet.postprocess_detections(model, split, [anchors] * len(metas), [image_size] * len(metas))
    results = []
    for det, meta in zip(detections, metas):
        boxes = det['boxes'] / det['boxes'].new_tensor(meta['scale_factor']).repeat(2)
        results.append({'bboxes': boxes, 'scores': det['scores'], 'labels': det['labels']})
    return results


def flatten_maps(maps: list[torch.Tensor], channels: int) -> torch.Tensor:
    """Raw maps (N, A*C, H, W) per level -> (N, sum H*W*A, C), the layout torchvision's head returns."""
    out = []
    for m in maps:
        n, _, h, w = m.shape
        out.append(m.view(n, -1, channels, h, w).permute(0, 3, 4, 1, 2).reshape(n, -1, channels))
    return torch.cat(out, dim=1)


class RetinaNetDecoder:
    """Raw maps (5 classification, then 5 regression) -> per-image detections in original-image pixels, by the
    reference's own post-processing (score 0.05, top-1000 per level, box decoding and clipping, batched NMS 0.5,
    300 per image — the model's test_cfg)."""

    def __init__(self, model, shape: tuple[int, int, int]):
        self.model = model
        self.image_size = tuple(shape[1:])
        self.levels = len(model.anchor_generator.sizes)  # P3..P7
        self.anchors = level_anchors(model, grid_sizes(self.image_size, self.levels), self.image_size)

    @torch.no_grad()
    def __call__(self, raw_maps: list[torch.Tensor], metas: list[dict]) -> list[dict[str, torch.Tensor]]:
        head_outputs = {'cls_logits': flatten_maps(raw_maps[:self.levels], self.model.num_classes),
                        'bbox_regression': flatten_maps(raw_maps[self.levels:], 4)}
        return postprocess(self.model, head_outputs, self.anchors, self.image_size, metas)


def grid_sizes(image_size: tuple[int, int], levels: int) -> list[tuple[int, int]]:
    """Feature map sizes of P3..P7: every stride-2 stage rounds up (stem, pool, layers 2-4, P6, P7)."""
    def halve(n: int, times: int) -> int:
        for _ in range(times):
            n = (n + 1) // 2
        return n
    return [(halve(image_size[0], 3 + i), halve(image_size[1], 3 + i)) for i in range(levels)]
