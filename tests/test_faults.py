"""Bad input from a client in a real Flower simulation: rejected, named, and the run goes on."""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import Array, Context, Message
from flwr.clientapp import ClientApp

from flower_app import client_app as real
from flower_app.results import read_rounds
from flower_app.simulation import simulate
from tests.conftest import TINY, data_dir


def faulty_client_app() -> ClientApp:
    """The real ClientApp, except that partition 1 puts a NaN into every activation payload."""
    app = ClientApp()

    @app.query("setup")
    def setup(msg: Message, context: Context) -> Message:
        return real.setup(msg, context)

    @app.train("forward")
    def forward(msg: Message, context: Context) -> Message:
        reply = real.train(msg, context)
        if context.node_config["partition-id"] == 1 and "acts" in reply.content:
            acts = reply.content["acts"]["acts"].numpy().copy()
            acts.flat[7] = np.nan
            reply.content["acts"]["acts"] = Array(acts)
        return reply

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        return real.evaluate(msg, context)

    return app


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
