# make setup: install everything into .venv (idempotent; mmcv compiles once per machine)
# make demo:  setup, then the main job on the demo images
# make test:  setup, then the test suite
# make test-fast: setup, then the tests that build no model, load no weights and run no CLI (the edit-test loop)
PY := .venv/bin/python
STAMP := .venv/.inloop-setup

.PHONY: setup demo test test-fast clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt scripts/setup.sh integrations/assets/__init__.py integrations/assets/yolov5_tfjs.py
	bash scripts/setup.sh
	touch $(STAMP)

demo: setup
	$(PY) run.py

test: setup
	$(PY) -m pytest

test-fast: setup
	$(PY) -m pytest -m "not integration"

clean:
	rm -rf outputs multirun .pytest_cache
