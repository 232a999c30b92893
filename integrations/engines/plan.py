"""One evaluation, described once for every engine: the model config pointed at the data, and the arguments of
DeviceBuild (export, build, sessions) and of DeviceEvaluator (paths, metrics). mmengine's runner and Lightning's
trainer are both built from a `Plan`, so an option means the same under either engine."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig

from common.errors import UserError
from integrations.config import plain
from integrations.models import get_family, load_model_config

DECODE_OPTIONS = ('score_thr', 'nms_iou', 'max_per_img', 'nms_pre', 'multi_label')  # eval's post-processing


@dataclass
class LoopOptions:
    """How one test loop runs. The defaults are the evaluation's; task=bench times the loop with other ones.

    Args:
        native: run the native model's forward (off when nothing compares with it).
        prefetch: batches a loader thread reads ahead of the loop (0: the loop's own thread loads).
        overlap: the device runs batch k while the host decodes batch k-1 and scores k-2.
        device_session: serves the device path instead of the built runtime (task=bench's replayed card).
    """

    native: bool = True
    prefetch: int = 2
    overlap: bool = True
    device_session: object | None = None


@dataclass
class Plan:
    """What an engine builds: `mm_cfg` (dataset, pipeline, metrics: the model config's own, pointed at the data),
    `build` (DeviceBuild's arguments), `evaluator` (DeviceEvaluator's), `loop` (the default LoopOptions)."""

    mm_cfg: object
    build: dict
    evaluator: dict
    loop: LoopOptions
    engine: dict
    checkpoint: str | None
    trust_checkpoint: bool
    init_seed: int | None
    work_dir: Path


def make_plan(cfg: DictConfig, output_dir: Path, export_dir: Path, compare_native: bool | None = None) -> Plan:
    """The plan of `cfg`'s evaluation; `compare_native` overrides `eval.compare_native` (tasks that run the
    native model apart from the loop, or not at all)."""
    from evaluators.mm.preprocess import fast_packing  # also registers PackDetInputsFast

    compare_native = cfg.eval.compare_native if compare_native is None else compare_native
    family = get_family(cfg.model.family)
    mm_cfg = load_model_config(cfg.model.config)
    loader = mm_cfg.test_dataloader
    loader.batch_size = cfg.eval.batch_size
    loader.num_workers = cfg.eval.num_workers
    loader.persistent_workers = False
    loader.pin_memory = False
    dataset = loader.dataset
    dataset.data_root = ''
    dataset.data_prefix = dict(img=str(Path(cfg.data.img_dir).resolve()) + '/')
    # for the dataset and the metric alike: the first eval.num_images images, without segmentation
    dataset.ann_file = str(evaluated_annotations(Path(cfg.data.ann_file).resolve(), cfg.eval.get('num_images'),
                                                 output_dir))
    family.prepare_config(mm_cfg, cfg.eval, cfg.model)
    dataset.pipeline = fast_packing(dataset.pipeline)

    metrics = mm_cfg.test_evaluator
    metrics = [streamed(m) for m in (metrics if isinstance(metrics, (list, tuple)) else [metrics])]
    for metric in metrics:
        metric.ann_file = dataset.ann_file
    mm_cfg.test_evaluator = metrics
    reference = reference_precision(cfg)
    labels = {'device': f'{cfg.runtime.name} {cfg.precision.name}', 'reference': f'{cfg.runtime.name} {reference}',
              'device_preprocessing': f'{cfg.runtime.name} preprocessing, onnx fp32'}
    explain = None
    if cfg.eval.explain:
        if 'Streaming' not in metrics[0]['type'] and 'OpenImagesMLPerf' not in metrics[0]['type']:
            raise UserError(f"eval.explain=true: the config's metric ({metrics[0]['type']}) is not a bbox "
                            'CocoMetric against an annotation file, which the breakdown re-accumulates')
        explain = {k: cfg.explain[k] for k in ('score_thr', 'iou_thr')} | {'keep': cfg.explain.images}
    evaluator = dict(metrics=metrics, labels=labels, overlap=cfg.eval.overlap, flat_memory=cfg.eval.flat_memory,
                     save_txt=str(output_dir) if cfg.eval.save_txt else None, explain=explain)
    build = dict(family=cfg.model.family, out_dir=str(export_dir), runtime=plain(cfg.runtime),
                 precision=plain(cfg.precision), reference=reference,
                 own_decode=own_decode_config(cfg, mm_cfg) if cfg.eval.explain else None,
                 preprocessing_stage=bool(cfg.eval.explain), opset=cfg.export.opset,
                 simplify=cfg.export.simplify, torchscript=cfg.export.torchscript, compare_native=compare_native,
                 cache_dir=cfg.cache.dir if cfg.cache.enabled else None)
    return Plan(mm_cfg=mm_cfg, build=build, evaluator=evaluator,
                loop=LoopOptions(native=compare_native, prefetch=cfg.eval.prefetch, overlap=cfg.eval.overlap),
                engine=plain(cfg.engine), checkpoint=cfg.model.checkpoint,
                trust_checkpoint=cfg.model.trust_checkpoint, init_seed=cfg.model.get('init_seed'),
                work_dir=output_dir / 'mmengine')


FP32_RUNTIMES = ('onnx', 'openvino')  # the runtimes that also build the export at fp32 (explain's numerics stage)


def reference_precision(cfg: DictConfig) -> str | None:
    """The reference precision evaluated in the loop: with explain on a runtime that builds fp32, fp32 (the
    numerics stage)."""
    if not cfg.eval.explain or cfg.runtime.name not in FP32_RUNTIMES or cfg.precision.name == 'fp32':
        return cfg.eval.reference
    if cfg.eval.reference not in (None, 'fp32'):
        raise UserError(f'eval.reference={cfg.eval.reference}: eval.explain evaluates fp32 beside the device for its '
                        'numerics stage; remove eval.reference or set it to fp32')
    return 'fp32'


def own_decode_config(cfg: DictConfig, mm_cfg) -> dict | None:
    """The model section of the config with its own post-processing settings, when `eval` overrides them: the
    native raw maps are then also decoded with it (eval.explain's decode-settings stage). None when nothing
    differs."""
    if all(cfg.eval.get(option) is None for option in DECODE_OPTIONS):
        return None
    own = load_model_config(cfg.model.config)
    get_family(cfg.model.family).prepare_config(own, dict.fromkeys(DECODE_OPTIONS), cfg.model)
    if own.model.get('test_cfg') == mm_cfg.model.get('test_cfg'):
        return None
    return {'model': own.model.to_dict(), 'default_scope': own.get('default_scope', 'mmyolo')}


def evaluated_annotations(ann_file: Path, num_images: int | None, output_dir: Path) -> Path:
    """The annotation file as the evaluation reads it: the first `num_images` images (all if None) and their
    annotations without segmentation polygons. Bbox evaluation never reads them, yet on COCO they are most of the
    file, and the dataset (as masks) and the metric would hold them for every image all run long."""
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
