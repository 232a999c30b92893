"""Run the evaluation inside mmengine's own `runner.test()`: the model config's dataset, pipeline, data
preprocessor and metric, with ExportHook and DeviceEvaluator added to it."""
from __future__ import annotations

import copy
import time
from pathlib import Path

from omegaconf import DictConfig

from common.errors import UserError
from integrations.config import plain
from integrations.explain import own_decode_config, reference_precision
from integrations.models import get_family

CUSTOM_IMPORTS = ['integrations.mmengine.hooks', 'evaluators.mmengine']


def load_model_config(config: str):
    """An mmengine config from a path or from an installed package (`mmyolo::yolov5/….py`)."""
    from mmengine.config import Config
    from mmengine.utils import get_installed_path

    path = config
    if '::' in config:
        package, relative = config.split('::', 1)
        try:
            path = str(Path(get_installed_path(package)) / '.mim' / 'configs' / relative)
        except Exception:  # get_installed_path raises whatever importlib does for a missing package
            raise UserError(f'model.config={config}: package {package} is not installed') from None
    if not Path(path).is_file():
        raise UserError(f'model.config={config}: config file not found')
    # yapf-formatting the config text (the Runner dumps and logs it four times) costs ~10 s per run; plain text
    # does. mmengine 0.10.7's fromfile drops its own format_python_code argument for non-lazy configs, so it is set
    # on the result.
    cfg = Config.fromfile(path)
    object.__setattr__(cfg, '_format_python_code', False)
    if not all(key in cfg for key in ('model', 'test_dataloader')):
        raise UserError(f'model.config={config}: not a detector config (an mmdet/mmyolo config with model and '
                        'test_dataloader)')
    return cfg


def build_model(mm_cfg, checkpoint: str | Path | None = None, trusted: bool = False):
    """The detector of an mmyolo/mmdet config (in the config's default scope) in eval mode, with a checkpoint
    loaded safely if given."""
    from mmengine.registry import MODELS, DefaultScope
    from mmyolo.utils import register_all_modules

    from integrations.checkpoint import apply_state_dict, load_state_dict

    register_all_modules(init_default_scope=False)
    with DefaultScope.overwrite_default_scope(mm_cfg.get('default_scope', 'mmyolo')):
        model = MODELS.build(copy.deepcopy(mm_cfg.model))  # detectors write test_cfg into their heads' configs
    if checkpoint:
        apply_state_dict(model, load_state_dict(checkpoint, trusted), str(checkpoint))
    return model.eval()


def evaluated_annotations(ann_file: Path, num_images: int | None, output_dir: Path) -> Path:
    """The annotation file as the evaluation reads it: the first `num_images` images (all if None) and their
    annotations without segmentation polygons. Bbox evaluation never reads them, yet on COCO they are most of the
    file, and the dataset (as masks) and the metric would hold them for every image all run long."""
    import json

    coco = json.loads(ann_file.read_text())
    masks = any('segmentation' in a for a in coco['annotations'])
    if not masks and not num_images:
        return ann_file
    if num_images:
        coco['images'] = coco['images'][:num_images]
        kept = {image['id'] for image in coco['images']}
        coco['annotations'] = [a for a in coco['annotations'] if a['image_id'] in kept]
    for annotation in coco['annotations']:
        annotation.pop('segmentation', None)
    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / f"{ann_file.stem}.bbox{f'.first{num_images}' if num_images else ''}.json"
    path.write_text(json.dumps(coco))
    return path


def streamed(metric):
    """mmdet's CocoMetric as StreamingCocoMetric (the same figures, constant memory per image) when it evaluates
    bbox only against an annotation file; any other metric as it is."""
    if metric['type'] in ('CocoMetric', 'mmdet.CocoMetric') and metric.get('metric', 'bbox') in ('bbox', ['bbox']) \
            and not metric.get('format_only'):
        return type(metric)({**metric, 'type': 'mmdet.StreamingCocoMetric'})
    return metric


