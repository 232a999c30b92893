"""The VDSP fusion ops of the generated JSON, in numpy (tests only): resize or letterbox an RGB planar image,
convert colour, normalize, and return the float16 tensor the model takes."""
from __future__ import annotations

import numpy as np

RESIZE = {'FUSION_OP_RGB_RESIZE_CVTCOLOR_NORM_TENSOR', 'FUSION_OP_RGB_LETTERBOX_CVTCOLOR_NORM_TENSOR'}


def resize(image: np.ndarray, width: int, height: int, kind: str) -> np.ndarray:
    """HWC uint8 resized by the named VDSP resize kind."""
    if kind in ('BILINEAR_CV', 'BILINEAR', 'NEAREST'):
        import cv2
        flag = cv2.INTER_NEAREST if kind == 'NEAREST' else cv2.INTER_LINEAR
        return cv2.resize(image, (width, height), interpolation=flag)
    from PIL import Image
    method = {'BILINEAR_PILLOW': Image.BILINEAR, 'BICUBIC_PILLOW': Image.BICUBIC}[kind]
    return np.asarray(Image.fromarray(image).resize((width, height), method))


class FusionOp:
    def __init__(self, spec: dict):
        if spec['OpType'] not in RESIZE:
            raise ValueError(f"emulation does not implement {spec['OpType']}")
        self.letterbox = 'LETTERBOX' in spec['OpType']
        self.config = spec['OpConfig']

    def __call__(self, planar: np.ndarray) -> np.ndarray:
        c = self.config
        out_w, out_h = c['OimageWidth'], c['OimageHeight']
        image = planar.transpose(1, 2, 0)
        height, width = image.shape[:2]
        if self.letterbox:
            scale = min(out_w / width, out_h / height)
            new_w, new_h = int(width * scale), int(height * scale)
            canvas = np.empty((out_h, out_w, 3), np.uint8)
            canvas[:] = 114  # VastAI's JSON names no pad value; assumed YOLOv5's letterbox grey (unverified)
            top, left = (out_h - new_h) // 2, (out_w - new_w) // 2
            canvas[top:top + new_h, left:left + new_w] = resize(image, new_w, new_h, c['ResizeType'])
            image = canvas
        else:
            image = resize(image, out_w, out_h, c['ResizeType'])
        code = c.get('ColorCvtCode', 'NO_CHANGE')
        if code in ('RGB2BGR', 'BGR2RGB'):
            image = image[..., ::-1]
        elif code != 'NO_CHANGE':
            raise ValueError(f'emulation does not implement ColorCvtCode {code}')
        x = image.astype(np.float32)
        if c['NormaType'].startswith('DIV255'):
            x = x / 255
        if c['NormaType'] in ('DIV255_MINUSMEAN_DIVSTD', 'MINUSMEAN_DIVSTD'):
            x = (x - np.asarray(c['Mean'], np.float32)) / np.asarray(c['Std'], np.float32)
        elif c['NormaType'] not in ('DIV255', 'EQUAL'):
            raise ValueError(f"emulation does not implement NormaType {c['NormaType']}")
        return x.transpose(2, 0, 1).astype(np.float16)
