"""`run(cfg)`: check the inputs, evaluate through the chosen engine, write results.json, print the comparison."""
from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from common.errors import UserError, check_at_least
from common.files import write_json_atomic, write_text_atomic
from integrations.config import plain
from integrations.explain import check as check_explain, explain, reference_precision

OPSETS = (11, 20)


def check_dataset(img_dir: str, ann_file: str) -> dict:
    """Fail early, naming the option, if the data cannot be evaluated; return the parsed annotation file."""
    if not Path(img_dir).is_dir():
        raise UserError(f'data.img_dir={img_dir}: directory not found')
    if not Path(ann_file).is_file():
        raise UserError(f'data.ann_file={ann_file}: file not found')
    try:
        coco = json.loads(Path(ann_file).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f'data.ann_file={ann_file}: not valid JSON ({err})') from None
    if not isinstance(coco, dict) or not all(isinstance(coco.get(k), list)
                                             for k in ('images', 'annotations', 'categories')):
        raise UserError(f'data.ann_file={ann_file}: not COCO format (needs images, annotations, categories lists)')
    check_coco_entries(ann_file, coco)
    missing = [im['file_name'] for im in coco['images'] if not (Path(img_dir) / im['file_name']).is_file()]
    if missing:
        raise UserError(f'data.img_dir={img_dir}: {len(missing)} image(s) of {ann_file} missing, '
                        f'first: {missing[0]}')
    empty = [im['file_name'] for im in coco['images'] if (Path(img_dir) / im['file_name']).stat().st_size == 0]
    if empty:
        raise UserError(f'data.img_dir={img_dir}: {len(empty)} image file(s) are empty (0 bytes), first: '
                        f'{empty[0]}; replace or remove them')
    return coco


def ensure_writable(path: Path, option: str) -> None:
    """Create `path` if needed and write a probe file into it, so a run never fails at its end for want of a
    place to put its results."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=path).close()
    except OSError as err:
        raise UserError(f'{option}={path}: not a writable directory ({err.strerror}); choose another') from None


def check_coco_entries(ann_file: str, coco: dict) -> None:
    """What pycocotools and mmdet take for granted of a COCO file, checked with the entry named: a bad entry
    would otherwise surface as a KeyError deep in the loop, or as a silently wrong mAP."""
    def fail(what: str) -> None:
        raise UserError(f'data.ann_file={ann_file}: {what}')

    if not coco['images']:
        fail('no images')
    if not coco['categories']:
        fail('no categories')
    ids = set()
    for index, image in enumerate(coco['images']):
        if not isinstance(image, dict):
            fail(f'images[{index}] is not an object')
        for key, kind in (('id', int), ('file_name', str), ('width', int), ('height', int)):
            if not isinstance(image.get(key), kind) or isinstance(image.get(key), bool):
                fail(f'images[{index}] needs "{key}" ({kind.__name__}), has {image.get(key)!r}')
        if image['width'] < 1 or image['height'] < 1:
            fail(f'images[{index}] ({image["file_name"]}) has size {image["width"]}x{image["height"]}')
        if image['id'] in ids:
            fail(f'image id {image["id"]} appears twice (images[{index}], {image["file_name"]}); ids must be unique')
        ids.add(image['id'])
    category_ids = {c.get('id') for c in coco['categories'] if isinstance(c, dict)}
    if len(category_ids) != len(coco['categories']) or None in category_ids:
        fail('every category needs a unique "id"')
    for index, ann in enumerate(coco['annotations']):
        name = f'annotations[{index}] (id {ann.get("id")})' if isinstance(ann, dict) else f'annotations[{index}]'
        if not isinstance(ann, dict) or ann.get('image_id') not in ids:
            fail(f'{name} points to image id {ann.get("image_id") if isinstance(ann, dict) else None}, '
                 'which is not in images')
        if ann.get('category_id') not in category_ids:
            fail(f'{name} has category_id {ann.get("category_id")!r}, which is not in categories')
        box = ann.get('bbox')
        if not (isinstance(box, list) and len(box) == 4 and all(isinstance(v, (int, float)) for v in box)):
            fail(f'{name} needs "bbox": [x, y, width, height], has {box!r}')
        if box[2] < 0 or box[3] < 0:
            fail(f'{name} has a box of negative size {box}; COCO boxes are [x, y, width, height]')


def check_openimages_mlperf(ann_file: str, categories: list[dict]) -> None:
    """The RetinaNet's labels are the category ids 0..263 of the MLPerf format, listed in id order: the dataset
    numbers its labels by the file's order of categories, so any other order would shift every label."""
    from integrations.models.openimages_mlperf import CLASSES

    pairs, expected = [(c.get('id'), c.get('name')) for c in categories], list(enumerate(CLASSES))
    if pairs != expected and sorted(map(repr, pairs)) == sorted(map(repr, expected)):
        raise UserError(f'data.ann_file={ann_file}: its categories are not listed in id order (0-263), as MLPerf\'s '
                        'format lists them; sort the "categories" list by id')
    if pairs != expected:
        raise UserError(f'data.ann_file={ann_file}: not in the openimages-mlperf format (264 categories, ids 0-263); '
                        'convert COCO ground truth with tools/coco_to_openimages_mlperf.py')


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


