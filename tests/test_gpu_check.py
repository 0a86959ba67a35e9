"""benchmarks/gpu_check.sh, the one script for a lent GPU, runs end to end here on the CPU."""

from __future__ import annotations

import os
import subprocess

import pytest

from tests.conftest import ROOT, data_dir

pytestmark = pytest.mark.slow


def test_gpu_check_script_runs_on_cpu_with_a_quick_setting():
    env = os.environ | {"SPLIT_LEARNING_DATA_DIR": data_dir()}
    proc = subprocess.run(
        ["bash", "benchmarks/gpu_check.sh", "--quick", "--device", "cpu"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    table = out[out.rindex("run  ") :]
    rows = [line for line in table.splitlines() if line.startswith(("in process", "Flower"))]
    assert len(rows) == 7, table
    assert not any("n/a" in row for row in rows), table
    assert "device: cpu; ResNet-8 cut 1" in out
    assert "deselected" in out or "skipped" in out  # the gpu tests ran (and skipped) too
