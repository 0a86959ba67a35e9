"""Well-formed but poisoned replies: no single client can make the server segment or the global
model non-finite, or move the aggregate by more than its counted share.

tests/test_hostile.py feeds the server malformed replies; here every reply decodes and is
malicious. Fast tests hold each check on its own; the slow table (``TABLE`` below, written up
in docs/trust.md) runs every row in a real Flower simulation, DSL and CSL (the never-done row
in DSL only), beside two honest clients, and compares the final model with a run in which each
culprit's poisoned reply is an error reply instead (``flower_app.server_app.run`` in this
process, through a grid of our own that hands each message to the same ClientApp): a rejected
reply is exactly a dropped one, bit for bit. For the robust aggregators, a client that is not
rejected (weights shifted by SHIFT, within every bound) moves the result by less than a stated
distance.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp

from flower_app import client_app as real
from flower_app.results import read_rounds
from flower_app.simulation import simulate
from models import cut_shape
from split_core import protocol
from split_core.config import RunConfig
from split_core.methods import client_modules, make_method
from split_core.payload import PayloadError, encode_activations, encode_modules
from split_core.protocol import (
    TRAIN_FORWARD,
    EvalMetrics,
    EvaluateReply,
    SetupReply,
    TrainMetrics,
    TrainReply,
)
from split_core.steps import Phases
from strategies import replies
from strategies.exchange import Exchange
from strategies.lifecycle import check_setup, setup_clients
from strategies.phases import QueryPhase, TrainPhase
from strategies.replies import Expected, expectations, parse_eval, parse_train
from strategies.roster import ClientInfo, Roster
from strategies.server_segment import ServerSegment
from tests.conftest import TINY, client_app_with, data_dir
from tests.memory_grid import MemoryGrid, run_in_process

pytestmark = pytest.mark.usefixtures("task_identity")  # messages are built outside a run
A, B, C = 11, 22, 33


def tiny(**extra) -> RunConfig:
    return RunConfig.from_run_config(TINY | {"data-dir": "unused", "method": "dsl"} | extra)


SHAPE = cut_shape(TINY["depth"], TINY["cut"])  # (16, 32, 32)


def acts_record(n: int, value: float | None = None, wire: str = "float32", seed: int = 0):
    acts = torch.rand(n, *SHAPE, generator=torch.Generator().manual_seed(seed))
    if value is not None:
        acts[-1].fill_(value)
    return encode_activations(acts, torch.arange(n) % 10, wire)


def reply(content: RecordDict) -> Message:
    return Message(content=content, dst_node_id=A, message_type=TRAIN_FORWARD)


def train_reply(acts=None, weights=None, **metrics) -> Message:
    rows = 0 if acts is None else acts["labels"].shape[0]  # the declared shape: not decoded
    values = {"num_examples": rows} | metrics
    return reply(TrainReply(TrainMetrics(**values), acts, weights).content())


def expected(cfg: RunConfig, train_examples: int = 96, weights=None) -> Expected:
    info = ClientInfo(A, 0, train_examples, 32, "test", "cpu", 1.0, 0.0, 1, 0)
    return expectations([info], cfg, torch.device("cpu"), weights)[A]


def refused(call: Callable[[], object]) -> str:
    with pytest.raises(PayloadError) as info:
        call()
    return str(info.value)


@pytest.fixture
def no_decoding(monkeypatch):
    """Checks that must run on the headers alone: decoding an array fails the test."""

    def decode(*args, **kwargs):
        raise AssertionError("an array was decoded before its size was checked")

    monkeypatch.setattr(replies, "decode_activations", decode)
    monkeypatch.setattr(Array, "numpy", lambda self: decode())


# ------------------------------------------------------------------- magnitudes, sizes
def test_huge_activations_are_refused_beyond_max_activation():
    reason = refused(lambda: parse_train(train_reply(acts_record(4, 3e38)), expected(tiny())))
    assert reason == "activations reach 3e+38 in magnitude, beyond max-activation=10000"
    cfg = tiny(**{"max-activation": 3.4e38})  # raised: the payload is taken
    assert parse_train(train_reply(acts_record(4, 3e38)), expected(cfg)).examples == 4


def int8_record(side: str, value: float) -> ArrayRecord:
    record = acts_record(4, wire="int8")
    numbers = record[f"acts.{side}"].numpy().copy()
    numbers[3] = value
    record[f"acts.{side}"] = Array(numbers)
    return record


@pytest.mark.parametrize(
    ("side", "value", "reason"),
    [
        ("scale", 1e30, "int8 channel 3 (scale 1e+30, zero point -128) decodes to 2.55e+32"),
        ("zero", 1e30, "int8 channel 3 (scale 0.00392, zero point 1e+30) decodes to 3.92e+27"),
        ("zero", -3e6, "int8 channel 3 (scale 0.00392, zero point -3e+06) decodes to 1.18e+04"),
    ],
)
def test_a_huge_int8_scale_or_zero_point_is_refused_before_the_array_is_expanded(
    side, value, reason, monkeypatch
):
    cfg = tiny(**{"payload-dtype": "int8"})
    message = train_reply(int8_record(side, value))

    def expand(*args, **kwargs):
        raise AssertionError("the int8 array was expanded")

    monkeypatch.setattr(replies, "decode_activations", expand)
    text = refused(lambda: parse_train(message, expected(cfg)))
    assert text.startswith(reason) and text.endswith("beyond max-activation=10000"), text


def test_an_honest_int8_channel_far_from_zero_is_taken():
    """A narrow channel far from 0 has a tiny scale and a zero point in the millions: its
    decoded range is what bounds it, not the zero point's size."""
    acts = torch.rand(4, *SHAPE, generator=torch.Generator().manual_seed(1))
    acts[:, 0] = 5.0 + 1e-4 * acts[:, 0]
    record = encode_activations(acts, torch.arange(4), "int8")
    assert abs(float(record["acts.zero"].numpy()[0])) > 1e6
    parsed = parse_train(train_reply(record), expected(tiny(**{"payload-dtype": "int8"})))
    assert torch.allclose(parsed.acts[:, 0], acts[:, 0], atol=1e-3)


