"""Write an openimages-mlperf-format ground truth from a COCO one, for the classes the two share.

    python tools/coco_to_openimages_mlperf.py COCO.json OUT.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evaluators.openimages_mlperf import CLASSES, convert  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('coco', type=Path, help='COCO-format ground truth (instances_*.json)')
    parser.add_argument('out', type=Path, help='openimages-mlperf-format file to write')
    args = parser.parse_args()
    try:
        coco = json.loads(args.coco.read_text())
        converted = convert(coco)
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as err:
        print(f'error: {args.coco}: not a readable COCO ground truth ({err})', file=sys.stderr)
        return 2
    tmp = args.out.with_name(f'.{args.out.name}.tmp')
    tmp.write_text(json.dumps(converted))
    tmp.replace(args.out)
    kept = {CLASSES[a['category_id']] for a in converted['annotations']}
    print(f"{args.out}: {len(converted['images'])} images, {len(converted['annotations'])} of "
          f"{len(coco['annotations'])} boxes kept, {len(kept)} classes: {', '.join(sorted(kept))}")
    return 0


if __name__ == '__main__':
    sys.exit(main())
