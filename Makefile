# make setup: install everything into .venv (idempotent; mmcv compiles once per machine)
# make demo:  setup, then the main job on the demo images
# make test:  setup, then the test suite
PY := .venv/bin/python
STAMP := .venv/.inloop-setup

.PHONY: setup demo test clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt scripts/setup.sh integrations/assets.py
	bash scripts/setup.sh
	touch $(STAMP)

demo: setup
	$(PY) run.py

test: setup
	$(PY) -m pytest

clean:
	rm -rf outputs multirun .pytest_cache
