#!/usr/bin/env bash
# The GPU check in one command: the timing table of benchmarks/gpu_check.py, then the tests
# marked `gpu` (they skip where there is no CUDA). Under 8 minutes on one H100.
#
#   bash benchmarks/gpu_check.sh            # ResNet-110 cut 27, full CIFAR-10, K=1 and K=10
#   bash benchmarks/gpu_check.sh --quick    # a tiny setting that also runs on a CPU
#
# Uses .venv when there is one, else python3 with this repository on PYTHONPATH (the lent GPU
# machines have PyTorch but neither Flower nor Ray: see README, "GPU check").
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=${PYTHON:-python3}; fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 FLWR_TELEMETRY_ENABLED=0
export FLWR_DISABLE_UPDATE_CHECK=1 RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO=0
"$PY" benchmarks/gpu_check.py "$@"
"$PY" -m pytest -q -m gpu -p no:cacheprovider tests/test_compute.py
