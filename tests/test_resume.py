"""Checkpoint and resume: a run killed (SIGKILL) or stopped (`flwr stop`) continues exactly.

Real `flwr run` simulations on the session's SuperLink. The interrupted runs are resumed with
``resume-from`` and must end with the same weights, bit for bit, as a run never interrupted
(one torch thread per party, as in every test), with each round in rounds.jsonl once.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import psutil
import pytest
import torch

from flower_app.results import read_rounds
from tests.conftest import TINY, data_dir

pytestmark = pytest.mark.slow

ROUNDS = 8  # rounds take about a second here: enough of them to stop one mid-run
CONFIG = TINY | {
    "method": "csl",
    "num-rounds": ROUNDS,
    "samples-per-client": 96,
    "test-samples": 64,
}


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout:.0f} s for {what}")
        time.sleep(0.2)


def rounds_in(run_dir: Path) -> int:
    path = run_dir / "rounds.jsonl"
    return len(read_rounds(run_dir)) if path.exists() else 0


def gone(process: psutil.Process) -> bool:
    try:
        return process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def status(link, run_id: int) -> str:
    out = link.flwr("ls", "--run-id", str(run_id), "--format", "json").stdout
    return json.loads(out)["runs"][0]["status"]


@pytest.fixture(scope="module")
def uninterrupted(flwr_run):
    log, run_dir = flwr_run("resume-reference", CONFIG)
    assert rounds_in(run_dir) == ROUNDS, log[-3000:]
    return run_dir


def start(flwr_run, name: str) -> tuple[int, Path]:
    config = CONFIG | {"data-dir": data_dir(), "output-dir": str(flwr_run.out), "run-name": name}
    return flwr_run.link.submit(config, clients=2), flwr_run.out / name


def assert_same_run(run_dir: Path, reference: Path) -> None:
    rounds, expected = read_rounds(run_dir), read_rounds(reference)
    assert [r["round"] for r in rounds] == list(range(1, ROUNDS + 1))
    for a, b in zip(rounds, expected, strict=True):
        for key in ("test_accuracy", "test_loss", "train_loss", "bytes_train_total"):
            assert a[key] == b[key], (a["round"], key)
    got, want = torch.load(run_dir / "model.pt"), torch.load(reference / "model.pt")
    for part in ("client", "server_segment"):
        for key, value in want[part].items():
            assert torch.equal(got[part][key], value), f"{part}.{key}"


def test_a_killed_run_resumes_to_the_uninterrupted_result(flwr_run, uninterrupted):
    run_id, run_dir = start(flwr_run, "resume-killed")
    wait_for(lambda: rounds_in(run_dir) >= 1, 300, "round 1")
    simulation = [
        p
        for p in psutil.Process(flwr_run.link.proc.pid).children(recursive=True)
        if "flwr-simulation" in " ".join(p.cmdline())
    ]
    assert len(simulation) == 1
    simulation[0].kill()  # SIGKILL: no handler runs, as in a crash
    wait_for(lambda: gone(simulation[0]), 10, "the simulation process to die")
    done = rounds_in(run_dir)
    assert 1 <= done < ROUNDS and (run_dir / "checkpoint.pt").exists()
    assert not (run_dir / "model.pt").exists()

    log, _ = flwr_run("resume-killed-2", {"resume-from": str(run_dir)})
    assert f"resuming {run_dir} after round {done} of {ROUNDS}" in log, log[-3000:]
    assert_same_run(run_dir, uninterrupted)


def test_flwr_stop_stops_a_run_and_it_resumes(flwr_run, uninterrupted):
    run_id, run_dir = start(flwr_run, "resume-stopped")
    wait_for(lambda: rounds_in(run_dir) >= 1, 300, "round 1")
    stopped = flwr_run.link.flwr("stop", str(run_id))
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    at_stop = rounds_in(run_dir)
    wait_for(lambda: status(flwr_run.link, run_id).startswith("finished"), 120, "the run to end")
    time.sleep(3)
    assert rounds_in(run_dir) == at_stop < ROUNDS  # not one round more after the stop
    assert not (run_dir / "model.pt").exists()

    flwr_run("resume-stopped-2", {"resume-from": str(run_dir)})
    assert_same_run(run_dir, uninterrupted)