def check_bench(bench: DictConfig) -> None:
    """task=bench's ranges, checked before anything is exported or built."""
    for option in ('batch_sizes', 'instances'):
        if not bench[option] or min(bench[option]) < 1:
            raise UserError(f'bench.{option}={list(bench[option])}: must be a non-empty list of numbers >= 1, e.g. [1,4]')
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
    if not OPSETS[0] <= cfg.export.opset <= OPSETS[1]:
        raise UserError(f'export.opset={cfg.export.opset}: use {OPSETS[0]}-{OPSETS[1]} (the TorchScript exporter\'s '
                        'range that both model families export at)')
    if cfg.task == 'bench':
        check_bench(cfg.bench)
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


@contextmanager
def host_threads(cfg: DictConfig):
    """torch's intra-op threads for the evaluation's host work (preprocessing, decoding): idle torch threads
    spin-wait on the cores a CPU runtime computes on, so without a native forward to speed up one is best."""
    import torch

    threads = cfg.eval.get('host_threads') or (None if cfg.eval.compare_native else 1)
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _metric_block(metrics: dict, prefix: str) -> dict | None:
    keys = ('bbox_mAP', 'bbox_mAP_50', 'bbox_mAP_75', 'bbox_mAP_s', 'bbox_mAP_m', 'bbox_mAP_l')
    if f'{prefix}/bbox_mAP' not in metrics:
        return None
    return {k: metrics[f'{prefix}/{k}'] for k in keys}


def _delta(a: dict | None, b: dict | None) -> float | None:
    """bbox mAP difference a - b, when both were measured."""
    return round(a['bbox_mAP'] - b['bbox_mAP'], 6) if a and b else None


def run(cfg: DictConfig, output_dir: str | Path | None = None) -> dict:
    """Evaluate `cfg` and return the results dict (also written to <output_dir>/results.json)."""
    try:
        return _run(cfg, output_dir)
    finally:
        release_process_group()


