"""inloop: `python run.py model=yolov5 runtime=onnx precision=fp32 data=demo` (see conf/ and README.md)."""
import os
import signal
import sys

import hydra
from omegaconf import DictConfig

from integrations.config import register_resolvers

register_resolvers()


@hydra.main(config_path='conf', config_name='config', version_base='1.3')
def main(cfg: DictConfig) -> float | None:
    """Returns the device bbox mAP: the objective a Hydra sweeper (Optuna) maximizes."""
    from common.errors import UserError
    from integrations.app.main import run

    try:
        results = run(cfg)
    except UserError as err:
        print(f'error: {err}', file=sys.stderr)
        sys.exit(2)
    return results['device']['bbox_mAP'] if results.get('device') else None


def config_error_line(err: Exception) -> str:
    """Hydra's message for a bad override (wrong type, unknown key, missing option) as one line: its lines and
    its cause's, without the node dump and the search path."""
    kept, options = [], []
    for part in (err, err.__cause__):
        listing = False
        for line in str(part or '').splitlines():
            line = line.strip()
            if line.startswith('Config search path'):
                break
            if line.startswith('Available options'):
                listing = True
            elif listing and line:
                options.append(line)
            elif line and not line.startswith(('full_key:', 'reference_type=', 'object_type=')):
                kept.append(line.rstrip('.'))
    first, *rest = dict.fromkeys(kept) or ['invalid configuration']
    first = first.removeprefix('Error merging override ')  # `eval.batch_size=abc: Value 'abc' … Integer`
    message = ': '.join([first, '; '.join(rest)]) if rest else first
    return f"{message} (available: {', '.join(options)})" if options else message


def terminate(signum, frame) -> None:
    """SIGTERM (a scheduler or `kill`) unwinds like Ctrl-C, so temporary files are removed on the way out."""
    global terminated
    terminated = True
    raise KeyboardInterrupt


terminated = False

if __name__ == '__main__':
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from integrations.app.checks import UnusableOutputDir

    os.environ.setdefault('HYDRA_FULL_ERROR', '1')  # config errors reach the handler below as exceptions
    signal.signal(signal.SIGTERM, terminate)
    try:
        main()
    except (HydraException, OmegaConfBaseException) as err:
        print(f'error: {config_error_line(err)} (python run.py --help lists the options)', file=sys.stderr)
        sys.exit(2)
    except UnusableOutputDir as err:  # before the run itself (integrations/app/checks.py's OutputDirCheck)
        print(f'error: {err}', file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        if 'tqdm' in sys.modules:  # the progress bars left open end their lines first
            from tqdm import tqdm
            for bar in list(tqdm._instances):
                bar.close()
        print('interrupted' + (' (SIGTERM)' if terminated else ''), file=sys.stderr)
        sys.exit(143 if terminated else 130)