def test_rows_beyond_one_message_are_refused_from_the_header(no_decoding):
    cfg = tiny(**{"chunk-mib": 0.5})  # 0.5 MiB of 16x32x32 float32: 8 rows, so one batch (32)
    assert expected(cfg).train_rows == 32 and expected(cfg).eval_rows == 8
    message = train_reply(acts_record(64))
    reason = refused(lambda: parse_train(message, expected(cfg)))
    assert reason == (
        "'acts' has 64 rows (1048576 values); this client may send at most 32 rows in this message"
    )


def test_rows_beyond_what_a_client_has_left_are_refused_from_the_header(no_decoding):
    message = train_reply(acts_record(32))
    reason = refused(lambda: parse_train(message, expected(tiny(), 96), received=80))
    assert reason.endswith("this client may send at most 16 rows in this message")


def test_evaluation_rows_are_bounded_by_the_test_set_left(no_decoding):
    content = EvaluateReply(EvalMetrics(num_examples=32), acts_record(32)).content()
    reason = refused(lambda: parse_eval(reply(content), expected(tiny()), received=8))
    assert reason.endswith("this client may send at most 24 rows in this message")


def test_an_array_whose_header_claims_more_than_it_carries_is_refused(no_decoding):
    record = acts_record(4)
    blob = record["acts"]
    record["acts"] = Array(
        dtype=blob.dtype, shape=blob.shape, stype=blob.stype, data=blob.data[:-4]
    )
    reason = refused(lambda: parse_train(train_reply(record, num_examples=4), expected(tiny())))
    assert reason == (
        "array 'acts' cannot be decoded: its header declares 65536 x 4 bytes, it carries 262140"
    )


def global_weights(cfg: RunConfig) -> ArrayRecord:
    return encode_modules(client_modules(cfg))


def scaled(weights: ArrayRecord, key: str, value: float) -> ArrayRecord:
    out = ArrayRecord({k: Array(v.numpy().copy()) for k, v in weights.items()})
    array = out[key].numpy().copy()
    array.flat[0] = value
    out[key] = Array(array)
    return out


def test_huge_weights_are_refused_beyond_max_weight():
    cfg = tiny()
    weights = global_weights(cfg)
    key = next(iter(weights))
    message = train_reply(
        weights=scaled(weights, key, 1e30), done=True, epoch_examples=96, num_examples=0
    )
    reason = refused(lambda: parse_train(message, expected(cfg, 96, weights)))
    assert reason == f"client weight {key!r} reaches 1e+30 in magnitude, beyond max-weight=1e+06"


