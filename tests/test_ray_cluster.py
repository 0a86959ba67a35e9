"""Simulation beyond one machine: Flower's Ray backend joins an existing Ray cluster.

Two Ray nodes on loopback, a head and a worker of one CPU each, each with its own temp dir, are
started with `ray start --block` in sessions of their own, so that stopping them is killing two
sessions by PID. A SuperLink whose environment holds ``RAY_ADDRESS`` runs a 4-client CSL
simulation on that cluster: the round records name the Ray node of every reply, and both nodes
must have served some. The same run on the single-node Ray that Flower starts by itself must give
the same metrics and the same weights: where an actor runs changes nothing.
"""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
import torch

from deploy.local_superlink import BIN, LocalSuperLink, free_port
from flower_app.results import read_rounds
from tests.conftest import TINY, data_dir

pytestmark = pytest.mark.slow

CONFIG = TINY | {"method": "csl", "samples-per-client": 256, "test-samples": 256}
SAME_KEYS = ("test_accuracy", "test_loss", "train_loss", "bytes_train_total", "bytes_eval")


def _session_pids(sid: int) -> list[int]:
    """Every process of session ``sid`` (Ray daemonises its raylet and GCS, but they stay in
    the session `ray start` was given)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[3]) == sid:  # after the state: ppid, pgrp, session
            pids.append(int(stat.parent.name))
    return pids


def _stop_session(proc: subprocess.Popen) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in _session_pids(proc.pid):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 15
        while _session_pids(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.3)
    proc.wait(timeout=10)


def _ray_start(temp_dir: Path, log: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [
            str(BIN / "ray"),
            "start",
            "--block",
            "--num-cpus",
            "1",
            "--node-ip-address",
            "127.0.0.1",
            "--temp-dir",
            str(temp_dir),
            "--disable-usage-stats",
            *args,
        ],
        env=os.environ | {"RAY_USAGE_STATS_ENABLED": "0"},
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def _alive_nodes(address: str) -> int:
    status = subprocess.run(
        [str(BIN / "ray"), "status", "--address", address],
        capture_output=True,
        text=True,
        timeout=60,
    )
    active = status.stdout.split("Active:", 1)[-1].split("Pending:", 1)[0]
    return sum(1 for line in active.splitlines() if " node_" in line)


@pytest.fixture
def ray_cluster():
    root = Path(tempfile.mkdtemp(prefix="ray"))  # short: Ray's socket paths have a length cap
    address = f"127.0.0.1:{free_port()}"
    port = address.rsplit(":", 1)[1]
    started = [
        _ray_start(
            root / "head",
            root / "head.log",
            "--head",
            "--port",
            port,
            "--include-dashboard",
            "false",
        )
    ]
    try:
        deadline = time.monotonic() + 120
        while _alive_nodes(address) < 1:
            assert time.monotonic() < deadline, (root / "head.log").read_text()[-2000:]
            time.sleep(1)
        started.append(_ray_start(root / "worker", root / "worker.log", "--address", address))
        while _alive_nodes(address) < 2:
            assert time.monotonic() < deadline, (root / "worker.log").read_text()[-2000:]
            time.sleep(1)
        yield address
    finally:
        for proc in reversed(started):
            _stop_session(proc)
        assert not any(_session_pids(p.pid) for p in started)


def _run(link: LocalSuperLink, out: Path, name: str) -> tuple[list[dict], dict]:
    config = CONFIG | {"output-dir": str(out), "run-name": name, "data-dir": data_dir()}
    result = link.run(config, clients=4, cpus_per_client=1, timeout=900)
    assert (result.run_dir / "model.pt").exists(), result.log[-3000:]
    return read_rounds(result.run_dir), torch.load(result.run_dir / "model.pt")


def test_a_simulation_runs_on_a_two_node_ray_cluster(ray_cluster, tmp_path):
    with LocalSuperLink(tmp_path / "cluster-home", env={"RAY_ADDRESS": ray_cluster}) as link:
        on_cluster, model_cluster = _run(link, tmp_path, "cluster")
    with LocalSuperLink(tmp_path / "single-home") as link:
        on_one, model_one = _run(link, tmp_path, "single")

    served = {node for r in on_cluster for node in r["ray_nodes"]}
    assert len(served) == 2, on_cluster[-1]["ray_nodes"]  # actors ran on both Ray nodes
    for r in on_cluster:  # every reply is attributed: all training ones, one evaluation each
        assert sum(r["ray_nodes"].values()) >= r["train_messages"] + 4
    assert len({node for r in on_one for node in r["ray_nodes"]}) == 1
    for a, b in zip(on_cluster, on_one, strict=True):
        for key in SAME_KEYS:
            assert a[key] == b[key], key
    for part in ("client", "server_segment"):
        for key, value in model_one[part].items():
            assert torch.equal(value, model_cluster[part][key]), f"{part}.{key}"
