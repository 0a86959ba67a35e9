#!/usr/bin/env bash
# Create .venv with everything the app, its tests and its notebook need.
#
#   PYTHON=python3.12 bash scripts/setup.sh      # the interpreter (default: python3; >= 3.11)
#   TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu bash scripts/setup.sh
#                                                 # torch/torchvision from that index (e.g. the
#                                                 # CPU-only wheels); default: pip's own indexes
#
# Flower's SuperLink must not try to install dependencies at run time (it would download torch
# for every run, and fails offline), so the FLWR_* variables below are added to
# .venv/bin/activate.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    found=$("$PYTHON" --version 2>/dev/null) || found="no '$PYTHON' on PATH"
    echo "split-learning needs Python >= 3.11 (found: $found)." >&2
    echo "Install one and run: PYTHON=python3.11 bash scripts/setup.sh" >&2
    exit 1
fi
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
python -m pip install --quiet --upgrade pip
TORCH_INDEX_ARGS=()
if [ -n "${TORCH_INDEX_URL:-}" ]; then
    TORCH_INDEX_ARGS=(--index-url "$TORCH_INDEX_URL")
fi
python -m pip install --quiet ${TORCH_INDEX_ARGS[@]+"${TORCH_INDEX_ARGS[@]}"} "torch==2.14.1" "torchvision==0.29.1"
python -m pip install --quiet -e ".[test]"
if ! grep -q FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION .venv/bin/activate; then
    cat >> .venv/bin/activate <<'ENV'
# split-learning: Flower runs offline, without telemetry or update checks
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1
export RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO=0
ENV
fi
echo "ready: source .venv/bin/activate"
