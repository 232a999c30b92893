"""The detector's test-time data preprocessing in one pass per image, for the evaluation loop's host side.

mmdet's `DetDataPreprocessor` (and mmyolo's YOLOv5 subclass, which defers to it at test time) reorders the
channels with fancy indexing, casts, subtracts, divides, pads and stacks, each into a new tensor: ≈5 ms for one
640x640 image on one core. Writing each channel plane once into the preallocated batch, normalized on the way,
gives the same tensor and metainfo (tested equal) in ≈0.5 ms. A uint8 pixel has 256 values, so the normalization
is a table of 256 floats per channel computed by the framework's own arithmetic, applied by OpenCV's vectorized
lookup (half the time of torch's division, which converts and divides every pixel). Inputs it does not cover go
to the framework's own.

`PackDetInputsFast` is mmdet's `PackDetInputs` with the HWC -> CHW copy of the image done by OpenCV's channel
split (one vectorized pass, ≈0.1 ms for 640x640) instead of torch's strided permute copy (≈0.5-1.3 ms).
"""
from __future__ import annotations

import math

import cv2
import numpy as np
import torch
from mmcv.transforms import BaseTransform
from mmdet.datasets.transforms import PackDetInputs
from mmdet.registry import TRANSFORMS

MAX_LENT, MAX_SPARE = 8, 4  # BatchPreprocessor(reuse=True): batches it tracks


@TRANSFORMS.register_module()
class PackDetInputsFast(PackDetInputs):
    """PackDetInputs whose `inputs` (a contiguous CHW uint8 tensor, equal to mmdet's) comes from `cv2.split`."""

    def transform(self, results: dict) -> dict:
        img = results.get('img')
        if img is None or img.ndim != 3 or img.dtype != np.uint8:
            return super().transform(results)
        chw = np.empty((img.shape[2], *img.shape[:2]), np.uint8)
        cv2.split(img, list(chw))  # writes each plane into its row of `chw`
        packed = super().transform({k: v for k, v in results.items() if k != 'img'})
        packed['inputs'] = torch.from_numpy(chw)
        return packed


@TRANSFORMS.register_module()
class ZeroBorder(BaseTransform):
    """`border` set to none: CenterNet's head takes its test crop's border off its boxes, and a fixed-shape
    pipeline that pads at the bottom and right (integrations/models/mm.py) leaves none."""

    def transform(self, results: dict) -> dict:
        results['border'] = np.zeros(4, np.float32)  # top, bottom, left, right
        return results


def fast_packing(pipeline: list) -> list:
    """The pipeline config with mmdet's PackDetInputs replaced by PackDetInputsFast (same arguments)."""
    return [{**step, 'type': 'mmdet.PackDetInputsFast'} if step['type'] in ('PackDetInputs', 'mmdet.PackDetInputs')
            else step for step in pipeline]


class BatchPreprocessor:
    """Callable like the wrapped preprocessor: `(data, training) -> {'inputs', 'data_samples'}`.

    With `reuse`, a batch handed back by `release` is written over by a later call of the same shape instead of
    a new one: the first touch of fresh memory (≈300 page faults for a 640x640 image on this VM) cost the
    evaluation loop more than the normalization itself.
    """

    def __init__(self, preprocessor, reuse: bool = False):
        from mmdet.models.data_preprocessors import DetDataPreprocessor
        from mmyolo.models.data_preprocessors import YOLOv5DetDataPreprocessor

        self.preprocessor = preprocessor
        # only preprocessors whose test-time forward is exactly DetDataPreprocessor's
        self.covered = type(preprocessor).forward in (DetDataPreprocessor.forward, YOLOv5DetDataPreprocessor.forward)
        if self.covered:
            levels = torch.arange(256, dtype=torch.float32)  # a uint8 pixel cast to float, as mmdet casts the batch
            if preprocessor._enable_normalize:  # one mean/std value applies to every channel, as in mmdet
                mean, std = (v.cpu().reshape(-1).expand(3) for v in (preprocessor.mean, preprocessor.std))
                self.tables = [((levels - mean[c]) / std[c]).numpy() for c in range(3)]
            else:
                self.tables = [levels.numpy()] * 3
        self.reuse = reuse
        self.lent: list[torch.Tensor] = []  # batches handed out and not released yet (the latest few)
        self.spare: list[torch.Tensor] = []  # released batches

    def release(self, batch: torch.Tensor) -> None:
        """`batch`, returned by this preprocessor, is read by nobody any more (ignored unless it is one of the
        batches it lent)."""
        lent = next((i for i, t in enumerate(self.lent) if t is batch), None)
        if lent is not None:
            self.spare = [*self.spare[-(MAX_SPARE - 1):], self.lent.pop(lent)]

    def _new_batch(self, shape: tuple) -> torch.Tensor:
        if not self.reuse:
            return torch.empty(shape, dtype=torch.float32)
        spare = next((i for i, t in enumerate(self.spare) if t.shape == shape), None)
        batch = self.spare.pop(spare) if spare is not None else torch.empty(shape, dtype=torch.float32)
        self.lent = [*self.lent[-(MAX_LENT - 1):], batch]  # one never released is forgotten, not kept alive
        return batch

    def _fast_path(self, data: dict, training: bool) -> bool:
        images = data.get('inputs')
        return (self.covered and not training and isinstance(images, (list, tuple)) and len(images) > 0
                and all(isinstance(x, torch.Tensor) and x.dtype == torch.uint8 and x.dim() == 3
                        and x.shape[0] == 3 and x.device.type == 'cpu' for x in images)
                and self.preprocessor.device.type == 'cpu')

    def __call__(self, data: dict, training: bool = False) -> dict:
        if not self._fast_path(data, training):
            return self.preprocessor(data, training)
        from mmdet.models.utils import samplelist_boxtype2tensor

        pre = self.preprocessor
        images, samples = data['inputs'], data['data_samples']
        divisor = pre.pad_size_divisor

        def padded(size: int) -> int:
            return math.ceil(size / divisor) * divisor

        height = padded(max(x.shape[1] for x in images))
        width = padded(max(x.shape[2] for x in images))
        batch = self._new_batch((len(images), 3, height, width))
        for out, image in zip(batch.numpy(), images):
            h, w = image.shape[1:]
            if (h, w) != (height, width):
                out.fill(pre.pad_value)  # the padding is in normalized units, as stack_batch pads
            planes = list(image.contiguous().numpy())
            if pre._channel_conversion:
                planes.reverse()
            for c, plane in enumerate(planes):
                cv2.LUT(plane, self.tables[c], dst=out[c, :h, :w])  # (x - mean[c]) / std[c], in place
        if samples is not None:
            for sample, image in zip(samples, images):
                sample.set_metainfo({'batch_input_shape': (height, width),
                                     'pad_shape': (padded(image.shape[1]), padded(image.shape[2]))})
            if pre.boxtype2tensor:
                samplelist_boxtype2tensor(samples)
        return {'inputs': batch, 'data_samples': samples}
