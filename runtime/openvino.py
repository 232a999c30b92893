"""OpenVINO: the export converted to OpenVINO's IR (xml + bin) and compiled for a device (CPU here; GPU, NPU and
AUTO where the machine has them). fp16 stores the weights in f16 and asks the device for f16 inference where it
has it; int8 is NNCF's post-training quantization on inloop's calibration images, the convs the config keeps in
float (precision.raw_map_convs, precision.exclude) left out through NNCF's ignored scope."""
from __future__ import annotations

import tempfile
from collections import Counter
from pathlib import Path

import numpy as np

from common.errors import UserError, check_at_least
from runtime import Artifact

DEVICES = ('CPU', 'GPU', 'NPU', 'AUTO')
# VastAI's calibration method names -> NNCF's activation range estimators; NNCF has no KL-divergence estimator.
# max: the smallest and largest value over all images (ORT's MinMax); percentile: the percentile of each image's
# values, averaged over the images (ORT takes it over one histogram of all images); mse: NNCF's histogram search
# for the range with the least quantization error (torch's HistogramObserver, an L2 criterion)
CALIBRATION_METHODS = ('max', 'percentile', 'mse')


def available_devices() -> list[str]:
    import openvino as ov
    return list(ov.Core().available_devices)


def check_device(device: str) -> None:
    """One error line naming the devices OpenVINO sees, for a device this machine does not have."""
    kind = device.split('.')[0]
    if kind not in DEVICES:
        raise UserError(f"runtime.device={device}: not an OpenVINO device; use one of {', '.join(DEVICES)}")
    if kind == 'AUTO':
        return
    present = available_devices()
    if not any(d == device or d.split('.')[0] == device for d in present):
        raise UserError(f"runtime.device={device}: OpenVINO sees no such device on this machine (it has "
                        f"{', '.join(present) or 'none'}); set runtime.device to one of them")


def range_estimator(calibration: dict):
    """NNCF's activation range estimator for the configured calibration method."""
    from nncf.quantization.range_estimator import (
        AggregatorType,
        RangeEstimatorParameters,
        RangeEstimatorParametersSet,
        StatisticsCollectorParameters,
        StatisticsType,
    )

    method = calibration['method']
    if method == 'max':
        return RangeEstimatorParametersSet.MINMAX
    if method == 'mse':
        return RangeEstimatorParametersSet.HISTOGRAM
    outlier = 1 - float(calibration['percentile']) / 100
    return RangeEstimatorParameters(
        min=StatisticsCollectorParameters(StatisticsType.QUANTILE, AggregatorType.MEAN, quantile_outlier_prob=outlier),
        max=StatisticsCollectorParameters(StatisticsType.QUANTILE, AggregatorType.MEAN, quantile_outlier_prob=outlier))


class CalibrationImages:
    """The calibration reader as an iterable NNCF can pass over more than once (statistics, then bias
    correction): each pass rewinds it and yields the preprocessed batches."""

    def __init__(self, reader):
        self.reader = reader

    def __iter__(self):
        self.reader.rewind()
        while (inputs := self.reader.get_next()) is not None:
            yield next(iter(inputs.values()))

    def __len__(self) -> int:
        return len(self.reader.paths)


def runtime_layers(compiled) -> list[dict]:
    """What the compiled model actually runs, read back from the device: each executed layer in order, with the
    converted model's operations it runs (OpenVINO's names, see ov_names), its type, runtime precision and the
    kernel that ran it (the runtime model's rt_info: originalLayersNames, layerType, runtimePrecision,
    primitiveType)."""
    layers = []
    for op in compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        layers.append({'name': op.get_friendly_name(),
                       'operations': [n for n in info['originalLayersNames'].astype(str).split(',') if n],
                       'layer_type': info['layerType'].astype(str), 'precision': info['runtimePrecision'].astype(str),
                       'kernel': info['primitiveType'].astype(str)})
    return layers