def test_weights_larger_on_the_wire_than_the_global_model_are_refused(no_decoding):
    cfg = tiny()
    weights = global_weights(cfg)
    key = next(iter(weights))
    big = ArrayRecord(dict(weights.items()))
    big[key] = Array(np.zeros(10**5, dtype=np.float32))
    message = train_reply(weights=big, done=True, epoch_examples=96, num_examples=0)
    reason = refused(lambda: parse_train(message, expected(cfg, 96, weights)))
    assert reason.startswith(f"client weight {key!r} carries 400128 bytes, the global model's")


@pytest.mark.parametrize(
    ("metrics", "reason"),
    [
        ({"aux_correct": 5}, "aux-correct is 5, more than num-examples 4"),
        ({"rebuilt": 2}, "rebuilt is 2: one message rebuilds at most once"),
        ({"recomputes": 3}, "recomputes is 3: one message recomputes once"),
    ],
)
def test_a_clients_own_figures_must_agree(metrics, reason):
    message = train_reply(acts_record(4), **metrics)
    assert refused(lambda: parse_train(message, expected(tiny()))) == reason


def test_an_evaluation_reply_may_carry_one_privacy_probe_in_0_1():
    for probe in ({"probe_count": 2, "probe_dcor": 1.0}, {"probe_count": 1, "probe_dcor": 1.5}):
        content = EvaluateReply(EvalMetrics(num_examples=4, **probe), acts_record(4)).content()
        assert "one probe per reply at most" in refused(
            lambda c=content: parse_eval(reply(c), expected(tiny()))
        )


# ---------------------------------------------------------------------- the server segment
def segment_state(server: ServerSegment) -> list[torch.Tensor]:
    momentum = [
        server.optimizer.state[p].get("momentum_buffer") for p in server.segment.parameters()
    ]
    return [*server.state_dict().values(), *(m for m in momentum if m is not None)]


def assert_same(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)


def payload(server: ServerSegment, n: int, poison: float | None = None, seed: int = 0):
    """Activations and labels as a decoded reply holds them (on the server's device), and the
    phase timers a step books into."""
    acts = torch.rand(n, *SHAPE, generator=torch.Generator().manual_seed(seed))
    if poison is not None:
        acts[-1].fill_(poison)
    return acts.to(server.device), (torch.arange(n) % 10).to(server.device), Phases()


def test_a_non_finite_server_step_undoes_the_whole_payload():
    """Batch 2 of a two-batch DSL chunk overflows: the step on batch 1, the BatchNorm statistics
    and the momentum it created are undone; the next payload trains exactly as on a segment
    that never saw the poisoned one."""
    cfg = tiny(**{"max-activation": 3.4e38})
    poisoned, fresh = ServerSegment(cfg), ServerSegment(cfg)
    before = segment_state(poisoned)
    with pytest.raises(PayloadError, match=r"^batch 2 of 2 in this payload: the server step is "):
        poisoned.train_on(*payload(poisoned, 64, 3e38), [False, False])
    assert_same(segment_state(poisoned), before)
    for server in (poisoned, fresh):
        server.train_on(*payload(server, 64, seed=1), [False, True])
    assert_same(segment_state(poisoned), segment_state(fresh))
    assert all(torch.isfinite(t).all() for t in segment_state(poisoned))


def test_server_grad_clip_scales_the_gradient_to_its_norm():
    """SGD without momentum or decay: the update is lr x g x min(1, clip / |g|)."""
    sgd = {"momentum": 0.0, "weight-decay": 0.0, "lr": 0.5}
    plain = ServerSegment(tiny(**sgd))
    clipped = ServerSegment(tiny(**sgd, **{"server-grad-clip": 0.01}))
    start = [p.detach().clone() for p in plain.segment.parameters()]
    plain.train_on(*payload(plain, 32), False)
    clipped.train_on(*payload(clipped, 32), False)
    steps = [
        (w0 - p.detach()) / 0.5 for w0, p in zip(start, plain.segment.parameters(), strict=True)
    ]
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in steps]))
    assert norm > 0.01  # the clip bites
    for w0, g, p in zip(start, steps, clipped.segment.parameters(), strict=True):
        torch.testing.assert_close(p.detach(), w0 - 0.5 * g * (0.01 / norm), rtol=1e-4, atol=1e-7)


