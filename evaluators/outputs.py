"""Per-image detections as files VastAI's own tools read (`eval.save_txt=true`).

For each evaluated image, `<image file stem>.txt` with one line per detection, `<class name> <score> x1 y1 x2 y2`
in original-image pixels at full float precision — the format the seeds' vsx scripts write and VastModelZOO's
`eval_map.py` scripts score: the COCO one (`cv/detection/common/eval/`) takes `int(stem)` as the image id and maps
COCO-80 class names to category ids; the MLPerf one (`cv/detection/retinanet/source_code/mlcommons/`) finds the
image by `<stem>.jpg` among the ground truth's `file_name`s and the category by its name. A COCO results file
`<folder>.pred.json` lies beside the folder, not in it: both scripts write their own `pred.json` into the folder.
Every detection the metric saw is written (no extra score threshold).
The files go to `<dir>.partial/` and the folder is renamed when the evaluation has finished, so an interrupted run
leaves no folder that looks complete.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np

from evaluators.cocoeval import xyxy_to_coco


class DetectionWriter:
    """Writes one folder of txt files (and the pred.json beside it) for one path (device, native, …).

    Args:
        folder: the final folder (e.g. <run>/txt/device); files are written under `<folder>.partial` first.
        class_names: name of each label.
        cat_ids: category id of each label (for pred.json).
        rank: this process's rank (each rank writes the images it evaluated; rank 0 finishes the folder).
    """

    def __init__(self, folder: str | Path, class_names, cat_ids, rank: int = 0):
        self.folder = Path(folder)
        self.partial = self.folder.with_name(self.folder.name + '.partial')
        self.class_names = list(class_names)
        self.cat_ids = list(cat_ids)
        self.rank = rank
        self.partial.mkdir(parents=True, exist_ok=True)
        self.results = open(self.partial / f'.pred.rank{rank}.jsonl', 'w')

    def write(self, img_id, img_path: str, bboxes, scores, labels) -> None:
        """One image's detections (boxes xyxy in original pixels)."""
        bboxes, scores, labels = (np.asarray(a) for a in (bboxes, scores, labels))
        lines = [' '.join([self.class_names[label], repr(score), *map(repr, box)])
                 for box, score, label in zip(bboxes.tolist(), scores.tolist(), labels.tolist())]
        target = self.partial / f'{Path(img_path).stem}.txt'
        temporary = target.with_name(f'.{target.name}.{self.rank}')
        temporary.write_text(''.join(line + '\n' for line in lines))
        os.replace(temporary, target)  # distributed padding may evaluate an image twice: same content
        self.results.write(json.dumps({'image_id': img_id, 'detections': [
            {'image_id': img_id, 'category_id': self.cat_ids[label], 'bbox': box, 'score': score}
            for box, score, label in zip(xyxy_to_coco(bboxes), scores.tolist(), labels.tolist())]}) + '\n')

    def close(self) -> None:
        self.results.close()

    def finish(self) -> dict:
        """Rank 0, after every rank closed its writer: merge the ranks' results into pred.json (each image once),
        then rename the folder into place and the pred.json out beside it. Returns the paths for results.json."""
        seen, first = set(), True
        with open(self.partial / 'pred.json', 'w') as out:
            out.write('[')
            for part in sorted(self.partial.glob('.pred.rank*.jsonl')):
                with open(part) as lines:
                    for line in lines:
                        image = json.loads(line)
                        if image['image_id'] in seen:
                            continue
                        seen.add(image['image_id'])
                        for detection in image['detections']:
                            out.write(('' if first else ',') + '\n' + json.dumps(detection))
                            first = False
                part.unlink()
            out.write('\n]\n')
        shutil.rmtree(self.folder, ignore_errors=True)
        os.replace(self.partial, self.folder)
        beside = self.folder.with_name(f'{self.folder.name}.pred.json')
        os.replace(self.folder / 'pred.json', beside)
        return {'txt': str(self.folder), 'pred_json': str(beside)}

    def discard(self) -> None:
        self.close()
        shutil.rmtree(self.partial, ignore_errors=True)
