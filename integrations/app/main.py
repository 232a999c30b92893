"""`run(cfg)`: check the inputs, run the task (integrations/tasks/) in the chosen engine, write its results file
and print its summary."""
from __future__ import annotations

import sys
from contextlib import contextmanager
from pathlib import Path

from omegaconf import DictConfig, open_dict

from common.files import write_json_atomic
from integrations.app import results as printout
from integrations.app.checks import check_inputs, ensure_writable


def run(cfg: DictConfig, output_dir: str | Path | None = None) -> dict:
    """Run `cfg`'s task and return its results (also written to <output_dir>: results.json, bench.json, …)."""
    try:
        return _run(cfg, output_dir)
    finally:
        release_process_group()


def _run(cfg: DictConfig, output_dir: str | Path | None) -> dict:
    if output_dir is None:
        from hydra.core.hydra_config import HydraConfig
        output_dir = HydraConfig.get().runtime.output_dir
    output_dir = Path(output_dir)
    ensure_writable(output_dir, 'hydra.run.dir (the output dir)')
    if cfg.task == 'cache':
        from integrations.tasks.cache import run_cache
        return run_cache(cfg)
    if cfg.task == 'export':  # the files go to <output_dir>/export, to be carried elsewhere
        with open_dict(cfg):
            cfg.cache.enabled = False
            if 'compile' in cfg.runtime:
                cfg.runtime.compile = False
    num_images = check_inputs(cfg)
    if cfg.task == 'bench':  # the loop is measured against the bare runtime: no native forward
        with open_dict(cfg):
            cfg.eval.compare_native = False
    if cfg.task == 'npz':
        from integrations.tasks.npz import run_npz
        return run_npz(cfg, output_dir)
    if cfg.task == 'check':
        from integrations.tasks.check import run_check
        return written(output_dir / 'check.json', run_check(cfg, output_dir), printout.check_table)
    if cfg.task == 'export':
        from integrations.tasks.export import run_export
        return written(output_dir / 'export.json', run_export(cfg, output_dir),
                       lambda result: printout.export_lines(result, cfg.runtime.name))
    with host_threads(cfg):
        if cfg.task == 'bench':
            from integrations.tasks.bench import run_bench
            return written(output_dir / 'bench.json', run_bench(cfg, output_dir), printout.bench_line)
        if cfg.task == 'mlperf':
            from integrations.tasks.mlperf import run_mlperf
            block = run_mlperf(cfg, output_dir)
            result = {'model': cfg.model.family, 'variant': cfg.model.variant, 'runtime': cfg.runtime.name,
                      'precision': cfg.precision.name, 'engine': cfg.engine.name,
                      'checkpoint': cfg.model.checkpoint, 'weights': printout.weights_note(cfg), 'mlperf': block}
            return written(output_dir / 'results.json', result, lambda _: printout.mlperf_line(block, output_dir))
        from integrations.tasks.eval import run_eval
        outcome, explained = run_eval(cfg, output_dir)
    result = printout.eval_results(cfg, outcome, num_images, explained)
    if outcome.rank == 0:  # distributed: every rank has the gathered metrics, one writes them
        write_json_atomic(output_dir / 'results.json', result)
        print(printout.format_comparison(result), file=sys.stdout)
    return result


def written(path: Path, result: dict, summary) -> dict:
    """`result` written to `path` (atomically), its `summary(result)` printed and where it went."""
    write_json_atomic(path, result)
    print(summary(result))
    print(f'{path.name}: {path}')
    return result


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


def release_process_group() -> None:
    """Destroy the distributed process group (torchrun ranks) while the interpreter is still whole: left to
    interpreter teardown, gloo's worker threads can abort the process after the results are written."""
    if 'torch' not in sys.modules:
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
