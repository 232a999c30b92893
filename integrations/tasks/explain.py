"""`eval.explain=true`: where the mAP between the native model and the device went, stage by stage, how sure we
are of each step, and pictures of it.

The stages, each changing one thing from the one before (a stage that does not apply is skipped and said so):
native under its config's own test pipeline (YOLOv5: rectangular `batch_shapes_cfg`) -> native at the fixed export
shape -> native with the deployed post-processing settings (`eval.score_thr`, `eval.multi_label`, …: the native
model's raw maps decoded a second time, no extra forward) -> the runtime at fp32 (numerics) -> the runtime at the
target precision, which is the device as reported. A runtime that preprocesses on the device (VACC) has instead
-> its preprocessing alone (the VDSP op's output read back and run by ONNX Runtime fp32 on the host) -> the device.
Every stage but the first comes out of the one evaluation loop; the first is one more native pass over the images
with the config's own pipeline. Intervals are paired bootstraps over images, re-accumulated from each stage's
COCOeval records (evaluators/breakdown.py).
"""
from __future__ import annotations

import copy
import time
from pathlib import Path

from omegaconf import DictConfig

from common.errors import UserError


def config_pipeline_pass(cfg: DictConfig, engine, ann_file: Path):
    """The native model under its config's own test pipeline (YOLO's rectangular batch shapes, mmdet's keep-ratio
    resize) and post-processing, as the framework's test would score it, in the engine's own test loop: (the metric
    holding its records, None) or (None, why the stage does not apply)."""
    from integrations.engines.plan import DECODE_OPTIONS, streamed
    from integrations.models import get_family, load_model_config

    own = load_model_config(cfg.model.config)
    dataset_cfg = own.test_dataloader.dataset
    shapes, pipeline = dataset_cfg.get('batch_shapes_cfg'), copy.deepcopy(dataset_cfg.pipeline)
    # the family's own post-processing settings and label space; its pipeline and batch shapes put back after
    get_family(cfg.model.family).prepare_config(own, dict.fromkeys(DECODE_OPTIONS), cfg.model)
    if not shapes and list(dataset_cfg.pipeline) == list(pipeline):
        return None, "the config's test pipeline already is the fixed export shape"
    dataset_cfg.pipeline, dataset_cfg.batch_shapes_cfg = pipeline, shapes
    dataset_cfg.data_root = ''
    dataset_cfg.ann_file = str(ann_file)
    dataset_cfg.data_prefix = dict(img=str(Path(cfg.data.img_dir).resolve()) + '/')
    loader = own.test_dataloader
    loader.batch_size = shapes.get('batch_size', 1)  # the batch the shapes were computed for
    loader.num_workers = cfg.eval.num_workers
    loader.persistent_workers = False
    metrics = own.test_evaluator if isinstance(own.test_evaluator, (list, tuple)) else [own.test_evaluator]
    metrics = [{**streamed(m), 'ann_file': str(ann_file), 'prefix': 'native_config'} for m in metrics]
    return engine.native_pass(own, metrics), None


def records_of(metric, what: str) -> list:
    if not getattr(metric, 'records', None):
        raise UserError(f'eval.explain: the {what} metric kept no per-image records (it needs the config\'s bbox '
                        'CocoMetric against data.ann_file)')
    return metric.records


