"""`engine=lightning`: the evaluation inside Lightning's `trainer.test()` (runner.py): a LightningModule around the
native mm detector and a DataModule over the config's own dataset (modules.py), and callbacks that share the
evaluation core with the mmengine engine (callbacks.py; integrations/deploy/, evaluators/)."""
