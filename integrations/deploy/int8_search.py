"""int8 that holds on images it was not tuned on: `precision.max_drop` keeps few convs in float (none of them
could go back to int8 alone) that bring the int8 model's drop against fp32, measured by the task's own mAP on a
selection set kept apart from calibration and from the evaluated images, within the budget;
`precision.layers_report` shows, conv by conv in execution order, where int8 leaves the float model.

The search: the int8 model as configured is scored on the selection set; if it loses more than `max_drop` points,
the modules of the quantized convs (mmcv's ConvModule: the conv and its activation) are ranked by the noise each
conv adds itself (runtime.onnx.layer_divergence on a few selection images, a cheap proxy), and the k first are kept
in float for k = 1, 2, 4, … until the budget holds, then k is bisected down to the smallest that holds. The mAP is
not monotone along the ranking, so a last pass tries to put each chosen module back in int8, lowest-ranked first,
and keeps it there if the budget still holds: no single module of the result can go back to int8. Every step's
selection mAP and speed is reported. Only these modules are candidates: the ops between them (Concat, Resize,
MaxPool of the neck) stay int8.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import tempfile
import time
from pathlib import Path

from common.errors import UserError

PROXY_IMAGES = 4  # selection images the ranking proxy runs on
SEARCH_RUNTIMES = ('onnx', 'vacc')  # vacc: on ONNX Runtime's int8 as a proxy
REPORT_RUNTIMES = ('onnx',)


def check_precision_options(precision: dict, runtime: str) -> None:
    """The rules of `precision.max_drop` and `precision.layers_report` that no type expresses, checked before
    anything is exported (the app's input checks and DeviceBuild both call this)."""
    if precision.get('name') != 'int8':
        return
    budget = precision.get('max_drop')
    if budget is not None:
        if runtime not in SEARCH_RUNTIMES:
            raise UserError(f"precision.max_drop: the search runs on runtime={' or '.join(SEARCH_RUNTIMES)}, not "
                            f'{runtime}; remove the option')
        if not budget > 0:
            raise UserError(f'precision.max_drop={budget}: must be > 0 (mAP points)')
        selection = precision.get('selection') or {}
        if not selection.get('img_dir') or not selection.get('ann_file'):
            raise UserError('precision.max_drop needs a selection set: add precision.selection.img_dir=DIR '
                            'precision.selection.ann_file=FILE.json (COCO format, not the evaluated images)')
    if precision.get('layers_report') and runtime not in REPORT_RUNTIMES:
        raise UserError(f'precision.layers_report runs on runtime={REPORT_RUNTIMES[0]}, not {runtime}; remove the '
                        'option')


def file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def check_disjoint(selection: list[Path], calibration: list[Path], evaluated: list[Path]) -> None:
    """The selection images share no file (by path or by content) with the calibration or evaluated images:
    choosing float layers on either would flatter the figures reported."""
    def index(paths: list[Path]) -> tuple[set, dict]:
        sizes: dict = {}
        for path in paths:
            sizes.setdefault(path.stat().st_size, []).append(path)
        return {p.resolve() for p in paths}, sizes

    digests: dict = {}

    def digest_of(path: Path) -> str:  # only files of equal size are hashed, each once
        if path not in digests:
            digests[path] = file_digest(path)
        return digests[path]

    for name, others in (('precision.calibration', calibration), ('the evaluated set (data.*)', evaluated)):
        resolved, sizes = index(others)
        for path in selection:
            same_size = sizes.get(path.stat().st_size, [])
            if path.resolve() in resolved or any(digest_of(path) == digest_of(o) for o in same_size):
                raise UserError(f'precision.selection: {path.name} is also in {name}; the selection set must be '
                                'disjoint from the calibration and the evaluated images (choose other images)')


class SelectionSet:
    """The selection images, preprocessed once as the evaluation preprocesses them, scored with the evaluation's
    own decoder and COCO matching (evaluators/cocoeval.py)."""

    def __init__(self, mm_cfg, model, decoder, classes, img_dir: str, ann_file: str, num_images: int | None,
                 label_space: str, calibration: list[Path] = (), evaluated: list[Path] = ()):
        import torch
        from mmengine.dataset import pseudo_collate
        from pycocotools.coco import COCO

        from common.annotations import check_dataset
        from evaluators.cocoeval import StreamingCocoEval
        from evaluators.mm.preprocess import BatchPreprocessor
        from integrations.deploy.pipeline import image_pipeline

        coco_json = check_dataset(img_dir, ann_file, 'precision.selection')
        images = coco_json['images'][:num_images or None]
        self.paths = [Path(img_dir) / image['file_name'] for image in images]
        check_disjoint(self.paths, list(calibration), list(evaluated))
        coco = COCO()  # from the file check_dataset has read and checked
        coco.dataset = coco_json
        with contextlib.redirect_stdout(io.StringIO()):
            coco.createIndex()
        # label i is category cat_ids[i], as the evaluation's metrics have it
        cat_ids = sorted(coco.getCatIds()) if label_space == 'openimages_mlperf' else \
            coco.getCatIds(catNms=list(classes))
        self.stream = StreamingCocoEval(coco, cat_ids, (100, 300, 1000), img_ids=[im['id'] for im in images])
        pipeline = image_pipeline(mm_cfg)
        preprocessor = BatchPreprocessor(model.data_preprocessor)
        self.items = []
        for image, path in zip(images, self.paths):
            data = pipeline(dict(img_path=str(path), img_id=image['id']))
            with torch.no_grad():
                batch = preprocessor(pseudo_collate([data]), False)
            self.items.append((image['id'], batch['inputs'].numpy(), [s.metainfo for s in batch['data_samples']]))
        self.decoder = decoder

    def score(self, session) -> tuple[float, float]:
        """(bbox mAP, images/s of the session's runs) on the selection set."""
        import torch

        records, runtime_s = [], 0.0
        for img_id, inputs, metas in self.items:
            start = time.perf_counter()
            raw_maps = session.run(inputs)
            runtime_s += time.perf_counter() - start
            det = self.decoder([torch.from_numpy(m) for m in raw_maps], metas)[0]
            records.append(self.stream.evaluate_image(img_id, det['bboxes'].numpy(), det['scores'].numpy(),
                                                      det['labels'].numpy()))
        stats = self.stream.summarize(self.stream.accumulate(self.stream.complete(records)), printout=False)
        return float(stats[0]), len(self.items) / runtime_s


def smallest_float_set(ranked: list[str], drop_of, max_drop: float) -> tuple[list[str], list[dict]]:
    """Few of `ranked` kept in float with drop_of(kept) <= max_drop (in mAP points): the first k, k by
    doubling then bisected between the last k that failed and the first that held; then each kept module,
    lowest-ranked first, is dropped from the set if the budget still holds without it. `drop_of(modules)` returns
    (drop, step report); every step is reported in order. All of `ranked` if no k holds."""
    steps, tried = [], {}

    def holds(modules: list[str], **step) -> bool:
        key = tuple(modules)
        if key not in tried:
            drop, report = drop_of(modules)
            tried[key] = drop <= max_drop
            steps.append({'float_layers': len(modules), **step, **report, 'within_budget': tried[key]})
        return tried[key]

    def first(k: int) -> bool:
        return holds(ranked[:k])

    if first(0):
        return [], steps
    low, k = 0, 1
    while k < len(ranked) and not first(k):
        low, k = k, min(2 * k, len(ranked))
    if k >= len(ranked) and not first(len(ranked)):
        return list(ranked), steps
    high = k
    while high - low > 1:
        middle = (low + high) // 2
        if first(middle):
            high = middle
        else:
            low = middle
    chosen = ranked[:high]
    for module in reversed(ranked[:high]):
        without = [m for m in chosen if m != module]
        if holds(without, back_to_int8=module):
            chosen = without
    return chosen, steps


def float_layer_search(selection: SelectionSet, max_drop: float):
    """`select_float` for runtime.onnx (and runtime=vacc's proxy): the search on `selection`, against the
    selection mAP of the float model the int8 one is quantized from (the export with exact rewrites)."""
    from runtime.onnx import OrtSession, layer_divergence, module_path

    def select(quantize, float_model: Path, excluded: list[str]):
        import onnx

        start = time.perf_counter()
        reference_map, reference_speed = selection.score(OrtSession(float_model))
        names = [n.name for n in onnx.load(str(float_model)).graph.node]
        with tempfile.TemporaryDirectory(prefix='inloop-search-') as tmp:
            def nodes_of(modules: list[str]) -> list[str]:
                return [n for n in names if any(f'{module_path(n)}.'.startswith(f'{m}.') for m in modules)
                        and n not in excluded]

            def drop_of(modules: list[str]) -> tuple[float, dict]:
                path = Path(tmp) / f'int8_{len(modules)}.onnx'
                quantize(nodes_of(modules), path)
                mAP, speed = selection.score(OrtSession(path))
                drop = 100 * (reference_map - mAP)
                return drop, {'selection_mAP': round(mAP, 6), 'drop_points': round(drop, 4),
                              'images_per_s': round(speed, 3), 'modules': list(modules)}

            drop0, first = drop_of([])
            ranked: list[str] = []
            if drop0 > max_drop:
                divergence = layer_divergence(float_model, Path(tmp) / 'int8_0.onnx',
                                              [inputs for _, inputs, _ in selection.items[:PROXY_IMAGES]])
                ranked = [conv_module(row['module']) for row in sorted(divergence, key=lambda r: -r['added_noise'])
                          if row['quantized'] and row['node'] not in excluded]
            chosen, steps = smallest_float_set(ranked, lambda modules: drop_of(modules) if modules else (drop0, first),
                                               max_drop)
        return nodes_of(chosen), {
            'max_drop': max_drop, 'selection_images': len(selection.items),
            'fp32_selection_mAP': round(reference_map, 6), 'fp32_images_per_s': round(reference_speed, 3),
            'ranked_by': 'added_noise of the module\'s conv', 'float_modules': chosen, 'steps': steps,
            'met': any(step['within_budget'] for step in steps), 'seconds': round(time.perf_counter() - start, 1)}

    return select


def conv_module(conv: str) -> str:
    """The module a conv is kept in float with: mmcv's ConvModule (`….conv1` for `….conv1.conv`), so its
    activation goes with it; a bare conv (a head's prediction conv) alone."""
    return conv.removesuffix('.conv') if conv.endswith('.conv') else conv


def selection_digest(paths: list[Path], ann_file: str) -> str:
    """Content digest of the selection set (images and annotations), for the cache key."""
    h = hashlib.sha256(Path(ann_file).read_bytes())
    for path in paths:
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:16]
