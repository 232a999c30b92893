"""Turn the COCO-trained YOLOv5s that npm's `yolov5@1.0.11` ships as a TF.js graph model into an mmyolo checkpoint.

The graph holds 60 convolutions (`conv2d`, `conv2d_1` … `conv2d_59`) in Ultralytics module order with BatchNorm
folded into the conv bias. Each is mapped to its Ultralytics name, then to mmyolo's name with the renaming rules of
mmyolo's own `tools/model_converters/yolov5_to_mmyolo.py`; every BN becomes "+ bias" (weight 1, bias = folded bias,
mean 0, var 1 - eps), so the mmyolo model computes exactly what the graph computes.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

# Ultralytics P5 module index -> mmyolo module, as in mmyolo's yolov5_to_mmyolo.py.
ULTRALYTICS_TO_MMYOLO_P5 = {
    'model.0': 'backbone.stem',
    'model.1': 'backbone.stage1.0',
    'model.2': 'backbone.stage1.1',
    'model.3': 'backbone.stage2.0',
    'model.4': 'backbone.stage2.1',
    'model.5': 'backbone.stage3.0',
    'model.6': 'backbone.stage3.1',
    'model.7': 'backbone.stage4.0',
    'model.8': 'backbone.stage4.1',
    'model.9.cv1': 'backbone.stage4.2.conv1',
    'model.9.cv2': 'backbone.stage4.2.conv2',
    'model.10': 'neck.reduce_layers.2',
    'model.13': 'neck.top_down_layers.0.0',
    'model.14': 'neck.top_down_layers.0.1',
    'model.17': 'neck.top_down_layers.1',
    'model.18': 'neck.downsample_layers.0',
    'model.20': 'neck.bottom_up_layers.0',
    'model.21': 'neck.downsample_layers.1',
    'model.23': 'neck.bottom_up_layers.1',
    'model.24.m': 'bbox_head.head_module.convs_pred',
}
# Ultralytics P5 layout: (module index, kind); C3 modules carry their bottleneck count, read from the mmyolo model.
_P5_LAYOUT = [('0', 'conv'), ('1', 'conv'), ('2', 'c3'), ('3', 'conv'), ('4', 'c3'), ('5', 'conv'), ('6', 'c3'),
              ('7', 'conv'), ('8', 'c3'), ('9', 'sppf'), ('10', 'conv'), ('13', 'c3'), ('14', 'conv'),
              ('17', 'c3'), ('18', 'conv'), ('20', 'c3'), ('21', 'conv'), ('23', 'c3'), ('24', 'detect')]


def read_tfjs_weights(model_dir: str | Path) -> dict[str, np.ndarray]:
    """Read every weight of a TF.js graph model (model.json + binary shards) as numpy arrays."""
    model_dir = Path(model_dir)
    manifest = json.loads((model_dir / 'model.json').read_text())['weightsManifest']
    weights = {}
    for group in manifest:
        buffer = b''.join((model_dir / p).read_bytes() for p in group['paths'])
        offset = 0
        for spec in group['weights']:
            if 'quantization' in spec:
                raise ValueError(f"{model_dir}: quantized TF.js weights ({spec['name']}) are not supported")
            dtype = np.dtype({'float32': np.float32, 'int32': np.int32}[spec['dtype']])
            count = int(np.prod(spec['shape'], dtype=np.int64))
            weights[spec['name']] = np.frombuffer(buffer, dtype, count, offset).reshape(spec['shape'])
            offset += count * dtype.itemsize
    return weights


def _mmyolo_name(ultralytics_name: str) -> str:
    """Rename an Ultralytics module path with the rules of mmyolo's yolov5_to_mmyolo.py."""
    prefix = next(p for p in sorted(ULTRALYTICS_TO_MMYOLO_P5, key=len, reverse=True)
                  if ultralytics_name == p or ultralytics_name.startswith(p + '.'))
    name = ULTRALYTICS_TO_MMYOLO_P5[prefix] + ultralytics_name[len(prefix):]
    if '.m.' in name:
        return name.replace('.m.', '.blocks.').replace('.cv', '.conv')
    return name.replace('.cv1', '.main_conv').replace('.cv2', '.short_conv').replace('.cv3', '.final_conv')