def release_process_group() -> None:
    """Destroy the distributed process group (torchrun ranks) while the interpreter is still whole: left to
    interpreter teardown, gloo's worker threads can abort the process after the results are written."""
    if 'torch' not in sys.modules:
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _run(cfg: DictConfig, output_dir: str | Path | None) -> dict:
    if output_dir is None:
        from hydra.core.hydra_config import HydraConfig
        output_dir = HydraConfig.get().runtime.output_dir
    output_dir = Path(output_dir)
    ensure_writable(output_dir, 'hydra.run.dir (the output dir)')
    if cfg.task == 'cache':
        return cache_task(cfg)
    if cfg.task == 'export':
        from omegaconf import open_dict
        with open_dict(cfg):
            cfg.cache.enabled = False  # the files go to <output_dir>/export, to be carried elsewhere
            if 'compile' in cfg.runtime:
                cfg.runtime.compile = False
    num_images = check_inputs(cfg)
    if cfg.task != 'eval':
        tasks = {'bench': bench_task, 'export': export_task, 'npz': npz_task, 'mlperf': mlperf_task}
        return tasks[cfg.task](cfg, output_dir)

    from importlib import import_module

    test = import_module(f'integrations.{cfg.engine.name}.runner').test
    export_dir = output_dir / 'export'
    output_dir.mkdir(parents=True, exist_ok=True)
    try:
        with host_threads(cfg):
            outcome = test(cfg, output_dir, export_dir)
    except BaseException:
        shutil.rmtree(export_dir, ignore_errors=True)
        for partial in (output_dir / 'txt').glob('*.partial'):
            shutil.rmtree(partial, ignore_errors=True)
        raise
    metrics, report = outcome['metrics'], outcome['report']
    artifacts = dict(report['artifacts'])
    for kind in ('txt', 'pred_json'):  # eval.save_txt: the folders and files per path
        if outcome.get('outputs'):
            artifacts[kind] = {path: files[kind] for path, files in outcome['outputs'].items()}
    device, native, reference = (_metric_block(metrics, p) for p in ('device', 'native', 'reference'))
    results = {
        'model': cfg.model.family, 'variant': cfg.model.variant, 'runtime': cfg.runtime.name,
        'precision': cfg.precision.name, 'engine': cfg.engine.name, 'num_images': num_images,
        'config': cfg.model.config, 'checkpoint': cfg.model.checkpoint,
        'weights': 'checkpoint' if cfg.model.checkpoint else
                   f"random (init_seed {cfg.model.get('init_seed')}): detections and mAP are meaningless",
        'input_shape': report['input_shape'],
        'shape_note': 'fixed-shape letterbox for native and device (the config\'s batch_shapes_cfg is off)',
        'device': device, 'native': native, 'reference': reference,
        'delta': {'device_minus_native': _delta(device, native), 'device_minus_reference': _delta(device, reference),
                  'reference': reference_precision(cfg)},
        'fidelity': ({'max_abs_diff': metrics['device/raw_max_abs_diff'],
                      'min_cosine': metrics['device/raw_min_cosine']} if 'device/raw_max_abs_diff' in metrics
                     else None),
        'precision_details': report['precision'],
        'layers_report': report.get('layers_report'),
        'export_check': report['export_check'], 'cache': report['cache'],
        'timings': {**report['timings'], 'eval_s': outcome['eval_s'], 'runtime_s': metrics['device/runtime_s'],
                    'images_per_s': num_images / outcome['eval_s']},
        'artifacts': artifacts, 'io': report['io'], 'runtime_version': report['runtime_version'],
    }
    if cfg.eval.explain:
        block = explain(cfg, outcome, output_dir, Path(outcome['ann_file']))  # the file the loop evaluated
        results['artifacts'].update(block.pop('artifacts'))
        results.update(block)
    if outcome.get('rank', 0) == 0:  # distributed: every rank has the gathered metrics, one writes them
        write_json_atomic(output_dir / 'results.json', results)
        print(format_comparison(results), file=sys.stdout)
    return results


def bench_task(cfg: DictConfig, output_dir: Path) -> dict:
    """Speed figures (vamp-style blocks printed as they come) written to bench.json."""
    from omegaconf import open_dict

    from integrations.bench import run_bench

    with open_dict(cfg):
        cfg.eval.compare_native = False  # the loop is measured against the bare runtime: no native forward
    output_dir.mkdir(parents=True, exist_ok=True)
    with host_threads(cfg):
        result = run_bench(cfg, output_dir)
    write_json_atomic(output_dir / 'bench.json', result)
    e = result['evaluation']
    print(f"bare runtime {result['qps']:.2f} images/s (p50 {result['p50'] / 1000:.1f} ms, p90 "
          f"{result['p90'] / 1000:.1f} ms, p99 {result['p99'] / 1000:.1f} ms); evaluation loop "
          f"{e['images_per_s']:.2f} images/s, overhead_ratio {e['overhead_ratio']:.2f} (bare session beside it "
          f"{e['bare_images_per_s']:.2f} images/s), "
          f"host {e['host_ms_per_image']:.1f} ms/image (" +
          ', '.join(f'{k} {v:.1f}' for k, v in e['host_ms_per_image_by_stage'].items()) + ')')
    if 'replay' in result:
        print(f"replayed runtime at {result['replay']['latency_ms']} ms: "
              f"{result['replay']['images_per_s']:.1f} images/s end to end")
    print(f"bench.json: {output_dir / 'bench.json'}")
    return result


