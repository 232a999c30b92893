"""The device evaluation, framework-free: a runtime session with the host decoding on threads (device.py), the
families' decoders (decode/), COCO evaluation one image at a time (cocoeval.py), eval.explain's statistics
(breakdown.py), VastAI's txt outputs (outputs.py) and the OpenImages-MLPerf label space; the OpenMMLab adapters
live in mm/."""
