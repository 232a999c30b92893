"""Bad input, case by case: one UserError naming the file or option and the fix, before anything is written; or,
where the input is valid but unusual (grayscale, alpha), the run works. The CLI turns a UserError into one
`error:` line and exit 2 (tests/test_app.py, tests/test_options.py)."""
from __future__ import annotations

import json
import shutil

import pytest
from PIL import Image

from common.errors import UserError
from integrations.app.checks import check_inputs
from integrations.app.main import run
from tests.conftest import DEMO_IMAGES, ROOT, compose_cfg

DEMO_ANN = ROOT / 'data' / 'demo' / 'annotations.json'


def _coco_with(tmp_path, change) -> list[str]:
    """The demo's annotation file changed by `change(coco)`, as data overrides."""
    coco = json.loads(DEMO_ANN.read_text())
    change(coco)
    path = tmp_path / 'ann.json'
    path.write_text(json.dumps(coco))
    return ['data=coco', f'data.img_dir={DEMO_IMAGES}', f'data.ann_file={path}']


def _drop(key):
    return lambda coco: coco['images'][0].pop(key)


def _first_ann(key, value):
    return lambda coco: coco['annotations'][0].__setitem__(key, value)


ANNOTATION_CASES = {
    'image without file_name': (_drop('file_name'), r'images\[0\] needs "file_name"'),
    'image without width': (_drop('width'), r'images\[0\] needs "width"'),
    'negative box size': (_first_ann('bbox', [10, 10, -5, 20]), 'negative size'),
    'duplicate image ids': (lambda c: c['images'][1].__setitem__('id', c['images'][0]['id']), 'appears twice'),
    'no categories': (lambda c: c.__setitem__('categories', []), 'no categories'),
    'no images': (lambda c: c.update(images=[], annotations=[]), 'no images'),
    'annotation of a missing image id': (_first_ann('image_id', 987654), 'image id 987654, which is not in images'),
    'annotation of an unknown category': (_first_ann('category_id', 4242), 'category_id 4242'),
    'bbox not a list of 4': (_first_ann('bbox', [1, 2, 3]), r'needs "bbox": \[x, y, width, height\]'),
    'images not a list': (lambda c: c.__setitem__('images', {}), 'not COCO format'),
}


@pytest.mark.parametrize('case', ANNOTATION_CASES)
def test_bad_annotation_files(tmp_path, case):
    change, message = ANNOTATION_CASES[case]
    with pytest.raises(UserError, match=f'data.ann_file=.*{message}'):
        check_inputs(compose_cfg(*_coco_with(tmp_path, change)))


def test_annotation_file_that_is_not_json(tmp_path):
    (tmp_path / 'ann.json').write_text('{"images": [')
    with pytest.raises(UserError, match='data.ann_file=.*not valid JSON'):
        check_inputs(compose_cfg('data=coco', f'data.img_dir={DEMO_IMAGES}', f'data.ann_file={tmp_path}/ann.json'))


def _one_image_set(tmp_path, write_image, name='broken.jpg', size=None) -> list[str]:
    """A folder with one image written by `write_image(path)` and a COCO file for it (the demo's bus boxes)."""
    images = tmp_path / 'images'
    images.mkdir()
    write_image(images / name)
    coco = json.loads(DEMO_ANN.read_text())
    bus = next(im for im in coco['images'] if im['file_name'] == 'bus.jpg')
    width, height = size or (bus['width'], bus['height'])
    coco['images'] = [{**bus, 'file_name': name, 'width': width, 'height': height}]
    coco['annotations'] = [a for a in coco['annotations'] if a['image_id'] == bus['id']]
    (tmp_path / 'ann.json').write_text(json.dumps(coco))
    return ['data=coco', f'data.img_dir={images}', f'data.ann_file={tmp_path}/ann.json', 'eval.compare_native=false']


