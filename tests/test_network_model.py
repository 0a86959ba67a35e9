"""The network model's formulas, on made-up per-batch costs (benchmarks/network_model.py)."""

from __future__ import annotations

import pytest

from benchmarks.network_model import Link, Measured, epoch_seconds

BASE = dict(
    clients=1,
    batches=10,
    client_forward=0.02,
    client_backward=0.03,
    client_data=0.0,
    client_overhead=0.0,
    server_overhead=0.0,
    state_bytes=0.0,
    server=0.04,
    act_bytes=1e6,
    grad_bytes=1e6,
    per_message=5.0,
    messages=11,
    epoch_seconds=1.0,
    method="csl",
)
FAST = Link(latency=0.0, bandwidth=1e15)


def test_csl_is_n_plus_one_round_trips():
    csl = Measured(**BASE)
    link = Link(latency=0.1, bandwidth=1e6)  # 1 s per MB
    compute = 10 * (0.02 + 0.04 + 0.03)
    transfer = 10 * 2.0  # activations and gradient, 1 MB each way per batch
    assert epoch_seconds("CSL", csl, csl, link, 1) == pytest.approx(compute + transfer + 11 * 0.2)


def test_dsl_pipelines_to_its_slowest_party_plus_the_last_chunk():
    dsl = Measured(**BASE | {"method": "dsl", "client_backward": 0.0, "grad_bytes": 0.0})
    # no link cost: the client's chain (10 x 0.02 s) plus the server's last chunk (5 x 0.04 s)
    # is below the server's whole work (10 x 0.04 s), which bounds the epoch
    assert epoch_seconds("DSL", dsl, dsl, FAST, 1) == pytest.approx(0.4)
    slow = Link(latency=0.5, bandwidth=1e15)  # 2 chunks, each waiting a round trip
    assert epoch_seconds("DSL", dsl, dsl, slow, 1) == pytest.approx(2 * (0.1 + 1.0) + 0.2)


def test_int8_quarters_the_activation_transfer_and_feedback_sits_between():
    csl = Measured(**BASE)
    dsl = Measured(**BASE | {"method": "dsl", "client_backward": 0.0, "grad_bytes": 0.0})
    link = Link(latency=0.01, bandwidth=1e6)
    times = {
        m: epoch_seconds(m, csl, dsl, link, 1) for m in ("CSL", "DSL", "DSL-int8", "DSL-fb(2)")
    }
    assert times["DSL-int8"] < times["DSL"] < times["DSL-fb(2)"] < times["CSL"]
    # all activation bytes cross at 1 MB/s: int8 saves three quarters of those 10 s
    assert times["DSL"] - times["DSL-int8"] == pytest.approx(7.5)


def test_a_shared_worker_serialises_the_clients():
    dsl = Measured(**BASE | {"method": "dsl", "clients": 4, "client_backward": 0.0})
    alone = epoch_seconds("DSL", dsl, dsl, FAST, 4)
    shared = epoch_seconds("DSL", dsl, dsl, FAST, 1)
    assert shared == pytest.approx(max(alone, 4 * 10 * 0.02, 4 * 10 * 0.04))
