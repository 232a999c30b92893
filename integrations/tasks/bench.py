"""`task=bench`: vamp-style speed figures for the configured model/precision/runtime, and how much of the bare
runtime's speed the evaluation loop keeps (overhead_ratio, host_ms_per_image), optionally against a replayed
runtime of fixed latency (bench.replay_latency_ms) to show what the host side sustains for a fast card."""
from __future__ import annotations

import resource
import statistics
import threading
import time
from pathlib import Path

import numpy as np
from omegaconf import DictConfig

from integrations.config import plain

REPLAY_PASSES = 3


def latency_stats(seconds: list[float]) -> dict:
    """avg/min/max/p50/p90/p99 in microseconds, as vamp prints them."""
    us = np.asarray(seconds) * 1e6
    return {'avg': float(us.mean()), 'min': float(us.min()), 'max': float(us.max()),
            'p50': float(np.percentile(us, 50)), 'p90': float(np.percentile(us, 90)),
            'p99': float(np.percentile(us, 99))}


def peak_memory_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(sessions: list, prepare, batches: list, iterations: int) -> dict:
    """`iterations` requests spread over the sessions (one thread each, like vamp's instances).
    model latency: the runtime call; e2e latency: from the request (batch assembly) to the raw maps back."""
    model, e2e, lock = [], [], threading.Lock()
    counter = iter(range(iterations))

    def worker(session):
        infer = session.run_paths if getattr(session, 'reads', 'tensor') == 'paths' else session.run
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                return
            start = time.perf_counter()
            batch = prepare(batches[i % len(batches)])
            call = time.perf_counter()
            infer(batch)
            done = time.perf_counter()
            with lock:
                model.append(done - call)
                e2e.append(time.perf_counter() - start)

    start = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(s,)) for s in sessions]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    forward_s = time.perf_counter() - start
    samples = iterations * len(batches[0])
    return {'samples': samples, 'forward_time_s': forward_s, 'throughput_qps': samples / forward_s,
            'e2e_latency_us': latency_stats(e2e), 'model_latency_us': latency_stats(model),
            'peak_memory_mb': peak_memory_mb()}


def vamp_block(setting: dict, figures: dict) -> str:
    lines = [f"- number of instances: {setting['instances']}", f"batch size: {setting['batch_size']}",
             f"samples: {figures['samples']}", f"forward time (s): {figures['forward_time_s']:.5f}",
             f"throughput (qps): {figures['throughput_qps']:.3f}"]
    for name in ('e2e', 'model'):
        stats = figures[f'{name}_latency_us']
        lines.append(f'{name} latency (us):')
        lines += [f'    {k} latency: {stats[k]:.0f}' for k in ('avg', 'min', 'max', 'p50', 'p90', 'p99')]
    lines.append(f"peak memory (MB): {figures['peak_memory_mb']:.1f}")
    if 'worker_transfer_ms_per_image' in figures:
        lines.append(f"device worker transfer (ms/image): {figures['worker_transfer_ms_per_image']:.3f}")
    return '\n'.join(lines)


class ReplaySession:
    """Stands in for a runtime: returns raw maps recorded from the real one, in the loop's order, after a fixed
    latency. Takes what the real session takes (a tensor, or image files for a device that preprocesses)."""

    def __init__(self, recorded: list[list[np.ndarray]], latency_ms: float, reads_paths: bool = False):
        self.recorded = recorded
        self.latency_s = latency_ms / 1000
        self.calls = 0
        self.reads = 'paths' if reads_paths else 'tensor'

    def run(self, batch) -> list[np.ndarray]:
        maps = self.recorded[self.calls % len(self.recorded)]
        self.calls += 1
        time.sleep(self.latency_s)
        return maps

    run_paths = run


def bench_settings(bench: DictConfig) -> list[dict]:
    """The (batch size, instances) settings the bare session is timed at: MLPerf SingleStream's one, or every
    combination of `bench.batch_sizes` and `bench.instances` (offline)."""
    if bench.scenario == 'single_stream':
        return [{'batch_size': 1, 'instances': 1}]
    return [{'batch_size': b, 'instances': i} for b in bench.batch_sizes for i in bench.instances]


