"""Calibration images for int8: chosen reproducibly, disjoint from the evaluated set where possible, and
preprocessed exactly as the evaluation preprocesses (the caller passes that preprocessing in)."""
from __future__ import annotations

import hashlib
import random
from collections.abc import Callable
from pathlib import Path

import numpy as np

from common.errors import UserError, check_at_least

IMAGE_SUFFIXES = {'.jpg', '.jpeg', '.png', '.bmp', '.webp'}


def select_images(source: str | Path, num_images: int, seed: int, exclude: set[Path]) -> tuple[list[Path], bool]:
    """`num_images` images of `source` drawn with `seed`, avoiding `exclude` (the evaluated images).

    Returns the sorted selection and whether it is disjoint from `exclude`; the evaluated images are used only
    when nothing else is there (e.g. calibrating on the demo set while evaluating it).
    """
    source = Path(source)
    check_at_least('precision.calibration.num_images', num_images, 1)
    check_at_least('precision.calibration.seed', seed, 0)
    if not source.is_dir():
        raise UserError(f'precision.calibration.data={source}: directory not found')
    images = sorted(p for p in source.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    excluded = {p.resolve() for p in exclude}
    candidates = [p for p in images if p.resolve() not in excluded]
    disjoint = bool(candidates)
    candidates = candidates or images
    if num_images > len(candidates):
        raise UserError(f'precision.calibration.num_images={num_images}: only {len(candidates)} images '
                        f'available in {source}' + ('' if disjoint else ' (all of them are evaluated too)')
                        + '; lower num_images or set precision.calibration.data=DIR')
    return sorted(random.Random(seed).sample(candidates, num_images)), disjoint


def digest(paths: list[Path]) -> str:
    """A content digest of the calibration set (names and bytes), for reports and cache keys."""
    h = hashlib.sha256()
    for path in paths:
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


class CalibrationReader:
    """onnxruntime's CalibrationDataReader contract: `get_next()` gives one input dict, then None; `set_range`
    limits that to a slice of the images. Each pass over the images shows a progress bar (a pass over 100 images
    takes a while), one bar across the slices of a pass."""

    def __init__(self, paths: list[Path], preprocess: Callable[[Path], np.ndarray], input_name: str = 'input'):
        self.paths = list(paths)
        self.preprocess = preprocess
        self.input_name = input_name
        self.position = 0
        self.end = len(self.paths)
        self.bar = None

    def set_range(self, start_index: int, end_index: int) -> None:
        self.position, self.end = start_index, min(end_index, len(self.paths))

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.position >= self.end:
            if self.position >= len(self.paths):
                self._close_bar()
            return None
        if self.bar is None:
            from tqdm import tqdm
            self.bar = tqdm(total=len(self.paths), initial=self.position, desc='calibration images', unit='image')
        batch = self.preprocess(self.paths[self.position])
        self.position += 1
        self.bar.update()
        return {self.input_name: batch}

    def rewind(self) -> None:
        self._close_bar()
        self.position, self.end = 0, len(self.paths)

    def _close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