def _truncated(path):
    data = (DEMO_IMAGES / 'bus.jpg').read_bytes()
    path.write_bytes(data[:len(data) // 3])


IMAGE_CASES = {
    '0-byte image': (lambda p: p.write_bytes(b''), 'broken.jpg'),
    'truncated JPEG': (_truncated, 'broken.jpg'),
    'text file named .jpg': (lambda p: p.write_text('hello, not an image'), 'broken.jpg'),
}


@pytest.mark.parametrize('case', IMAGE_CASES)
def test_unreadable_images_stop_naming_the_file(tmp_path, case):
    write, name = IMAGE_CASES[case]
    data = _one_image_set(tmp_path, write)
    with pytest.raises(UserError, match=f'data.img_dir.*{name}'):
        run(compose_cfg(*data), tmp_path / 'run')
    assert not (tmp_path / 'run' / 'results.json').exists()


def test_image_of_another_size_than_its_annotation(tmp_path):
    data = _one_image_set(tmp_path, lambda p: shutil.copy(DEMO_IMAGES / 'bus.jpg', p), size=(400, 300))
    with pytest.raises(UserError, match=r'broken.jpg is 810x1080 but the annotation file states 400x300'):
        run(compose_cfg(*data), tmp_path / 'run')
    assert not (tmp_path / 'run' / 'results.json').exists()


@pytest.mark.parametrize('mode, name', [('L', 'gray.jpg'), ('RGBA', 'alpha.png')])
def test_grayscale_and_alpha_images_work(tmp_path, mode, name):
    def write(path):
        image = Image.open(DEMO_IMAGES / 'bus.jpg').convert(mode)
        if mode == 'RGBA':
            image.putalpha(128)
        image.save(path)

    result = run(compose_cfg(*_one_image_set(tmp_path, write, name=name)), tmp_path / 'run')
    assert result['device']['bbox_mAP'] > 0.2  # the bus is still found


def test_checkpoint_of_the_other_family(tmp_path):
    import torch

    from integrations.models import build_model, load_model_config

    retinanet = build_model(load_model_config(str(ROOT / 'configs' / 'mlperf_retinanet_800.py')))
    torch.save({'model': retinanet.state_dict()}, tmp_path / 'retinanet.pth')
    with pytest.raises(UserError, match=r'model.checkpoint=.*retinanet.pth does not fit model.config: missing keys'):
        run(compose_cfg(f'model.checkpoint={tmp_path}/retinanet.pth', 'eval.num_images=1'), tmp_path / 'run')


def test_checkpoint_with_the_right_keys_and_wrong_shapes(tmp_path, yolov5s):
    import torch

    state = dict(yolov5s.state_dict())
    key = next(k for k in state if k.endswith('convs_pred.0.weight'))
    state[key] = torch.zeros(27, *state[key].shape[1:])  # a 4-class head
    torch.save({'state_dict': state}, tmp_path / 'four_classes.pth')
    with pytest.raises(UserError, match=f'shape mismatch: {key}'):
        run(compose_cfg(f'model.checkpoint={tmp_path}/four_classes.pth', 'eval.num_images=1'), tmp_path / 'run')


def test_model_config_missing_or_not_a_detector(tmp_path):
    with pytest.raises(UserError, match='model.config=.*config file not found'):
        run(compose_cfg(f'model.config={tmp_path}/nope.py', 'eval.num_images=1'), tmp_path / 'a')
    (tmp_path / 'not_detector.py').write_text("optimizer = dict(type='SGD', lr=0.1)\n")
    with pytest.raises(UserError, match='model.config=.*not_detector.py: not a detector config'):
        run(compose_cfg(f'model.config={tmp_path}/not_detector.py', 'eval.num_images=1'), tmp_path / 'b')


@pytest.mark.parametrize('images, message', [(0, 'only 0 images'), (1, 'only 1 images')])
def test_calibration_folder_empty_or_too_small(tmp_path, images, message):
    folder = tmp_path / 'calibration'
    folder.mkdir()
    for i in range(images):
        shutil.copy(DEMO_IMAGES / 'bus.jpg', folder / f'{i}.jpg')
    with pytest.raises(UserError, match=f'precision.calibration.*{message}'):
        run(compose_cfg('precision=int8', f'precision.calibration.data={folder}',
                        'precision.calibration.num_images=4', 'eval.num_images=1'), tmp_path / 'run')


@pytest.mark.parametrize('option', ['cache.dir', 'output dir'])
def test_unwritable_cache_or_output_dir(tmp_path, option):
    """A directory that cannot be made (under a file; root writes anywhere else) is named before the run."""
    blocker = tmp_path / 'a-file'
    blocker.write_text('')
    overrides = ['eval.num_images=1', *([f'cache.dir={blocker}/cache'] if option == 'cache.dir' else [])]
    run_dir = blocker / 'run' if option == 'output dir' else tmp_path / 'run'
    with pytest.raises(UserError, match=f'{option}.*not a writable directory'):
        run(compose_cfg(*overrides), run_dir)
    assert not (tmp_path / 'run').exists() or not any((tmp_path / 'run').iterdir())


@pytest.mark.parametrize('option', ['hydra.run.dir', 'hydra.sweep.dir'])
def test_output_dir_under_a_file_from_the_cli_is_one_line(tmp_path, option):
    """Hydra makes the output folder before the app runs: its own NotADirectoryError traceback is replaced by one
    line naming the option, exit 2, and nothing is written."""
    import subprocess
    import sys

    blocker = tmp_path / 'a-file'
    blocker.write_text('')
    sweep = ['-m', 'eval.score_thr=0.1,0.2'] if option == 'hydra.sweep.dir' else []
    proc = subprocess.run([sys.executable, str(ROOT / 'run.py'), *sweep, f'{option}={blocker}/out'], cwd=tmp_path,
                          capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines() == [f'error: {option}={blocker}/out: {blocker} is a file, not a '
                                                f'directory; choose another {option}']
    assert sorted(p.name for p in tmp_path.iterdir()) == ['a-file']
