"""ONNX Runtime on the CPU: the reference runtime. fp32 runs the export as is, fp16 converts it (float
inputs/outputs kept), int8 quantizes it statically with onnxruntime.quantization and a calibration set."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np

from common.errors import UserError, check_at_least
from runtime import Artifact

# VastAI's calibration method names -> onnxruntime's calibrators; ORT has no MSE calibrator.
CALIBRATION_METHODS = {'max': 'MinMax', 'kl_divergence': 'Entropy', 'percentile': 'Percentile'}
# onnxruntime's Entropy calibrator defaults to as many histogram bins as quantized bins (128), which leaves the
# KL search a single candidate, the full range (= max); a finer histogram gives it thresholds to choose from.
ENTROPY_BINS = 512
# images per collect_data call: onnxruntime's histogram calibrators hold every activation of every image of a call
# in memory (≈350 MB per 640x640 YOLOv5s image: 100 images at once ran this 24 GB machine out of memory) and merge
# the histograms of successive calls; 16 keeps the default 13 images in one call
CALIBRATION_CHUNK = 16
FLOAT_REFERENCE = 'model_float_reference.onnx'


def has_vnni() -> bool:
    """Whether this CPU has VNNI (AVX512-VNNI or AVX-VNNI), from /proc/cpuinfo's flags."""
    try:
        flags = next((line for line in Path('/proc/cpuinfo').read_text().splitlines() if line.startswith('flags')), '')
    except OSError:
        return False
    return bool({'avx512_vnni', 'avx_vnni'} & set(flags.split()))


class OrtSession:
    """An onnxruntime InferenceSession behind the runtime Session interface."""

    def __init__(self, path: Path, intra_op_threads: int = 0, allow_spinning: bool = True):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_threads
        # spinning threads busy-wait between calls: faster back to back, but they take the cores that
        # the evaluation loop's host work (running beside the call) needs
        options.add_session_config_entry('session.intra_op.allow_spinning', '1' if allow_spinning else '0')
        self.session = ort.InferenceSession(str(path), options, providers=['CPUExecutionProvider'])
        self.input_name = self.session.get_inputs()[0].name
        self.output_names = [o.name for o in self.session.get_outputs()]

    def run(self, batch: np.ndarray) -> list[np.ndarray]:
        return self.session.run(self.output_names, {self.input_name: np.ascontiguousarray(batch, np.float32)})


def module_path(node_name: str) -> str:
    """The module that an exported node belongs to, from its scope: torch's exporter names a child of a
    container `parent.<i>` and, when the container itself runs (Sequential), nests it under the container's
    own scope: `/backbone/stage1/stage1.0/conv/Conv` -> `backbone.stage1.0.conv`."""
    path: list[str] = []
    for scope in node_name.split('/')[1:-1]:
        if path and scope.startswith(path[-1] + '.'):
            path[-1] = scope
        else:
            path.append(scope)
    return '.'.join(path)


def nodes_matching(model, patterns: list[str]) -> list[str]:
    """ONNX node names for `precision.exclude` entries: a node name, or a module name (`neck.reduce_layers.2`)
    matched through the node's scope (module_path) or its weight's name (`…<module>.weight`)."""
    matched = []
    for pattern in patterns:
        hits = [n.name for n in model.graph.node
                if n.name == pattern or f'{module_path(n.name)}.'.startswith(f'{pattern}.')
                or any(i == f'{pattern}.weight' or i.endswith(f'.{pattern}.weight') for i in n.input)]
        if not hits:
            raise UserError(f'precision.exclude: {pattern!r} matches no node of the exported model '
                            '(give an ONNX node name or a module name such as neck.reduce_layers.2)')
        matched += [h for h in hits if h not in matched]
    return matched


