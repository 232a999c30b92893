"""mmengine's launcher: two processes shard the images and give exactly the one-process result."""
import json
import subprocess
import sys

from integrations.config import ROOT
from tests.conftest import DEMO_IMAGES, compose_cfg


def test_two_processes_equal_one(assets, demo_subset, tmp_path):
    """Three images over two ranks: the sampler pads one rank with a repeat, which must not be counted twice."""
    data = ['data=coco', f'data.img_dir={DEMO_IMAGES}', f'data.ann_file={demo_subset}']
    single = subprocess.run([sys.executable, 'run.py', *data, f'hydra.run.dir={tmp_path / "one"}'],
                            cwd=ROOT, capture_output=True, text=True)
    assert single.returncode == 0, single.stderr[-2000:]
    double = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2',
                             '--master_port', '29533', 'run.py', 'engine.launcher=pytorch', *data,
                             f'hydra.run.dir={tmp_path / "two"}'], cwd=ROOT, capture_output=True, text=True)
    assert double.returncode == 0, double.stderr[-3000:]
    one, two = (json.loads((tmp_path / d / 'results.json').read_text()) for d in ('one', 'two'))
    assert one['num_images'] == two['num_images'] == 3
    assert one['device'] == two['device'] and one['native'] == two['native']
    assert two['fidelity']['max_abs_diff'] < 1e-3
    assert double.stdout.count('metric ') == 1  # one rank reports


def test_run_destroys_the_process_group_it_ran_in(assets, tmp_path):
    """Left to interpreter teardown, gloo's worker threads can abort a rank after its results are written
    (SIGABRT, 'terminate called without an active exception'); run() releases the group itself."""
    import torch.distributed as dist

    from integrations.app.main import run

    dist.init_process_group('gloo', init_method=f'file://{tmp_path / "store"}', rank=0, world_size=1)
    try:
        run(compose_cfg('task=export'), tmp_path / 'run')
    finally:
        initialized = dist.is_initialized()
        if initialized:
            dist.destroy_process_group()
    assert not initialized