# ------------------------------------------------------------------- counted examples
def train_phase(cfg: RunConfig, counts: dict[int, int]):
    weights = global_weights(cfg)
    infos = [
        ClientInfo(n, i, k, 0, "test", "cpu", 1.0, 0.0, 1, 0)
        for i, (n, k) in enumerate(counts.items())
    ]
    server = ServerSegment(cfg)
    exp = expectations(infos, cfg, server.device, weights)
    phase = TrainPhase(cfg, make_method(cfg), server, 1, weights, infos, exp)
    return phase, weights, server


def shifted(weights: ArrayRecord, by: float) -> ArrayRecord:
    return ArrayRecord(
        {
            k: Array(
                v.numpy() + np.asarray(by, v.numpy().dtype)
                if v.numpy().dtype.kind == "f"
                else v.numpy()
            )
            for k, v in weights.items()
        }
    )


def final(acts, weights, examples) -> Message:
    return train_reply(acts, weights, done=True, epoch_examples=examples)


def test_fedavg_weights_each_client_by_the_rows_the_server_counted():
    cfg = tiny()
    phase, weights, _ = train_phase(cfg, {A: 32, B: 64})
    phase.consume(A, final(acts_record(32), shifted(weights, 1.0), 32))
    phase.consume(B, train_reply(acts_record(32, seed=2)))
    phase.consume(B, final(acts_record(32, seed=3), shifted(weights, 4.0), 64))
    assert phase.aggregator.total == 96 and phase.aggregator.clients == 2
    out = phase.aggregator.result()
    for key, ref in weights.items():
        if ref.numpy().dtype.kind == "f":  # (32 x 1 + 64 x 4) / 96 = 3
            np.testing.assert_allclose(out[key].numpy(), ref.numpy() + 3.0, rtol=0, atol=1e-5)


def test_a_client_that_says_done_early_is_dropped_before_the_server_steps():
    cfg = tiny()
    phase, weights, server = train_phase(cfg, {A: 64})
    before = segment_state(server)
    message = final(acts_record(32), weights, 64)  # claims its 64, sent 32
    assert refused(lambda: phase.consume(A, message)) == (
        "says it is done after sending 32 of the 64 training examples it declared at set-up"
    )
    assert_same(segment_state(server), before) and phase.aggregator.clients == 0


def test_an_inflated_epoch_claim_is_refused():
    cfg = tiny()
    phase, weights, _ = train_phase(cfg, {A: 32})
    message = final(acts_record(32), weights, 9 * 10**18)
    assert refused(lambda: phase.consume(A, message)) == (
        "epoch-examples is 9000000000000000000, but the client declared 32 training examples "
        "at set-up"
    )


def test_max_update_norm_drops_the_client_before_its_last_chunk_is_stepped():
    cfg = tiny(**{"max-update-norm": 1.0})
    phase, weights, server = train_phase(cfg, {A: 32})
    before = segment_state(server)
    reason = refused(lambda: phase.consume(A, final(acts_record(32), shifted(weights, 0.1), 32)))
    assert reason.startswith("its update has L2 norm ")
    assert reason.endswith("from the round's global weights, beyond max-update-norm=1")
    assert_same(segment_state(server), before)


# ------------------------------------------------------------------------- set-up claims
def setup_content(pid: int, train: float = 96, test: int = 16, parts: int = 3) -> RecordDict:
    content = SetupReply(pid, parts, 96, test, 1.0, 0.0, 1, 0, "test", "cpu").content()
    content["metrics"]["train-examples"] = train
    return content


def test_an_infinite_set_up_count_is_a_payload_error_not_an_overflow():
    assert refused(lambda: SetupReply.decode(setup_content(0, math.inf))) == (
        "set-up reply is malformed: OverflowError: cannot convert float infinity to integer"
    )


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (
            setup_content(0, 9 * 10**18),
            "train-examples is 9000000000000000000: a client holds 1 to 600 training examples "
            "in this run",
        ),
        (setup_content(0, 0), "train-examples is 0: a client holds 1 to 600 training examples"),
        (setup_content(0, test=401), "test-examples is 401: a client holds at most 400 test"),
        (setup_content(3), "partition-id 3 is not below num-partitions 3"),
    ],
)
def test_set_up_claims_are_bounded_by_the_run(content, reason):
    cfg = RunConfig.from_run_config(TINY | {"data-dir": "unused"})  # 600 per client, 400 tests
    assert refused(lambda: check_setup(SetupReply.decode(content), cfg)).startswith(reason)


