"""Load checkpoints without unpickling arbitrary code.

Plain state dicts (our converted weights, torchvision `{'model': state_dict}`) load with `weights_only=True`.
Two kinds of real checkpoint pickle more, and only those classes are allow-listed: MLCommons' training script
saves `{'model', 'optimizer', 'epoch', 'args': argparse.Namespace}`; an mmengine Runner pickles a few
mmengine/numpy objects in its `meta`. Anything else is refused with a message; `trusted=True`
(`model.trust_checkpoint=true`) is the user's explicit decision to unpickle a file they trust.
"""
from __future__ import annotations

import pickle
from pathlib import Path

from common.errors import UserError


def _class_function(owner, name: str):
    """Stands in for `getattr` while unpickling: HistoryBuffer pickles its statistics methods as
    getattr(HistoryBuffer, 'mean'); any other use of getattr could reach arbitrary objects and is refused."""
    import inspect
    import types

    from mmengine.logging.history_buffer import HistoryBuffer

    method = inspect.getattr_static(owner, name, None) if owner is HistoryBuffer else None
    if isinstance(method, types.FunctionType) and not name.startswith('_'):
        return method
    raise pickle.UnpicklingError(f'getattr({owner!r}, {name!r}) is not allowed')


def _safe_globals() -> list:
    """What real checkpoints pickle besides tensors: MLCommons training's `args` (an argparse.Namespace of
    plain values), an mmengine Runner's meta (numpy 1.x and 2.x names)."""
    import argparse
    import codecs

    import numpy as np
    from mmengine.logging.history_buffer import HistoryBuffer

    multiarray = np._core.multiarray
    return [argparse.Namespace, HistoryBuffer, np.ndarray, np.dtype, codecs.encode, multiarray._reconstruct,
            multiarray.scalar,
            (multiarray._reconstruct, 'numpy.core.multiarray._reconstruct'),
            (multiarray.scalar, 'numpy.core.multiarray.scalar'), (_class_function, 'builtins.getattr'),
            *{type(np.dtype(t)) for t in ('float64', 'float32', 'float16', 'int64', 'int32', 'uint8', 'bool')}]


def load_state_dict(path: str | Path, trusted: bool = False) -> dict:
    """The model state dict of a checkpoint file ({'state_dict'}, {'model'} or a plain state dict)."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise UserError(f'model.checkpoint={path}: file not found')
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            checkpoint = torch.load(path, map_location='cpu', weights_only=not trusted)
    except pickle.UnpicklingError as err:
        reason = str(err).split('WeightsUnpickler error:')[-1].strip().splitlines()[0]
        raise UserError(f'model.checkpoint={path}: refused to unpickle ({reason}); if you trust this file, '
                        'add model.trust_checkpoint=true') from None
    except (RuntimeError, EOFError) as err:
        raise UserError(f'model.checkpoint={path}: not a readable PyTorch checkpoint ({err})') from None
    for key in ('state_dict', 'model'):
        if isinstance(checkpoint, dict) and isinstance(checkpoint.get(key), dict):
            checkpoint = checkpoint[key]
            break
    if not isinstance(checkpoint, dict) or not all(isinstance(k, str) for k in checkpoint):
        raise UserError(f'model.checkpoint={path}: no state dict inside')
    return {k.removeprefix('module.'): v for k, v in checkpoint.items()}


def apply_state_dict(model, state_dict: dict, source: str) -> None:
    """Load strictly (after the model's own `adapt_state_dict`, if it has one, renames keys of older releases);
    on mismatch, one line listing missing and unexpected keys (and shape mismatches)."""
    if hasattr(model, 'adapt_state_dict'):
        state_dict = model.adapt_state_dict(state_dict)
    own = model.state_dict()
    wrong_shape = [k for k, v in state_dict.items() if k in own and tuple(own[k].shape) != tuple(v.shape)]
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    if missing or unexpected or wrong_shape:
        def show(keys):
            return ', '.join(keys[:5]) + (f' … (+{len(keys) - 5})' if len(keys) > 5 else '') if keys else 'none'
        raise UserError(f'model.checkpoint={source} does not fit model.config: missing keys: {show(missing)}; '
                        f'unexpected keys: {show(unexpected)}; shape mismatch: {show(wrong_shape)}')
    model.load_state_dict(state_dict, strict=True)


def load_checkpoint(model, path: str | Path, trusted: bool = False) -> None:
    """`path`'s state dict into `model`, loaded safely and strictly (the two functions above)."""
    apply_state_dict(model, load_state_dict(path, trusted), str(path))
