"""Every rule that no type in the config expresses, checked before anything heavy is imported or built: ranges,
rules across options, the data files, the output directories. Each failure is one UserError naming the option."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from common.annotations import check_dataset
from common.errors import UserError, check_at_least
from integrations.config import plain
from integrations.deploy.int8_search import check_precision_options

OPSETS = (11, 20)
ONE_PROCESS_TASKS = ('bench', 'mlperf', 'check')  # they time or drive one session: no distributed launch


class UnusableOutputDir(BaseException):
    """The output directory cannot be made: run.py prints it as one error line. A BaseException because Hydra turns
    a callback's Exception into a warning and goes on to fail with its own traceback."""


class OutputDirCheck(Callback):
    """Before Hydra makes the run's (or the sweep's) output directory: one error line instead of Hydra's traceback
    when it cannot, e.g. a regular file where one of its folders should be."""

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        self._check(Path(config.hydra.run.dir), 'hydra.run.dir')

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        self._check(Path(config.hydra.sweep.dir), 'hydra.sweep.dir')

    @staticmethod
    def _check(path: Path, option: str) -> None:
        try:
            check_output_dir(path, option)
        except UserError as err:
            raise UnusableOutputDir(str(err)) from None


def check_output_dir(path: Path, option: str) -> None:
    """`path` can be made: its nearest existing ancestor is a writable directory."""
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        raise UserError(f'{option}={path}: {existing} is a file, not a directory; choose another {option}')
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f'{option}={path}: {existing} is not writable; choose another {option}')


def ensure_writable(path: Path, option: str) -> None:
    """Create `path` if needed and write a probe file into it, so a run never fails at its end for want of a
    place to put its results."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=path).close()
    except OSError as err:
        raise UserError(f'{option}={path}: not a writable directory ({err.strerror}); choose another') from None


def check_openimages_mlperf(ann_file: str, categories: list[dict]) -> None:
    """The RetinaNet's labels are the category ids 0..263 of the MLPerf format, listed in id order: the dataset
    numbers its labels by the file's order of categories, so any other order would shift every label."""
    from evaluators.openimages_mlperf import CLASSES

    pairs, expected = [(c.get('id'), c.get('name')) for c in categories], list(enumerate(CLASSES))
    if pairs != expected and sorted(map(repr, pairs)) == sorted(map(repr, expected)):
        raise UserError(f'data.ann_file={ann_file}: its categories are not listed in id order (0-263), as MLPerf\'s '
                        'format lists them; sort the "categories" list by id')
    if pairs != expected:
        raise UserError(f'data.ann_file={ann_file}: not in the openimages-mlperf format (264 categories, ids 0-263); '
                        'convert COCO ground truth with tools/coco_to_openimages_mlperf.py')


def check_explain(cfg: DictConfig) -> None:
    """What eval.explain needs, before anything is built."""
    if not cfg.eval.explain:
        return
    if not cfg.eval.compare_native:
        raise UserError('eval.explain=true compares the device with the native model: remove eval.compare_native=false')
    if distributed(cfg.engine):
        raise UserError('eval.explain=true runs in one process: remove the distributed launcher/devices options')


def distributed(engine: DictConfig) -> bool:
    """The engine's options ask for more than one process (mmengine's launcher, Lightning's devices/nodes)."""
    return (engine.get('launcher', 'none') != 'none' or str(engine.get('devices', 1)) not in ('1', 'auto')
            or engine.get('num_nodes', 1) != 1)


def check_eval(options: DictConfig) -> None:
    """The ranges of the loop's and the post-processing's options (null keeps the model config's own)."""
    for option, least in (('batch_size', 1), ('num_workers', 0), ('prefetch', 0)):
        check_at_least(f'eval.{option}', options[option], least)
    for option in ('max_per_img', 'nms_pre', 'num_images', 'host_threads'):
        if options[option] is not None:
            check_at_least(f'eval.{option}', options[option], 1)
    if options.score_thr is not None and not 0 <= options.score_thr < 1:
        raise UserError(f'eval.score_thr={options.score_thr}: must be a score in [0, 1), or null for the model\'s own')
    if options.nms_iou is not None and not 0 < options.nms_iou <= 1:
        raise UserError(f'eval.nms_iou={options.nms_iou}: must be an IoU in (0, 1], or null for the model\'s own')


PROFILE_RUNTIMES = ('onnx', 'openvino')  # the runtimes with a `profile` (bench.profile)


def check_bench(bench: DictConfig) -> None:
    """task=bench's ranges, checked before anything is exported or built."""
    for option in ('batch_sizes', 'instances'):
        if not bench[option] or min(bench[option]) < 1:
            raise UserError(f'bench.{option}={list(bench[option])}: must be a non-empty list of numbers >= 1, '
                            'e.g. [1,4]')
    check_at_least('bench.warmup', bench.warmup, 0)
    check_at_least('bench.iterations', bench.iterations, 1)
    if bench.replay_latency_ms is not None:
        check_at_least('bench.replay_latency_ms', bench.replay_latency_ms, 0)


