"""The app: `run(cfg)` (main.py), the checks of every option and input before anything runs (checks.py), and what
is written and printed at the end (results.py)."""
