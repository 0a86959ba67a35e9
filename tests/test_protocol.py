"""The message protocol: every request and reply survives its round trip, structure is checked
on decode, and no message key is spelt anywhere but in split_core/protocol.py."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from split_core import protocol
from split_core.payload import PayloadError
from split_core.protocol import (
    CheckpointReply,
    EvalMetrics,
    EvaluateReply,
    EvaluateRequest,
    Fold,
    RestoreRequest,
    SetupReply,
    SetupRequest,
    TrainMetrics,
    TrainReply,
    TrainRequest,
    decode_metrics,
    encode_metrics,
)

ROOT = Path(__file__).resolve().parents[1]
WEIGHTS = ArrayRecord({"segment.w": Array(np.arange(6, dtype=np.float32).reshape(2, 3))})


def _same(a, b) -> None:
    """Dataclasses equal field by field, ArrayRecords by their bytes."""
    assert type(a) is type(b)
    for f in dataclasses.fields(a):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if isinstance(x, ArrayRecord):
            assert {k: v.data for k, v in x.items()} == {k: v.data for k, v in y.items()}
        else:
            assert x == y, f.name


@pytest.mark.parametrize(
    "message",
    [
        TrainRequest(3, 0.05, weights=WEIGHTS),
        TrainRequest(3, 0.05),
        TrainRequest(1, 0.1, gradient=WEIGHTS),
        EvaluateRequest(2, WEIGHTS),
        EvaluateRequest(2),
        RestoreRequest(WEIGHTS),
        SetupRequest({"method": "dsl", "depth": 8}),
    ],
)
def test_requests_round_trip(message):
    _same(type(message).decode(message.content()), message)


def test_message_types_follow_the_gradient():
    assert TrainRequest(1, 0.1).message_type == protocol.TRAIN_FORWARD
    assert TrainRequest(1, 0.1, gradient=WEIGHTS).message_type == protocol.TRAIN_BACKWARD
    for t in protocol.MESSAGE_TYPES:  # Flower accepts "<category>[.<action>]" only
        category, action = protocol.split_type(t)
        assert category in ("train", "evaluate", "query") and (action is None or "." not in action)


def test_replies_round_trip():
    train = TrainReply(
        TrainMetrics(num_examples=32, done=True, epoch_examples=96, aux_loss_sum=1.5),
        activations=WEIGHTS,
        weights=WEIGHTS,
    )
    _same(TrainReply.decode(train.content()), train)
    assert TrainReply.decode(train.content()).metrics == train.metrics
    evaluation = EvaluateReply(EvalMetrics(num_examples=5, probe_dcor=0.25, probe_count=1))
    assert EvaluateReply.decode(evaluation.content()).metrics == evaluation.metrics
    _same(CheckpointReply.decode(CheckpointReply(WEIGHTS).content()), CheckpointReply(WEIGHTS))
    setup = SetupReply(0, 2, 600, 200, 1.0, 0.0, 1, 4096, "cifar10 (zip)", "cpu")
    assert SetupReply.decode(setup.content()) == setup


def test_the_ray_node_travels_in_the_info_record_and_nothing_else_does():
    node = "5ea880b07b9698c5c9bbf9143352aced8e1f0688132e1ea999fe96e8"
    train = TrainReply(TrainMetrics(num_examples=0), ray_node=node)
    assert TrainReply.decode(train.content()).ray_node == node
    evaluation = EvaluateReply(EvalMetrics(num_examples=0), ray_node=node)
    assert EvaluateReply.decode(evaluation.content()).ray_node == node
    assert "info" not in TrainReply(TrainMetrics(num_examples=0)).content()
    for value, problem in (
        ("x" * 65, "'ray-node' must be a Ray node id \\(hex\\), got 'xxx"),
        ("NODE-1", "'ray-node' must be a Ray node id \\(hex\\), got 'NODE-1'"),
        (7, "'ray-node' must be a Ray node id \\(hex\\), got '7'"),
    ):
        content = train.content()
        content["info"] = ConfigRecord({"ray-node": value})
        with pytest.raises(PayloadError, match=problem):
            TrainReply.decode(content)
    content = evaluation.content()
    content["info"] = ConfigRecord({"ray-node": node, "secret": "x"})
    with pytest.raises(PayloadError, match=r"reply info carries undeclared \['secret'\]"):
        EvaluateReply.decode(content)


def test_an_unfinished_reply_sends_no_epoch_examples():
    record = encode_metrics(TrainMetrics(num_examples=32))
    assert "epoch-examples" not in record and record["done"] == 0
    assert decode_metrics(TrainMetrics, record).epoch_examples is None


def test_setup_reply_problems_are_named():
    content = SetupReply(0, 2, 600, 200, 1.0, 0.0, 1, 4096, "x", "cpu").content()
    del content["info"]
    with pytest.raises(PayloadError, match="set-up reply is malformed: KeyError: 'info'"):
        SetupReply.decode(content)
    negative = SetupReply(0, 2, -1, 200, 1.0, 0.0, 1, 4096, "x", "cpu").content()
    with pytest.raises(PayloadError, match="set-up reply has negative counts"):
        SetupReply.decode(negative)


def test_records_of_the_wrong_kind_are_refused():
    content = RecordDict({"config": ConfigRecord({"round": 1, "lr": 0.1}), "arrays": WEIGHTS})
    content["grad"] = MetricRecord({"x": 1.0})
    with pytest.raises(PayloadError, match="training request carries no 'grad' ArrayRecord"):
        TrainRequest.decode(content)
    with pytest.raises(PayloadError, match="checkpoint reply carries no 'optim' ArrayRecord"):
        CheckpointReply.decode(RecordDict())


def test_every_metric_declares_its_fold_and_a_unique_key():
    for kind in (TrainMetrics, EvalMetrics):
        keys = [f.metadata["key"] for f in dataclasses.fields(kind)]
        assert len(keys) == len(set(keys)), kind
        assert all(isinstance(protocol.fold_of(f), Fold) for f in dataclasses.fields(kind))
    flags = [f.name for f in dataclasses.fields(TrainMetrics) if f.metadata["kind"] is bool]
    assert all(
        protocol.fold_of(f) is Fold.NONE
        for f in dataclasses.fields(TrainMetrics)
        if f.name in flags
    )


# ----------------------------------------------------------------------- one place
USERS = [  # the modules that speak the protocol
    "flower_app/client_app.py",
    "experiments/reference.py",
    "split_core/client.py",
    "split_core/client_state.py",
    *sorted(
        str(p.relative_to(ROOT))
        for p in (ROOT / "strategies").glob("*.py")
        if p.name != "checkpoint.py"  # its config keys are run-config keys, not messages
    ),
]


def _spelt() -> set[str]:
    """Message types, record keys and metric names: what no other module may spell."""
    words = set(protocol.MESSAGE_TYPES)
    words |= {protocol.CONFIG, protocol.METRICS, protocol.INFO, protocol.WEIGHTS}
    words |= {protocol.ACTIVATIONS, protocol.GRADIENT, protocol.OPTIMIZER}
    for kind in (TrainMetrics, EvalMetrics):
        words |= {f.metadata["key"] for f in dataclasses.fields(kind)}
    words |= {key for _, key, _ in SetupReply._FIELDS.values()}
    return words


@pytest.mark.parametrize("module", USERS)
def test_no_message_key_is_spelt_outside_the_protocol(module):
    words = _spelt()
    found = [
        (node.lineno, node.value)
        for node in ast.walk(ast.parse((ROOT / module).read_text()))
        if isinstance(node, ast.Constant) and node.value in words
    ]
    assert found == []