def check_mlperf(options: DictConfig) -> None:
    """task=mlperf's ranges and LoadGen itself, checked before anything is exported or built."""
    try:
        import mlperf_loadgen  # noqa: F401
    except ImportError:
        raise UserError('task=mlperf needs MLPerf LoadGen: pip install mlcommons-loadgen (make setup installs it)') \
            from None
    for option in ('min_duration_ms', 'min_query_count', 'samples_per_query', 'performance_sample_count'):
        check_at_least(f'mlperf.{option}', options[option], 1)
    for option in ('target_latency_ms', 'target_qps'):
        if options[option] is not None and not options[option] > 0:
            raise UserError(f'mlperf.{option}={options[option]}: must be > 0, or null to take it from the warm-up')
    if options.user_conf is not None:
        if not options.official:
            raise UserError('mlperf.user_conf is read after MLPerf\'s mlperf.conf: add mlperf.official=true')
        if not Path(options.user_conf).is_file():
            raise UserError(f'mlperf.user_conf={options.user_conf}: file not found')


def check_inputs(cfg: DictConfig) -> int:
    """Ranges and rules across options (Hydra has checked every type), then the data: the number of images."""
    check_eval(cfg.eval)
    check_explain(cfg)
    if cfg.task == 'check' and cfg.runtime.name != 'vacc':
        raise UserError(f'task=check checks a VastAI card and its software: add runtime=vacc (not {cfg.runtime.name})')
    if cfg.task in ONE_PROCESS_TASKS and distributed(cfg.engine):
        raise UserError(f'task={cfg.task} runs in one process: remove the distributed engine options '
                        '(engine.launcher, engine.devices, engine.num_nodes)')
    check_precision_options(plain(cfg.precision), cfg.runtime.name)
    if cfg.precision.get('max_drop') is not None:
        check_dataset(cfg.precision.selection.img_dir, cfg.precision.selection.ann_file, 'precision.selection')
    if not OPSETS[0] <= cfg.export.opset <= OPSETS[1]:
        raise UserError(f'export.opset={cfg.export.opset}: use {OPSETS[0]}-{OPSETS[1]} (the TorchScript exporter\'s '
                        'range that both model families export at)')
    if cfg.task == 'bench':
        check_bench(cfg.bench)
        if cfg.bench.profile and cfg.runtime.name not in PROFILE_RUNTIMES:
            raise UserError(f"bench.profile reads the runtime's own profiler: runtime={' or '.join(PROFILE_RUNTIMES)}"
                            f', not {cfg.runtime.name}; remove the option')
    if cfg.task == 'mlperf':
        check_mlperf(cfg.mlperf)
    for option in ('img_dir', 'ann_file'):
        if OmegaConf.is_missing(cfg.data, option):
            raise UserError(f'data.{option} is required for data={cfg.data.name}: add data.{option}=PATH')
    missing = [key for key in cfg.runtime if OmegaConf.is_missing(cfg.runtime, key)]
    if missing:
        raise UserError(f'runtime.{missing[0]} is required for runtime={cfg.runtime.name}: '
                        f'add runtime.{missing[0]}=… (see conf/runtime/{cfg.runtime.name}.yaml)')
    if cfg.cache.enabled and cfg.task in ('eval', 'bench', 'mlperf'):
        ensure_writable(Path(cfg.cache.dir), 'cache.dir')
    if cfg.task in ('eval', 'bench', 'export', 'mlperf'):  # the runtime's checks (options, SDK, compiler) first
        from runtime import get_runtime
        options = {k: v for k, v in plain(cfg.runtime).items() if k != 'name'}
        get_runtime(cfg.runtime.name, precision=plain(cfg.precision), **options)
        if cfg.eval.reference:
            get_runtime(cfg.runtime.name, precision={'name': cfg.eval.reference}, **options)
    coco = check_dataset(cfg.data.img_dir, cfg.data.ann_file)
    num_images = len(coco['images'])
    if cfg.model.label_space == 'openimages_mlperf':
        check_openimages_mlperf(cfg.data.ann_file, coco['categories'])
    if cfg.eval.num_images:
        num_images = min(num_images, cfg.eval.num_images)
    if cfg.model.checkpoint and not Path(cfg.model.checkpoint).is_file():
        raise UserError(f'model.checkpoint={cfg.model.checkpoint}: file not found'
                        + (' (run `make setup` to fetch and convert the YOLOv5s weights)'
                           if 'checkpoints/' in str(cfg.model.checkpoint) else ''))
    return num_images


