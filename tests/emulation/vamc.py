"""Fake `vamc compile <yaml>` (tests only): validates the build YAML against the schema of the seeds' files and
writes <workspace.path>/<name>/mod.{so,json,params}, the ONNX in mod.params for the emulated SDK: as it is for fp16,
with int8's error emulated for int8 (each Conv's weights rounded to per-tensor int8, its output through ONNX's
dynamic uint8 quantization), except the convs `backend.quantize.skip_conv_layers` names by their index among the
graph's Conv nodes (with VSX_EMULATION_MISBEHAVE=skip_numbering, counted from 1 instead). `vamc --version`
prints a version line."""
from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import yaml

CALIBRATE_MODES = {'max', 'kl_divergence', 'percentile', 'mse'}
PROCESS_OPS = {'DecodeImage', 'CvtColor', 'Resize', 'Pad', 'Normalize', 'ToTensor'}


def fail(message: str) -> None:
    print(f'vamc: error: {message}', file=sys.stderr)
    sys.exit(1)


def require(mapping: dict, key: str, where: str):
    if not isinstance(mapping, dict) or key not in mapping:
        fail(f'{where}.{key} missing')
    return mapping[key]


def validate(cfg: dict, cwd: Path) -> None:
    if not isinstance(require(cfg, 'name', 'config'), str):
        fail('name must be a string')
    frontend = require(cfg, 'frontend', 'config')
    if not (cwd / require(frontend, 'checkpoint', 'frontend')).is_file():
        fail(f"frontend.checkpoint {frontend['checkpoint']} not found")
    shape = require(frontend, 'shape', 'frontend')
    if not isinstance(shape, dict) or len(shape) != 1 or len(next(iter(shape.values()))) != 4:
        fail('frontend.shape must map the input name to [N, C, H, W]')
    if require(frontend, 'type', 'frontend') != 'onnx' or require(frontend, 'dtype', 'frontend') != 'fp32':
        fail('frontend.type must be onnx and frontend.dtype fp32')
    backend = require(cfg, 'backend', 'config')
    if require(backend, 'type', 'backend') != 'tvm_vacc':
        fail('backend.type must be tvm_vacc')
    dtype = require(backend, 'dtype', 'backend')
    if dtype not in ('fp16', 'int8'):
        fail(f'backend.dtype {dtype}: fp16 or int8')
    require(cfg, 'workspace', 'config')['path']
    if dtype == 'int8':
        quantize = require(backend, 'quantize', 'backend')
        if require(quantize, 'calibrate_mode', 'backend.quantize') not in CALIBRATE_MODES:
            fail(f"backend.quantize.calibrate_mode {quantize['calibrate_mode']}")
        if not isinstance(require(quantize, 'quantize_per_channel', 'backend.quantize'), bool):
            fail('backend.quantize.quantize_per_channel must be a bool')
        skip = quantize.get('skip_conv_layers', [])
        if not isinstance(skip, list) or not all(isinstance(i, int) and i >= 0 for i in skip):
            fail('backend.quantize.skip_conv_layers must be a list of conv indices')
        dataset = require(cfg, 'dataset', 'config')
        path = cwd / require(dataset, 'path', 'dataset')
        sampler = require(dataset, 'sampler', 'dataset')
        found = list(path.glob(f"*.{require(sampler, 'suffix', 'dataset.sampler')}")) if path.is_dir() else []
        if len(found) < require(sampler, 'get_data_num', 'dataset.sampler'):
            fail(f"dataset.path {path}: {len(found)} images, get_data_num {sampler['get_data_num']}")
        ops = [op.get('type') for op in require(dataset, 'process_ops', 'dataset')]
        if not ops or ops[0] != 'DecodeImage' or ops[-1] != 'ToTensor' or not set(ops) <= PROCESS_OPS:
            fail(f'dataset.process_ops {ops}')


def emulated_int8(source: Path, target: Path, skip: set[int]) -> None:
    """The export with int8's error on every Conv but the skipped ones."""
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(source))
    weights = {w.name: w for w in model.graph.initializer}
    nodes, index = [], 0
    for node in model.graph.node:
        nodes.append(node)
        if node.op_type != 'Conv':
            continue
        skipped = (index + 1 if os.environ.get('VSX_EMULATION_MISBEHAVE') == 'skip_numbering' else index) in skip
        index += 1
        if skipped or node.input[1] not in weights:
            continue
        weight = numpy_helper.to_array(weights[node.input[1]])
        scale = max(float(np.abs(weight).max()) / 127, 1e-12)
        weights[node.input[1]].CopyFrom(numpy_helper.from_array((np.round(weight / scale) * scale).astype(weight.dtype),
                                                                node.input[1]))
        output = node.output[0]
        node.output[0] = f'{output}_float'
        nodes += [helper.make_node('DynamicQuantizeLinear', [node.output[0]],
                                   [f'{output}_q', f'{output}_scale', f'{output}_zero']),
                  helper.make_node('DequantizeLinear', [f'{output}_q', f'{output}_scale', f'{output}_zero'], [output])]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    onnx.save(model, str(target))


def main() -> None:
    if sys.argv[1:] == ['--version']:
        print('vamc 3.4.3 (emulated)')
        return
    if len(sys.argv) != 3 or sys.argv[1] != 'compile':
        fail('usage: vamc compile <config.yaml>')
    cwd = Path.cwd()
    cfg = yaml.safe_load(Path(sys.argv[2]).read_text())
    validate(cfg, cwd)
    out = cwd / cfg['workspace']['path'] / cfg['name']
    out.mkdir(parents=True, exist_ok=True)
    print(f"compiling {cfg['frontend']['checkpoint']} to {cfg['backend']['dtype']} (emulated)", flush=True)
    if cfg['backend']['dtype'] == 'int8':
        emulated_int8(cwd / cfg['frontend']['checkpoint'], out / 'mod.params',
                      set(cfg['backend']['quantize'].get('skip_conv_layers', [])))
    else:
        shutil.copyfile(cwd / cfg['frontend']['checkpoint'], out / 'mod.params')
    (out / 'mod.so').write_bytes(b'emulated')
    (out / 'mod.json').write_text(json.dumps({'emulated': True, 'dtype': cfg['backend']['dtype'],
                                              'shape': cfg['frontend']['shape']}))
    print(f'wrote {out}/mod.so, mod.json, mod.params', flush=True)


if __name__ == '__main__':
    main()