def build_config(cfg: DictConfig, output_dir: Path, export_dir: Path):
    """The model's mmengine config, pointed at `cfg.data` and extended with the export/device pieces."""
    from evaluators.preprocess import fast_packing  # also registers PackDetInputsFast

    family = get_family(cfg.model.family)
    mm_cfg = load_model_config(cfg.model.config)
    loader = mm_cfg.test_dataloader
    loader.batch_size = cfg.eval.batch_size
    loader.num_workers = cfg.eval.num_workers
    loader.persistent_workers = False
    loader.prefetch = cfg.eval.get('prefetch', 0)
    loader.pin_memory = False
    dataset = loader.dataset
    dataset.data_root = ''
    dataset.ann_file = str(Path(cfg.data.ann_file).resolve())
    dataset.data_prefix = dict(img=str(Path(cfg.data.img_dir).resolve()) + '/')
    # for the dataset and the metric alike: the first eval.num_images images, without segmentation
    dataset.ann_file = str(evaluated_annotations(Path(dataset.ann_file), cfg.eval.get('num_images'), output_dir))
    family.prepare_config(mm_cfg, cfg.eval)
    dataset.pipeline = fast_packing(dataset.pipeline)
    if cfg.model.get('init_seed') is not None and not cfg.model.checkpoint:
        mm_cfg.model.init_seed = cfg.model.init_seed  # random weights, reproducibly

    metrics = mm_cfg.test_evaluator
    metrics = [streamed(m) for m in (metrics if isinstance(metrics, (list, tuple)) else [metrics])]
    for metric in metrics:
        metric.ann_file = dataset.ann_file
    reference = reference_precision(cfg)
    labels = {'device': f'{cfg.runtime.name} {cfg.precision.name}', 'reference': f'{cfg.runtime.name} {reference}',
              'device_preprocessing': f'{cfg.runtime.name} preprocessing, onnx fp32'}
    explain = None
    if cfg.eval.explain:
        if 'Streaming' not in metrics[0]['type'] and 'OpenImagesMLPerf' not in metrics[0]['type']:
            raise UserError(f"eval.explain=true: the config's metric ({metrics[0]['type']}) is not a bbox "
                            'CocoMetric against an annotation file, which the breakdown re-accumulates')
        explain = {k: cfg.explain[k] for k in ('score_thr', 'iou_thr')} | {'keep': cfg.explain.images}
    mm_cfg.test_evaluator = dict(type='DeviceEvaluator', metrics=metrics, labels=labels, overlap=cfg.eval.overlap,
                                 flat_memory=cfg.eval.flat_memory,
                                 save_txt=str(output_dir) if cfg.eval.save_txt else None, explain=explain)
    runtime = plain(cfg.runtime)
    precision = plain(cfg.precision)
    # training hooks of the config (EMAHook swaps parameters at test time) would change the evaluated weights:
    # the evaluation tests exactly the checkpoint's state_dict
    kept_hooks = [h for h in mm_cfg.get('custom_hooks', []) if 'EMAHook' not in h['type']]
    mm_cfg.custom_hooks = [*kept_hooks,
                           dict(type='ExportHook', family=cfg.model.family, out_dir=str(export_dir),
                                runtime=runtime, precision=precision, reference=reference,
                                own_decode=own_decode_config(cfg, mm_cfg) if cfg.eval.explain else None,
                                preprocessing_stage=bool(cfg.eval.explain),
                                opset=cfg.export.opset,
                                simplify=cfg.export.simplify, torchscript=cfg.export.torchscript,
                                compare_native=cfg.eval.compare_native,
                                cache_dir=cfg.cache.dir if cfg.cache.enabled else None),
                           dict(type='ProgressBarHook')]
    own_imports = mm_cfg.get('custom_imports', {}).get('imports', [])
    mm_cfg.custom_imports = dict(imports=[*own_imports, *CUSTOM_IMPORTS], allow_failed_imports=False)
    mm_cfg.runner_type = 'EvalRunner'
    mm_cfg.default_hooks.logger.interval = 10 ** 9  # the progress bar replaces per-iteration log lines
    mm_cfg.default_hooks.pop('visualization', None)
    mm_cfg.visualizer.vis_backends = [dict(type='LocalVisBackend')]
    mm_cfg.work_dir = str(output_dir / 'mmengine')
    mm_cfg.load_from = None  # loaded by integrations.checkpoint, without unpickling arbitrary objects
    mm_cfg.launcher = cfg.engine.get('launcher', 'none')  # mmengine's; Lightning launches its own
    mm_cfg.env_cfg = dict(mm_cfg.get('env_cfg', {}), dist_cfg=dict(backend=cfg.engine.get('dist_backend', 'gloo')))
    mm_cfg.log_level = cfg.engine.log_level
    return mm_cfg


def build_runner(cfg: DictConfig, output_dir: Path, export_dir: Path):
    """The Runner of the model config (with our hooks and evaluator) and the checkpoint loaded safely."""
    from mmengine.registry import RUNNERS
    from mmengine.utils import import_modules_from_strings
    from mmyolo.utils import register_all_modules

    from integrations.checkpoint import apply_state_dict, load_state_dict

    register_all_modules(init_default_scope=True)
    import_modules_from_strings(CUSTOM_IMPORTS)  # registers EvalRunner, ExportHook, DeviceEvaluator, …
    if cfg.engine.get('launcher') == 'pytorch' and cfg.engine.get('dist_backend') == 'gloo':  # task=bench: any engine
        # mmengine's pytorch launcher selects a CUDA device first, which fails without one; a process group
        # that already exists is used as it is
        import torch.distributed as dist
        if not dist.is_initialized():
            dist.init_process_group(backend='gloo')
    runner = RUNNERS.build(build_config(cfg, output_dir, export_dir))
    if cfg.model.checkpoint:
        apply_state_dict(runner.model, load_state_dict(cfg.model.checkpoint, cfg.model.trust_checkpoint),
                         cfg.model.checkpoint)
    return runner


def export_hook(runner):
    return next(h for h in runner.hooks if type(h).__name__ == 'ExportHook')


def progress_hook(runner):
    return next(h for h in runner.hooks if type(h).__name__ == 'ProgressBarHook')


def loop_seconds(runner) -> float:
    """Seconds of the last test loop's iterations (ProgressBarHook times them)."""
    return progress_hook(runner).loop_s


def run_test(runner) -> tuple[dict, float]:
    """`runner.test()` with a one-line error for unreadable images; metrics and the seconds of the test
    (without the export and build)."""
    start = time.perf_counter()
    try:
        metrics = runner.test()
    except AssertionError as err:
        if 'failed to load image' in str(err):
            raise UserError(f'data.img_dir: {err}; replace or remove that image') from None
        raise
    finally:
        progress_hook(runner).close()
    timings = export_hook(runner).report['timings']
    return metrics, time.perf_counter() - start - timings['export_s'] - timings['build_s']


def test(cfg: DictConfig, output_dir: Path, export_dir: Path) -> dict:
    """Evaluate inside `runner.test()`: metrics, the export report and the loop's seconds."""
    from mmengine.dist import get_rank

    runner = build_runner(cfg, output_dir, export_dir)
    metrics, eval_s = run_test(runner)
    return {'metrics': metrics, 'report': export_hook(runner).report, 'eval_s': eval_s, 'rank': get_rank(),
            'outputs': runner.test_loop.evaluator.outputs, 'evaluator': runner.test_loop.evaluator,
            'model': runner.model, 'ann_file': runner.cfg.test_dataloader.dataset.ann_file}
