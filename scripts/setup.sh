#!/usr/bin/env bash
# Create .venv with everything the app, its tests and its notebook need.
# torch/torchvision are pinned to the CPU-or-CUDA wheels pip finds locally on this machine type;
# Flower's SuperLink must not try to install dependencies at run time (offline), so the three
# FLWR_* variables below are added to .venv/bin/activate.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
python -m pip install --quiet --upgrade pip
python -m pip install --quiet "torch==2.14.1" "torchvision==0.29.1"
python -m pip install --quiet -e ".[test]"
if ! grep -q FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION .venv/bin/activate; then
    cat >> .venv/bin/activate <<'ENV'
# split-learning: Flower runs offline, without telemetry or update checks
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1
export RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO=0
ENV
fi
echo "ready: source .venv/bin/activate"
