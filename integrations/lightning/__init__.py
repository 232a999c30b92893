"""Lightning pieces: a LightningModule around the native mm detector, a DataModule over the model config's own
dataset and pipeline, and two callbacks (export + build on test start, device evaluation per batch) that share
the evaluation core with the mmengine engine (integrations/deploy.py, evaluators/)."""
