"""Bad input from a client in a real Flower simulation: rejected, named, and the run goes on."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch
from flwr.app import Array, ConfigRecord, Context, Message
from flwr.clientapp import ClientApp

from flower_app import client_app as real
from flower_app.results import read_rounds
from flower_app.simulation import simulate
from tests.conftest import TINY, client_app_with, data_dir

pytestmark = pytest.mark.slow  # real Flower runs: deselect with -m 'not slow'
# A first message of a round may wait behind other clients' messages for a Ray actor, which
# then loads the data into its cache: on a 2-core CPU running four test files at once, that took
# more than 8 s. The hang must outlast the timeout by far, or the hanging client would answer.
REPLY_TIMEOUT = 20.0
HANG_SECONDS = 3 * REPLY_TIMEOUT


def faulty_client_app() -> ClientApp:
    """The real ClientApp, except that partition 1 puts a NaN into every activation payload."""

    def forward(msg: Message, context: Context) -> Message:
        reply = real.train(msg, context)
        if context.node_config["partition-id"] == 1 and "acts" in reply.content:
            acts = reply.content["acts"]["acts"].numpy().copy()
            acts.flat[7] = np.nan
            reply.content["acts"]["acts"] = Array(acts)
        return reply

    return client_app_with(forward=forward)


def test_malformed_payload_is_rejected_and_the_run_goes_on(tmp_path):
    config = TINY | {"data-dir": data_dir(), "output-dir": str(tmp_path), "run-name": "faulty"}
    run_dir = simulate(config, num_clients=2, client_app=faulty_client_app())
    rounds = read_rounds(run_dir)
    assert [r["round"] for r in rounds] == [1, 2]
    for r in rounds:
        assert r["num_clients"] == 1 and r["failed_clients"] == 1
        (reason,) = r["failures"].values()
        assert "bad payload: activations contain NaN or infinite values" in reason
        # the server trained on partition 0 only: the NaN batch never reached its model
        assert r["train_examples"] == TINY["samples-per-client"]
        assert np.isfinite(r["train_loss"])
        assert r["test_accuracy"] is not None
    server = torch.load(run_dir / "model.pt")["server_segment"]
    assert all(torch.isfinite(v).all() for v in server.values() if v.is_floating_point())


def unreliable_client_app() -> ClientApp:
    """The real ClientApp with three unreliable partitions:

    1. fails set-up (it never takes part);
    2. raises on its second training message and on its evaluation, in round 1 only;
    3. hangs on its first training message of round 2, for three times the reply-timeout.
    """

    def setup(msg: Message, context: Context) -> Message:
        if context.node_config["partition-id"] == 1:
            raise OSError("disk on fire")
        return real.setup(msg, context)

    def forward(msg: Message, context: Context) -> Message:
        pid, rnd = int(context.node_config["partition-id"]), int(msg.content["config"]["round"])
        seen = 0 if "arrays" in msg.content else int(context.state["test.seen"]["n"])
        context.state["test.seen"] = ConfigRecord({"n": seen + 1})
        if pid == 2 and rnd == 1 and seen == 1:
            raise RuntimeError("out of memory, allegedly")
        if pid == 3 and rnd == 2 and seen == 0:
            time.sleep(HANG_SECONDS)
        return real.train(msg, context)

    def evaluate(msg: Message, context: Context) -> Message:
        if context.node_config["partition-id"] == 2 and msg.content["config"]["round"] == 1:
            raise RuntimeError("evaluation broke too")
        return real.evaluate(msg, context)

    return client_app_with(setup=setup, forward=forward, evaluate=evaluate)


def test_unreliable_clients_are_left_out_and_the_run_goes_on(tmp_path):
    config = TINY | {
        "method": "dsl",
        "samples-per-client": 96,
        "chunk-mib": 0.5,  # one batch per message: partition 2 fails mid-round
        "test-samples": 128,
        "reply-timeout": REPLY_TIMEOUT,
        "data-dir": data_dir(),
        "output-dir": str(tmp_path),
        "run-name": "unreliable",
    }
    run_dir = simulate(config, 4, client_app=unreliable_client_app(), cpus_per_client=1)
    first, second = read_rounds(run_dir)
    pid_of = {
        str(c["node_id"]): c["partition_id"]
        for c in json.loads((run_dir / "config.json").read_text())["clients"]
    }
    setup_failure = json.loads((run_dir / "config.json").read_text())["setup_failures"]
    (why_setup,) = setup_failure.values()
    assert "disk on fire" in why_setup  # and set-up went on with the other three

    # Round 1: partition 2 fails in training and in evaluation, and counts once.
    assert first["num_clients"] == 2, first["failures"]
    assert first["failed_clients"] == 2
    reasons = {pid_of.get(n, "setup"): why for n, why in first["failures"].items()}
    assert reasons["setup"] == why_setup
    assert "out of memory, allegedly" in reasons[2]  # the first failure of the round
    # Partition 2's first batch counts if the server stepped on it before the failure of its
    # second message arrived, and not if it still waited in the queue (then it was dropped with
    # the client): which one depends on timing, and both are a whole number of batches.
    assert first["train_examples"] in (2 * 96, 2 * 96 + 32)

    # Round 2: partition 2 is back; partition 3 hangs and the reply-timeout drops it.
    assert second["num_clients"] == 2, second["failures"]
    ((node, why),) = second["failures"].items()
    assert pid_of[node] == 3 and why == f"no reply within {REPLY_TIMEOUT:g} s (reply-timeout)"
    assert second["train_examples"] == 2 * 96
    assert np.isfinite(second["train_loss"])
