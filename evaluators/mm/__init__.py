"""The evaluators' OpenMMLab adapters: DeviceEvaluator, an mmengine Evaluator for both engines (evaluator.py), the
streamed COCO metrics registered with mmdet (metrics.py), and the model's data preprocessor in one pass
(preprocess.py)."""
