"""Hostile or broken replies never crash the server, and change nothing but that client's share.

One real simulation with eleven clients: partition 0 is honest, each other partition breaks its
second training reply of every round in its own way (the table below). The same run in this
process (no Flower engine: tests/memory_grid.py) has those partitions simply fail at the same
reply (the ClientApp raises; the grid answers with an error reply, as Flower does). The two runs
must end with the same server segment and the same global client weights, bit for bit: a
rejected reply is exactly a dropped one. Each rejection names its problem in rounds.jsonl.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord
from flwr.clientapp import ClientApp

from flower_app import client_app as real
from flower_app.results import read_rounds
from flower_app.simulation import simulate
from tests.conftest import TINY, client_app_with, data_dir
from tests.memory_grid import run_in_process

pytestmark = pytest.mark.slow


def _acts(reply: Message) -> ArrayRecord:
    return reply.content["acts"]


def _replace(reply: Message, key: str, array: np.ndarray) -> None:
    _acts(reply)[key] = Array(array)


def truncated(reply):
    blob = _acts(reply)["acts"]
    short = Array(dtype=blob.dtype, shape=blob.shape, stype=blob.stype, data=blob.data[:1000])
    _acts(reply)["acts"] = short


def garbage(reply):
    blob = _acts(reply)["acts"]
    noise = np.random.default_rng(0).integers(0, 256, len(blob.data), dtype=np.uint8).tobytes()
    _acts(reply)["acts"] = Array(dtype=blob.dtype, shape=blob.shape, stype=blob.stype, data=noise)


def wrong_dtype(reply):
    _replace(reply, "acts", _acts(reply)["acts"].numpy().astype(np.int32))


def wrong_shape(reply):
    acts = _acts(reply)["acts"].numpy()
    _replace(reply, "acts", acts.reshape(len(acts), 8, 32, -1))


def nan(reply):
    acts = _acts(reply)["acts"].numpy().copy()
    acts.flat[123] = np.nan
    _replace(reply, "acts", acts)


def inf(reply):
    acts = _acts(reply)["acts"].numpy().copy()
    acts.flat[5] = -np.inf
    _replace(reply, "acts", acts)


def label_out_of_range(reply):
    labels = _acts(reply)["labels"].numpy().copy()
    labels[0] = 10
    _replace(reply, "labels", labels)


def missing_labels(reply):
    del _acts(reply)["labels"]


def missing_metric(reply):
    metrics = dict(reply.content["metrics"])
    del metrics["num-examples"]
    reply.content["metrics"] = MetricRecord(metrics)


def absurd_examples(reply):
    reply.content["metrics"]["num-examples"] = 10**9


BREAKAGES = {  # partition -> (what it does to its 2nd training reply, the reason expected)
    1: (truncated, "array 'acts' cannot be decoded"),
    2: (garbage, "is not a valid .npy blob"),
    3: (wrong_dtype, "activations must be float32 on the wire (payload-dtype=float32), got int32"),
    4: (wrong_shape, "activations have shape (32, 8, 32, 64), expected (n>0, 16, 32, 32)"),
    5: (nan, "activations contain NaN or infinite values"),
    6: (inf, "activations contain NaN or infinite values"),
    7: (label_out_of_range, "labels out of range [0, 10): "),
    8: (missing_labels, "activation payload has arrays ['acts'], expected ['acts', 'labels']"),
    9: (missing_metric, "reply metrics lack 'num-examples'"),
    10: (absurd_examples, "num-examples is 1000000000, the payload has 32"),
}
K = 1 + len(BREAKAGES)


def breaking_app(mode: str) -> ClientApp:
    """The real ClientApp; partitions 1.. break (``mode='break'``) or fail (``'fail'``) their
    second training reply of every round."""

    def forward(msg: Message, context: Context) -> Message:
        pid = int(context.node_config["partition-id"])
        seen = 0 if "arrays" in msg.content else int(context.state["test.count"]["n"])
        context.state["test.count"] = ConfigRecord({"n": seen + 1})
        if pid in BREAKAGES and seen + 1 == 2:
            if mode == "fail":
                raise RuntimeError("this reply is dropped")
            reply = real.train(msg, context)
            BREAKAGES[pid][0](reply)
            return reply
        return real.train(msg, context)

    return client_app_with(forward=forward)


CONFIG = TINY | {
    "method": "dsl",
    "samples-per-client": 96,  # three chunks of one batch (32) per client
    "chunk-mib": 0.5,
    "test-samples": 11 * 16,
    "max-active-clients": K,
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("hostile")
    dirs = {}
    config = CONFIG | {"data-dir": data_dir(), "output-dir": str(out)}
    dirs["break"] = simulate(config | {"run-name": "break"}, K, client_app=breaking_app("break"))
    # the twin in this process: the breaking clients answer with errors instead
    dirs["fail"] = run_in_process(config | {"run-name": "fail"}, breaking_app("fail"), K)
    return dirs


def test_every_broken_reply_is_rejected_with_its_reason(runs):
    rounds = read_rounds(runs["break"])
    assert [r["round"] for r in rounds] == [1, 2]  # the run went on
    config = json.loads((runs["break"] / "config.json").read_text())
    pid_of = {str(c["node_id"]): c["partition_id"] for c in config["clients"]}
    for r in rounds:
        assert r["num_clients"] == 1 and r["failed_clients"] == len(BREAKAGES)
        reasons = {pid_of[node]: why for node, why in r["failures"].items()}
        assert set(reasons) == set(BREAKAGES)
        for pid, (_, expected) in BREAKAGES.items():
            assert reasons[pid].startswith("bad payload: ") and expected in reasons[pid], pid


def test_a_rejected_reply_is_exactly_a_dropped_one(runs):
    broken, failed = (torch.load(runs[m] / "model.pt") for m in ("break", "fail"))
    for part in ("client", "server_segment"):
        assert broken[part].keys() == failed[part].keys()
        for key, value in broken[part].items():
            assert torch.equal(value, failed[part][key]), f"{part}.{key}"
    for a, b in zip(read_rounds(runs["break"]), read_rounds(runs["fail"]), strict=True):
        for key in ("test_accuracy", "train_loss", "train_examples", "bytes_activations"):
            assert a[key] == b[key], key
