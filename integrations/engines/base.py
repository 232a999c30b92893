"""What every task gets from an engine, whichever it is: the built model, dataset and DeviceEvaluator of a Plan,
the device prepared on request, and test loops run by the engine's own loop (mmengine's `runner.test()`,
Lightning's `trainer.test()`)."""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from common.errors import UserError
from integrations.engines.plan import LoopOptions, Plan


@contextmanager
def unreadable_images_as_user_errors():
    """An image file the pipeline cannot decode (mmcv's assertion) as one line naming it."""
    try:
        yield
    except AssertionError as err:
        if 'failed to load image' in str(err):
            raise UserError(f'data.img_dir: {err}; replace or remove that image') from None
        raise


def load_weights(model, plan: Plan) -> None:
    """The tested weights: the checkpoint (loaded safely), or without one the random initialization drawn with
    `model.init_seed`, the same in every engine and process; then the family's deploy form (fused blocks)."""
    from integrations.deploy.checkpoint import load_checkpoint
    from integrations.models import build_model, get_family

    if plan.checkpoint:
        load_checkpoint(model, plan.checkpoint, plan.trust_checkpoint)
    elif plan.init_seed is not None:
        model.load_state_dict(build_model(plan.mm_cfg, seed=plan.init_seed).state_dict())
    get_family(plan.build['family']).prepare_model(model)


@dataclass
class Outcome:
    """One test loop: the metrics (device/…, native/…, reference/…), DeviceBuild's report, the seconds of the test
    without the export and build (`eval_s`), of its iterations alone (`loop_s`) and of their waits for the
    loader (`load_s`), and what later stages read (the evaluator, the model, the annotation file evaluated)."""

    metrics: dict
    report: dict
    eval_s: float
    loop_s: float
    load_s: float
    rank: int
    outputs: dict
    evaluator: object
    model: object
    ann_file: str


class EngineRun:
    """The engine-neutral face of one evaluation; `integrations.engines.<name>.runner.Run` builds it from a Plan.

    Subclasses set `model` (the plain detector with the tested weights), `dataset` (the config's test dataset),
    `evaluator` (the DeviceEvaluator), `mm_cfg` and `rank`, and implement `build`, `prepare`, `_test` and
    `native_pass`.
    """

    plan: Plan
    model = None
    dataset = None
    evaluator = None
    mm_cfg = None
    rank = 0

    def build(self) -> tuple[Path, dict, str, object, object]:
        """Export and build only (task=export): DeviceBuild.build's result."""
        raise NotImplementedError

    def prepare(self, device_session=None) -> dict:
        """Build (or find in the cache), load and attach the sessions without a loop; DeviceBuild's report."""
        raise NotImplementedError

    def native_pass(self, mm_cfg, metrics: list) -> object:
        """The native model (these weights) under another config's dataset and pipeline, scored by `metrics` in
        the engine's own test loop; the first metric, holding its per-image records."""
        raise NotImplementedError

    def _test(self, options: LoopOptions) -> tuple[dict, dict, float, float]:
        """One loop: (metrics, DeviceBuild's report, loop seconds, loader-wait seconds)."""
        raise NotImplementedError

    def test(self, options: LoopOptions | None = None) -> Outcome:
        """One test loop with `options` (the plan's by default)."""
        start = time.perf_counter()
        metrics, report, loop_s, load_s = self._test(options or self.plan.loop)
        timings = report['timings']
        eval_s = time.perf_counter() - start - timings['export_s'] - timings['build_s']
        return Outcome(metrics=metrics, report=report, eval_s=eval_s, loop_s=loop_s, load_s=load_s, rank=self.rank,
                       outputs=self.evaluator.outputs, evaluator=self.evaluator, model=self.model,
                       ann_file=self.dataset.ann_file)

    @cached_property
    def preprocessor(self):
        """The model's data preprocessor, in one pass per image (evaluators/mm/preprocess.py)."""
        from evaluators.mm.preprocess import BatchPreprocessor

        return BatchPreprocessor(self.model.data_preprocessor)

    def sample(self, index: int):
        """The dataset's item `index` through the model's data preprocessor, as a batch of one:
        (inputs (1, C, H, W), metainfo)."""
        import torch
        from mmengine.dataset import pseudo_collate

        with torch.no_grad():
            batch = self.preprocessor(pseudo_collate([self.dataset[index]]), False)
        return batch['inputs'], batch['data_samples'][0].metainfo

    def native_predictions(self, index: int):
        """The native model's prediction of the dataset's item `index` (an mmdet DetDataSample)."""
        import torch
        from mmengine.dataset import pseudo_collate

        with torch.no_grad():
            return self.model.test_step(pseudo_collate([self.dataset[index]]))[0]
