"""Checks of a COCO-format annotation file and its image folder, for every reader of one (the evaluated set, the
int8 selection set): a bad entry fails here, naming the option, the file and the entry, instead of as a KeyError
deep in the loop or as a silently wrong mAP."""
from __future__ import annotations

import json
from pathlib import Path

from common.errors import UserError


def check_dataset(img_dir: str, ann_file: str, option: str = 'data') -> dict:
    """Fail early, naming the options (`<option>.img_dir`, `<option>.ann_file`), if the data cannot be evaluated;
    return the parsed annotation file."""
    if not Path(img_dir).is_dir():
        raise UserError(f'{option}.img_dir={img_dir}: directory not found')
    if not Path(ann_file).is_file():
        raise UserError(f'{option}.ann_file={ann_file}: file not found')
    try:
        coco = json.loads(Path(ann_file).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f'{option}.ann_file={ann_file}: not valid JSON ({err})') from None
    if not isinstance(coco, dict) or not all(isinstance(coco.get(k), list)
                                             for k in ('images', 'annotations', 'categories')):
        raise UserError(f'{option}.ann_file={ann_file}: not COCO format (needs images, annotations, categories lists)')
    check_coco_entries(ann_file, coco, option)
    missing = [im['file_name'] for im in coco['images'] if not (Path(img_dir) / im['file_name']).is_file()]
    if missing:
        raise UserError(f'{option}.img_dir={img_dir}: {len(missing)} image(s) of {ann_file} missing, '
                        f'first: {missing[0]}')
    empty = [im['file_name'] for im in coco['images'] if (Path(img_dir) / im['file_name']).stat().st_size == 0]
    if empty:
        raise UserError(f'{option}.img_dir={img_dir}: {len(empty)} image file(s) are empty (0 bytes), first: '
                        f'{empty[0]}; replace or remove them')
    return coco


def check_coco_entries(ann_file: str, coco: dict, option: str = 'data') -> None:
    """What pycocotools and mmdet take for granted of a COCO file, checked with the entry named: a bad entry
    would otherwise surface as a KeyError deep in the loop, or as a silently wrong mAP."""
    def fail(what: str) -> None:
        raise UserError(f'{option}.ann_file={ann_file}: {what}')

    if not coco['images']:
        fail('no images')
    if not coco['categories']:
        fail('no categories')
    ids = set()
    for index, image in enumerate(coco['images']):
        if not isinstance(image, dict):
            fail(f'images[{index}] is not an object')
        for key, kind in (('id', int), ('file_name', str), ('width', int), ('height', int)):
            if not isinstance(image.get(key), kind) or isinstance(image.get(key), bool):
                fail(f'images[{index}] needs "{key}" ({kind.__name__}), has {image.get(key)!r}')
        if image['width'] < 1 or image['height'] < 1:
            fail(f'images[{index}] ({image["file_name"]}) has size {image["width"]}x{image["height"]}')
        if image['id'] in ids:
            fail(f'image id {image["id"]} appears twice (images[{index}], {image["file_name"]}); ids must be unique')
        ids.add(image['id'])
    category_ids = {c.get('id') for c in coco['categories'] if isinstance(c, dict)}
    if len(category_ids) != len(coco['categories']) or None in category_ids:
        fail('every category needs a unique "id"')
    for index, ann in enumerate(coco['annotations']):
        name = f'annotations[{index}] (id {ann.get("id")})' if isinstance(ann, dict) else f'annotations[{index}]'
        if not isinstance(ann, dict) or ann.get('image_id') not in ids:
            fail(f'{name} points to image id {ann.get("image_id") if isinstance(ann, dict) else None}, '
                 'which is not in images')
        if ann.get('category_id') not in category_ids:
            fail(f'{name} has category_id {ann.get("category_id")!r}, which is not in categories')
        box = ann.get('bbox')
        if not (isinstance(box, list) and len(box) == 4 and all(isinstance(v, (int, float)) for v in box)):
            fail(f'{name} needs "bbox": [x, y, width, height], has {box!r}')
        if box[2] < 0 or box[3] < 0:
            fail(f'{name} has a box of negative size {box}; COCO boxes are [x, y, width, height]')