def _c3_depths(model) -> list[int]:
    """Bottleneck count of each C3 module, in Ultralytics order, read from the mmyolo model."""
    csp_layers = [model.backbone.stage1[1], model.backbone.stage2[1], model.backbone.stage3[1],
                  model.backbone.stage4[1], model.neck.top_down_layers[0][0], model.neck.top_down_layers[1],
                  model.neck.bottom_up_layers[0], model.neck.bottom_up_layers[1]]
    return [len(layer.blocks) for layer in csp_layers]


def ultralytics_conv_names(c3_depths: list[int]) -> list[str]:
    """Ultralytics module path of every convolution, in the order the TF.js graph numbers them."""
    depths = iter(c3_depths)
    names = []
    for index, kind in _P5_LAYOUT:
        if kind == 'conv':
            names.append(f'model.{index}')
        elif kind == 'c3':
            names += [f'model.{index}.cv1', f'model.{index}.cv2', f'model.{index}.cv3']
            for k in range(next(depths)):
                names += [f'model.{index}.m.{k}.cv1', f'model.{index}.m.{k}.cv2']
        elif kind == 'sppf':
            names += [f'model.{index}.cv1', f'model.{index}.cv2']
        else:
            names += [f'model.{index}.m.{k}' for k in range(3)]
    return names


def tfjs_conv_params(weights: dict[str, np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
    """(HWIO kernel, bias) of conv2d, conv2d_1, … in graph numbering."""
    kernels, biases = {}, {}
    for name, value in weights.items():
        parts = name.split('/')
        for i, part in enumerate(parts[:-2]):
            if part == 'conv2d' or part.startswith('conv2d_'):
                number = 0 if part == 'conv2d' else int(part.split('_')[1])
                if parts[i + 1] == 'Conv2D':
                    kernels[number] = value
                elif parts[i + 1] == 'BiasAdd':
                    biases[number] = value
    if sorted(kernels) != list(range(len(kernels))) or kernels.keys() != biases.keys():
        raise ValueError('TF.js graph: convolution kernels and biases are not numbered 0..N-1')
    return [(kernels[i], biases[i]) for i in range(len(kernels))]


def convert(model_dir: str | Path, model) -> dict:
    """State dict for the mmyolo YOLOv5 `model` (P5) holding the TF.js graph's weights."""
    import torch

    convs = tfjs_conv_params(read_tfjs_weights(model_dir))
    names = ultralytics_conv_names(_c3_depths(model))
    if len(names) != len(convs):
        raise ValueError(f'{model_dir}: the graph has {len(convs)} convolutions, the mmyolo model '
                         f'needs {len(names)}; pick the config of the same YOLOv5 size')
    modules = dict(model.named_modules())
    state = {}
    for name, (kernel, bias) in zip(names, convs):
        target = _mmyolo_name(name)
        weight = torch.from_numpy(np.ascontiguousarray(kernel.transpose(3, 2, 0, 1)))
        bias = torch.from_numpy(bias.copy())
        if target.startswith('bbox_head.'):
            state[f'{target}.weight'], state[f'{target}.bias'] = weight, bias
            continue
        bn = modules[f'{target}.bn']
        state[f'{target}.conv.weight'] = weight
        state[f'{target}.bn.weight'] = torch.ones_like(bias)
        state[f'{target}.bn.bias'] = bias
        state[f'{target}.bn.running_mean'] = torch.zeros_like(bias)
        state[f'{target}.bn.running_var'] = torch.full_like(bias, 1.0 - bn.eps)
        state[f'{target}.bn.num_batches_tracked'] = torch.tensor(0)
    return state
