"""A real Hydra sweep of `flwr run` jobs, a job that fails, and the report made from it all."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from flower_app.report import COLUMNS, load_runs, make_report
from tests.conftest import ROOT, TINY, data_dir

pytestmark = pytest.mark.slow  # real Flower runs: deselect with -m 'not slow'

TINY_OVERRIDES = [f"run_config.{k}={v}" for k, v in (TINY | {"num-rounds": 1}).items()]


def test_sweep_runs_every_job_reports_failures_and_feeds_the_report(tmp_path):
    sweep_dir = tmp_path / "sweep"
    missing = tmp_path / "no-data"
    missing.mkdir()
    cmd = [
        sys.executable,
        "-m",
        "flower_app.sweep",
        "-m",
        "model=resnet8",
        "method=dsl,csl",
        f"run_config.data-dir={data_dir()},{missing}",
        *[o for o in TINY_OVERRIDES if not o.startswith("run_config.depth")],
        f"hydra.sweep.dir={sweep_dir}",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=ROOT)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    for n in (1, 2, 3, 4):
        assert f"[job {n}/4]" in out
    jobs = [json.loads(line) for line in (sweep_dir / "jobs.jsonl").read_text().splitlines()]
    assert len(jobs) == 4
    ok = [j for j in jobs if j["status"] == "ok"]
    failed = [j for j in jobs if j["status"] == "failed"]
    assert sorted(j["method"] for j in ok) == ["csl", "dsl"]
    assert len(failed) == 2 and all(str(missing) in " ".join(j["overrides"]) for j in failed)
    for job in failed:
        assert job["reason"].startswith("SetupError: 2 of 2 clients failed set-up")
        assert "FAILED: SetupError" in out

    runs = load_runs(sweep_dir)
    assert sorted(r.method for r in runs) == ["csl", "dsl"]
    written = make_report(sweep_dir, tmp_path / "report")
    figures = ("fig4_accuracy", "fig5_communication", "fig6_memory", "fig7_time", "fig8_probe_dcor")
    for name in (f"{f}.png" for f in figures):
        assert written[name].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = written["table.md"].read_text()
    row = next(line for line in table.splitlines() if "ResNet-8 cut 1 K=2" in line)
    cells = dict(zip(COLUMNS, (c.strip() for c in row.strip("|").split("|")), strict=True))
    assert cells["dataset"] == "cifar10" and cells["epochs"] == "1"
    assert 0.50 <= float(cells["bytes DSL/CSL"]) <= 0.52
    assert cells["bwd MB/epoch CSL"] == cells["fwd MB/epoch"]  # gradients as big as activations
    assert "Failed jobs:" in table and "SetupError" in table
