"""The engine-independent core of device evaluation: run the runtime on the batch the native pipeline produced,
decode on the host, and measure how far the device's raw maps are from the native model's."""
from __future__ import annotations

import time

import numpy as np
import torch

from integrations.export import compare_maps


class DeviceInference:
    """Session + decoder, with forward hooks on the native model's raw-map modules (`taps`) so the native
    forward of the same batch is compared with the device's raw maps without a second forward pass."""

    def __init__(self, session, decoder, taps=()):
        self.session = session
        self.decoder = decoder
        self.native_maps: list[torch.Tensor] = []
        self.handles = [m.register_forward_hook(self._record) for m in taps]
        self.device_s = 0.0
        self.fidelity = {'max_abs_diff': 0.0, 'min_cosine': 1.0} if taps else None

    def _record(self, module, args, output) -> None:
        self.native_maps.append(output.detach())

    def __call__(self, inputs: torch.Tensor, metas: list[dict]) -> list[dict[str, torch.Tensor]]:
        batch = inputs.detach().cpu().numpy().astype(np.float32, copy=False)
        start = time.perf_counter()
        raw_maps = self.session.run(batch)
        self.device_s += time.perf_counter() - start
        if self.native_maps:
            diff = compare_maps([m.numpy() for m in self.native_maps], raw_maps)
            self.fidelity['max_abs_diff'] = max(self.fidelity['max_abs_diff'], diff['max_abs_diff'])
            self.fidelity['min_cosine'] = min(self.fidelity['min_cosine'], diff['min_cosine'])
            self.native_maps.clear()
        return self.decoder([torch.from_numpy(m) for m in raw_maps], metas)

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()
