"""What the VDSP resize kind costs in mAP, under the SDK emulation of tests/emulation (not a card).

    .venv/bin/python bench/vdsp_resize.py [--images DIR --ann FILE] [--kinds BILINEAR_CV BILINEAR_PILLOW]

Runs runtime=vacc precision=fp16 once per resize kind (emulated: ONNX Runtime on the tensor the emulated VDSP op
makes from the original image) and prints its bbox mAP beside the native model's on the host pipeline.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EMULATION = ROOT / 'tests' / 'emulation'


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--images', default=str(ROOT.parent / 'shared' / 'data' / 'coco128' / 'images'))
    parser.add_argument('--ann', default=str(ROOT.parent / 'shared' / 'data' / 'coco128' / 'instances.json'))
    parser.add_argument('--kinds', nargs='+', default=['BILINEAR_CV', 'BILINEAR_PILLOW'])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        vamc = tmp / 'bin' / 'vamc'
        vamc.parent.mkdir()
        vamc.write_text(f'#!/bin/sh\nexec {sys.executable} {EMULATION / "vamc.py"} "$@"\n')
        vamc.chmod(0o755)
        env = {**os.environ, 'PATH': f"{vamc.parent}{os.pathsep}{os.environ['PATH']}",
               'PYTHONPATH': str(EMULATION), 'INLOOP_CACHE_DIR': str(tmp / 'cache')}
        print(f"{'resize kind':<18}{'device mAP':>12}{'mAP_75':>10}{'native mAP':>12}")
        for kind in args.kinds:
            run_dir = tmp / kind
            subprocess.run([sys.executable, str(ROOT / 'run.py'), 'runtime=vacc', 'precision=fp16',
                            f'runtime.vdsp.resize_type={kind}', 'data=coco', f'data.img_dir={args.images}',
                            f'data.ann_file={args.ann}', f'hydra.run.dir={run_dir}'],
                           cwd=ROOT, env=env, check=True, capture_output=True)
            r = json.loads((run_dir / 'results.json').read_text())
            print(f"{kind:<18}{r['device']['bbox_mAP']:>12.3f}{r['device']['bbox_mAP_75']:>10.3f}"
                  f"{r['native']['bbox_mAP']:>12.3f}")


if __name__ == '__main__':
    main()
