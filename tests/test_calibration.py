"""Calibration images: reproducible, disjoint from the evaluated set, and clear errors."""
import numpy as np
import pytest

from common.errors import UserError
from runtime.calibration import CalibrationReader, digest, select_images


@pytest.fixture
def image_dir(tmp_path):
    for i in range(10):
        (tmp_path / f'{i:02d}.jpg').write_bytes(bytes([i]) * 10)
    (tmp_path / 'notes.txt').write_text('not an image')
    return tmp_path


def test_selection_is_reproducible_and_disjoint(image_dir):
    evaluated = {image_dir / '00.jpg', image_dir / '01.jpg'}
    first, disjoint = select_images(image_dir, 5, seed=3, exclude=evaluated)
    again, _ = select_images(image_dir, 5, seed=3, exclude=evaluated)
    other, _ = select_images(image_dir, 5, seed=4, exclude=evaluated)
    assert first == again and first != other and disjoint
    assert not set(first) & evaluated and all(p.suffix == '.jpg' for p in first)
    assert digest(first) == digest(again) != digest(other)


def test_falls_back_to_evaluated_images_only_when_nothing_else(image_dir):
    everything = set(image_dir.glob('*.jpg'))
    chosen, disjoint = select_images(image_dir, 3, seed=0, exclude=everything)
    assert len(chosen) == 3 and not disjoint


@pytest.mark.parametrize('num,seed,where,message', [
    (0, 0, None, 'num_images=0: must be >= 1'), (2, -1, None, 'seed=-1: must be >= 0'), (9, 0, None, 'only 8 images'),
    (2, 0, 'missing', 'directory not found')])
def test_bad_calibration_options(image_dir, num, seed, where, message):
    source = image_dir / 'missing' if where else image_dir
    with pytest.raises(UserError, match=message):
        select_images(source, num, seed=seed, exclude={image_dir / '00.jpg', image_dir / '01.jpg'})


def test_reader_follows_the_onnxruntime_contract(image_dir):
    paths = sorted(image_dir.glob('*.jpg'))[:3]
    reader = CalibrationReader(paths, lambda p: np.full((1, 3, 2, 2), int(p.stem), np.float32))
    batches = [reader.get_next() for _ in range(4)]
    assert [b['input'][0, 0, 0, 0] for b in batches[:3]] == [0, 1, 2] and batches[3] is None
    reader.rewind()
    assert reader.get_next()['input'][0, 0, 0, 0] == 0


def test_reader_serves_slices_under_one_progress_bar(image_dir, capsys):
    """set_range (onnxruntime's interface) limits get_next to a slice; the pass's bar ends with the last slice."""
    paths = sorted(image_dir.glob('*.jpg'))[:3]
    reader = CalibrationReader(paths, lambda p: np.full((1, 3, 2, 2), int(p.stem), np.float32))
    served = []
    for start in (0, 2):
        reader.set_range(start, start + 2)
        while (batch := reader.get_next()) is not None:
            served.append(int(batch['input'][0, 0, 0, 0]))
        served.append(None)
    assert served == [0, 1, None, 2, None] and reader.bar is None
    assert capsys.readouterr().err.count('3/3') == 1
    reader.rewind()
    assert len([b for b in iter(reader.get_next, None)]) == 3


def test_each_pass_shows_its_progress(image_dir, capsys):
    paths = sorted(image_dir.glob('*.jpg'))[:3]
    reader = CalibrationReader(paths, lambda p: np.zeros((1, 3, 2, 2), np.float32))
    for _ in range(2):  # e.g. equalizing the raw-map channels, then the activation ranges
        reader.rewind()
        while reader.get_next() is not None:
            pass
    progress = capsys.readouterr().err
    assert progress.count('calibration images') >= 2 and progress.count('3/3') == 2 and reader.bar is None