def explain(cfg: DictConfig, engine, outcome, output_dir: Path) -> dict:
    """The breakdown, intervals, detection diff and report of a finished evaluation (`engine`'s test loop gave
    `outcome`): the keys results.json gains."""
    from evaluators.breakdown import breakdown, interval, stage_maps
    from integrations.engines.plan import DECODE_OPTIONS
    from integrations.tasks.report import write_report

    start = time.perf_counter()
    evaluator = outcome.evaluator
    device_metric = evaluator.paths['device'].evaluator.metrics[0]
    device_name = f'{cfg.runtime.name} {cfg.precision.name}'
    stages, records, skipped = [], [], []

    def stage(name: str, label: str, metric) -> None:
        stages.append((name, label))
        records.append(records_of(metric, label))

    config_metric, why = config_pipeline_pass(cfg, engine, Path(outcome.ann_file))  # the file the loop evaluated
    seconds = {'config_pass_s': time.perf_counter() - start}
    if config_metric is not None:
        stage('native_config', "native, the config's test pipeline (rectangular batch shapes) and settings",
              config_metric)
    else:
        skipped.append({'stage': 'native_config', 'why': why})
    if evaluator.own_decode:
        stage('export_shape', "native at the export shape, the model's own post-processing settings",
              evaluator.own_decode.evaluator.metrics[0])
        stage('decode', 'native with the deployed post-processing settings (' + ', '.join(
            f'eval.{o}={cfg.eval[o]}' for o in DECODE_OPTIONS if cfg.eval.get(o) is not None) + ')',
            evaluator.metrics[0])
    else:
        stage('export_shape', 'native at the export shape', evaluator.metrics[0])
        skipped.append({'stage': 'decode', 'why': "the deployed post-processing settings are the model's own"})
    if 'device_preprocessing' in evaluator.paths:  # the runtime preprocesses on the device (VACC's VDSP op)
        stage('device_preprocessing', f"{cfg.runtime.name}'s own preprocessing (its output read back), onnx fp32 on "
              'the host', evaluator.paths['device_preprocessing'].evaluator.metrics[0])
        skipped.append({'stage': 'numerics', 'why': f'runtime={cfg.runtime.name} runs {cfg.precision.name} only: '
                        'its numerics and precision are one stage'})
        stage('device', f'{device_name} (the device\'s numerics and precision)', device_metric)
    else:
        skipped.append({'stage': 'device_preprocessing',
                        'why': f'runtime={cfg.runtime.name} takes the host-preprocessed tensor'})
        if 'reference' in evaluator.paths:  # fp32, reference_precision's
            stage('numerics', f'{cfg.runtime.name} fp32 (the runtime\'s numerics)',
                  evaluator.paths['reference'].evaluator.metrics[0])
            stage('precision', f'{device_name} (the precision)', device_metric)
        else:
            skipped.append({'stage': 'precision', 'why': f'precision={cfg.precision.name}: the runtime at fp32 '
                            'is the device'})
            stage('numerics', f'{device_name} (the runtime\'s numerics)', device_metric)

    stream = device_metric.stream
    start = time.perf_counter()
    point, resampled = stage_maps(stream, records, cfg.explain.resamples, cfg.explain.seed)
    seconds['bootstrap_s'] = time.perf_counter() - start
    native_index = [name for name, _ in stages].index('decode' if evaluator.own_decode else 'export_shape')
    per_class = per_class_ap_delta(stream, records[native_index], records[-1], device_metric)
    diff = evaluator.diff.summary()
    block = {
        'breakdown': breakdown(stages, point, resampled),
        'delta_ci95': interval(resampled[-1] - resampled[native_index]),
        'detections_diff': diff,
        'explain': {'skipped': skipped, 'resamples': cfg.explain.resamples, 'seed': cfg.explain.seed,
                    'per_class_ap_delta': per_class, 'native_stage': stages[native_index][0]},
    }
    start = time.perf_counter()
    report = write_report(output_dir, block, evaluator.diff.largest(), device_metric, cfg, device_name)
    seconds['report_s'] = time.perf_counter() - start
    block['explain']['timings'] = {k: round(v, 3) for k, v in seconds.items()}
    block['artifacts'] = {'report': str(report)}
    return block


def per_class_ap_delta(stream, native_records: list, device_records: list, metric) -> list[dict]:
    """AP (0.50:0.95) per class of native and device, with ground truth, largest |delta| first."""
    native = stream.per_category_ap(stream.accumulate(native_records))
    device = stream.per_category_ap(stream.accumulate(device_records))
    names = {c['id']: c['name'] for c in metric.ground_truth.dataset['categories']}
    rows = [{'class': names.get(c, str(c)), 'native_AP': round(native[c], 6), 'device_AP': round(device[c], 6),
             'delta': round(device[c] - native[c], 6)} for c in native if c in device]
    return sorted(rows, key=lambda row: -abs(row['delta']))
