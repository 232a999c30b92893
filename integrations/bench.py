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
    """Stands in for a runtime: returns raw maps recorded from the real one, after a fixed latency."""

    def __init__(self, recorded: list[list[np.ndarray]], latency_ms: float):
        self.recorded = recorded
        self.latency_s = latency_ms / 1000
        self.calls = 0

    def run(self, batch: np.ndarray) -> list[np.ndarray]:
        maps = self.recorded[self.calls % len(self.recorded)]
        self.calls += 1
        time.sleep(self.latency_s)
        return maps


def run_bench(cfg: DictConfig, output_dir: Path) -> dict:
    from tqdm import tqdm

    from integrations.deploy import loop_preprocessing
    from integrations.mmengine.runner import (
        build_runner,
        export_hook,
        loop_seconds,
        progress_hook,
        run_test,
    )
    from runtime import Artifact, get_runtime

    bench = cfg.bench
    runner = build_runner(cfg, output_dir, output_dir / 'export')
    hook = export_hook(runner)
    hook.before_test(runner)  # export/build (or cache hit) and sessions attached to the evaluator
    model = runner.model
    dataset = runner.test_dataloader.dataset
    paths = [Path(dataset.get_data_info(i)['img_path']) for i in range(len(dataset))]
    inference = runner.test_loop.evaluator.paths['device'][0]
    if inference.reads_paths:  # the runtime preprocesses on the device: requests are image files
        images, prepare = [[str(p)] for p in paths], list

        def stack(parts: list[list[str]]) -> list[str]:
            return [path for part in parts for path in part]
    else:
        preprocess = loop_preprocessing(runner.cfg, model)
        images = [preprocess(p) for p in tqdm(paths, desc='preprocessing', unit='image')]
        prepare, stack = np.ascontiguousarray, np.concatenate
    options = plain(cfg.runtime)  # as the build's runtime got them
    runtime = get_runtime(options.pop('name'), precision=plain(cfg.precision),
                          **options)
    built = hook.report
    artifact = Artifact(Path(built['artifacts']['runtime']), built['precision'], Path(built['build_dir']))
    settings = ([{'batch_size': 1, 'instances': 1}] if bench.scenario == 'single_stream' else
                [{'batch_size': b, 'instances': i} for b in bench.batch_sizes for i in bench.instances])
    blocks = []
    for setting in tqdm(settings, desc='bench settings', unit='setting'):
        b = setting['batch_size']
        batches = [stack([images[(j + k) % len(images)] for k in range(b)]) for j in range(len(images))]
        sessions = [runtime.load(artifact) for _ in range(setting['instances'])]
        if bench.warmup:
            measure(sessions, prepare, batches, bench.warmup)
        for session in sessions:  # VACC's device worker: count what it adds from here on
            session.transfer_s = session.images = 0
        figures = measure(sessions, prepare, batches, bench.iterations)
        if hasattr(sessions[0], 'sdk_s'):
            figures['worker_transfer_ms_per_image'] = 1000 * sum(s.transfer_s for s in sessions) / max(
                sum(s.images for s in sessions), 1)
        for session in sessions:
            getattr(session, 'close', lambda: None)()
        blocks.append({**setting, **figures})
        print(vamp_block(setting, figures), flush=True)

    # the evaluation loop on the same images against the bare session (batch 1, one instance): once
    # sequential, where the wall time not spent in the runtime call is the host's work, once overlapped
    bare = next(b for b in blocks if b['batch_size'] == 1 and b['instances'] == 1)
    evaluator, loader = runner.test_loop.evaluator, runner.test_loop.dataloader
    in_flight, evaluator.in_flight = evaluator.in_flight, 0
    prefetch = getattr(loader, 'depth', 0)  # a PrefetchLoader's; nothing read ahead: every host stage in series
    if prefetch:
        loader.depth = 0
    run_test(runner)  # ExportHook attaches fresh sessions (a cache hit)
    sequential_s = loop_seconds(runner)
    if prefetch:
        loader.depth = prefetch
    device = evaluator.paths['device'][0]
    host_s = sequential_s - device.runtime_s
    stages = {'load': progress_hook(runner).load_s, **evaluator.host_s, 'decode': device.decode_s}
    stages['other'] = host_s - sum(stages.values())  # mmengine's loop and hooks, batch hand-over
    # this CPU's speed drifts within minutes: the bare session runs the same images right before and after
    # the overlapped loop, and the ratio is taken against their mean
    session, one_by_one = runtime.load(artifact), [prepare(image) for image in images]
    bare_before = measure([session], lambda batch: batch, one_by_one, len(images))['throughput_qps']
    evaluator.in_flight = in_flight
    run_test(runner)
    eval_s = loop_seconds(runner)
    bare_after = measure([session], lambda batch: batch, one_by_one, len(images))['throughput_qps']
    bare_images_per_s = (bare_before + bare_after) / 2
    evaluation = {'images_per_s': len(paths) / eval_s, 'sequential_images_per_s': len(paths) / sequential_s,
                  'bare_images_per_s': bare_images_per_s,
                  'overhead_ratio': (len(paths) / eval_s) / bare_images_per_s,
                  'host_ms_per_image': 1000 * host_s / len(paths),
                  'host_ms_per_image_by_stage': {k: 1000 * v / len(paths) for k, v in stages.items()}}
    result = {'model': cfg.model.family, 'runtime': cfg.runtime.name, 'precision': cfg.precision.name,
              'scenario': bench.scenario, 'num_images': len(paths), 'settings': blocks, 'evaluation': evaluation,
              'qps': bare['throughput_qps'], 'p50': bare['e2e_latency_us']['p50'],
              'p90': bare['e2e_latency_us']['p90'], 'p99': bare['e2e_latency_us']['p99'],
              'cache': hook.report['cache']}
    if bench.scenario == 'offline':
        result['offline_samples_per_s'] = max(b['throughput_qps'] for b in blocks)
    else:
        result['single_stream_p90_latency_us'] = bare['e2e_latency_us']['p90']

    if bench.replay_latency_ms is not None:
        run = session.run_paths if inference.reads_paths else session.run
        recorded = [run(image) for image in images]
        hook.before_test = lambda runner: None  # keep the replay attached for the loops below
        passes = []
        for _ in range(REPLAY_PASSES):  # the median of a few short loops, as this figure is noisy
            replay = ReplaySession(recorded, float(bench.replay_latency_ms))
            evaluator.paths['device'] = (type(inference)(replay, inference.decoder), evaluator.paths['device'][1])
            run_test(runner)
            passes.append(len(paths) / loop_seconds(runner))
        result['replay'] = {'latency_ms': float(bench.replay_latency_ms), 'images_per_s': statistics.median(passes),
                            'images_per_s_passes': passes}
    getattr(session, 'close', lambda: None)()
    return result
