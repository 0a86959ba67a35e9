"""The server's event loop and its bookkeeping, without a Flower run.

``Exchange`` is driven here through our in-memory Grid (tests/memory_grid.py): each node is
a function from a request to its reply, released after a delay, or never. Messages are real
Flower ``Message`` objects; Flower 1.42 builds one only inside a task, so the ``task_identity``
fixture gives this process one.
"""

from __future__ import annotations

import pytest
import torch
from flwr.app import ConfigRecord, Error, Message, MetricRecord, RecordDict

from split_core.payload import PayloadError, encode_activations, encode_modules
from split_core.protocol import (
    TRAIN_FORWARD,
    EvalMetrics,
    EvaluateReply,
    TrainMetrics,
    TrainReply,
)
from strategies.exchange import Exchange, Turns
from strategies.ledger import Ledger, Tally
from strategies.phases import QueryPhase
from strategies.replies import Expected, Reply, parse_eval, parse_train
from strategies.roster import ClientInfo, Roster
from tests.memory_grid import MemoryGrid, Respond

A, B, C = 11, 22, 33


def fake_grid(nodes: dict[int, Respond], delay: dict[int, float] | None = None) -> MemoryGrid:
    """Nodes answer at once or after ``delay`` seconds; pushes are logged by their chunk."""
    return MemoryGrid(nodes, delay, label=_chunk)


pytestmark = pytest.mark.usefixtures("task_identity")  # messages are built outside a run


def _request(node: int, chunk: int) -> Message:
    content = RecordDict({"config": ConfigRecord({"chunk": chunk})})
    return Message(content=content, dst_node_id=node, message_type=TRAIN_FORWARD)


def _chunk(msg: Message) -> int:
    return int(msg.content["config"]["chunk"])


def echo(msg: Message) -> Message:
    """A node that answers each request with the chunk it asked for."""
    metrics = MetricRecord({"chunk": _chunk(msg)})
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)


def silent(msg: Message) -> None:
    return None


def dead(msg: Message) -> Message:
    return Message(Error(code=5, reason="node unavailable"), reply_to=msg)


class Chunks:
    """A phase like DSL training: each client sends ``n`` chunks and is asked for the next as
    soon as one lands; consumes are logged into the grid's events."""

    def __init__(self, grid: MemoryGrid, nodes: list[int], n: int, ordered: bool = True):
        self.grid, self.nodes, self.n, self.ordered = grid, nodes, n, ordered
        self.bad: dict[int, int] = {}  # node -> the chunk whose consume raises PayloadError

    def first_messages(self) -> list[Message]:
        return [_request(node, 0) for node in self.nodes]

    def on_arrival(self, node: int, reply: Message) -> Message | None:
        k = int(reply.content["metrics"]["chunk"])
        return _request(node, k + 1) if k + 1 < self.n else None

    def consume(self, node: int, reply: Message) -> tuple[None, bool]:
        k = int(reply.content["metrics"]["chunk"])
        if self.bad.get(node) == k:
            raise PayloadError(f"chunk {k} is broken")
        self.grid.events.append(("consume", node, k))
        return None, k + 1 == self.n


def _exchange(grid: MemoryGrid, window: int = 8, max_queued: int = 8, timeout: float = 5.0):
    return Exchange(grid, timeout, window, max_queued, max_poll_interval=0.002)


def _consumed(grid: MemoryGrid) -> list[tuple[int, int]]:
    return [(node, k) for kind, node, k in grid.events if kind == "consume"]


# ---------------------------------------------------------------------------- Exchange
def test_pipelining_asks_for_the_next_chunk_before_the_last_is_consumed():
    grid = fake_grid({A: echo, B: echo})
    report = _exchange(grid).run(Chunks(grid, [A, B], n=3))
    assert report.failures == {} and report.messages == 6
    assert _consumed(grid) == [(A, 0), (B, 0), (A, 1), (B, 1), (A, 2), (B, 2)]  # turn order
    for node in (A, B):
        for k in (1, 2):
            assert grid.events.index(("push", node, k)) < grid.events.index(
                ("consume", node, k - 1)
            )


