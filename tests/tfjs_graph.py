"""A small interpreter for the TF.js YOLOv5s graph, used as the independent oracle of the weight conversion.

It executes the graph's own nodes (NHWC, TensorFlow semantics) with torch primitives, so the test compares the
converted mmyolo model against what the TF.js model itself computes, not against our reading of it.
"""
import base64
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from integrations.assets.yolov5_tfjs import read_tfjs_weights


def _attr_str(attr, key):
    return base64.b64decode(attr[key]['s']).decode()


def _ints(attr, key):
    return [int(i) for i in attr[key]['list']['i']]


def _nchw(x):
    return x.permute(0, 3, 1, 2)


def _nhwc(x):
    return x.permute(0, 2, 3, 1)


def _same_pad(size, kernel, stride):
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def _conv(x, kernel, bias, attr):
    if _attr_str(attr, 'data_format') != 'NHWC' or _ints(attr, 'dilations') != [1, 1, 1, 1]:
        raise NotImplementedError('only NHWC undilated convolutions')
    stride = _ints(attr, 'strides')[1]
    w = kernel.permute(3, 2, 0, 1)
    x = _nchw(x)
    if _attr_str(attr, 'padding') == 'SAME':
        top, bottom = _same_pad(x.shape[2], w.shape[2], stride)
        left, right = _same_pad(x.shape[3], w.shape[3], stride)
        x = F.pad(x, (left, right, top, bottom))
    return _nhwc(F.conv2d(x, w, bias, stride=stride))


def _max_pool(x, attr):
    k, s = _ints(attr, 'ksize')[1], _ints(attr, 'strides')[1]
    assert _attr_str(attr, 'padding') == 'SAME' and s == 1
    return _nhwc(F.max_pool2d(_nchw(x), k, 1, padding=k // 2))


def _strided_slice(x, begin, end, strides, attr):
    """TF StridedSlice restricted to what the graph uses: an ellipsis plus plain per-axis slices."""
    masks = {k: int(attr.get(k, {}).get('i', 0)) for k in
             ('begin_mask', 'end_mask', 'ellipsis_mask', 'new_axis_mask', 'shrink_axis_mask')}
    assert masks['new_axis_mask'] == 0 and masks['shrink_axis_mask'] == 0
    index = []
    for i, (b, e, s) in enumerate(zip(begin.tolist(), end.tolist(), strides.tolist())):
        if masks['ellipsis_mask'] >> i & 1:
            index.append(Ellipsis)
            continue
        index.append(slice(None if masks['begin_mask'] >> i & 1 else b,
                           None if masks['end_mask'] >> i & 1 else e, s))
    return x[tuple(index)]


class TfjsGraph:
    """Executes a TF.js graph-model directory on float32 NHWC input."""

    def __init__(self, model_dir):
        model_dir = Path(model_dir)
        topology = json.loads((model_dir / 'model.json').read_text())['modelTopology']
        self.nodes = _topological(topology['node'])
        self.consts = {k: torch.from_numpy(v.copy()) for k, v in read_tfjs_weights(model_dir).items()}

    @torch.no_grad()
    def __call__(self, image_nhwc: np.ndarray) -> np.ndarray:
        values = dict(self.consts)
        for node in self.nodes:
            op, attr = node['op'], node.get('attr', {})
            args = [values[name.split(':')[0]] for name in node.get('input', [])]
            if op == 'Const':
                continue
            if op == 'Placeholder':
                out = torch.from_numpy(image_nhwc)
            elif op == '_FusedConv2D':
                fused = [base64.b64decode(s).decode() for s in attr['fused_ops']['list']['s']]
                assert fused == ['BiasAdd'], fused
                out = _conv(args[0], args[1], args[2], attr)
            elif op == 'Pad':
                pads = args[1].tolist()  # [[before, after]] per NHWC axis
                out = F.pad(args[0], [p for axis in reversed(pads) for p in axis])
            elif op in ('Mul',):
                out = args[0] * args[1]
            elif op in ('Add', 'AddV2'):
                out = args[0] + args[1]
            elif op == 'RealDiv':
                out = args[0] / args[1]
            elif op == 'Sub':
                out = args[0] - args[1]
            elif op == 'Sigmoid':
                out = torch.sigmoid(args[0])
            elif op == 'Square':
                out = args[0] * args[0]
            elif op == 'ConcatV2':
                out = torch.cat(args[:-1], dim=int(args[-1]))
            elif op == 'MaxPool':
                out = _max_pool(args[0], attr)
            elif op == 'ResizeNearestNeighbor':
                h, w = args[1].tolist()
                assert h % args[0].shape[1] == 0 and w % args[0].shape[2] == 0
                out = _nhwc(F.interpolate(_nchw(args[0]), size=(h, w), mode='nearest'))
            elif op == 'Reshape':
                out = args[0].reshape(args[1].tolist())
            elif op == 'Transpose':
                out = args[0].permute(args[1].tolist())
            elif op == 'StridedSlice':
                out = _strided_slice(args[0], args[1], args[2], args[3], attr)
            elif op == 'Identity':
                out = args[0]
            else:
                raise NotImplementedError(f'TF.js op {op} ({node["name"]})')
            values[node['name']] = out
        return values['Identity'].numpy()


def _topological(nodes):
    """Nodes ordered so that every input comes before its consumer."""
    by_name = {n['name']: n for n in nodes}
    ordered, seen = [], set()

    def visit(name):
        stack = [(name, False)]
        while stack:
            current, expanded = stack.pop()
            if current in seen:
                continue
            if expanded:
                seen.add(current)
                ordered.append(by_name[current])
                continue
            stack.append((current, True))
            stack += [(i.split(':')[0], False) for i in by_name[current].get('input', [])
                      if i.split(':')[0] not in seen]

    for node in nodes:
        visit(node['name'])
    return ordered
