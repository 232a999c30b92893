"""The engine-independent core of device evaluation: run a runtime session on the batch the native pipeline
produced, decode on the host, and measure how far its raw maps are from the native model's."""
from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch

from integrations.export import compare_maps


class NativeTaps:
    """Forward hooks on the native model's raw-map modules: the native forward of a batch leaves its raw maps
    here, so the device's maps are compared without a second forward pass."""

    def __init__(self, modules=()):
        self.maps: list[torch.Tensor] = []
        self.handles = [m.register_forward_hook(self._record) for m in modules]

    def _record(self, module, args, output) -> None:
        self.maps.append(output.detach())

    def take(self) -> list[np.ndarray]:
        maps, self.maps = [m.numpy() for m in self.maps], []
        return maps

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


class DeviceInference:
    """A runtime session plus the family's decoder; accumulates runtime seconds and raw-map fidelity.

    `submit` starts the runtime call on a worker thread (runtimes release the GIL while they compute) and
    `finish` decodes its result, so the caller can load, preprocess and decode other batches meanwhile.
    Calls run one at a time and in order, so results equal the sequential loop's.
    """

    def __init__(self, session, decoder):
        self.session = session
        self.decoder = decoder
        self.runtime_s = 0.0
        self.fidelity: dict | None = None
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix='runtime')

    def _run(self, batch) -> list[np.ndarray]:
        start = time.perf_counter()
        raw_maps = self.session.run_paths(batch) if self.reads_paths else self.session.run(batch)
        self.runtime_s += time.perf_counter() - start
        return raw_maps

    @property
    def reads_paths(self) -> bool:
        """The session takes the original image files (it preprocesses on the device) instead of the batch."""
        return getattr(self.session, 'reads', 'tensor') == 'paths'

    def submit(self, inputs: torch.Tensor, metas: list[dict]) -> Future:
        batch = [meta['img_path'] for meta in metas] if self.reads_paths else \
            inputs.detach().cpu().numpy().astype(np.float32, copy=False)
        return self.worker.submit(self._run, batch)

    def __call__(self, inputs: torch.Tensor, metas: list[dict], native_maps=None) -> list[dict[str, torch.Tensor]]:
        return self.finish(self.submit(inputs, metas), metas, native_maps)

    def finish(self, future: Future, metas: list[dict], native_maps=None) -> list[dict[str, torch.Tensor]]:
        raw_maps = future.result()
        if native_maps:
            diff = compare_maps(native_maps, raw_maps)
            if self.fidelity is None:
                self.fidelity = diff
            else:
                self.fidelity = {'max_abs_diff': max(self.fidelity['max_abs_diff'], diff['max_abs_diff']),
                                 'min_cosine': min(self.fidelity['min_cosine'], diff['min_cosine'])}
        return self.decoder([torch.from_numpy(m) for m in raw_maps], metas)