def ov_names(onnx_model, nodes: list[str], model) -> list[str]:
    """The operations OpenVINO's ONNX frontend made of `nodes`, by name: a Conv with a bias becomes a Convolution
    `<node>/WithoutBiases` and an Add `<node>`, and the node that writes a graph output (a raw map's conv) is named
    by that output instead."""
    outputs = {o.name for o in onnx_model.graph.output}
    by_name = {n.name: n for n in onnx_model.graph.node}
    operations = [op.get_friendly_name() for op in model.get_ops()
                  if op.get_type_name() not in ('Constant', 'Parameter', 'Result')]
    names = []
    for node in nodes:
        own = {node, *(o for o in by_name[node].output if o in outputs)}
        found = [name for name in operations if name in own or any(name.startswith(f'{o}/') for o in own)]
        if not found:
            raise RuntimeError(f'OpenVINO names no operation of the converted model after {node!r}; the nodes kept '
                               'in float would be quantized')
        names += found
    return names


class OpenVinoSession:
    """A compiled OpenVINO model behind the runtime Session interface: float32 NCHW in, the raw maps out."""

    def __init__(self, path: Path, device: str, config: dict):
        import openvino as ov

        self.device = device
        self.compiled = ov.Core().compile_model(str(path), device, config)
        self.request = self.compiled.create_infer_request()
        self.outputs = len(self.compiled.outputs)

    def run(self, batch: np.ndarray) -> list[np.ndarray]:
        self.request.infer({0: np.ascontiguousarray(batch, np.float32)})
        return [self.request.get_output_tensor(i).data.copy() for i in range(self.outputs)]

    def layers(self) -> list[dict]:
        return runtime_layers(self.compiled)

    def report(self) -> dict:
        """What the device runs, read back from the compiled model: the device(s) it runs on, the precision of its
        floating-point layers and how many of its convolutions ran in each precision."""
        convolutions = Counter(layer['precision'] for layer in self.layers()
                               if layer['layer_type'] == 'Convolution')
        return {'device': self.device, 'execution_devices': list(self.compiled.get_property('EXECUTION_DEVICES')),
                'inference_precision': self.inference_precision(),
                'convolutions_by_precision': dict(sorted(convolutions.items()))}

    def inference_precision(self) -> str | None:
        """The compiled model's INFERENCE_PRECISION_HINT; None where it does not say (AUTO's compiled model)."""
        try:
            return self.compiled.get_property('INFERENCE_PRECISION_HINT').to_string()
        except RuntimeError:
            return None


