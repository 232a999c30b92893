"""The prefetching loader: same batches in the same order, errors raised in the loop, no thread left behind."""
import threading

import pytest

from integrations.engines.prefetch import PrefetchLoader


class _Loader(list):
    batch_size = 3


def _prefetch_threads() -> list:
    return [t for t in threading.enumerate() if t.name == 'prefetch']


@pytest.mark.parametrize('depth', [0, 1, 4])
def test_same_batches_in_order(depth):
    loader = PrefetchLoader(_Loader(range(50)), depth)
    assert list(loader) == list(range(50)) and len(loader) == 50 and loader.batch_size == 3
    assert list(loader) == list(range(50))  # iterable again, like a DataLoader


def test_loader_error_is_raised_in_the_loop():
    def failing():
        yield 0
        yield 1
        raise AssertionError('failed to load image: x.jpg')

    class Failing:
        def __iter__(self):
            return failing()

    seen = []
    with pytest.raises(AssertionError, match='failed to load image'):
        for batch in PrefetchLoader(Failing(), 2):
            seen.append(batch)
    assert seen == [0, 1] and not _prefetch_threads()


def test_stopping_early_ends_the_thread():
    for batch in PrefetchLoader(_Loader(range(1000)), 2):
        if batch == 3:
            break
    assert not _prefetch_threads()


def test_negative_depth_is_refused():
    with pytest.raises(ValueError, match='>= 0'):
        PrefetchLoader([], -1)
