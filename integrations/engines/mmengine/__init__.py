"""`engine=mmengine`: the evaluation inside mmengine's `runner.test()` (runner.py), its hooks (hooks.py) and its
runner and test loop (loop.py)."""