def test_a_duplicate_partition_id_keeps_the_first_node_and_drops_the_second():
    claims = {A: 0, B: 1, C: 0}
    nodes = {n: (lambda m, p=p: Message(setup_content(p), reply_to=m)) for n, p in claims.items()}
    grid = MemoryGrid(nodes, errors_as_replies=True)
    cfg = RunConfig.from_run_config(TINY | {"data-dir": "unused"})
    clients, report = setup_clients(Exchange(grid, 5.0, 8, 2, 0.002), [A, B, C], cfg)
    assert [(c.node_id, c.partition_id) for c in clients] == [(A, 0), (B, 1)]
    assert report.failures == {C: f"bad payload: partition-id 0 is already taken by node {A}"}
    # set up again mid-run: a partition held by a node outside the set-up stays taken
    clients, report = setup_clients(Exchange(grid, 5.0, 8, 2, 0.002), [C], cfg, {0: A})
    assert clients == [] and report.failures[C].endswith(f"already taken by node {A}")


def test_any_exception_while_reading_a_reply_drops_only_that_client():
    nodes = {n: (lambda m: Message(RecordDict(), reply_to=m)) for n in (A, B)}
    grid = MemoryGrid(nodes, errors_as_replies=True)
    seen = []

    def read(node: int, message: Message) -> None:
        if node == A:
            int(math.inf)
        seen.append(node)

    messages = [Message(RecordDict(), dst_node_id=n, message_type="query.x") for n in (A, B)]
    report = Exchange(grid, 5.0, 8, 2, 0.002).run(QueryPhase(messages, read))
    assert seen == [B]
    assert report.failures == {
        A: "its reply could not be used: OverflowError: cannot convert float infinity to integer"
    }


def test_round_timeout_drops_every_client_not_finished():
    answer = {A: lambda m: Message(RecordDict(), reply_to=m), B: lambda m: None, C: lambda m: None}
    messages = [Message(RecordDict(), dst_node_id=n, message_type="query.x") for n in answer]
    grid = MemoryGrid(answer, errors_as_replies=True)
    exchange = Exchange(grid, 60.0, 2, 2, 0.002, phase_timeout=0.3)
    t0 = time.monotonic()
    report = exchange.run(QueryPhase(messages))  # window 2: C waits behind the silent B
    assert 0.3 < time.monotonic() - t0 < 5
    reason = "not finished within 0.3 s (round-timeout)"
    assert report.failures == {B: reason, C: reason}
    assert report.messages == 3  # C was never sent anything


def test_error_8_a_crashed_or_hung_client_app_counts_as_a_dead_node():
    info = [ClientInfo(n, i, 8, 4, "test", "cpu", 1.0, 0.0, 1, 0) for i, n in enumerate((A, B))]
    roster = Roster(info)
    roster.note_failures({B: "error 8: ClientApp process stopped"}, {B: 8})
    assert roster.for_round({A, B})[1] == {B: "node unavailable: not invited until it is back"}
    roster.for_round({A})  # its SuperNode left ...
    assert [c.node_id for c in roster.for_round({A, B})[0]] == [A, B]  # ... and came back
    roster.note_failures({A: "error 2: raised"}, {A: 2})
    assert [c.node_id for c in roster.for_round({A, B})[0]] == [A, B]  # a raise is not death


# ====================================================================== the poisoned table
# DSL answers 3 training messages a round (3 chunks of one batch), CSL 4 (the 4th, after the
# last batch's gradient, is the final reply with the weights and no activations).
LAST = {"dsl": 3, "csl": 4}
SHIFT = 5.0  # robust table: what the "shifted weights" culprit adds to every float weight
# Table A: the never-done culprit stalls past the round timeout. The timeout must leave the
# honest clients room to finish on the one free actor while four test workers share two cores
# (20 s did not: an honest reply timed out and its own refusal was never seen; 60 s did not
# once, in CSL's round 2, which takes about 2 s on a quiet 2-core CPU).
ROUND_TIMEOUT = 90.0
STALL = ROUND_TIMEOUT + 10.0  # the longest it stalls, on its last message of round 1


