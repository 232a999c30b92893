"""A DataLoader iterated on a background thread, a bounded number of batches ahead of the loop.

On a machine with few cores, DataLoader worker processes cost the loop more than they save (each batch is
pickled over and lands in shared memory that is slow to touch first); a thread in the same process loads the
next images while the loop's thread preprocesses and scores, since image decoding and torch's copies release
the GIL. Batches come in the DataLoader's order, so results equal the unprefetched loop's.
"""
from __future__ import annotations

import queue
import threading

_END = object()


class PrefetchLoader:
    """Wraps a DataLoader (any sized iterable); other attributes (dataset, sampler, batch_size) are the loader's.
    `depth` 0 iterates the loader on the caller's thread."""

    def __init__(self, loader, depth: int = 2):
        if depth < 0:
            raise ValueError(f'prefetch depth must be >= 0, got {depth}')
        self.loader = loader
        self.depth = depth

    def __len__(self) -> int:
        return len(self.loader)

    def __getattr__(self, name):
        return getattr(self.loader, name)

    def __iter__(self):
        if not self.depth:
            yield from self.loader
            return
        batches: queue.Queue = queue.Queue(self.depth)
        stop = threading.Event()

        def put(item) -> bool:
            while not stop.is_set():
                try:
                    batches.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    pass
            return False

        def produce() -> None:
            try:
                for batch in self.loader:
                    if not put(batch):
                        return
                put(_END)
            except BaseException as err:  # handed to the loop, which raises it
                put(err)

        thread = threading.Thread(target=produce, name='prefetch', daemon=True)
        thread.start()
        try:
            while (item := batches.get()) is not _END:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:  # also when the loop stops early: the producer ends instead of blocking on a full queue
            stop.set()
            thread.join()
