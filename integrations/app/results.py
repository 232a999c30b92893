"""What the app writes and prints: results.json's content for task=eval (built from the loop's Outcome), and the
one-screen printouts of eval, bench, mlperf and export."""
from __future__ import annotations

from omegaconf import DictConfig

from evaluators.cocoeval import SUMMARY_KEYS


def weights_note(cfg: DictConfig) -> str:
    """Where the weights came from: a checkpoint, or the seeded random initialization (no weights given)."""
    return 'checkpoint' if cfg.model.checkpoint else \
        f"random (init_seed {cfg.model.get('init_seed')}): detections and mAP are meaningless"


def _metric_block(metrics: dict, prefix: str) -> dict | None:
    if f'{prefix}/bbox_mAP' not in metrics:
        return None
    return {k: metrics[f'{prefix}/{k}'] for k in SUMMARY_KEYS}


def _delta(a: dict | None, b: dict | None) -> float | None:
    """bbox mAP difference a - b, when both were measured."""
    return round(a['bbox_mAP'] - b['bbox_mAP'], 6) if a and b else None


def eval_results(cfg: DictConfig, outcome, num_images: int, explained: dict | None) -> dict:
    """results.json of task=eval (docs/results.md), from the loop's Outcome and eval.explain's block."""
    from integrations.engines.plan import reference_precision
    from integrations.models import get_family

    metrics, report = outcome.metrics, outcome.report
    artifacts = dict(report['artifacts'])
    for kind in ('txt', 'pred_json'):  # eval.save_txt: the folders and files per path
        if outcome.outputs:
            artifacts[kind] = {path: files[kind] for path, files in outcome.outputs.items()}
    device, native, reference = (_metric_block(metrics, p) for p in ('device', 'native', 'reference'))
    results = {
        'model': cfg.model.family, 'variant': cfg.model.variant, 'runtime': cfg.runtime.name,
        'precision': cfg.precision.name, 'engine': cfg.engine.name, 'num_images': num_images,
        'config': cfg.model.config, 'checkpoint': cfg.model.checkpoint, 'weights': weights_note(cfg),
        'input_shape': report['input_shape'], 'shape_note': get_family(cfg.model.family).SHAPE_NOTE,
        'device': device, 'native': native, 'reference': reference,
        'delta': {'device_minus_native': _delta(device, native), 'device_minus_reference': _delta(device, reference),
                  'reference': reference_precision(cfg)},
        'fidelity': ({'max_abs_diff': metrics['device/raw_max_abs_diff'],
                      'min_cosine': metrics['device/raw_min_cosine']} if 'device/raw_max_abs_diff' in metrics
                     else None),
        'precision_details': report['precision'],
        'layers_report': report.get('layers_report'),
        'export_check': report['export_check'], 'cache': report['cache'],
        'timings': {**report['timings'], 'eval_s': outcome.eval_s, 'runtime_s': metrics['device/runtime_s'],
                    'images_per_s': num_images / outcome.eval_s},
        'artifacts': artifacts, 'io': report['io'], 'runtime_version': report['runtime_version'],
    }
    if explained:
        results['artifacts'].update(explained.pop('artifacts'))
        results.update(explained)
    return results


INT8_PRECISIONS = ('u8', 'i8', 'uint8', 'int8')  # OpenVINO's runtime precisions, ONNX Runtime's input types


def bench_line(result: dict) -> str:
    """task=bench's summary line (the vamp-style blocks are printed as they come)."""
    e = result['evaluation']
    line = (f"bare runtime {result['qps']:.2f} images/s (p50 {result['p50'] / 1000:.1f} ms, p90 "
            f"{result['p90'] / 1000:.1f} ms, p99 {result['p99'] / 1000:.1f} ms); evaluation loop "
            f"{e['images_per_s']:.2f} images/s, overhead_ratio {e['overhead_ratio']:.2f} (bare session beside it "
            f"{e['bare_images_per_s']:.2f} images/s), "
            f"host {e['host_ms_per_image']:.1f} ms/image (" +
            ', '.join(f'{k} {v:.1f}' for k, v in e['host_ms_per_image_by_stage'].items()) + ')')
    if 'profile' in result:
        profile = result['profile']
        types = ', '.join(f'{k} {v:.1f}' for k, v in list(profile['by_layer_type_ms'].items())[:6])
        precisions = ', '.join(f'{k} {v:.1f}' for k, v in profile['by_precision_ms'].items())
        line += (f"\nprofile: {profile['total_ms']:.1f} ms per call; by layer type {types}; by precision "
                 f'{precisions} (ms); slowest layers:')
        line += ''.join(f"\n  {row['ms']:7.3f} ms {row['share']:6.1%}  {row['precision']:<6} {row['layer_type']:<16} "
                        f"{row['kernel']:<28} {row['node']}" for row in profile['top'])
        if kept := [row['node'] for row in profile['planned_float'] if row['ran_in'] in INT8_PRECISIONS]:
            line += f"\nmeant to stay in float but ran in int8: {', '.join(kept)}"
    if 'replay' in result:
        line += (f"\nreplayed runtime at {result['replay']['latency_ms']} ms: "
                 f"{result['replay']['images_per_s']:.1f} images/s end to end")
    return line


def mlperf_line(block: dict, output_dir) -> str:
    """task=mlperf's summary line."""
    if block['mode'] == 'performance':
        figures = ', '.join(f'{k} {v / 1000:.1f} ms' for k, v in block['latency_us'].items())
        rate = f", {block['samples_per_s']:.2f} samples/s" if 'samples_per_s' in block else ''
        why = f" ({'; '.join(block['not_satisfied'])})" if block['not_satisfied'] else ''
        return (f"mlperf {block['scenario']} performance: {block['result']}{why}{rate}, latency {figures} "
                f"({output_dir / 'mlperf_log_summary.txt'})")
    target = (f", target {block['target']:.4f}: {'met' if block['meets_target'] else 'NOT met'}"
              if block['target'] is not None else '')
    return (f"mlperf {block['scenario']} accuracy: bbox mAP {block['accuracy']['bbox_mAP']:.4f} over "
            f"{block['samples']} samples{target} ({output_dir / 'mlperf_log_accuracy.json'})")


def check_table(result: dict) -> str:
    """task=check's one-screen table: each step's result and its main figures or why."""
    def short(step: dict) -> str:
        if step['note']:
            return step['note']
        shown = {k: v for k, v in step['figures'].items() if not isinstance(v, (dict, list))}
        return ', '.join(f'{k} {v}' for k, v in shown.items())

    lines = [f"{'step':<18}{'result':<8}figures / why"]
    lines += [f"{step['name']:<18}{step['result']:<8}{short(step)[:94]}" for step in result['steps']]
    lines.append(', '.join(f'{count} {name}' for name, count in result['counts'].items() if count))
    return '\n'.join(lines)


def export_lines(result: dict, runtime: str) -> str:
    """task=export's file list, and for a VACC build what to run on the card's machine."""
    lines = [f'{name:12s} {path}' for name, path in result['files'].items()]
    if runtime == 'vacc':
        lines.append(f"compile on a machine with vamc: cd {result['export_dir']} && vamc compile vamc.yaml; then "
                     'python run.py runtime=vacc runtime.model_prefix=<that dir>/deploy_weights/<name>/mod')
    return '\n'.join(lines)


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
