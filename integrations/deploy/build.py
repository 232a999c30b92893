"""The engine-independent core of deployment: export the head-cut model, build it for a runtime (or find it in
the artifact cache), load the sessions and attach them to a DeviceEvaluator. mmengine's ExportHook and
Lightning's ExportCallback are thin adapters around `DeviceBuild` (integrations/engines/)."""
from __future__ import annotations

import hashlib
import json
import logging
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

from common.errors import UserError
from evaluators.device import compare_maps
from evaluators.mm.preprocess import BatchPreprocessor
from integrations.deploy.graph import RawMapGraph, export_onnx, export_torchscript
from integrations.deploy.int8_search import check_precision_options
from integrations.deploy.pipeline import loop_preprocessing
from integrations.models import build_model, get_family
from runtime import Artifact, get_runtime
from runtime.cache import ArtifactCache, content_key
from runtime.calibration import CalibrationReader, digest, select_images
from runtime.onnx import OrtSession

# ONNX Runtime fp32 against PyTorch on the raw maps, element by element: |ort - torch| <= ABS + REL * |torch|
EXPORT_TOLERANCE = {'abs': 1e-3, 'rel': 1e-3}
log = logging.getLogger(__name__)


class DeviceBuild:
    """Export (checked against PyTorch), build and load a runtime for a detector, and hand the sessions to the
    evaluator. With a cache the export and build are looked up by content first and done only on a miss.

    Args:
        family: model family module name in `integrations.models`. Defaults to 'yolov5'.
        out_dir: where the artifacts go when the cache is off. Defaults to 'export'.
        runtime: runtime options, `name` picks `runtime.<name>`. Defaults to ONNX Runtime.
        precision: precision options (conf/precision/*.yaml), `name` fp32/fp16/int8. Defaults to fp32.
        reference: also evaluate this precision of the same runtime in the same loop (e.g. 'fp32').
        opset: ONNX opset. Defaults to 13.
        simplify: run onnxslim on the export. Defaults to True.
        torchscript: also write a traced TorchScript file. Defaults to False.
        compare_native: keep the native forward (native mAP and raw-map fidelity); False skips it.
        cache_dir: artifact cache directory; None (default) builds into `out_dir` every time.
        own_decode: {'model', 'default_scope'} of the config with its own post-processing settings (eval.explain
            when eval overrides them): the evaluator also decodes the native raw maps with them.
        preprocessing_stage: a runtime that preprocesses on the device also runs its preprocessing alone, with the
            fp32 export on the host (eval.explain's device_preprocessing stage, path `device_preprocessing`).
    """

    def __init__(self, family: str = 'yolov5', out_dir: str = 'export', runtime: dict | None = None,
                 precision: dict | None = None, reference: str | None = None, opset: int = 13,
                 simplify: bool = True, torchscript: bool = False, compare_native: bool = True,
                 cache_dir: str | None = None, own_decode: dict | None = None, preprocessing_stage: bool = False):
        self.family_name = family
        self.family = get_family(family)
        self.out_dir = Path(out_dir)
        self.runtime_cfg = dict(runtime or {'name': 'onnx'})
        self.precision = dict(precision or {'name': 'fp32'})
        self.reference = reference if reference and reference != self.precision['name'] else None
        self.export_cfg = {'opset': opset, 'simplify': simplify, 'torchscript': torchscript}
        self.compare_native = compare_native
        self.cache = ArtifactCache(cache_dir) if cache_dir else None
        self.calibration_info: dict = {}
        self.selection_digest: str | None = None
        self.own_decode = own_decode
        self.preprocessing_stage = preprocessing_stage
        check_precision_options(self.precision, self.runtime_cfg['name'])

    def prepare(self, model, mm_cfg, dataset, evaluator, device_session=None) -> dict:
        """Build (or reuse), load the sessions, attach them to `evaluator`; returns the report for results.json.
        `model` is the plain detector (not a distributed wrapper) with the tested weights loaded;
        `device_session`, if given, serves the device path instead of the built runtime (task=bench's replayed
        card)."""
        entry, built, cache_state, runtime, reference = self.build(model, mm_cfg, dataset)
        timings = built['timings'] if cache_state != 'hit' else {'export_s': 0.0, 'build_s': 0.0}
        artifact = Artifact(entry / built['device']['file'], built['device']['info'], entry)
        sessions = {'device': device_session or runtime.load(artifact)}
        if self.preprocessing_stage and hasattr(runtime, 'load_preprocessing'):
            sessions['device_preprocessing'] = runtime.load_preprocessing(artifact, entry / built['files']['onnx'])
        if reference:
            sessions['reference'] = reference.load(Artifact(entry / built['reference']['file'], root=entry))
        shape = self.family.input_shape(mm_cfg)
        taps = self.family.tap_modules(model) if self.compare_native else []
        own_decoder = None
        if self.own_decode:  # the decoder reads the model's anchors and settings, not its weights
            from mmengine.config import ConfigDict

            own_decoder = self.family.build_decoder(build_model(ConfigDict(self.own_decode)), shape)
        evaluator.attach(sessions=sessions, decoder=self.family.build_decoder(model, shape),
                         preprocessor=BatchPreprocessor(model.data_preprocessor, reuse=True), taps=taps,
                         own_decoder=own_decoder)
        artifacts = {name: str(entry / file) for name, file in built['files'].items()}
        layers = None
        if self.precision['name'] == 'int8' and self.precision.get('layers_report'):
            layers = self._layers_report(entry, built, model, mm_cfg, dataset)
        return {'layers_report': layers, 'input_shape': [*shape], 'io': built['io'],
                'export_check': built['export_check'], 'build_dir': str(entry), 'artifacts': artifacts,
                'timings': timings, 'cache': cache_state,
                'precision': {**built['device']['info'], **self.calibration_info,
                              **getattr(sessions['device'], 'report', dict)()},
                'runtime_version': runtime.version()}

    def build(self, model, mm_cfg, dataset) -> tuple[Path, dict, str, object, object]:
        """Export and build (or find them in the cache): the entry directory, its build report, the cache state
        ('off', 'hit', 'miss') and the device and reference runtimes."""
        model.eval()
        shape = self.family.input_shape(mm_cfg)
        options = {k: v for k, v in self.runtime_cfg.items() if k != 'name'}
        runtime = get_runtime(self.runtime_cfg['name'], precision=self.precision, **options)
        reference = get_runtime(self.runtime_cfg['name'], precision={'name': self.reference}, **options) \
            if self.reference else None
        calibration, self.calibration_info = self._calibration(model, mm_cfg, dataset)
        keep_float, equalize = raw_map_conv_handling(self.family, model, self.precision)
        preprocessing = self.family.device_preprocessing(mm_cfg)
        select_float = self._float_layer_search(model, mm_cfg, dataset, shape, calibration)

        def build(out_dir: Path) -> None:
            # the export is checked on the first evaluated image, as the loop preprocesses it
            sample = torch.from_numpy(loop_preprocessing(mm_cfg, model)(Path(dataset.get_data_info(0)['img_path'])))
            build_artifacts(model, self.family, sample, out_dir, self.export_cfg, runtime, reference,
                            calibration, keep_float, equalize, preprocessing, select_float)

        if self.cache is None:
            shutil.rmtree(self.out_dir, ignore_errors=True)
            self.out_dir.mkdir(parents=True)
            build(self.out_dir)
            entry, cache_state = self.out_dir, 'off'
        else:
            key = content_key(self._key_parts(model, mm_cfg, shape, runtime, [keep_float, equalize]))
            entry, hit = self.cache.get_or_build(key, build, describe={
                'model': self.family_name, 'config': mm_cfg.filename, 'shape': shape,
                'runtime': self.runtime_cfg['name'], 'precision': self.precision['name'],
                'reference': self.reference})
            cache_state = 'hit' if hit else 'miss'
        return entry, json.loads((entry / BUILD_REPORT).read_text()), cache_state, runtime, reference

    def _layers_report(self, entry: Path, built: dict, model, mm_cfg, dataset) -> list[dict]:
        """Conv by conv in execution order, int8 against the float model on the first evaluated images."""
        from runtime.onnx import FLOAT_REFERENCE, layer_divergence

        count = min(int(self.precision.get('layers_report_images', 2)), len(dataset))
        preprocess = loop_preprocessing(mm_cfg, model)
        images = [preprocess(Path(dataset.get_data_info(i)['img_path'])) for i in range(count)]
        log.info('layers report on %d images', count)
        return layer_divergence(entry / FLOAT_REFERENCE, entry / built['device']['file'], images)

    def _key_parts(self, model, mm_cfg, shape, runtime, raw_map_convs) -> dict:
        """Everything that shapes the artifacts, and nothing that only shapes the evaluation (thresholds)."""
        import onnx
        import onnxslim

        model_cfg = _without_eval_settings(mm_cfg.model.to_dict())
        calibrated = bool(self.calibration_info)
        return {'weights': state_digest(model), 'model': model_cfg, 'family': self.family_name,
                'shape': shape, 'export': self.export_cfg,
                'runtime': {**self.runtime_cfg, **getattr(runtime, 'resolved_options', dict)()},
                'precision': self.precision, 'reference': self.reference, 'raw_map_convs': raw_map_convs,
                'calibration': self.calibration_info.get('calibration_digest'),
                'selection': self.selection_digest,
                'preprocessing': str(mm_cfg.test_dataloader.dataset.pipeline) if calibrated else None,
                'versions': {'runtime': runtime.version(), 'torch': torch.__version__,
                             'onnx': onnx.__version__, 'onnxslim': onnxslim.__version__,
                             'build_format': BUILD_FORMAT}}

    def _float_layer_search(self, model, mm_cfg, dataset, shape, calibration):
        """precision.max_drop: the search over convs kept in float (integrations/deploy/int8_search.py), on the
        selection set, checked disjoint from calibration and evaluation; None without a budget."""
        from integrations.deploy.int8_search import SelectionSet, float_layer_search, selection_digest

        budget = self.precision.get('max_drop')
        if self.precision['name'] != 'int8' or budget is None:
            return None
        options = self.precision['selection']
        evaluated = [Path(dataset.get_data_info(i)['img_path']) for i in range(len(dataset))]
        selection = SelectionSet(mm_cfg, model, self.family.build_decoder(model, shape), dataset.metainfo['classes'],
                                 options['img_dir'], options['ann_file'], options.get('num_images'),
                                 self.family.LABEL_SPACE, calibration.paths, evaluated)
        self.selection_digest = selection_digest(selection.paths, options['ann_file'])
        return float_layer_search(selection, budget)

    def _calibration(self, model, mm_cfg, dataset) -> tuple[CalibrationReader | None, dict]:
        """The calibration reader for int8: images drawn by seed, preprocessed as the test loop does."""
        if self.precision['name'] != 'int8':
            return None, {}
        settings = self.precision['calibration']
        evaluated = {Path(dataset.get_data_info(i)['img_path']) for i in range(len(dataset))}
        paths, disjoint = select_images(settings['data'], settings['num_images'], settings['seed'], evaluated)
        if not disjoint:
            log.warning('calibrating on evaluated images (%s holds nothing else); set '
                        'precision.calibration.data=DIR for a disjoint calibration set', settings['data'])
        info = {'calibration_data': str(settings['data']), 'calibration_seed': settings['seed'],
                'calibration_images': [p.name for p in paths], 'calibration_digest': digest(paths),
                'calibration_disjoint': disjoint}
        return CalibrationReader(paths, loop_preprocessing(mm_cfg, model)), info