def mlperf_task(cfg: DictConfig, output_dir: Path) -> dict:
    """MLPerf LoadGen over the runtime session: its logs in the run dir, the `mlperf` block in results.json."""
    from integrations.mlperf import run_mlperf

    output_dir.mkdir(parents=True, exist_ok=True)
    with host_threads(cfg):
        block = run_mlperf(cfg, output_dir)
    results = {'model': cfg.model.family, 'variant': cfg.model.variant, 'runtime': cfg.runtime.name,
               'precision': cfg.precision.name, 'checkpoint': cfg.model.checkpoint,
               'weights': 'checkpoint' if cfg.model.checkpoint else
                          f"random (init_seed {cfg.model.get('init_seed')}): detections and mAP are meaningless",
               'mlperf': block}
    write_json_atomic(output_dir / 'results.json', results)
    if block['mode'] == 'performance':
        figures = ', '.join(f'{k} {v / 1000:.1f} ms' for k, v in block['latency_us'].items())
        rate = f", {block['samples_per_s']:.2f} samples/s" if 'samples_per_s' in block else ''
        why = f" ({'; '.join(block['not_satisfied'])})" if block['not_satisfied'] else ''
        print(f"mlperf {block['scenario']} performance: {block['result']}{why}{rate}, latency {figures} "
              f"({output_dir / 'mlperf_log_summary.txt'})")
    else:
        target = (f", target {block['target']:.4f}: {'met' if block['meets_target'] else 'NOT met'}"
                  if block['target'] is not None else '')
        print(f"mlperf {block['scenario']} accuracy: bbox mAP {block['accuracy']['bbox_mAP']:.4f} over "
              f"{block['samples']} samples{target} ({output_dir / 'mlperf_log_accuracy.json'})")
    return results


def export_task(cfg: DictConfig, output_dir: Path) -> dict:
    """Export and write the runtime's build files without running anything (runtime=vacc: model.onnx, vamc.yaml,
    vdsp_params.json and the calibration images, to compile with vamc where the SDK is)."""
    from integrations.mmengine.runner import build_runner, export_hook

    export_dir = output_dir / 'export'
    try:
        runner = build_runner(cfg, output_dir, export_dir)
        _, built, *_ = export_hook(runner).build(runner)
    except BaseException:
        shutil.rmtree(export_dir, ignore_errors=True)
        raise
    files = {name: str(export_dir / file) for name, file in built['files'].items()
             if (export_dir / file).exists() or name != 'runtime'}
    result = {'export_dir': str(export_dir), 'files': files, 'io': built['io'],
              'export_check': built['export_check'], 'precision': built['device']['info']}
    write_json_atomic(output_dir / 'export.json', result)
    for name, path in files.items():
        print(f'{name:12s} {path}')
    if cfg.runtime.name == 'vacc':
        print(f'compile on a machine with vamc: cd {export_dir} && vamc compile vamc.yaml; then '
              'python run.py runtime=vacc runtime.model_prefix=<that dir>/deploy_weights/<name>/mod')
    return result


