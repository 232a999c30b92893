"""The engine-independent core of device evaluation: run a runtime session on the batch the native pipeline
produced, decode on the host, and measure how far its raw maps are from the native model's."""
from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch

from common.errors import UserError


def compare_maps(reference: list, candidate: list) -> dict:
    """Max abs difference and min cosine similarity over a list of same-shaped raw maps."""
    max_abs, min_cos = 0.0, 1.0
    for ref, cand in zip(reference, candidate):
        ref = np.asarray(ref, np.float64).reshape(ref.shape[0], -1)
        cand = np.asarray(cand, np.float64).reshape(cand.shape[0], -1)
        max_abs = max(max_abs, float(np.abs(ref - cand).max()))
        norms = np.linalg.norm(ref, axis=1) * np.linalg.norm(cand, axis=1)
        # a map of zeros (an untrained head's can be 1e-10) is as close as it is: cosine 1 when both are zero
        cos = np.where(norms > 0, (ref * cand).sum(1) / np.where(norms > 0, norms, 1), (ref == cand).all(1) * 1.0)
        min_cos = min(min_cos, float(cos.min()))
    return {'max_abs_diff': max_abs, 'min_cosine': min_cos}


class NativeTaps:
    """Forward hooks on the native model's raw-map modules: the native forward of a batch leaves its raw maps
    here, so the device's maps are compared without a second forward pass. A module whose output nests tensors
    (a head's kinds of levels) leaves them flattened, kind by kind, as the export orders them."""

    def __init__(self, modules=()):
        self.maps: list[torch.Tensor] = []
        self.handles = [m.register_forward_hook(self._record) for m in modules]

    def _record(self, module, args, output) -> None:
        if isinstance(output, (list, tuple)):
            for part in output:
                self._record(module, args, part)
        else:
            self.maps.append(output.detach())

    def take(self) -> list[np.ndarray]:
        maps, self.maps = [m.numpy() for m in self.maps], []
        return maps

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


class DeviceInference:
    """A runtime session plus the family's decoder; accumulates runtime seconds and raw-map fidelity.

    `submit` queues the batch for the runtime call on one worker thread and the host decoding of its raw maps on
    a second one: the device runs batch k while the host decodes batch k-1 and the caller loads and scores
    others (runtimes and torch's kernels release the GIL while they compute); `Future.result()` gives the
    detections. Each stage takes its batches one at a time and in order, so results equal the sequential loop's.
    """

    def __init__(self, session, decoder, label: str = 'runtime'):
        self.session = session
        self.decoder = decoder
        self.label = label  # named in errors, e.g. 'onnx int8'
        self.runtime_s = 0.0
        self.decode_s = 0.0
        self.fidelity: dict | None = None
        self.runner = ThreadPoolExecutor(max_workers=1, thread_name_prefix='runtime')
        self.decoding = ThreadPoolExecutor(max_workers=1, thread_name_prefix='decode')

    def close(self) -> None:
        """The worker threads, and the session's own resources (VACC's device worker process)."""
        self.runner.shutdown()
        self.decoding.shutdown()
        getattr(self.session, 'close', lambda: None)()

    @property
    def reads_paths(self) -> bool:
        """The session takes the original image files (it preprocesses on the device) instead of the batch."""
        return getattr(self.session, 'reads', 'tensor') == 'paths'

    def submit(self, inputs: torch.Tensor, metas: list[dict], native_maps=None) -> Future:
        """Detections of the batch, to come; `native_maps` (the native model's raw maps of the same batch) are
        compared with the runtime's."""
        batch = [meta['img_path'] for meta in metas] if self.reads_paths else \
            inputs.detach().cpu().numpy().astype(np.float32, copy=False)
        raw_maps = self.runner.submit(self._run, batch)
        return self.decoding.submit(self._decode, raw_maps, metas, native_maps)

    def _run(self, batch) -> list[np.ndarray]:
        start = time.perf_counter()
        raw_maps = self.session.run_paths(batch) if self.reads_paths else self.session.run(batch)
        self.runtime_s += time.perf_counter() - start
        return raw_maps

    def check_finite(self, raw_maps: list[np.ndarray], metas: list[dict]) -> None:
        """A broken device or build gives NaN/inf raw maps, which decode to a silently wrong mAP: stop instead.
        (The sum carries any NaN/inf: 0.4 ms for YOLOv5s's largest map; it overflows only on values ~1e33, which
        are as broken.)"""
        for index, raw_map in enumerate(raw_maps):
            if not np.isfinite(raw_map.sum()):
                bad = 'NaN' if np.isnan(raw_map).any() else 'inf'
                images = ', '.join(str(m.get('img_path', '?')) for m in metas)
                raise UserError(f'{self.label}: raw map {index} {list(raw_map.shape)} holds {bad} values (images: '
                                f'{images}); the runtime or its build is broken, e.g. an int8 range or an fp16 '
                                'overflow: try precision=fp32')

    def _decode(self, raw_maps: Future, metas: list[dict], native_maps) -> list[dict[str, torch.Tensor]]:
        raw_maps = raw_maps.result()
        self.check_finite(raw_maps, metas)
        if hasattr(self.session, 'device_metas'):  # the device resized the images itself: its geometry
            metas = self.session.device_metas(metas)
        if native_maps:
            diff = compare_maps(native_maps, raw_maps)
            if self.fidelity is None:
                self.fidelity = diff
            else:
                self.fidelity = {'max_abs_diff': max(self.fidelity['max_abs_diff'], diff['max_abs_diff']),
                                 'min_cosine': min(self.fidelity['min_cosine'], diff['min_cosine'])}
        start = time.perf_counter()
        detections = self.decoder([torch.from_numpy(m) for m in raw_maps], metas)
        self.decode_s += time.perf_counter() - start
        return detections