def _stall_until_round_one_is_recorded(run_dir: Path) -> None:
    """Hold this actor past the round timeout, and no longer than round 1 lasts.

    A stall of a fixed STALL seconds outlived round 1 by up to 10 s plus however late round 1
    had reached it, all of it taken from round 2's actors (CI once saw every client of round 2
    time out; with as few actors as Ray found CPUs, that is one actor fewer for all of them).
    """
    end = time.monotonic() + STALL
    rounds = run_dir / "rounds.jsonl"  # created empty with the run; round 1 is its first line
    while time.monotonic() < end and not (rounds.exists() and rounds.stat().st_size > 0):
        time.sleep(0.2)


def _message_number(msg: Message, context: Context) -> int:
    """This training message's number in the round (1 = the one with the global weights)."""
    seen = 0 if "arrays" in msg.content else int(context.state["test.count"]["n"])
    context.state["test.count"] = ConfigRecord({"n": seen + 1})
    return seen + 1


def _floats(weights: ArrayRecord, change: Callable[[np.ndarray], np.ndarray]) -> ArrayRecord:
    return ArrayRecord(
        {
            k: Array(change(v.numpy()) if v.numpy().dtype.kind == "f" else v.numpy())
            for k, v in weights.items()
        }
    )


def huge_activations(reply: Message, context: Context) -> None:
    acts = reply.content["acts"]["acts"].numpy()
    reply.content["acts"]["acts"] = Array(np.full_like(acts, 3e38))


def huge_weights(reply: Message, context: Context) -> None:
    reply.content["arrays"] = _floats(reply.content["arrays"], lambda a: np.full_like(a, 1e30))


def inflated_epoch(reply: Message, context: Context) -> None:
    reply.content["metrics"]["epoch-examples"] = 9 * 10**18


def lying_done(reply: Message, context: Context) -> None:
    """Done after two of its three batches, with well-formed weights and its full claim."""
    reply.content["metrics"]["done"] = 1
    reply.content["metrics"]["epoch-examples"] = 96
    reply.content["arrays"] = context.state["test.weights"]


def huge_int8(side: str) -> Callable[[Message, Context], None]:
    def poison(reply: Message, context: Context) -> None:
        values = reply.content["acts"][f"acts.{side}"].numpy()
        reply.content["acts"][f"acts.{side}"] = Array(np.full_like(values, 1e30))

    return poison


def shifted_weights(reply: Message, context: Context) -> None:
    reply.content["arrays"] = _floats(reply.content["arrays"], lambda a: a + np.float32(SHIFT))


def inflated_setup(reply: Message, context: Context) -> None:
    reply.content["metrics"]["train-examples"] = 9 * 10**18


# partition -> (row, when, poison, the reason rounds.jsonl must give; None: not refused).
# when: a training message number, "last", "setup", "clone" (a second node started with
# partition 0's node config) or "stall" (never answers its last message of round 1).
TABLE = {
    2: (
        "huge activations",
        2,
        huge_activations,
        "bad payload: activations reach 3e+38 in magnitude, beyond max-activation=10000",
    ),
    3: ("huge weights", "last", huge_weights, "reaches 1e+30 in magnitude, beyond max-weight"),
    4: (
        "inflated set-up count",
        "setup",
        inflated_setup,
        "bad payload: train-examples is 9000000000000000000: a client holds 1 to 96 training "
        "examples in this run",
    ),
    5: (
        "inflated epoch count",
        "last",
        inflated_epoch,
        "bad payload: epoch-examples is 9000000000000000000, but the client declared 96 "
        "training examples at set-up",
    ),
    6: (
        "lying done",
        2,
        lying_done,
        "bad payload: says it is done after sending 64 of the 96 training examples it "
        "declared at set-up",
    ),
    7: ("duplicate partition-id", "clone", None, "bad payload: partition-id 0 is already taken"),
    8: ("never done", "stall", None, f"not finished within {ROUND_TIMEOUT:g} s (round-timeout)"),
}
# The never-done row in DSL's run only: the round timeout is the strategy's, whatever the
# method, and each run that has it waits a whole ROUND_TIMEOUT.
TABLES = {"dsl": TABLE, "csl": {pid: row for pid, row in TABLE.items() if pid != 8}}
ROBUST_TABLE = {
    2: ("huge int8 scale", 2, huge_int8("scale"), "bad payload: int8 channel 0 (scale 1e+30, "),
    3: ("huge int8 zero point", 2, huge_int8("zero"), "bad payload: int8 channel 0 (scale "),
    4: ("shifted weights", "last", shifted_weights, None),
}