@pytest.mark.parametrize("bound", [1, 2])
def test_back_pressure_stops_asking_a_client_whose_replies_wait(bound):
    """A is slow and its turn comes first: B's replies queue up to ``max_queued``, and B is
    asked for its next chunk only once one of them is consumed."""
    grid = fake_grid({A: echo, B: echo}, delay={A: 0.1})
    report = _exchange(grid, max_queued=bound).run(Chunks(grid, [A, B], n=3))
    assert report.failures == {}
    assert report.peak_queued == bound
    assert _consumed(grid) == [(n, k) for k in range(3) for n in (A, B)]
    asked = grid.events.index(("push", B, bound))
    assert asked > grid.events.index(("consume", B, 0))  # held back until B's first was used


def test_a_timed_out_message_leaves_in_flight_and_drops_its_client():
    grid = fake_grid({A: echo, B: silent}, delay={A: 0.02})
    exchange = _exchange(grid, timeout=0.2)
    report = exchange.run(Chunks(grid, [A, B], n=20))  # A works on long after B's timeout
    assert report.failures == {B: "no reply within 0.2 s (reply-timeout)"}
    assert exchange.in_flight == {}
    b_id = grid.ids[B, 0]
    polled = [b_id in ids for ids in grid.pulls]
    forgotten = polled.index(False)
    assert any(polled) and not any(polled[forgotten:]) and forgotten < len(polled) - 1
    assert _consumed(grid) == [(A, k) for k in range(20)]  # A went on alone


def test_a_dead_node_is_dropped_with_its_error_code():
    grid = fake_grid({A: echo, B: dead})
    report = _exchange(grid).run(Chunks(grid, [A, B], n=2))
    assert report.failures == {B: "error 5: node unavailable"}
    assert report.codes == {B: 5}
    assert _consumed(grid) == [(A, 0), (A, 1)]


def test_a_bad_payload_drops_only_that_client():
    grid = fake_grid({A: echo, B: echo})
    phase = Chunks(grid, [A, B], n=3)
    phase.bad[B] = 1
    report = _exchange(grid).run(phase)
    assert report.failures == {B: "bad payload: chunk 1 is broken"}
    assert report.codes == {}
    assert _consumed(grid) == [(A, 0), (B, 0), (A, 1), (A, 2)]


def test_a_refused_message_drops_its_client():
    grid = fake_grid({A: echo, B: echo})
    grid.refuse.add(B)
    report = _exchange(grid).run(Chunks(grid, [A, B], n=2))
    assert report.failures == {B: "the SuperLink refused the message"}
    assert _consumed(grid) == [(A, 0), (A, 1)]


def test_a_phase_without_clients_sends_nothing():
    grid = fake_grid({A: echo})
    report = _exchange(grid).run(QueryPhase([]))
    assert (report.messages, report.failures, report.peak_active) == (0, {}, 0)
    assert grid.events == [] and grid.pulls == []


def test_the_window_bounds_the_clients_in_flight():
    grid = fake_grid({A: echo, B: echo, C: echo})
    report = _exchange(grid, window=2).run(Chunks(grid, [A, B, C], n=2))
    assert report.peak_active == 2
    assert grid.events.index(("push", C, 0)) > grid.events.index(("consume", A, 1))
    assert _consumed(grid) == [(A, 0), (B, 0), (A, 1), (B, 1), (C, 0), (C, 1)]


def test_unordered_phases_consume_on_arrival():
    grid = fake_grid({A: echo, B: echo}, delay={A: 0.1})
    report = _exchange(grid).run(Chunks(grid, [A, B], n=2, ordered=False))
    assert report.failures == {} and report.peak_queued == 0
    assert _consumed(grid)[:2] == [(B, 0), (B, 1)]  # B did not wait for A's turn


