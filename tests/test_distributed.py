"""mmengine's launcher: two processes shard the images and give exactly the one-process result."""
import json
import subprocess
import sys

from integrations.config import ROOT
from tests.conftest import DEMO_IMAGES


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