def poisoned_app(table: dict, method: str, mode: str, run_dir: Path | None = None) -> ClientApp:
    """The real ClientApp, with the culprits of ``table`` (by partition-id).

    ``poison``: each culprit poisons its reply as its row says. ``fail``: a culprit whose row
    expects a refusal does the same work and answers with an error reply instead (so its own
    state is the same either way); the never-done culprit raises at once instead of stalling.
    ``honest``: as ``fail``, but the culprits the server keeps (no reason) behave.
    ``run_dir``: the poisoned run's directory, where the never-done culprit sees round 1 end.
    """

    def row(context: Context) -> tuple | None:
        return table.get(int(context.node_config[protocol.PARTITION_ID]))

    def error(msg: Message) -> Message:
        return Message(Error(code=2, reason="this reply is dropped"), reply_to=msg)

    def setup(msg: Message, context: Context) -> Message:
        entry = row(context)
        if entry is None or entry[1] not in ("setup", "clone"):
            return real.setup(msg, context)
        if mode != "poison":
            return error(msg)
        if entry[1] == "clone":
            context.node_config[protocol.PARTITION_ID] = 0
            return real.setup(msg, context)
        reply = real.setup(msg, context)
        entry[2](reply, context)
        return reply

    def train(msg: Message, context: Context) -> Message:
        entry = row(context)
        if entry is None or entry[1] in ("setup", "clone"):
            return real.train(msg, context)
        name, when, poison, reason = entry
        number = _message_number(msg, context)
        if poison is lying_done and "arrays" in msg.content:
            context.state["test.weights"] = msg.content["arrays"]
        if number != (LAST[method] if when in ("last", "stall") else when):
            return real.train(msg, context)
        if when == "stall":
            if int(msg.content["config"]["round"]) != 1:
                return real.train(msg, context)
            if mode == "poison":
                _stall_until_round_one_is_recorded(run_dir)
            raise RuntimeError("never done")  # Flower keeps the node's state as it was
        reply = real.train(msg, context)
        if reason is None:  # kept by the aggregator: poisoned unless the run is the honest one
            return reply if mode == "honest" else (poison(reply, context) or reply)
        if mode != "poison":
            return error(msg)
        poison(reply, context)
        return reply

    return client_app_with(setup=setup, forward=train, backward=train)


def table_config(table: dict, method: str, out: Path, name: str, **extra) -> dict:
    k = 2 + len(table)
    return (
        TINY
        | {
            "method": method,
            "samples-per-client": 96,  # three batches of 32, one per DSL chunk
            "chunk-mib": 0.5,
            "test-samples": k * 16,
            "max-active-clients": k,
            "data-dir": data_dir(),
            "output-dir": str(out),
            "run-name": name,
        }
        | extra
    )


def model(run_dir: Path) -> dict:
    return torch.load(run_dir / "model.pt")


def assert_models_equal(a: dict, b: dict) -> None:
    for part in ("client", "server_segment"):
        assert a[part].keys() == b[part].keys()
        for key, value in a[part].items():
            assert torch.equal(value, b[part][key]), f"{part}.{key}"


def reasons(run_dir: Path) -> tuple[list[dict[int, str]], list[str]]:
    """Each round's failure reasons by partition (of the clients that passed set-up), and
    the set-up failures' reasons (those nodes never got a partition of their own)."""
    config = json.loads((run_dir / "config.json").read_text())
    pid_of = {str(c["node_id"]): c["partition_id"] for c in config["clients"]}
    rounds = [
        {pid_of[n]: why for n, why in r["failures"].items() if n in pid_of}
        for r in read_rounds(run_dir)
    ]
    return rounds, list(config["setup_failures"].values())


def run_table(table: dict, method: str, out: Path, modes: tuple[str, ...], **extra) -> dict:
    """The poisoned run in a real Flower simulation; the other modes in this process."""
    k, dirs = 2 + len(table), {}
    config = table_config(table, method, out, f"{method}-poison", **extra)
    t0 = time.monotonic()
    dirs["poison"] = simulate(
        config,
        num_clients=k,
        client_app=poisoned_app(table, method, "poison", Path(out) / config["run-name"]),
        cpus_per_client=1.0,  # two actors on any machine: one may stall, the other serves
        ray_cpus=2,
    )
    print(f"{method}: the poisoned Flower run took {time.monotonic() - t0:.0f} s")
    for mode in modes:
        config = table_config(table, method, out, f"{method}-{mode}", **extra)
        dirs[mode] = run_in_process(config, poisoned_app(table, method, mode), k)
    return dirs


