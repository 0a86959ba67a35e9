"""The Deployment Engine for real, on loopback: one SuperLink, two SuperNodes, `flwr run`.

No simulation and no mocks: a `flower-superlink` and two `flower-supernode` processes, Flower's
own, started by `deploy.local.LocalDeployment` (the one local deployment the script and the
benchmarks use too) on free ports of 127.0.0.1 with a private FLWR_HOME and directory, so
nothing collides with a developer's SuperLink. `flwr run` talks to the SuperLink's Control API
through the `local-deployment` connection the deployment writes into its `FLWR_HOME`.

In deployment every message a SuperNode receives starts a fresh `flwr-clientapp` process (the
SuperNode logs count them; checked below). The ClientApp's in-process cache is therefore always
empty, and every step after `query.setup` must rebuild the client from `context.state`. So these
runs prove that `context.state` is the source of truth: the weights they produce equal the
in-process reference's (`experiments.reference`), message for message.

All processes are stopped by PID (their process groups, then any descendant left) when the
deployment's `with` block ends, also when a test or the start-up fails.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from deploy.local import CONNECTION, LocalDeployment, Settings
from deploy.local_superlink import APP_ROOT, free_port, free_port_block
from experiments import reference
from flower_app.results import read_rounds
from models import cut_shape
from split_core.config import RunConfig
from tests.conftest import TINY, data_dir

pytestmark = pytest.mark.slow  # real Flower runs: deselect with -m 'not slow'

NUM_NODES = 2
# Every message the SuperNode pulls is logged as "Receiving: <type> message", then it starts one
# ClientApp process for it.
RECEIVING = "Receiving: "
FRESH_PROCESS = "Start `flwr-clientapp` process"
# Big chunks: a DSL client sends all its activations in one message (each message costs seconds
# here, as each starts a fresh process).
SMALL = TINY | {
    "num-rounds": 1,
    "test-samples": 64,
    "chunk-mib": 64.0,
    "chunk-taper": False,  # every message costs seconds here: one chunk per client
    "min-clients": NUM_NODES,
}


@dataclass
class FlowerRun:
    log: str
    run_dir: Path
    run_id: str
    status: str
    seconds: float


@dataclass
class Deployment:
    local: LocalDeployment
    out: Path

    @property
    def supernode_logs(self) -> list[Path]:
        return [self.local.at.log(f"supernode-{i}") for i in range(self.local.settings.nodes)]

    def flwr(self, *args: str, timeout: float = 60):  # noqa: ANN201
        return self.local.flwr(*args, timeout=timeout)

    def online_nodes(self) -> list[str]:
        return [str(n) for n in self.local.online_nodes()]

    def run(self, name: str, config: dict, timeout: float = 600) -> FlowerRun:
        """`flwr run <app> local-deployment --stream`; data-dir comes from the node config."""
        overrides = config | {"output-dir": str(self.out), "run-name": name}
        start = time.monotonic()
        proc = self.flwr(
            "run",
            str(APP_ROOT),
            CONNECTION,
            "--stream",
            "--run-config",
            " ".join(f"{k}={json.dumps(v)}" for k, v in overrides.items()),
            timeout=timeout,
        )
        seconds = time.monotonic() - start
        log = proc.stdout + proc.stderr
        assert proc.returncode == 0, log[-3000:]
        match = re.search(r"Successfully started run (\d+)", log)
        assert match, log[-3000:]
        run_id = match.group(1)
        # `flwr run --stream` exits 0 even when the run failed: ask the SuperLink.
        runs = json.loads(self.flwr("ls", CONNECTION, "--format", "json").stdout)["runs"]
        status = next(r["status"] for r in runs if r["run-id"] == run_id)
        return FlowerRun(log, self.out / name, run_id, status, seconds)

    def received(self, run_id: str) -> list[int]:
        """Messages each SuperNode pulled for ``run_id``."""
        counts = []
        for path in self.supernode_logs:
            current, n = None, 0
            for line in path.read_text().splitlines():
                if m := re.search(r"\[RUN (\d+)\]", line):
                    current = m.group(1)
                elif RECEIVING in line and current == run_id:
                    n += 1
            counts.append(n)
        return counts

    def process_counts(self) -> list[tuple[int, int]]:
        """(messages received, ClientApp processes started) for each SuperNode, all runs."""
        out = []
        for path in self.supernode_logs:
            text = path.read_text()
            out.append((text.count(RECEIVING), text.count(FRESH_PROCESS)))
        return out


@contextlib.contextmanager
def deploy(tmp: Path, num_nodes: int, warm: bool = False):
    """A SuperLink and ``num_nodes`` SuperNodes on loopback: Flower's own processes, or with
    one warm ClientApp process per SuperNode (``warm``)."""
    settings = Settings(
        nodes=num_nodes,
        warm=warm,
        superlink_port=free_port(),
        supernode_base_port=free_port_block(num_nodes),
        data_dir=data_dir(),
    )
    out = tmp / "runs"
    out.mkdir()
    with LocalDeployment(tmp / "deploy", settings) as local:
        yield Deployment(local, out)


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory):
    with deploy(tmp_path_factory.mktemp("deployment"), NUM_NODES) as dep:
        yield dep


def _check_round(dep: Deployment, run: FlowerRun, config: dict) -> dict:
    assert run.status == "finished:completed", run.log[-3000:]
    rounds = read_rounds(run.run_dir)
    assert len(rounds) == 1, rounds
    r = rounds[0]
    assert r["round"] == 1 and r["method"] == config["method"]
    assert r["num_clients"] == NUM_NODES and r["failed_clients"] == 0, r["failures"]
    samples = NUM_NODES * config["samples-per-client"]
    acts_per_sample = math.prod(cut_shape(config["depth"], config["cut"])) * 4  # float32
    assert cut_shape(config["depth"], config["cut"]) == (16, 32, 32)
    assert r["bytes_activations"] == samples * acts_per_sample
    assert r["bytes_labels"] == samples  # uint8 labels
    assert r["train_examples"] == samples
    assert isinstance(r["test_accuracy"], float) and 0.0 <= r["test_accuracy"] <= 1.0

    # The clients are the two SuperNodes, each read its partition from its node config.
    clients = json.loads((run.run_dir / "config.json").read_text())["clients"]
    assert sorted(c["partition_id"] for c in clients) == list(range(NUM_NODES))
    assert sorted(str(c["node_id"]) for c in clients) == sorted(dep.online_nodes())
    assert all(c["data_source"].startswith(data_dir()) for c in clients), clients

    # One fresh ClientApp process per message: set-up, training, evaluation, checkpoint.
    per_node = r["train_messages"] // NUM_NODES
    assert dep.received(run.run_id) == [3 + per_node] * NUM_NODES
    for received, started in dep.process_counts():
        assert received == started > 0
    return r


def _check_reference(run: FlowerRun, config: dict, rnd: dict) -> None:
    """The deployment run equals the no-Flower reference: no state was lost between processes."""
    ref = reference.train(RunConfig.from_run_config(config | {"data-dir": data_dir()}), 2)
    saved = torch.load(run.run_dir / "model.pt")
    for key, value in ref.server.segment.state_dict().items():
        torch.testing.assert_close(saved["server_segment"][key], value, rtol=1e-5, atol=1e-5)
    assert rnd["test_accuracy"] == pytest.approx(ref.history[-1]["test_accuracy"])


def test_dsl_in_deployment(deployment: Deployment, one_thread):
    """DSL, 1 round, 2 SuperNodes: one activation message per client, no gradients back."""
    config = SMALL | {"method": "dsl", "samples-per-client": 128}
    run = deployment.run("deploy-dsl", config)
    r = _check_round(deployment, run, config)
    assert r["bytes_gradients"] == 0
    assert r["bytes_activations"] == 2 * 128 * 16 * 32 * 32 * 4
    assert r["bytes_labels"] == 256
    assert r["train_messages"] == NUM_NODES  # 8 MiB per client fits one 64 MiB chunk
    _check_reference(run, config, r)
    print(
        f"\n[deploy-dsl] flwr run {run.seconds:.1f} s, round {r['round_seconds']:.1f} s, "
        f"train {r['train_seconds']:.1f} s for {r['train_messages']} messages, "
        f"eval {r['eval_seconds']:.1f} s"
    )


def test_csl_in_deployment(deployment: Deployment, one_thread):
    """CSL, 2 batches per client: forward/backward round trips, each in a new process.

    CSL's autograd graph cannot outlive a process, so every backward rebuilds the client from
    `context.state` and still yields exactly the reference's weights.
    """
    config = SMALL | {"method": "csl", "samples-per-client": 64, "batch-size": 32}
    run = deployment.run("deploy-csl", config)
    r = _check_round(deployment, run, config)
    assert r["bytes_gradients"] == r["bytes_activations"] == 2 * 64 * 16 * 32 * 32 * 4
    assert r["train_messages"] > NUM_NODES * 2  # round trips, not one message per client
    _check_reference(run, config, r)
    print(
        f"\n[deploy-csl] flwr run {run.seconds:.1f} s, round {r['round_seconds']:.1f} s, "
        f"train {r['train_seconds']:.1f} s for {r['train_messages']} messages, "
        f"eval {r['eval_seconds']:.1f} s"
    )


def test_a_supernode_killed_after_round_1_leaves_a_run_that_finishes(tmp_path, one_thread):
    """3 SuperNodes; one is SIGKILLed once round 1 is written. The run finishes rounds 2 and 3
    with the two survivors; the dead node is dropped by reply-timeout (Flower itself takes
    about a minute to mark it offline) and named in rounds.jsonl.

    The SuperNodes run warm ClientApp processes: with a fresh process per message, three of
    them importing torch at once on a loaded 2-core CPU took longer than any reply-timeout
    short enough for this test (40 s was missed), and the round lost its clients to that."""
    config = SMALL | {
        "method": "dsl",
        "num-rounds": 3,
        "min-clients": 2,
        "reply-timeout": 15.0,
        "samples-per-client": 64,
        "checkpoint-every": 0,
    }
    with deploy(tmp_path, 3, warm=True) as dep:
        overrides = config | {"output-dir": str(dep.out), "run-name": "killed"}
        started = dep.flwr(
            "run",
            str(APP_ROOT),
            CONNECTION,
            "--format",
            "json",
            "--run-config",
            " ".join(f"{k}={json.dumps(v)}" for k, v in overrides.items()),
        )
        run_id = json.loads(started.stdout)["run-id"]
        run_dir = dep.out / "killed"
        deadline = time.monotonic() + 240
        while not (run_dir / "rounds.jsonl").exists() or not read_rounds(run_dir):
            assert time.monotonic() < deadline, "round 1 never ended"
            time.sleep(0.5)
        victim = dep.local.pids()["supernode-2"]  # partition-id 2
        os.killpg(victim, signal.SIGKILL)
        os.waitpid(victim, 0)
        deadline = time.monotonic() + 300
        while True:
            runs = json.loads(dep.flwr("ls", CONNECTION, "--format", "json").stdout)["runs"]
            status = next(r["status"] for r in runs if r["run-id"] == run_id)
            if status.startswith("finished"):
                break
            assert time.monotonic() < deadline, "the run did not finish"
            time.sleep(1)
        assert status == "finished:completed"
        rounds = read_rounds(run_dir)
        assert [r["round"] for r in rounds] == [1, 2, 3]
        assert rounds[0]["num_clients"] == 3 and rounds[0]["failed_clients"] == 0
        clients = json.loads((run_dir / "config.json").read_text())["clients"]
        dead = next(str(c["node_id"]) for c in clients if c["partition_id"] == 2)
        for r in rounds[1:]:
            assert r["num_clients"] == 2 and r["failed_clients"] == 1
            assert r["train_examples"] == 2 * 64
            why = r["failures"][dead]
            assert "reply-timeout" in why or "error 5" in why or "not invited" in why, why
        assert (run_dir / "model.pt").exists()