def test_query_phase_reads_each_reply_once():
    grid, read = fake_grid({A: echo, B: echo}), []
    phase = QueryPhase(
        [_request(A, 7), _request(B, 8)], lambda n, r: read.append((n, _chunk_of(r)))
    )
    report = _exchange(grid).run(phase)
    assert report.messages == 2 and read == [(A, 7), (B, 8)]


def _chunk_of(reply: Message) -> int:
    return int(reply.content["metrics"]["chunk"])


# ------------------------------------------------------------------------------- Turns
def test_turns_go_round_robin_and_hand_over_places():
    turns = Turns([A, B, C], window=2)
    assert turns.current() == A
    assert turns.advance(False) == []
    assert turns.current() == B
    assert turns.advance(True) == [C]  # B finished: C takes its place
    assert [turns.current(), turns.advance(False)] == [C, []]
    assert turns.current() == A
    assert turns.remove(A) == []  # nobody waits any more
    assert turns.current() == C
    assert turns.advance(True) == [] and turns.current() is None


def test_a_waiting_client_that_fails_never_gets_a_turn():
    turns = Turns([A, B, C], window=1)
    assert turns.remove(C) == []
    assert turns.advance(True) == [B]
    assert turns.advance(True) == [] and turns.current() is None


# ----------------------------------------------------------------------------- replies
SHAPE = (2, 4, 4)


def _expected(global_weights=None, train_examples: int = 8) -> Expected:
    return Expected(SHAPE, 10, torch.device("cpu"), train_examples, global_weights)


def _acts(n: int = 4):
    acts = torch.rand(n, *SHAPE, generator=torch.Generator().manual_seed(n))
    return encode_activations(acts, torch.arange(n) % 10, "float32")


def _reply(content: RecordDict) -> Message:
    return Message(content=content, dst_node_id=A, message_type=TRAIN_FORWARD)


def _train(values: dict | None = None, **records) -> Message:
    """A training reply with these metric ``values``; records replaced, or dropped (None)."""
    content = TrainReply(TrainMetrics(num_examples=4), _acts()).content()
    if values is not None:
        content["metrics"] = MetricRecord(values)
    for key, record in records.items():
        if record is None:
            del content[key]
        else:
            content[key] = record
    return _reply(content)


def test_a_good_training_reply_is_decoded_and_counted():
    parsed = parse_train(_train(), _expected())
    assert isinstance(parsed, Reply) and parsed.acts.shape == (4, *SHAPE)
    assert parsed.labels.tolist() == [0, 1, 2, 3]
    assert (parsed.bytes_activations, parsed.bytes_labels) == (4 * 32 * 4, 4)
    assert not parsed.done and parsed.weights is None


def _weights():
    return encode_modules({"m": torch.nn.Linear(2, 1)})


@pytest.mark.parametrize(
    ("message", "reason"),
    [
        (lambda: _train(metrics=None), "reply carries no 'metrics' MetricRecord"),
        (lambda: _train({"done": 0}), "reply metrics lack 'num-examples'"),
        (lambda: _train({"num-examples": 4, "done": 0, "sneaky": 1}), "undeclared ['sneaky']"),
        (lambda: _train({"num-examples": 4, "done": 0, "seconds": -1.0}), "got -1.0"),
        (lambda: _train({"num-examples": 4.5, "done": 0}), "must be a whole number, got 4.5"),
        (lambda: _train({"num-examples": 4, "done": 2}), "metric 'done' must be 0 or 1, got 2"),
        (lambda: _train({"num-examples": 4, "done": 0, "seconds": [1.0]}), "is not a number"),
        (lambda: _train({"num-examples": 5, "done": 0}), "num-examples is 5, the payload has 4"),
        (lambda: _train({"num-examples": 4, "done": 1}), "final reply carries no client weights"),
        (
            lambda: _train({"num-examples": 4, "done": 1, "epoch-examples": 7}, arrays=_weights()),
            "epoch-examples is 7, but the client declared 8 training examples at set-up",
        ),
    ],
)
def test_bad_training_replies_are_rejected_with_their_reason(message, reason):
    with pytest.raises(PayloadError) as info:
        parse_train(message(), _expected(_weights()))
    assert reason in str(info.value)