def npz_task(cfg: DictConfig, output_dir: Path) -> dict:
    """vamp's input: one npz per evaluated image (`input_0`, planar RGB uint8, as VastAI's image2npz.py writes it)
    and the datalist naming them, absolute or relative to `npz.relative_to`. vamp writes its outputs as
    output_%06d.npz by datalist line, which runtime=npz reads back."""
    import numpy as np
    from tqdm import tqdm

    from runtime.vacc import read_planar_rgb

    base = Path(cfg.npz.relative_to).resolve() if cfg.npz.relative_to else None
    if base is not None and not base.is_dir():
        raise UserError(f'npz.relative_to={cfg.npz.relative_to}: directory not found')
    images = json.loads(Path(cfg.data.ann_file).read_text())['images'][:cfg.eval.get('num_images') or None]
    npz_dir, partial = output_dir / 'npz', output_dir / 'npz.partial'
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    lines = []
    try:
        for image in tqdm(images, desc='image -> npz', unit='image'):
            name = f"{Path(image['file_name']).stem}.npz"
            np.savez(partial / name, input_0=read_planar_rgb(Path(cfg.data.img_dir) / image['file_name'])[0])
            target = (npz_dir / name).resolve()
            lines.append(os.path.relpath(target, base) if base else str(target))
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    shutil.rmtree(npz_dir, ignore_errors=True)
    os.replace(partial, npz_dir)
    datalist = output_dir / 'npz_datalist.txt'
    write_text_atomic(datalist, '\n'.join(lines) + '\n')
    print(f'{len(lines)} npz files in {npz_dir}; datalist {datalist}')
    return {'npz_dir': str(npz_dir), 'datalist': str(datalist), 'num_images': len(lines)}


def cache_task(cfg: DictConfig) -> dict:
    """List the artifact cache, or clean it (cache.clean=all|invalid)."""
    from runtime.cache import ArtifactCache

    cache = ArtifactCache(cfg.cache.dir)
    if cfg.cache.clean:
        print(f'removed {cache.clean(only_invalid=cfg.cache.clean == "invalid")} entries from {cache.root}')
    rows = cache.entries()
    print(f'{len(rows)} entries in {cache.root}')
    for row in rows:
        d = row['describe']
        print(f"{row['key']}  {row['bytes'] / 2**20:8.1f} MiB  {'ok' if row['valid'] else 'DAMAGED':7s}  "
              f"{d.get('model')} {d.get('runtime')} {d.get('precision')}  {d.get('config')}")
    return {'cache_dir': str(cache.root), 'entries': rows}


def format_comparison(results: dict) -> str:
    """Device and native mAP side by side, derived from the results dict."""
    columns = {f"{results['runtime']} {results['precision']}": results['device']}
    if results['reference']:
        columns[f"{results['runtime']} {results['delta']['reference']}"] = results['reference']
    if results['native']:
        columns['native'] = results['native']
    lines = [] if results['weights'] == 'checkpoint' else [f"weights: {results['weights']}"]
    lines.append(f"{'metric':<14}" + ''.join(f'{name:>14}' for name in columns))
    for key in results['device']:
        lines.append(f'{key:<14}' + ''.join(f'{block[key]:>14.4f}' for block in columns.values()))
    if results['fidelity']:
        lines.append(f"raw maps: max |diff| {results['fidelity']['max_abs_diff']:.3g}, "
                     f"min cosine {results['fidelity']['min_cosine']:.6f}")
    if results.get('breakdown'):
        lines.append('where the mAP went (eval.explain; 95 % paired bootstrap intervals):')
        for entry in results['breakdown']:
            delta = '' if entry['delta'] is None else \
                f"  {entry['delta']:+.4f} [{entry['delta_ci95'][0]:+.4f}, {entry['delta_ci95'][1]:+.4f}]"
            lines.append(f"  {entry['stage']:<14}{entry['bbox_mAP']:.4f}{delta}  {entry['label']}")
        low, high = results['delta_ci95']
        lines.append(f"device - native {results['delta']['device_minus_native']:+.4f}, 95 % interval "
                     f"[{low:+.4f}, {high:+.4f}]; report: {results['artifacts']['report']}")
    t = results['timings']
    lines.append(f"{results['num_images']} images, {t['images_per_s']:.2f} images/s "
                 f"(export {t['export_s']:.1f}s, build {t['build_s']:.1f}s, eval {t['eval_s']:.1f}s, "
                 f"cache {results['cache']})")
    return '\n'.join(lines)
