"""Helpers of the model=mm tests: random weights that give tellable detections, and detections of two paths
compared box for box."""
from __future__ import annotations

from collections import Counter

import torch


def lively(model, batches: list[torch.Tensor], seed: int = 0) -> None:
    """Random weights whose detections a box-for-box comparison can tell apart: the head's final convs redrawn so
    that on these images their outputs are about N(-1, 0.3) and vary from place to place. The config's own
    initialization leaves them nearly the prior bias everywhere, and an untrained body gives features that barely
    vary over the image: every prior would score alike and the order of equal scores decide the detections."""
    from integrations.models.mm import raw_map_modules

    convs = raw_map_modules(model)
    seen = {conv: [] for conv in convs}
    handles = [conv.register_forward_hook(lambda m, args, out: seen[m].append(args[0].detach())) for conv in convs]
    with torch.no_grad():
        for batch in batches:
            model._forward(batch)
    for handle in handles:
        handle.remove()
    generator = torch.Generator().manual_seed(seed)
    for conv in convs:
        inputs = torch.cat([x.transpose(0, 1).reshape(x.shape[1], -1) for x in seen[conv]], dim=1)  # (C, N*H*W)
        mean, spread = inputs.mean(1), float(inputs.std(1).mean()) + 1e-12
        fan_in = conv.weight[0].numel()
        weight = torch.randn(conv.weight.shape, generator=generator) * 0.3 / (fan_in ** 0.5 * spread)
        conv.weight.data = weight
        # the features' mean, the same everywhere, cancelled: what is left varies with the image
        conv.bias.data = torch.randn(conv.bias.shape, generator=generator) * 0.3 - 1 - (
            weight.sum((2, 3)) * mean).sum(1)


def differences(native: dict, device: dict, tolerance: float = 1e-4) -> int:
    """How many detections differ between two paths: the same count, the same (label, score) pairs within
    `tolerance`, and the same box (within `tolerance` of its coordinates' size) for every detection whose label and
    score no other detection of its side shares. Detections that tie exactly are interchangeable: which of them
    a cap or an NMS keeps is decided by the order of equal scores, which a 1e-7 difference between PyTorch and
    ONNX Runtime may change (real images have flat areas, and there an untrained model scores alike)."""
    def rows(side):
        keys = [(int(label), round(float(score) / tolerance)) for label, score in zip(side['labels'], side['scores'])]
        counts = Counter(keys)
        return sorted(keys), {key: box for key, box in zip(keys, side['bboxes']) if counts[key] == 1}

    if len(native['scores']) != len(device['scores']):
        return abs(len(native['scores']) - len(device['scores'])) or 1
    (native_keys, native_boxes), (device_keys, device_boxes) = rows(native), rows(device)
    # a score on a rounding edge may land one step apart: keys compare within one step
    different = sum(a[0] != b[0] or abs(a[1] - b[1]) > 1 for a, b in zip(native_keys, device_keys))
    for key, box in native_boxes.items():
        other = next((device_boxes[k] for k in ((key[0], key[1] + d) for d in (0, -1, 1)) if k in device_boxes), None)
        if other is not None and float((other - box).abs().max()) > tolerance * max(1.0, float(box.abs().max())):
            different += 1
    return different