def test_a_final_reply_brings_checked_weights():
    metrics = {"num-examples": 4, "done": 1, "epoch-examples": 8}
    parsed = parse_train(_train(metrics, arrays=_weights()), _expected(_weights()))
    assert parsed.done and set(parsed.weights) == {"m.weight", "m.bias"}
    assert parsed.bytes_weights == 3 * 4


def test_evaluation_replies_take_only_evaluation_metrics():
    good = _reply(EvaluateReply(EvalMetrics(num_examples=4, done=True), _acts()).content())
    assert parse_eval(good, _expected()).done
    metrics = MetricRecord({"num-examples": 0, "done": 1, "awaits-gradient": 0})
    bad = _reply(RecordDict({"metrics": metrics}))
    with pytest.raises(PayloadError, match=r"undeclared \['awaits-gradient'\]"):
        parse_eval(bad, _expected())


# ------------------------------------------------------------------------------ ledger
def test_the_tally_folds_each_metric_as_the_protocol_declares():
    tally = Tally(TrainMetrics)
    for loss, peak, seconds in ((1e16, 5, 0.5), (1.0, 9, 0.25), (-1e16, 7, 0.25)):
        tally.add(TrainMetrics(aux_loss_sum=loss, peak_saved_bytes=peak, forward_seconds=seconds))
    totals = tally.totals()
    assert totals.aux_loss_sum == 1.0  # fsum; a plain sum gives 0.0
    assert totals.peak_saved_bytes == 9  # a peak is the max, never a sum
    assert totals.forward_seconds == 1.0
    assert totals.done is False and totals.epoch_examples is None  # control fields: never added


def test_the_ledger_counts_bytes_by_phase():
    train, evaluation = Ledger(), Ledger(evaluation=True)
    reply = Reply(TrainMetrics(num_examples=4), bytes_activations=100, bytes_labels=4)
    reply.bytes_weights = 12
    train.add_reply(reply)
    evaluation.add_reply(Reply(EvalMetrics(num_examples=4), bytes_activations=50, bytes_labels=4))
    assert (train.bytes["activations"], train.bytes["labels"], train.bytes["model_sync"]) == (
        100,
        4,
        12,
    )
    assert train.bytes["eval"] == 0 and evaluation.bytes["eval"] == 54
    assert evaluation.bytes["activations"] == 0


# ------------------------------------------------------------------------------ roster
def _info(node: int, pid: int) -> ClientInfo:
    return ClientInfo(node, pid, 8, 4, "test", "cpu", 1.0, 0.0, 1, 0)


def test_the_roster_leaves_out_dead_nodes_until_they_come_back():
    roster = Roster([_info(B, 1), _info(A, 0)])
    assert [c.node_id for c in roster.clients] == [A, B]  # partition order
    roster.note_failures({B: "error 5: node unavailable"}, {B: 5})
    taking_part, left_out = roster.for_round({A, B})
    assert [c.node_id for c in taking_part] == [A]
    assert left_out == {B: "node unavailable: not invited until it is back"}
    assert roster.for_round({A})[1] == {B: "node unavailable: not invited until it is back"}
    taking_part, left_out = roster.for_round({A, B})  # gone from the list, and back
    assert [c.node_id for c in taking_part] == [A, B] and left_out == {}
    assert B in roster.needs_setup
    roster.replace(_info(B, 1))
    assert B not in roster.needs_setup


def test_the_roster_leaves_out_unlisted_nodes_and_keeps_failed_ones():
    roster = Roster([_info(A, 0), _info(B, 1)])
    roster.note_failures({A: "bad payload: x"}, {})
    taking_part, left_out = roster.for_round({A})
    assert [c.node_id for c in taking_part] == [A]  # a failure is not death
    assert left_out == {B: "node not connected to the SuperLink"}
