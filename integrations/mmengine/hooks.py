"""mmengine hooks: export the head-cut model and hand runtime sessions to the DeviceEvaluator, and a progress
bar for the test loop. Usable from any mmyolo config:

    custom_imports = dict(imports=['integrations.mmengine.hooks', 'evaluators.mmengine'])
    custom_hooks = [dict(type='ExportHook', family='yolov5', out_dir='work_dirs/export')]
    test_evaluator = dict(type='DeviceEvaluator', metrics=[dict(type='mmdet.CocoMetric', ann_file=...)])
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from mmengine.hooks import Hook
from mmengine.logging import print_log
from mmengine.model import is_model_wrapper
from mmengine.registry import HOOKS

from integrations.export import RawMapGraph, compare_maps, export_onnx, export_torchscript
from integrations.models import get_family
from runtime import get_runtime
from runtime.calibration import CalibrationReader, digest, select_images
from runtime.onnx import OrtSession

EXPORT_TOLERANCE = 1e-3  # max abs difference between ONNX Runtime fp32 and PyTorch raw maps


@HOOKS.register_module()
class ExportHook(Hook):
    """Before the test loop: cut the head, export ONNX (+TorchScript), build and load the runtime, and attach it
    to the test evaluator. Runs after the checkpoint is loaded, so the export holds the tested weights.

    Args:
        family: model family module name in `integrations.models`. Defaults to 'yolov5'.
        out_dir: where the artifacts go. Defaults to 'export'.
        runtime: runtime options, `name` picks `runtime.<name>`. Defaults to ONNX Runtime.
        precision: precision options (conf/precision/*.yaml), `name` fp32/fp16/int8. Defaults to fp32.
        reference: also evaluate this precision of the same runtime in the same loop (e.g. 'fp32').
        opset: ONNX opset. Defaults to 13.
        simplify: run onnxslim on the export. Defaults to True.
        torchscript: also write a traced TorchScript file. Defaults to False.
        compare_native: keep the native forward (native mAP and raw-map fidelity); False skips it.
    """

    priority = 'LOW'  # after checkpoint loading and the framework's own before_test hooks

    def __init__(self, family: str = 'yolov5', out_dir: str = 'export', runtime: dict | None = None,
                 precision: dict | None = None, reference: str | None = None, opset: int = 13,
                 simplify: bool = True, torchscript: bool = False, compare_native: bool = True):
        self.family = get_family(family)
        self.out_dir = Path(out_dir)
        self.runtime_cfg = dict(runtime or {'name': 'onnx'})
        self.precision = dict(precision or {'name': 'fp32'})
        self.reference = reference if reference and reference != self.precision['name'] else None
        self.opset = opset
        self.simplify = simplify
        self.torchscript = torchscript
        self.compare_native = compare_native
        self.report: dict = {}

    def before_test(self, runner) -> None:
        model = runner.model.module if is_model_wrapper(runner.model) else runner.model
        model.eval()
        shape = self.family.input_shape(runner.cfg)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        onnx_path = self.out_dir / 'model.onnx'
        sample = torch.rand(1, *shape)

        start = time.perf_counter()
        with self.family.cut_head(model):
            graph = RawMapGraph(model)
            io_spec = export_onnx(graph, sample, onnx_path, self.family.OUTPUT_PREFIX, self.opset, self.simplify)
            artifacts = {'onnx': str(onnx_path)}
            if self.torchscript:
                export_torchscript(graph, sample, self.out_dir / 'model.torchscript.pt')
                artifacts['torchscript'] = str(self.out_dir / 'model.torchscript.pt')
            with torch.no_grad():
                reference_maps = [m.numpy() for m in graph(sample)]
        export_check = compare_maps(reference_maps, OrtSession(onnx_path).run(sample.numpy()))
        if export_check['max_abs_diff'] > EXPORT_TOLERANCE:
            raise RuntimeError(f"ONNX export differs from PyTorch by {export_check['max_abs_diff']:.3g} "
                               f'(> {EXPORT_TOLERANCE}) on the raw maps')
        export_s = time.perf_counter() - start

        start = time.perf_counter()
        options = {k: v for k, v in self.runtime_cfg.items() if k != 'name'}
        runtime = get_runtime(self.runtime_cfg['name'], precision=self.precision, **options)
        calibration, calibration_info = self._calibration(runner, model)
        keep_float = [name for name, _ in _named(model, self.family.raw_map_modules(model))] \
            if self.precision.get('keep_raw_map_convs_float') else []
        artifact = runtime.build(onnx_path, self.out_dir, calibration=calibration, keep_float=keep_float)
        sessions = {'device': runtime.load(artifact)}
        if self.reference:
            reference = get_runtime(self.runtime_cfg['name'], precision={'name': self.reference}, **options)
            sessions['reference'] = reference.load(reference.build(onnx_path, self.out_dir))
        build_s = time.perf_counter() - start
        artifacts['runtime'] = str(artifact.path)

        taps = self.family.raw_map_modules(model) if self.compare_native else []
        runner.test_loop.evaluator.attach(sessions=sessions, decoder=self.family.build_decoder(model, shape),
                                          preprocessor=model.data_preprocessor, taps=taps)
        if not self.compare_native:
            # the native forward is not needed: hand the evaluator the batch's own data samples
            model.test_step = lambda data: data['data_samples']
        self.report = {'input_shape': [*shape], 'io': io_spec, 'export_check': export_check,
                       'artifacts': artifacts, 'timings': {'export_s': export_s, 'build_s': build_s},
                       'precision': {**artifact.info, **calibration_info},
                       'runtime_version': runtime.version()}

    def _calibration(self, runner, model) -> tuple[CalibrationReader | None, dict]:
        """The calibration reader for int8: images drawn by seed, preprocessed as the test loop does."""
        if self.precision['name'] != 'int8':
            return None, {}
        settings = self.precision['calibration']
        dataset = runner.test_dataloader.dataset
        evaluated = {Path(dataset.get_data_info(i)['img_path']) for i in range(len(dataset))}
        paths, disjoint = select_images(settings['data'], settings['num_images'], settings['seed'], evaluated)
        if not disjoint:
            print_log(f"calibrating on evaluated images ({settings['data']} holds nothing else); set "
                      'precision.calibration.data=DIR for a disjoint calibration set', 'current', logging.WARNING)
        preprocess = loop_preprocessing(runner.cfg, model)
        info = {'calibration_data': str(settings['data']), 'calibration_seed': settings['seed'],
                'calibration_images': [p.name for p in paths], 'calibration_digest': digest(paths),
                'calibration_disjoint': disjoint}
        return CalibrationReader(paths, preprocess), info


def loop_preprocessing(cfg, model):
    """path -> float32 NCHW batch of one, through the config's test pipeline and the model's preprocessor."""
    from mmcv.transforms import Compose
    from mmengine.dataset import pseudo_collate

    pipeline = Compose([step for step in cfg.test_dataloader.dataset.pipeline
                        if 'LoadAnnotations' not in step['type']])

    def preprocess(path: Path):
        data = pipeline(dict(img_path=str(path), img_id=0))
        with torch.no_grad():
            return model.data_preprocessor(pseudo_collate([data]), False)['inputs'].numpy()

    return preprocess


def _named(model, modules) -> list[tuple[str, torch.nn.Module]]:
    names = {id(m): n for n, m in model.named_modules()}
    return [(names[id(m)], m) for m in modules]


@HOOKS.register_module()
class ProgressBarHook(Hook):
    """A tqdm bar over the test iterations."""

    priority = 'VERY_LOW'
    bar = None

    def before_test_epoch(self, runner) -> None:
        from tqdm import tqdm
        self.bar = tqdm(total=len(runner.test_dataloader), desc='evaluating', unit='batch')

    def after_test_iter(self, runner, batch_idx, data_batch=None, outputs=None) -> None:
        self.bar.update(1)
        if self.bar.n >= self.bar.total:
            self.close()  # before the metrics print their summaries

    def close(self) -> None:
        """End the bar's line; also called when the loop fails, so an error message starts on its own line."""
        if self.bar is not None:
            self.bar.close()
