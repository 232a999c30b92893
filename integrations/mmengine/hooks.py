"""mmengine hooks: export the head-cut model and hand a runtime session to the DeviceEvaluator, and a
progress bar for the test loop. Usable from any mmyolo config:

    custom_imports = dict(imports=['integrations.mmengine.hooks', 'evaluators.mmengine'])
    custom_hooks = [dict(type='ExportHook', family='yolov5', out_dir='work_dirs/export')]
    test_evaluator = dict(type='DeviceEvaluator', metrics=[dict(type='mmdet.CocoMetric', ann_file=...)])
"""
from __future__ import annotations

import time
from pathlib import Path

import torch
from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper
from mmengine.registry import HOOKS

from integrations.export import RawMapGraph, compare_maps, export_onnx, export_torchscript
from integrations.models import get_family
from runtime import get_runtime

EXPORT_TOLERANCE = 1e-3  # max abs difference between ONNX Runtime fp32 and PyTorch raw maps


@HOOKS.register_module()
class ExportHook(Hook):
    """Before the test loop: cut the head, export ONNX (+TorchScript), build and load the runtime, and attach it
    to the test evaluator. Runs after the checkpoint is loaded, so the export holds the tested weights.

    Args:
        family: model family module name in `integrations.models`. Defaults to 'yolov5'.
        out_dir: where the artifacts go. Defaults to 'export'.
        runtime: runtime options, `name` picks `runtime.<name>`. Defaults to ONNX Runtime.
        precision: 'fp32', 'fp16' or 'int8'. Defaults to 'fp32'.
        opset: ONNX opset. Defaults to 13.
        simplify: run onnxslim on the export. Defaults to True.
        torchscript: also write a traced TorchScript file. Defaults to False.
        compare_native: keep the native forward (native mAP and raw-map fidelity); False skips it.
    """

    priority = 'LOW'  # after checkpoint loading and the framework's own before_test hooks

    def __init__(self, family: str = 'yolov5', out_dir: str = 'export', runtime: dict | None = None,
                 precision: str = 'fp32', opset: int = 13, simplify: bool = True, torchscript: bool = False,
                 compare_native: bool = True):
        self.family = get_family(family)
        self.out_dir = Path(out_dir)
        self.runtime_cfg = dict(runtime or {'name': 'onnx'})
        self.precision = precision
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
        sample = torch.rand(1, *shape)

        start = time.perf_counter()
        with self.family.cut_head(model):
            graph = RawMapGraph(model)
            io_spec = export_onnx(graph, sample, self.out_dir / 'model.onnx', self.family.OUTPUT_PREFIX,
                                  self.opset, self.simplify)
            artifacts = {'onnx': str(self.out_dir / 'model.onnx')}
            if self.torchscript:
                export_torchscript(graph, sample, self.out_dir / 'model.torchscript.pt')
                artifacts['torchscript'] = str(self.out_dir / 'model.torchscript.pt')
            with torch.no_grad():
                reference = [m.numpy() for m in graph(sample)]
        export_s = time.perf_counter() - start

        options = {k: v for k, v in self.runtime_cfg.items() if k != 'name'}
        runtime = get_runtime(self.runtime_cfg['name'], precision=self.precision, **options)
        start = time.perf_counter()
        artifact = runtime.build(self.out_dir / 'model.onnx', self.out_dir)
        session = runtime.load(artifact)
        build_s = time.perf_counter() - start
        artifacts['runtime'] = str(artifact)

        export_check = compare_maps(reference, get_runtime('onnx').load(self.out_dir / 'model.onnx').run(
            sample.numpy()))
        if export_check['max_abs_diff'] > EXPORT_TOLERANCE:
            raise RuntimeError(f"ONNX export differs from PyTorch by {export_check['max_abs_diff']:.3g} "
                               f'(> {EXPORT_TOLERANCE}) on the raw maps')

        decoder = self.family.build_decoder(model, shape)
        taps = self.family.raw_map_modules(model) if self.compare_native else []
        runner.test_loop.evaluator.attach(session=session, decoder=decoder, preprocessor=model.data_preprocessor,
                                          taps=taps)
        if not self.compare_native:
            # the native forward is not needed: hand the evaluator the batch's own data samples
            model.test_step = lambda data: data['data_samples']
        self.report = {'input_shape': [*shape], 'io': io_spec, 'export_check': export_check,
                       'artifacts': artifacts, 'timings': {'export_s': export_s, 'build_s': build_s},
                       'runtime_version': runtime.version()}


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
