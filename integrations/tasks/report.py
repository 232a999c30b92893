"""eval.explain's pictures and report.html: the images with the largest native/device difference side by side,
drawn by mmdet's own DetLocalVisualizer (ground truth | native | device), the per-class AP delta and the
breakdown as a waterfall (matplotlib), in one self-contained page (images embedded) that reads offline."""
from __future__ import annotations

import base64
import html
import io
from pathlib import Path

import numpy as np

from common.files import write_atomic, write_text_atomic


def _png(image: np.ndarray) -> bytes:
    """RGB array -> PNG bytes."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format='PNG', optimize=True)
    return buffer.getvalue()


def _figure_png(figure) -> bytes:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    figure.savefig(buffer, format='png', dpi=100, bbox_inches='tight')
    plt.close(figure)
    return buffer.getvalue()


def side_by_side(entry: dict, classes, ground_truth: dict | None, score_thr: float) -> np.ndarray:
    """Ground truth (optional) | native | device of one image, drawn with DetLocalVisualizer."""
    import mmcv
    import torch
    from mmdet.structures import DetDataSample
    from mmdet.visualization import DetLocalVisualizer
    from mmengine.structures import InstanceData

    image = mmcv.imread(entry['img_path'], channel_order='rgb')
    visualizer = DetLocalVisualizer.get_instance('inloop_explain', line_width=2)
    visualizer.dataset_meta = {'classes': tuple(classes)}

    def draw(detections: dict, with_truth: bool) -> np.ndarray:
        sample = DetDataSample()
        sample.pred_instances = InstanceData(**{k: torch.as_tensor(v) for k, v in detections.items()})
        if with_truth:
            sample.gt_instances = InstanceData(**{k: torch.as_tensor(v) for k, v in ground_truth.items()})
        visualizer.add_datasample('image', image, sample, draw_gt=with_truth, draw_pred=True,
                                  pred_score_thr=score_thr)
        return visualizer.get_image()

    left = draw(entry['native'], ground_truth is not None)
    right = draw(entry['device'], False)
    return np.concatenate([left, right], axis=1)


def ground_truth_of(metric, img_id) -> dict:
    """An image's ground-truth boxes (xyxy) and labels (indices into the metric's categories)."""
    index = {c: k for k, c in enumerate(metric.evaluated_categories())}
    anns = [a for a in metric.ground_truth.imgToAnns.get(img_id, []) if a['category_id'] in index]
    boxes = np.asarray([[x, y, x + w, y + h] for x, y, w, h in (a['bbox'] for a in anns)], np.float32).reshape(-1, 4)
    return {'bboxes': boxes, 'labels': np.asarray([index[a['category_id']] for a in anns], np.int64)}


def waterfall(breakdown: list[dict]):
    """The breakdown as a waterfall: the first stage's mAP, each stage's delta (with its interval), the last."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(1.6 * len(breakdown) + 2, 3.6))
    first = breakdown[0]['bbox_mAP']
    axis.bar(0, first, color='#4c72b0')
    level = first
    for x, entry in enumerate(breakdown[1:], start=1):
        delta = entry['delta']
        low, high = entry['delta_ci95']
        axis.bar(x, delta, bottom=level, color='#55a868' if delta >= 0 else '#c44e52')
        axis.errorbar(x, level + delta, yerr=[[delta - low], [high - delta]], color='black', capsize=3, lw=1)
        axis.text(x, max(level, level + delta), f'{delta:+.4f}', ha='center', va='bottom', fontsize=8)
        level += delta
    axis.set_xticks(range(len(breakdown)), [e['stage'] for e in breakdown], rotation=20, fontsize=8)
    values = [e['bbox_mAP'] for e in breakdown]
    span = max(values) - min(values)
    axis.set_ylim(max(0.0, min(values) - max(span, 0.005) * 1.5), max(values) + max(span, 0.005) * 1.5)
    axis.set_ylabel('bbox mAP')
    axis.set_title('mAP by stage (bars: delta, whiskers: 95 % bootstrap interval)', fontsize=9)
    return _figure_png(figure)


def class_deltas(rows: list[dict], count: int = 15):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    rows = rows[:count][::-1]
    figure, axis = plt.subplots(figsize=(6, 0.3 * len(rows) + 1))
    axis.barh([r['class'] for r in rows], [r['delta'] for r in rows],
              color=['#55a868' if r['delta'] >= 0 else '#c44e52' for r in rows])
    axis.axvline(0, color='black', lw=0.8)
    axis.set_xlabel('device AP - native AP (0.50:0.95)')
    axis.set_title(f'classes with the largest AP change ({len(rows)} shown)', fontsize=9)
    axis.tick_params(axis='y', labelsize=8)
    return _figure_png(figure)


def _img(data: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(data).decode()}">'


def _table(header: list[str], rows: list[list]) -> str:
    cells = ''.join(f'<th>{html.escape(h)}</th>' for h in header)
    body = ''.join('<tr>' + ''.join(f'<td>{html.escape("" if v is None else str(v))}</td>' for v in row) + '</tr>'
                   for row in rows)
    return f'<table><thead><tr>{cells}</tr></thead><tbody>{body}</tbody></table>'