def _without_eval_settings(cfg):
    """The model config without its train/test settings at any depth (heads get a copy of test_cfg)."""
    if isinstance(cfg, dict):
        return {k: _without_eval_settings(v) for k, v in cfg.items() if k not in ('test_cfg', 'train_cfg')}
    if isinstance(cfg, (list, tuple)):
        return [_without_eval_settings(v) for v in cfg]
    return cfg


BUILD_REPORT = 'build.json'
BUILD_FORMAT = 5  # bump when what build_artifacts writes changes


def build_artifacts(model, family, sample, out_dir: Path, export_cfg: dict, runtime, reference, calibration,
                    keep_float, equalize, preprocessing, select_float=None) -> None:
    """Export (checked against PyTorch on `sample`, a batch of one) and build into `out_dir`, and describe it in
    build.json with paths relative to `out_dir`, so the directory can move (the cache renames it into place)."""
    onnx_path = out_dir / 'model.onnx'
    shape = tuple(sample.shape[1:])
    start = time.perf_counter()
    print(f"exporting the raw-map graph to ONNX (opset {export_cfg['opset']})", file=sys.stderr, flush=True)
    with family.cut_head(model):
        graph = RawMapGraph(model)
        with torch.no_grad():
            graph(sample)
        names = family.output_names(model, graph.group_sizes)
        io_spec = export_onnx(graph, sample, onnx_path, names, export_cfg['opset'], export_cfg['simplify'])
        files = {'onnx': onnx_path.name}
        if export_cfg['torchscript']:
            export_torchscript(graph, sample, out_dir / 'model.torchscript.pt')
            files['torchscript'] = 'model.torchscript.pt'
        with torch.no_grad():
            torch_maps = [m.numpy() for m in graph(sample)]
    ort_maps = OrtSession(onnx_path).run(sample.numpy())
    export_check = compare_maps(torch_maps, ort_maps)
    allowed = EXPORT_TOLERANCE['abs'], EXPORT_TOLERANCE['rel']
    if not all(np.all(np.abs(o - t) <= allowed[0] + allowed[1] * np.abs(t)) for t, o in zip(torch_maps, ort_maps)):
        raise UserError(f"the ONNX export differs from PyTorch by {export_check['max_abs_diff']:.3g} on the raw "
                        f'maps (more than {allowed[0]} + {allowed[1]} x |value|); try export.simplify=false or '
                        'another export.opset')
    export_s = time.perf_counter() - start

    start = time.perf_counter()
    print(f"building for runtime={runtime.name} precision={runtime.precision['name']}", file=sys.stderr, flush=True)
    artifact = runtime.build(onnx_path, out_dir, calibration=calibration, keep_float=keep_float,
                             equalize=equalize, preprocessing=preprocessing, shape=shape,
                             **({'select_float': select_float} if select_float else {}))
    built = {'device': {'file': _relative(artifact.path, out_dir), 'info': artifact.info}}
    files['runtime'] = built['device']['file']
    files.update(artifact.files)
    if reference:
        reference_artifact = reference.build(onnx_path, out_dir, preprocessing=preprocessing, shape=shape)
        built['reference'] = {'file': _relative(reference_artifact.path, out_dir)}
    report = {**built, 'io': io_spec, 'export_check': export_check, 'files': files,
              'timings': {'export_s': export_s, 'build_s': time.perf_counter() - start}}
    (out_dir / BUILD_REPORT).write_text(json.dumps(report, indent=1))


def _relative(path: Path, out_dir: Path) -> str:
    """A built file's path relative to the build directory (which moves into the cache), or absolute when the
    runtime uses something outside it (a given compiled model)."""
    try:
        return str(path.resolve().relative_to(out_dir.resolve()))
    except ValueError:
        return str(path)


def state_digest(model) -> str:
    """Digest of the model's parameters and buffers: what the checkpoint put in, however it was loaded."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:24]


def raw_map_conv_handling(family, model, precision: dict) -> tuple[list[str], list[str]]:
    """`precision.raw_map_convs` as module names for the runtime's build: (kept in float, equalized)."""
    choice = precision.get('raw_map_convs')
    names = {id(m): n for n, m in model.named_modules()}
    modules = [names[id(m)] for m in family.raw_map_modules(model)]
    return (modules if choice == 'float' else []), (modules if choice == 'equalized' else [])
