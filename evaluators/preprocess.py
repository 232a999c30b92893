"""The detector's test-time data preprocessing in one pass per image, for the evaluation loop's host side.

mmdet's `DetDataPreprocessor` (and mmyolo's YOLOv5 subclass, which defers to it at test time) reorders the
channels with fancy indexing, casts, subtracts, divides, pads and stacks, each into a new tensor: ≈5 ms for one
640x640 image on one core. Writing each channel plane once into the preallocated batch, normalized on the way,
gives the same tensor and metainfo (tested equal) in ≈1 ms. Inputs it does not cover go to the framework's own.

`PackDetInputsFast` is mmdet's `PackDetInputs` with the HWC -> CHW copy of the image done by OpenCV's channel
split (one vectorized pass, ≈0.1 ms for 640x640) instead of torch's strided permute copy (≈0.5-1.3 ms).
"""
from __future__ import annotations

import math

import cv2
import numpy as np
import torch
from mmdet.datasets.transforms import PackDetInputs
from mmdet.registry import TRANSFORMS


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


def fast_packing(pipeline: list) -> list:
    """The pipeline config with mmdet's PackDetInputs replaced by PackDetInputsFast (same arguments)."""
    return [{**step, 'type': 'mmdet.PackDetInputsFast'} if step['type'] in ('PackDetInputs', 'mmdet.PackDetInputs')
            else step for step in pipeline]


class BatchPreprocessor:
    """Callable like the wrapped preprocessor: `(data, training) -> {'inputs', 'data_samples'}`."""

    def __init__(self, preprocessor):
        from mmdet.models.data_preprocessors import DetDataPreprocessor
        from mmyolo.models.data_preprocessors import YOLOv5DetDataPreprocessor

        self.preprocessor = preprocessor
        # only preprocessors whose test-time forward is exactly DetDataPreprocessor's
        self.covered = type(preprocessor).forward in (DetDataPreprocessor.forward, YOLOv5DetDataPreprocessor.forward)

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
        batch = torch.empty((len(images), 3, height, width), dtype=torch.float32)
        # (x - mean) / std in float32 as mmdet computes it; x - 0 is x, so a zero mean is not subtracted
        subtract = pre._enable_normalize and bool(pre.mean.any())
        for out, image in zip(batch, images):
            h, w = image.shape[1:]
            if (h, w) != (height, width):
                out.fill_(pre.pad_value)  # the padding is in normalized units, as stack_batch pads
            planes = list(image.unbind(0))
            if pre._channel_conversion:
                planes.reverse()
            for c, plane in enumerate(planes):
                region = out[c, :h, :w]
                if not pre._enable_normalize:
                    region.copy_(plane)
                elif subtract:
                    torch.sub(plane, pre.mean[c], out=region).div_(pre.std[c])
                else:
                    torch.div(plane, pre.std[c], out=region)
        if samples is not None:
            for sample, image in zip(samples, images):
                sample.set_metainfo({'batch_input_shape': (height, width),
                                     'pad_shape': (padded(image.shape[1]), padded(image.shape[2]))})
            if pre.boxtype2tensor:
                samplelist_boxtype2tensor(samples)
        return {'inputs': batch, 'data_samples': samples}
