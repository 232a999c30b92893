#!/usr/bin/env bash
# Installs inloop's measured stack into .venv and fetches the offline assets (weights, demo images).
# Idempotent: every step checks before it works. The mmcv wheel (a ~13 min compile) is kept in a
# per-torch-version wheelhouse under ~/.cache so each machine compiles it once.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3.11}
VENV=${VENV:-.venv}
PY="$VENV/bin/python"
TORCH_VERSION=$(sed -n "s/^torch==//p" constraints.txt)
MMCV_VERSION=2.0.1
WHEELHOUSE_ROOT=${INLOOP_WHEELHOUSE:-$HOME/.cache/inloop/wheels}

log() { printf '[setup] %s\n' "$*"; }

if [ ! -x "$PY" ]; then
  log "creating $VENV with $PYTHON"
  "$PYTHON" -m venv "$VENV"
fi
# mmengine and mmcv's setup.py import pkg_resources, removed in setuptools 81.
PIP=("$PY" -m pip install -q -c constraints.txt)
"${PIP[@]}" setuptools wheel ninja

if ! "$PY" -c "import torch, torchvision" 2>/dev/null; then
  log "installing torch $TORCH_VERSION and torchvision (constraints.txt)"
  "${PIP[@]}" torch torchvision
fi

if ! "$PY" -c "import mmcv.ops" 2>/dev/null; then
  wheelhouse="$WHEELHOUSE_ROOT/torch-$TORCH_VERSION-py311"
  wheel=$(ls "$wheelhouse"/mmcv-$MMCV_VERSION-*.whl 2>/dev/null | head -n1 || true)
  if [ -z "$wheel" ]; then
    log "building mmcv $MMCV_VERSION with CPU ops (about 13 minutes, once per machine)"
    build=$(mktemp -d)
    trap 'rm -rf "$build"' EXIT
    "$PY" -m pip download -q --no-deps --no-binary :all: "mmcv==$MMCV_VERSION" -d "$build"
    tar -xzf "$build"/mmcv-$MMCV_VERSION.tar.gz -C "$build"
    # torch >= 2.10 headers require C++20; mmcv 2.0.1 hard-codes -std=c++14.
    sed -i 's/-std=c++14/-std=c++20/g' "$build/mmcv-$MMCV_VERSION/setup.py"
    mkdir -p "$wheelhouse"
    (cd "$build/mmcv-$MMCV_VERSION" && MMCV_WITH_OPS=1 FORCE_CUDA=0 MAX_JOBS=2 \
      "$OLDPWD/$PY" -m pip wheel -q --no-deps --no-build-isolation . -w "$build/out")
    mv "$build"/out/mmcv-*.whl "$wheelhouse/"
    wheel=$(ls "$wheelhouse"/mmcv-$MMCV_VERSION-*.whl | head -n1)
  fi
  log "installing $wheel"
  "${PIP[@]}" "$wheel"
fi

log "installing inloop and its pinned dependencies"
"${PIP[@]}" -e ".[test]"

# eval.explain's report is checked in headless Chromium (tests/test_explain.py); Debian packages it
if ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    log "installing chromium (Debian) for the report test"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium >/dev/null \
      || { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive \
           apt-get install -y -q --no-install-recommends chromium >/dev/null; }
  else
    log "chromium not found and not root: install it (apt-get install chromium) for tests/test_explain.py"
  fi
fi

log "fetching offline assets (YOLOv5s weights, demo images)"
"$PY" -m integrations.assets all
log "done"
