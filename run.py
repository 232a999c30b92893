"""inloop: `python run.py model=yolov5 runtime=onnx precision=fp32 data=demo` (see conf/ and README.md)."""
import sys

import hydra
from omegaconf import DictConfig

from integrations.config import register_resolvers

register_resolvers()


@hydra.main(config_path='conf', config_name='config', version_base='1.3')
def main(cfg: DictConfig) -> float | None:
    """Returns the device bbox mAP: the objective a Hydra sweeper (Optuna) maximizes."""
    from integrations.app import run
    from integrations.errors import UserError

    try:
        results = run(cfg)
    except UserError as err:
        print(f'error: {err}', file=sys.stderr)
        sys.exit(2)
    return results['device']['bbox_mAP'] if results.get('device') else None


if __name__ == '__main__':
    main()