class Runtime:
    """OpenVINO, compiled for `device`."""

    name = 'openvino'

    def __init__(self, precision: dict, device: str = 'CPU', threads: int = 0,
                 performance_hint: str = 'LATENCY'):
        check_at_least('runtime.threads', threads, 0)
        self.precision = dict(precision)
        self.device = device
        self.threads = threads
        self.performance_hint = performance_hint
        name = self.precision['name']
        if name not in ('fp32', 'fp16', 'int8'):
            raise UserError(f'precision={name}: runtime=openvino supports fp32, fp16, int8')
        if name == 'int8':
            method = self.precision['calibration']['method']
            if method not in CALIBRATION_METHODS:
                raise UserError(f'precision.calibration.method={method}: NNCF has no counterpart; runtime=openvino '
                                f"supports {', '.join(CALIBRATION_METHODS)}")
            if not 0 < self.precision['calibration']['percentile'] <= 100:
                raise UserError(f"precision.calibration.percentile={self.precision['calibration']['percentile']}: "
                                'must be in (0, 100]')
            if self.precision['format'] != 'qdq':
                raise UserError(f"precision.format={self.precision['format']}: runtime=openvino quantizes with "
                                'NNCF (FakeQuantize, the qdq form); remove the option')
        check_device(device)

    @staticmethod
    def version() -> str:
        import nncf
        import openvino
        return f'{openvino.__version__} (nncf {nncf.__version__})'

    def compile_config(self) -> dict:
        """compile_model's properties: the precision asked of the device (fp32 pinned: a CPU with AMX or
        avx512_bf16 would otherwise run bf16), threads, the performance hint."""
        config = {'PERFORMANCE_HINT': self.performance_hint,
                  'INFERENCE_PRECISION_HINT': 'f16' if self.precision['name'] == 'fp16' else 'f32'}
        if self.threads:
            config['INFERENCE_NUM_THREADS'] = self.threads
        if self.precision['name'] == 'fp16' and self.device != 'AUTO' and not self._supports_f16():
            del config['INFERENCE_PRECISION_HINT']  # AUTO hands the hint on to the device it picks
        return config

    def _supports_f16(self) -> bool:
        import openvino as ov
        return 'FP16' in ov.Core().get_property(self.device, 'OPTIMIZATION_CAPABILITIES')

    def build(self, onnx_path: Path, out_dir: Path, calibration=None, keep_float=(), equalize=(),
              preprocessing=None, shape=None, select_float=None) -> Artifact:
        """The export as IR: as is (fp32), with f16 weights (fp16), or quantized by NNCF (int8).
        (`preprocessing` and `shape` are for runtimes that preprocess on the device.)"""
        import openvino as ov

        name = self.precision['name']
        model = ov.convert_model(str(onnx_path))
        info: dict = {'name': name, 'device': self.device}
        if name == 'int8':
            model, info = self._quantize(onnx_path, model, calibration, list(keep_float), list(equalize), info)
        out = out_dir / f'model_{name}.xml'  # beside the fp32 reference explain builds
        ov.save_model(model, str(out), compress_to_fp16=name == 'fp16')
        if name == 'fp16':
            info['weights'] = 'f16'
        return Artifact(out, info, files={'openvino_bin': out.with_suffix('.bin').name})

    def _quantize(self, onnx_path: Path, model, calibration, keep_float: list[str], equalize: list[str],
                  info: dict):
        import nncf
        import onnx
        import openvino as ov
        from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, QuantizationParameters

        from runtime.onnx import equalize_output_channels, nodes_matching

        if calibration is None:
            raise ValueError('int8 needs a calibration reader')
        p = self.precision
        export = onnx.load(str(onnx_path))
        float_nodes = nodes_matching(export, [*keep_float, *p['exclude']])
        if equalize:  # the same rewrite as runtime=onnx's, its rescales kept in float
            float_nodes += equalize_output_channels(export, onnx_path, calibration, equalize)
            with tempfile.TemporaryDirectory(prefix='inloop-ov-') as tmp:
                onnx.save(export, f'{tmp}/model.onnx')
                model = ov.convert_model(f'{tmp}/model.onnx')
        ignored = ov_names(export, float_nodes, model)
        advanced = AdvancedQuantizationParameters(
            activations_range_estimator_params=range_estimator(p['calibration']),
            weights_quantization_params=None if p['per_channel'] else QuantizationParameters(per_channel=False))
        preset = nncf.QuantizationPreset.PERFORMANCE if p['activation_symmetric'] else nncf.QuantizationPreset.MIXED
        quantized = nncf.quantize(model, nncf.Dataset(CalibrationImages(calibration)), preset=preset,
                                  subset_size=len(calibration.paths),
                                  ignored_scope=nncf.IgnoredScope(names=ignored) if ignored else None,
                                  advanced_parameters=advanced)
        calibration.rewind()
        return quantized, {**info, 'quantizer': 'nncf', 'method': p['calibration']['method'],
                           'num_images': len(calibration.paths), 'float_nodes': float_nodes, 'ignored_scope': ignored,
                           'equalized_convs': equalize, 'per_channel': bool(p['per_channel']),
                           'activation_symmetric': bool(p['activation_symmetric']),
                           'percentile': float(p['calibration']['percentile'])}

    def load(self, artifact: Artifact) -> OpenVinoSession:
        return OpenVinoSession(artifact.path, self.device, self.compile_config())

    def profile(self, artifact: Artifact, batch: np.ndarray, iterations: int) -> list[dict]:
        """Each layer OpenVINO's performance counters report, in their order, with its mean time per call over
        `iterations` calls on `batch`, its status, type, the kernel that ran and its runtime precision
        (bench.profile). Layers done in place (a Reshape, a Concat written into its output) have no counter."""
        session = OpenVinoSession(artifact.path, self.device, {**self.compile_config(), 'PERF_COUNT': True})
        session.run(batch)  # warm-up: the first call's counters include one-time work
        seconds = None  # per counter, in the counters' order (a name may come twice: a FakeQuantize's two parts)
        for _ in range(iterations):
            session.run(batch)
            times = np.array([counter.real_time.total_seconds() for counter in session.request.profiling_info])
            seconds = times if seconds is None else seconds + times
        runtime = {layer['name']: layer for layer in session.layers()}
        rows = []
        for counter, total in zip(session.request.profiling_info, seconds):
            layer = runtime.get(counter.node_name, {})
            rows.append({'node': counter.node_name, 'operations': layer.get('operations', []),
                         'layer_type': counter.node_type, 'kernel': counter.exec_type,
                         'precision': layer.get('precision', 'n/a'), 'status': counter.status.name,
                         'ms': 1000 * float(total) / iterations})
        return rows