@pytest.fixture(scope="module")
def table_runs(tmp_path_factory) -> dict[str, dict[str, Path]]:
    out = tmp_path_factory.mktemp("poisoned")
    timeout = {"round-timeout": ROUND_TIMEOUT}
    return {m: run_table(TABLES[m], m, out, ("fail",), **timeout) for m in ("dsl", "csl")}


@pytest.mark.slow
@pytest.mark.parametrize("method", ["dsl", "csl"])
def test_every_poisoned_reply_is_refused_and_its_culprit_named(table_runs, method):
    run_dir = table_runs[method]["poison"]
    assert [r["round"] for r in read_rounds(run_dir)] == [1, 2]  # the run finished
    rounds, setup = reasons(run_dir)
    assert sum(TABLE[4][3] in why for why in setup) == 1, setup
    twins = [why for why in [*setup, *rounds[0].values()] if why.startswith(TABLE[7][3])]
    assert len(twins) == 1, (setup, rounds[0])  # partition 0's node, or its twin
    seconds = [round(r["round_seconds"]) for r in read_rounds(run_dir)]
    for rnd, failures in enumerate(rounds, 1):
        for pid in (2, 3, 5, 6):
            assert TABLE[pid][3] in failures[pid], (rnd, pid, failures.get(pid), seconds)
        if 8 in TABLES[method]:  # timed out in round 1 only
            assert (failures.get(8) == TABLE[8][3]) == (rnd == 1), (rnd, failures.get(8))
        assert 1 not in failures  # the honest client
    for r in read_rounds(run_dir):
        assert math.isfinite(r["train_loss"]) and math.isfinite(r["test_loss"])


@pytest.mark.slow
@pytest.mark.parametrize("method", ["dsl", "csl"])
def test_a_poisoned_run_ends_exactly_as_one_where_the_culprits_failed(table_runs, method):
    poisoned = model(table_runs[method]["poison"])
    assert_models_equal(poisoned, model(table_runs[method]["fail"]))
    for part in ("client", "server_segment"):
        floats = [v for v in poisoned[part].values() if v.is_floating_point()]
        assert all(torch.isfinite(v).all() for v in floats)


# ------------------------------------------------------------------ robust aggregators
ROBUST = {
    "dsl": {"aggregation": "median"},
    "csl": {"aggregation": "trimmed-mean", "trim-fraction": 0.34},
}
ROBUST_DISTANCE = SHIFT / 10  # FedAvg would move every float weight by SHIFT / 3 in round 1


@pytest.fixture(scope="module")
def robust_runs(tmp_path_factory) -> dict[str, dict[str, Path]]:
    out = tmp_path_factory.mktemp("robust")
    return {
        m: run_table(
            ROBUST_TABLE, m, out, ("fail", "honest"), **ROBUST[m], **{"payload-dtype": "int8"}
        )
        for m in ("dsl", "csl")
    }


@pytest.mark.slow
@pytest.mark.parametrize("method", ["dsl", "csl"])
def test_robust_aggregation_refuses_huge_int8_sides_and_bounds_a_shifted_client(
    robust_runs, method
):
    runs = robust_runs[method]
    rounds, setup = reasons(runs["poison"])
    assert setup == [] and len(rounds) == 2
    for failures in rounds:
        assert set(failures) == {2, 3}, failures
        for pid in (2, 3):
            assert failures[pid].startswith(ROBUST_TABLE[pid][3]), failures[pid]
            assert failures[pid].endswith("beyond max-activation=10000"), failures[pid]
    poisoned = model(runs["poison"])
    assert_models_equal(poisoned, model(runs["fail"]))  # the int8 culprits: exactly dropped
    honest = model(runs["honest"])["client"]
    distance = max(
        float((v - honest[k]).abs().max())
        for k, v in poisoned["client"].items()
        if v.is_floating_point()
    )
    print(f"{method} {ROBUST[method]}: shifted by {SHIFT}, the global weights moved {distance:.3g}")
    assert distance <= ROBUST_DISTANCE
