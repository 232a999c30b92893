"""Checkpoints load without unpickling arbitrary objects, and mismatches are one clear line."""
import collections
import pickle

import pytest
import torch

from common.errors import UserError
from integrations.deploy.checkpoint import apply_state_dict, load_state_dict


class _Payload:
    """Stands for an arbitrary pickled object: unpickling it would run foreign code."""


def _model():
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4))


@pytest.mark.parametrize('wrap', [lambda sd: sd, lambda sd: {'state_dict': sd}, lambda sd: {'model': sd},
                                  lambda sd: {'state_dict': {f'module.{k}': v for k, v in sd.items()}}])
def test_plain_state_dicts_load(tmp_path, wrap):
    model = _model()
    path = tmp_path / 'ckpt.pth'
    torch.save(wrap(model.state_dict()), path)
    target = _model()
    apply_state_dict(target, load_state_dict(path), str(path))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), target.state_dict().values()))


def test_mmengine_runner_checkpoint_loads(tmp_path):
    """An mmengine Runner pickles HistoryBuffer and numpy objects into `meta`; they are allow-listed."""
    import numpy as np
    from mmengine.logging.history_buffer import HistoryBuffer

    buffer = HistoryBuffer()
    buffer.update(0.5)
    path = tmp_path / 'epoch_1.pth'
    torch.save({'meta': {'message_hub': {'log_scalars': {'loss': buffer}}, 'seed': np.int64(3)},
                'state_dict': _model().state_dict()}, path)
    assert set(load_state_dict(path)) == set(_model().state_dict())


def test_untrusted_pickle_is_refused_with_one_line(tmp_path):
    path = tmp_path / 'evil.pth'
    torch.save({'state_dict': _model().state_dict(), 'extra': _Payload()}, path)
    with pytest.raises(UserError) as err:
        load_state_dict(path)
    message = str(err.value)
    assert str(path) in message and 'trust_checkpoint=true' in message and '\n' not in message
    assert set(load_state_dict(path, trusted=True)) == set(_model().state_dict())


def test_mismatched_checkpoint_lists_keys(tmp_path):
    state = collections.OrderedDict(_model().state_dict())
    state['extra.weight'] = state.pop('0.weight')
    with pytest.raises(UserError, match=r'missing keys: 0\.weight; unexpected keys: extra\.weight'):
        apply_state_dict(_model(), state, 'ckpt.pth')


def test_missing_and_garbage_files(tmp_path):
    with pytest.raises(UserError, match='file not found'):
        load_state_dict(tmp_path / 'nope.pth')
    garbage = tmp_path / 'garbage.pth'
    garbage.write_bytes(pickle.dumps('not a checkpoint') + b'\0junk')
    with pytest.raises(UserError, match='garbage.pth'):
        load_state_dict(garbage)


def test_getattr_is_only_allowed_for_history_buffer_methods():
    from mmengine.logging.history_buffer import HistoryBuffer

    from integrations.deploy.checkpoint import _class_function

    assert _class_function(HistoryBuffer, 'mean') is HistoryBuffer.mean
    for owner, name in [(HistoryBuffer, '__init__'), (HistoryBuffer, '__class__'), (pickle, 'loads')]:
        with pytest.raises(pickle.UnpicklingError):
            _class_function(owner, name)