def run_bench(cfg: DictConfig, output_dir: Path) -> dict:
    """The bare session's figures for every setting, then the evaluation loop on the same images in the chosen
    engine (sequential, overlapped, and against a replayed runtime): bench.json's content."""
    from tqdm import tqdm

    from integrations.deploy.pipeline import loop_preprocessing
    from integrations.engines import open_engine
    from integrations.engines.plan import LoopOptions, make_plan
    from runtime import Artifact, get_runtime

    bench = cfg.bench
    # the loop is measured against the bare runtime: no native forward
    engine = open_engine(make_plan(cfg, output_dir, output_dir / 'export', compare_native=False))
    built = engine.prepare()  # export/build (or cache hit) and sessions attached to the evaluator
    dataset = engine.dataset
    paths = [Path(dataset.get_data_info(i)['img_path']) for i in range(len(dataset))]
    options = plain(cfg.runtime)  # as the build's runtime got them
    runtime = get_runtime(options.pop('name'), precision=plain(cfg.precision), **options)
    artifact = Artifact(Path(built['artifacts']['runtime']), built['precision'], Path(built['build_dir']))
    reads_paths = engine.evaluator.paths['device'].inference.reads_paths
    if reads_paths:  # the runtime preprocesses on the device: requests are image files
        images, prepare = [[str(p)] for p in paths], list

        def stack(parts: list[list[str]]) -> list[str]:
            return [path for part in parts for path in part]
    else:
        preprocess = loop_preprocessing(engine.mm_cfg, engine.model)
        images = [preprocess(p) for p in tqdm(paths, desc='preprocessing', unit='image')]
        prepare, stack = np.ascontiguousarray, np.concatenate
    blocks = []
    for setting in tqdm(bench_settings(bench), desc='bench settings', unit='setting'):
        b = setting['batch_size']
        batches = [stack([images[(j + k) % len(images)] for k in range(b)]) for j in range(len(images))]
        sessions = [runtime.load(artifact) for _ in range(setting['instances'])]
        if bench.warmup:
            measure(sessions, prepare, batches, bench.warmup)
        worker_before = worker_counts(sessions)  # VACC's device worker: what it adds from here on
        figures = measure(sessions, prepare, batches, bench.iterations)
        if worker_before is not None:
            transfer_s, count = (after - before for after, before in zip(worker_counts(sessions), worker_before))
            figures['worker_transfer_ms_per_image'] = 1000 * transfer_s / max(count, 1)
        for session in sessions:
            getattr(session, 'close', lambda: None)()
        blocks.append({**setting, **figures})
        print(vamp_block(setting, figures), flush=True)

    # the evaluation loop on the same images against the bare session (batch 1, one instance): once
    # sequential and unprefetched, where the wall time not spent in the runtime call is the host's work, once as
    # the evaluation runs it
    bare = next(b for b in blocks if b['batch_size'] == 1 and b['instances'] == 1)
    sequential = engine.test(LoopOptions(native=False, prefetch=0, overlap=False))
    device = engine.evaluator.paths['device'].inference
    host_s = sequential.loop_s - device.runtime_s
    stages = {'load': sequential.load_s, **engine.evaluator.host_s, 'decode': device.decode_s}
    stages['other'] = host_s - sum(stages.values())  # the engine's loop and hooks, batch hand-over
    # this CPU's speed drifts within minutes: the bare session runs the same images right before and after
    # the overlapped loop, and the ratio is taken against their mean
    session, one_by_one = runtime.load(artifact), [prepare(image) for image in images]
    bare_before = measure([session], lambda batch: batch, one_by_one, len(images))['throughput_qps']
    eval_s = engine.test().loop_s
    bare_after = measure([session], lambda batch: batch, one_by_one, len(images))['throughput_qps']
    bare_images_per_s = (bare_before + bare_after) / 2
    evaluation = {'images_per_s': len(paths) / eval_s, 'sequential_images_per_s': len(paths) / sequential.loop_s,
                  'bare_images_per_s': bare_images_per_s,
                  'overhead_ratio': (len(paths) / eval_s) / bare_images_per_s,
                  'host_ms_per_image': 1000 * host_s / len(paths),
                  'host_ms_per_image_by_stage': {k: 1000 * v / len(paths) for k, v in stages.items()}}
    result = {'model': cfg.model.family, 'runtime': cfg.runtime.name, 'precision': cfg.precision.name,
              'engine': cfg.engine.name, 'scenario': bench.scenario, 'num_images': len(paths), 'settings': blocks,
              'evaluation': evaluation, 'qps': bare['throughput_qps'], 'p50': bare['e2e_latency_us']['p50'],
              'p90': bare['e2e_latency_us']['p90'], 'p99': bare['e2e_latency_us']['p99'], 'cache': built['cache'],
              'artifact': str(artifact.path)}
    if bench.scenario == 'offline':
        result['offline_samples_per_s'] = max(b['throughput_qps'] for b in blocks)
    else:
        result['single_stream_p90_latency_us'] = bare['e2e_latency_us']['p90']

    if bench.profile:
        result['profile'] = profile_summary(runtime.profile(artifact, one_by_one[0], bench.iterations),
                                            built['precision'])

    if bench.replay_latency_ms is not None:
        run = session.run_paths if reads_paths else session.run
        recorded = [run(image) for image in images]
        passes = []
        for _ in range(REPLAY_PASSES):  # the median of a few short loops, as this figure is noisy
            replay = ReplaySession(recorded, float(bench.replay_latency_ms), reads_paths)
            passes.append(len(paths) / engine.test(LoopOptions(native=False, prefetch=engine.plan.loop.prefetch,
                                                               overlap=engine.plan.loop.overlap,
                                                               device_session=replay)).loop_s)
        result['replay'] = {'latency_ms': float(bench.replay_latency_ms), 'images_per_s': statistics.median(passes),
                            'images_per_s_passes': passes}
    getattr(session, 'close', lambda: None)()
    return result