def layer_divergence(float_path: Path, int8_path: Path, batches) -> list[dict]:
    """Per Conv of the float export, in execution order: how far the int8 model's values are from the float
    model's on `batches` (a few preprocessed images), at the conv's input and at its output.

    Both models run unoptimized, so the int8 model's QuantizeLinear/DequantizeLinear pairs act as written (QDQ:
    the int8 arithmetic simulated in float, what onnxruntime's own qdq_loss_debug compares). SQNR is
    10 log10(|float|² / |float - int8|²) over all the images (None where the values are exact); `added_noise`
    (relative noise power at the output minus at the input) is what the layer itself adds, which ranks the
    candidates for keeping in float."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    def tapped(path: Path, tensors: list[str]) -> ort.InferenceSession:
        model = onnx.load(str(path))
        present = {o.name for o in model.graph.output}
        model.graph.output.extend(helper.make_tensor_value_info(t, TensorProto.FLOAT, None)
                                  for t in dict.fromkeys(tensors) if t not in present)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        return ort.InferenceSession(model.SerializeToString(), options, providers=['CPUExecutionProvider'])

    float_graph, int8_graph = onnx.load(str(float_path)).graph, onnx.load(str(int8_path)).graph
    float_producers = {o: n for n in float_graph.node for o in n.output}
    producers = {o: n for n in int8_graph.node for o in n.output}
    int8_convs = {n.name: n for n in int8_graph.node if n.op_type == 'Conv'}
    layers = [(n, int8_convs[n.name]) for n in float_graph.node if n.op_type == 'Conv' and n.name in int8_convs]

    def conv_input(conv, producers: dict) -> str:
        """The conv's input in the export's layout: before a SpaceToDepth the int8 build put in front of it."""
        tensor = conv.input[0]
        for _ in range(3):
            node = producers.get(tensor)
            if node is None or node.op_type not in ('DequantizeLinear', 'QuantizeLinear', 'SpaceToDepth'):
                break
            if node.op_type == 'SpaceToDepth':
                return node.input[0]
            tensor = node.input[0]
        return conv.input[0]

    def inputs(f, q) -> tuple[str, str]:
        return conv_input(f, float_producers), conv_input(q, producers)

    if not layers:
        raise UserError('precision.layers_report: the int8 model keeps no Conv of the export by name (it needs '
                        'precision.format=qdq)')
    sessions = (tapped(float_path, [t for f, q in layers for t in (inputs(f, q)[0], f.output[0])]),
                tapped(int8_path, [t for f, q in layers for t in (inputs(f, q)[1], q.output[0])]))
    sums = np.zeros((len(layers), 2, 3))  # per layer, input/output: |float|², |float - int8|², float . int8
    norms = np.zeros((len(layers), 2))  # |int8|²
    for batch in batches:
        values = []
        for session in sessions:
            names = [o.name for o in session.get_outputs()]
            values.append(dict(zip(names, session.run(None, {session.get_inputs()[0].name: batch}))))
        for k, (f, q) in enumerate(layers):
            for side, (a, b) in enumerate((inputs(f, q), (f.output[0], q.output[0]))):
                x, y = values[0][a].astype(np.float64).ravel(), values[1][b].astype(np.float64).ravel()
                sums[k, side] += ((x * x).sum(), ((x - y) ** 2).sum(), (x * y).sum())
                norms[k, side] += (y * y).sum()
    eps = np.finfo(np.float64).tiny
    noise = sums[..., 1] / np.maximum(sums[..., 0], eps)  # relative noise power, 0 where exact
    cosine = sums[..., 2] / np.maximum(np.sqrt(sums[..., 0] * norms), eps)

    def decibels(value: float) -> float | None:
        return None if value == 0 else round(float(-10 * np.log10(value)), 3)

    return [{'node': f.name, 'module': module_path(f.name),
             'quantized': producers.get(q.input[0]) is not None and producers[q.input[0]].op_type == 'DequantizeLinear',
             'sqnr_db': decibels(noise[k, 1]), 'cosine': round(float(cosine[k, 1]), 6),
             'input_sqnr_db': decibels(noise[k, 0]), 'added_noise': round(float(noise[k, 1] - noise[k, 0]), 6)}
            for k, (f, q) in enumerate(layers)]


def space_to_depth_convs(model) -> list[str]:
    """Rewrite each stride-2 Conv on fewer than 4 input channels whose kernel and pads are even (YOLOv5's 6x6
    stem) as SpaceToDepth(2) and a Conv of half the kernel, stride 1, on 4x the channels; returns their names.

    The same sums of the same products (weights regrouped), so the same model; but ONNX Runtime's int8 conv
    handles 3 input channels by a slow path (8.8 ms for YOLOv5s's stem, against 4.4 ms in fp32) and 12 by its
    VNNI kernels (2.3 ms). A Conv keeps its name, so `precision.exclude` finds it as before."""
    from onnx import helper, numpy_helper

    initializers = {i.name: i for i in model.graph.initializer}
    rewritten, nodes = [], []
    for node in model.graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        weight = node.input[1] if node.op_type == 'Conv' and len(node.input) > 1 else None
        w = numpy_helper.to_array(initializers[weight]) if weight in initializers else None
        pads = list(attrs.get('pads', [0, 0, 0, 0]))
        plain = (attrs.get('group', 1) == 1 and attrs.get('auto_pad', b'NOTSET') == b'NOTSET'
                 and all(d == 1 for d in attrs.get('dilations', [1, 1])))
        if (w is None or not plain or w.ndim != 4 or w.shape[1] >= 4 or list(attrs.get('strides', [1, 1])) != [2, 2]
                or any(n % 2 for n in [*w.shape[2:], *pads])):
            nodes.append(node)
            continue
        height, width = w.shape[2:]
        # SpaceToDepth puts input pixel (2i + dy, 2j + dx) of channel c at channel (2 dy + dx) * C + c of (i, j)
        regrouped = np.concatenate([w[:, :, dy::2, dx::2] for dy in (0, 1) for dx in (0, 1)], axis=1)
        model.graph.initializer.append(numpy_helper.from_array(regrouped, f'{weight}_space_to_depth'))
        blocks = f'{node.name}_space_to_depth_output'
        nodes.append(helper.make_node('SpaceToDepth', [node.input[0]], [blocks], name=f'{node.name}_space_to_depth',
                                      blocksize=2))
        nodes.append(helper.make_node('Conv', [blocks, f'{weight}_space_to_depth', *node.input[2:]], list(node.output),
                                      name=node.name, kernel_shape=[height // 2, width // 2], strides=[1, 1],
                                      pads=[p // 2 for p in pads]))
        rewritten.append(node.name)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return rewritten


def equalize_output_channels(model, session_path: Path, reader, modules: list[str]) -> list[str]:
    """Scale the output channels of the named modules' Convs to one range, undone by a float Mul after each.

    A raw map that stacks box offsets and class logits in one tensor gets one activation range spanning both,
    too coarse for each; with every channel scaled to a largest magnitude of 1 over the calibration images, the
    single range fits every channel, as per-channel output ranges would. A module that runs once per level is
    one weight shared by several Convs: they share the scales. `model` (saved at `session_path`) is changed in
    place; the Conv outputs must be graph outputs (raw maps are). Returns the Mul nodes, to keep in float."""
    import onnxruntime as ort
    from onnx import helper, numpy_helper

    matched = set(nodes_matching(model, modules))
    shared = {}  # weight name -> its Convs
    for node in model.graph.node:
        if node.name in matched and node.op_type == 'Conv':
            shared.setdefault(node.input[1], []).append(node)
    outputs = [conv.output[0] for convs in shared.values() for conv in convs]
    session = ort.InferenceSession(str(session_path), providers=['CPUExecutionProvider'])
    largest = dict.fromkeys(outputs, 0.0)
    reader.rewind()
    while (inputs := reader.get_next()) is not None:
        for name, value in zip(outputs, session.run(outputs, inputs)):
            largest[name] = np.maximum(largest[name], np.abs(value).max(axis=(0, 2, 3)))
    reader.rewind()
    initializers = {i.name: i for i in model.graph.initializer}
    rescales = []
    for weight, convs in shared.items():
        magnitude = np.max([largest[conv.output[0]] for conv in convs], axis=0)
        magnitude = np.where(magnitude > 0, magnitude, 1).astype(np.float32)
        for name in convs[0].input[1:]:  # weight and bias
            array = numpy_helper.to_array(initializers[name])
            scaled = array / magnitude.reshape(-1, *[1] * (array.ndim - 1))
            initializers[name].CopyFrom(numpy_helper.from_array(scaled.astype(array.dtype), name))
        scale = f'{weight}.channel_magnitude'
        model.graph.initializer.append(numpy_helper.from_array(magnitude.reshape(1, -1, 1, 1), scale))
        for conv in convs:
            output = conv.output[0]
            conv.output[0] = f'{output}_equalized'
            rescale = helper.make_node('Mul', [conv.output[0], scale], [output], name=f'{conv.name}_rescale')
            model.graph.node.insert(list(model.graph.node).index(conv) + 1, rescale)
            rescales.append(rescale.name)
    return rescales


def fold_rescales_into_dequantize(model, rescales: list[str]) -> list[str]:
    """Fold each equalization rescale (a float Mul by a per-channel constant right after a per-tensor
    DequantizeLinear that feeds nothing else) into that DequantizeLinear, made per-channel (axis 1) with the
    product of the two scales: one pass over the raw map instead of two (the values differ by float rounding
    only). `model` (quantized, opset >= 13) is changed in place; returns the Muls folded."""
    from onnx import helper, numpy_helper

    initializers = {i.name: i for i in model.graph.initializer}
    producers = {out: node for node in model.graph.node for out in node.output}
    # how many nodes, and graph outputs, read each tensor
    readers = Counter([i for node in model.graph.node for i in node.input] + [o.name for o in model.graph.output])
    folded, replaced = [], set()
    wanted = set(rescales)
    for mul in [n for n in model.graph.node if n.name in wanted]:
        dequantize = producers.get(mul.input[0])
        if (dequantize is None or dequantize.op_type != 'DequantizeLinear' or readers[mul.input[0]] != 1
                or not all(name in initializers for name in dequantize.input[1:3]) or mul.input[1] not in initializers):
            continue
        scale = numpy_helper.to_array(initializers[dequantize.input[1]])
        zero_point = numpy_helper.to_array(initializers[dequantize.input[2]])
        magnitude = numpy_helper.to_array(initializers[mul.input[1]]).reshape(-1)
        if scale.size != 1 or zero_point.size != 1:
            continue
        names = (f'{dequantize.name}_channel_scale', f'{dequantize.name}_channel_zero_point')
        model.graph.initializer.extend([
            numpy_helper.from_array((scale.reshape(()) * magnitude).astype(np.float32), names[0]),
            numpy_helper.from_array(np.full(magnitude.shape, zero_point.reshape(()), zero_point.dtype), names[1])])
        replaced.update([*dequantize.input[1:3], mul.input[1]])
        dequantize.input[1:3] = names
        del dequantize.attribute[:]
        dequantize.attribute.append(helper.make_attribute('axis', 1))
        dequantize.output[0] = mul.output[0]
        model.graph.node.remove(mul)
        folded.append(mul.name)
    used = {name for node in model.graph.node for name in node.input}
    for initializer in [i for i in model.graph.initializer if i.name in replaced - used]:
        model.graph.initializer.remove(initializer)
    return folded


class Runtime:
    """ONNX Runtime, CPU execution provider."""

    name = 'onnx'

    def __init__(self, precision: dict, intra_op_threads: int = 0, allow_spinning: bool = False,
                 int8_space_to_depth: bool = True, int8_reduce_range: bool | None = None):
        check_at_least('runtime.intra_op_threads', intra_op_threads, 0)
        self.precision = dict(precision)
        self.intra_op_threads = intra_op_threads
        self.allow_spinning = allow_spinning
        self.int8_space_to_depth = int8_space_to_depth
        # ONNX Runtime's uint8 x int8 kernels without VNNI (AVX2, AVX512F) add pairs of products in int16 and
        # saturate: on such a CPU YOLOv5s int8 lost 3.1 points on coco128 with 8-bit weights and 0.6 with 7-bit
        # ones; with VNNI the sums are exact, 8 bits are kept
        self.int8_reduce_range = (not has_vnni()) if int8_reduce_range is None else int8_reduce_range
        if self.precision['name'] not in ('fp32', 'fp16', 'int8'):
            raise UserError(f"precision={self.precision['name']}: runtime=onnx supports fp32, fp16, int8")
        if self.precision['name'] == 'int8':
            calibration = self.precision['calibration']
            if calibration['method'] not in CALIBRATION_METHODS:
                raise UserError(f"precision.calibration.method={calibration['method']}: runtime=onnx supports "
                                f'{", ".join(CALIBRATION_METHODS)}')
            if not 0 < calibration['percentile'] <= 100:
                raise UserError(f"precision.calibration.percentile={calibration['percentile']}: "
                                'must be in (0, 100]')

    @staticmethod
    def version() -> str:
        import onnxruntime
        return onnxruntime.__version__

    def resolved_options(self) -> dict:
        """Options decided here rather than in the config (so they belong in the cache key)."""
        return {'int8_reduce_range': self.int8_reduce_range}

    def build(self, onnx_path: Path, out_dir: Path, calibration=None, keep_float: list[str] = (),
              equalize: list[str] = (), preprocessing=None, shape=None, select_float=None) -> Artifact:
        """The model file to run: the export itself (fp32), an fp16 copy, or a statically quantized copy, with
        the `keep_float` modules in float and the `equalize` convs' output channels scaled to one range (see
        equalize_output_channels). (`preprocessing` and `shape` are for runtimes that preprocess on the device;
        ORT runs on the host's.) `select_float(quantize, float_model, excluded)` -> (node names, search report)
        chooses more convs to keep in float, given `quantize(nodes, path)` that builds such an int8 model."""
        import onnx

        name = self.precision['name']
        if name == 'fp32':
            return Artifact(onnx_path, {'name': 'fp32'})
        if name == 'fp16':
            from onnxruntime.transformers.float16 import convert_float_to_float16

            out = out_dir / 'model_fp16.onnx'
            onnx.save(convert_float_to_float16(onnx.load(str(onnx_path)), keep_io_types=True), str(out))
            return Artifact(out, {'name': 'fp16', 'io': 'float32'})
        return self._quantize(onnx_path, out_dir, calibration, list(keep_float), list(equalize), select_float,
                              keep_reference=bool(self.precision.get('layers_report') or select_float))

    def _quantize(self, onnx_path: Path, out_dir: Path, calibration, keep_float: list[str],
                  equalize: list[str], select_float=None, keep_reference: bool = False) -> Artifact:
        import onnx
        from onnxruntime.quantization import (
            CalibrationMethod,
            QuantFormat,
            QuantType,
            quant_pre_process,
            quantize_static,
        )
        from onnxruntime.quantization.calibrate import save_tensors_data

        if calibration is None:
            raise ValueError('int8 needs a calibration reader')
        p = self.precision
        opset = next(o.version for o in onnx.load(str(onnx_path)).opset_import if o.domain in ('', 'ai.onnx'))
        if p['per_channel'] and opset < 13:
            raise UserError(f'export.opset={opset}: per-channel int8 (precision.per_channel=true) needs opset 13 or '
                            'later for per-axis QuantizeLinear; raise export.opset or set precision.per_channel=false')
        symmetric = bool(p['activation_symmetric'])
        method = getattr(CalibrationMethod, CALIBRATION_METHODS[p['calibration']['method']])
        prepared = out_dir / 'model_prep.onnx'
        quant_pre_process(str(onnx_path), str(prepared), skip_symbolic_shape=True)
        model = onnx.load(str(prepared))
        rescales = []
        if equalize:
            rescales = equalize_output_channels(model, prepared, calibration, equalize)
            onnx.save(model, str(prepared))
        tensor_ranges = self._calibrate(prepared, calibration, method, symmetric)
        # rewritten after calibration, so the int8 model is the same: the float conv's other summation order would
        # shift every range a little (and the mAP by a point either way); SpaceToDepth moves values, so its output
        # takes its input's range
        regrouped = space_to_depth_convs(model) if self.int8_space_to_depth else []
        if regrouped:
            for node in model.graph.node:
                if node.op_type == 'SpaceToDepth' and node.output[0] not in tensor_ranges.data:
                    tensor_ranges.data[node.output[0]] = tensor_ranges.data[node.input[0]]
            onnx.save(model, str(prepared))
        ranges = out_dir / 'calibration.json'
        save_tensors_data(tensor_ranges, ranges)
        excluded = nodes_matching(model, [*keep_float, *p['exclude']]) + rescales
        out = out_dir / 'model_int8.onnx'

        def quantize(extra: list[str], path: Path) -> list[str]:
            """The int8 model with `extra` nodes also kept in float, at `path`; the rescales folded into it."""
            quantize_static(
                str(prepared), str(path), calibration_data_reader=None, calibration_cache_path=str(ranges),
                quant_format=QuantFormat.QDQ if p['format'] == 'qdq' else QuantFormat.QOperator,
                per_channel=bool(p['per_channel']),
                activation_type=QuantType.QInt8 if symmetric else QuantType.QUInt8,
                weight_type=QuantType.QInt8, calibrate_method=method, nodes_to_exclude=[*excluded, *extra],
                reduce_range=self.int8_reduce_range,
                extra_options={'ActivationSymmetric': symmetric, 'WeightSymmetric': True})
            folded = []
            if rescales and opset >= 13:  # per-axis DequantizeLinear
                quantized = onnx.load(str(path))
                if folded := fold_rescales_into_dequantize(quantized, rescales):
                    onnx.save(quantized, str(path))
            return folded

        chosen, search = [], None
        if select_float is not None:  # precision.max_drop: the caller's search, over this build's convs
            chosen, search = select_float(quantize, prepared, excluded)
        folded = quantize(chosen, out)
        files = {}
        if keep_reference:  # the float model the int8 one is quantized from (exact rewrites), for layer reports
            prepared.rename(out_dir / FLOAT_REFERENCE)
            files['float_reference'] = FLOAT_REFERENCE
        else:
            prepared.unlink()
        return Artifact(out, {'name': 'int8', 'method': p['calibration']['method'],
                              'num_images': len(calibration.paths), 'calibration_ranges': ranges.name,
                              'excluded_nodes': excluded, 'equalized_convs': equalize,
                              'space_to_depth_convs': regrouped, 'folded_rescales': folded,
                              'per_channel': bool(p['per_channel']), 'format': p['format'],
                              'activation_symmetric': symmetric,
                              'percentile': float(p['calibration']['percentile']),
                              'reduce_range': self.int8_reduce_range,
                              'float_layers': [{'node': n, 'module': module_path(n)} for n in chosen],
                              'search': search}, files=files)

    def _calibrate(self, model: Path, reader, method, symmetric: bool):
        """Activation ranges (TensorsData) from the calibration images, with onnxruntime's calibrators."""
        import tempfile

        from onnxruntime.quantization.calibrate import create_calibrator

        options = {'symmetric': symmetric, 'percentile': float(self.precision['calibration']['percentile']),
                   'num_bins': ENTROPY_BINS if method.name == 'Entropy' else 2048}
        with tempfile.TemporaryDirectory(prefix='inloop-calib-') as tmp:
            calibrator = create_calibrator(model, None, augmented_model_path=str(Path(tmp) / 'augmented.onnx'),
                                           calibrate_method=method, extra_options=options)
            for start in range(0, len(reader.paths), CALIBRATION_CHUNK):
                reader.set_range(start, start + CALIBRATION_CHUNK)
                calibrator.collect_data(reader)
            reader.rewind()
            return calibrator.compute_data()

    def load(self, artifact: Artifact) -> OrtSession:
        return OrtSession(artifact.path, self.intra_op_threads, self.allow_spinning)

    def profile(self, artifact: Artifact, batch: np.ndarray, iterations: int) -> list[dict]:
        """Each node's mean kernel time per call over `iterations` calls on `batch`, from ONNX Runtime's profiler
        (its `<node>_kernel_time` events), with the operator that ran it and the type of its first input
        (bench.profile)."""
        import json
        import tempfile

        import onnxruntime as ort

        with tempfile.TemporaryDirectory(prefix='inloop-profile-') as tmp:
            options = ort.SessionOptions()
            options.intra_op_num_threads = self.intra_op_threads
            options.add_session_config_entry('session.intra_op.allow_spinning', '1' if self.allow_spinning else '0')
            options.enable_profiling = True
            options.profile_file_prefix = f'{tmp}/ort'
            session = ort.InferenceSession(str(artifact.path), options, providers=['CPUExecutionProvider'])
            feed = {session.get_inputs()[0].name: np.ascontiguousarray(batch, np.float32)}
            for _ in range(iterations + 1):  # the first call is a warm-up, left out below
                session.run(None, feed)
            events = json.loads(Path(session.end_profiling()).read_text())
        nodes: dict = {}
        calls: Counter = Counter()
        for event in events:
            if event.get('cat') != 'Node' or not event['name'].endswith('_kernel_time'):
                continue
            name, args = event['name'].removesuffix('_kernel_time'), event['args']
            calls[name] += 1
            if calls[name] == 1:  # the warm-up call
                inputs = args.get('input_type_shape') or [{'': None}]
                nodes[name] = {'node': name, 'layer_type': args.get('op_name', ''),
                               'kernel': args.get('provider', ''), 'precision': next(iter(inputs[0])), 'ms': 0.0}
            else:
                nodes[name]['ms'] += event['dur'] / 1000 / iterations
        return list(nodes.values())