STYLE = ('body{font-family:sans-serif;margin:2em;max-width:1400px}table{border-collapse:collapse;margin:1em 0}'
         'td,th{border:1px solid #bbb;padding:3px 8px;font-size:13px;text-align:right}th{background:#eee}'
         'td:first-child{text-align:left}img{max-width:100%;display:block;margin:0.5em 0}figure{margin:1em 0}')
# sets data-images-loaded on <body> once every image has decoded: a headless browser's DOM shows it
LOADED = ('<script>window.addEventListener("load",function(){var i=document.images,n=0;for(var k=0;k<i.length;k++)'
          '{if(i[k].complete&&i[k].naturalWidth>0)n++;}document.body.dataset.imagesLoaded=n+"/"+i.length;});'
          '</script>')


def write_report(output_dir: Path, block: dict, largest: list[dict], metric, cfg, device_name: str) -> Path:
    """report.html in `output_dir`, and the side-by-side PNGs beside it in explain/."""
    diff, details = block['detections_diff'], block['explain']
    pictures_dir = output_dir / 'explain'
    pictures_dir.mkdir(parents=True, exist_ok=True)
    pictures = []
    for entry in largest:
        truth = ground_truth_of(metric, entry['img_id']) if cfg.explain.draw_ground_truth else None
        data = _png(side_by_side(entry, metric.dataset_meta['classes'], truth, diff['score_thr']))
        path = pictures_dir / f"{Path(entry['img_path']).stem}.png"
        write_atomic(path, lambda tmp, data=data: Path(tmp).write_bytes(data))
        pictures.append((entry, data))
    rows = [[e['stage'], e['label'], f"{e['bbox_mAP']:.4f}", None if e['delta'] is None else f"{e['delta']:+.4f}",
             None if e['delta_ci95'] is None else f"[{e['delta_ci95'][0]:+.4f}, {e['delta_ci95'][1]:+.4f}]"]
            for e in block['breakdown']]
    low, high = block['delta_ci95']
    sizes = [[name, c['native'], c['device'], c['matched'], c['lost'], c['new'], c['mean_score_shift']]
             for name, c in diff['by_size'].items()]
    classes = sorted(diff['by_class'].items(), key=lambda kv: -(kv[1]['lost'] + kv[1]['new']))[:15]
    class_rows = [[name, c['native'], c['device'], c['matched'], c['lost'], c['new'], c['mean_score_shift']]
                  for name, c in classes]
    counts = ['', 'native', 'device', 'matched', 'lost', 'new', 'mean score shift']
    parts = [
        f'<h1>Where the mAP went: native vs {html.escape(device_name)}</h1>',
        f"<p>{cfg.model.family} {html.escape(str(cfg.model.variant))}, {diff['images']} images of "
        f"{html.escape(str(cfg.data.ann_file))}. Device - native: {block['breakdown'][-1]['bbox_mAP'] - next(e['bbox_mAP'] for e in block['breakdown'] if e['stage'] == details['native_stage']):+.4f} "
        f"bbox mAP, 95 % interval [{low:+.4f}, {high:+.4f}] (paired bootstrap over images, "
        f"{details['resamples']} resamples, seed {details['seed']}).</p>",
        '<h2>Breakdown</h2>', _table(['stage', 'what changes', 'bbox mAP', 'delta', 'delta 95 % interval'], rows),
        _img(waterfall(block['breakdown']), 'waterfall of the breakdown'),
        '<ul>' + ''.join(f"<li>skipped {html.escape(s['stage'])}: {html.escape(s['why'])}</li>"
                         for s in details['skipped']) + '</ul>',
        f"<h2>Detections (score &ge; {diff['score_thr']}, matched by class at IoU &ge; {diff['iou_thr']})</h2>",
        _table(counts, [['all', diff['native'], diff['device'], diff['matched'], diff['lost'], diff['new'],
                         diff['mean_score_shift']], *sizes]),
        '<h3>Classes with the most lost + new detections</h3>', _table(counts, class_rows),
    ]
    if details['per_class_ap_delta']:
        parts.append(_img(class_deltas(details['per_class_ap_delta']), 'per-class AP delta'))
    parts.append('<h2>Images with the largest difference</h2>')
    for entry, data in pictures:
        caption = (f"{html.escape(Path(entry['img_path']).name)}: {entry['lost']} lost, {entry['new']} new, "
                   f"{entry['matched']} matched ({'ground truth | ' if cfg.explain.draw_ground_truth else ''}"
                   f"native | {html.escape(device_name)})")
        parts.append(f'<figure>{_img(data, caption)}<figcaption>{caption}</figcaption></figure>')
    page = (f'<!DOCTYPE html><html><head><meta charset="utf-8"><title>inloop explain</title><style>{STYLE}</style>'
            f'</head><body>{"".join(parts)}{LOADED}</body></html>')
    report = output_dir / 'report.html'
    write_text_atomic(report, page)
    return report