PROFILE_TOP = 10  # layers printed by time


def profile_summary(layers: list[dict], precision: dict) -> dict:
    """bench.profile's figures: every layer (as the runtime's profiler reports it) with its share of the total,
    the time by layer type and by precision, the slowest layers, and the layers the build meant to keep in float
    (int8's `float_nodes` or `excluded_nodes`) with the precision each actually ran in."""
    total = sum(layer['ms'] for layer in layers) or 1.0
    rows = [{**layer, 'ms': round(layer['ms'], 4), 'share': round(layer['ms'] / total, 4)} for layer in layers]

    def by(key: str) -> dict:
        sums: dict = {}
        for layer in layers:
            sums[layer[key]] = sums.get(layer[key], 0.0) + layer['ms']
        return {k: round(v, 3) for k, v in sorted(sums.items(), key=lambda item: -item[1])}

    planned = precision.get('ignored_scope') or precision.get('excluded_nodes') or []
    ran = {}
    for layer in layers:
        for name in layer.get('operations', [layer['node']]):
            ran[name] = layer['precision']
    return {'total_ms': round(total, 3), 'layers': rows, 'by_layer_type_ms': by('layer_type'),
            'by_precision_ms': by('precision'), 'top': sorted(rows, key=lambda r: -r['ms'])[:PROFILE_TOP],
            'planned_float': [{'node': name, 'ran_in': ran.get(name)} for name in planned]}


def worker_counts(sessions: list) -> tuple[float, int] | None:
    """(seconds the device worker added, images it ran) summed over the sessions; None for sessions without a
    device worker."""
    if not all(hasattr(s, 'transfer_s') for s in sessions):
        return None
    return sum(s.transfer_s for s in sessions), sum(s.images for s in sessions)
