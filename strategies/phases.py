"""The phases of a round, each what ``Exchange`` needs to drive one kind of message.

  TrainPhase     train.forward / train.backward until every client has sent its last chunk;
                 the server segment steps on each chunk in turn order, the aggregator adds
                 each client's weights as its last reply is consumed, weighted by the rows
                 the server counted for it
  EvaluatePhase  evaluate until every client has sent its test activations; scored on arrival
  QueryPhase     one request and one reply per client (set-up, checkpoint, restore)

A phase builds its first messages, says what to ask a client for as soon as a reply lands
(``on_arrival``: nothing that needs the server), and consumes replies (``consume``: validate,
step, and maybe a follow-up such as a gradient).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

from flwr.app import ArrayRecord, Message

from split_core.compute import seeded_generator
from split_core.config import RunConfig
from split_core.methods import SplitMethod
from split_core.payload import PayloadError, encode_gradient, record_bytes
from split_core.protocol import EvaluateRequest, TrainRequest
from strategies.aggregation import make_aggregator
from strategies.ledger import Ledger
from strategies.progress import Progress
from strategies.replies import Expected, Reply, eval_status, parse_eval, parse_train, train_status
from strategies.roster import ClientInfo
from strategies.server_segment import ServerSegment


class TrainPhase:
    """One epoch over every client's data, ending in the FedAvg of the clients' weights."""

    ordered = True  # the server segment sees the same batches in the same order on every run

    def __init__(
        self,
        cfg: RunConfig,
        method: SplitMethod,
        server: ServerSegment,
        rnd: int,
        arrays: ArrayRecord,
        clients: Sequence[ClientInfo],
        expected: Mapping[int, Expected],
    ) -> None:
        self.cfg, self.method, self.server, self.expected = cfg, method, server, expected
        self.rnd, self.arrays, self.clients = rnd, arrays, list(clients)
        self.lr = cfg.lr_at(rnd)
        self.ledger, self.aggregator = Ledger(), make_aggregator(cfg, arrays)
        batches = sum(math.ceil(c.train_examples / cfg.batch_size) for c in self.clients)
        self.progress = Progress(f"round {rnd}", batches, cfg.progress_seconds)
        self._seen: dict[int, int] = {}  # batches of each client consumed so far this round
        self._rows: dict[int, int] = {}  # examples of each client the server counted so far
        self._partition = {c.node_id: c.partition_id for c in self.clients}

    def first_messages(self) -> list[Message]:
        """The global client weights, to every client."""
        request = TrainRequest(self.rnd, self.lr, weights=self.arrays)
        messages = [request.message(c.node_id) for c in self.clients]
        self.ledger.bytes["model_sync"] += record_bytes(self.arrays) * len(messages)
        return messages

    def on_arrival(self, node: int, reply: Message) -> Message | None:
        """Ask for the next chunk at once, so the client computes while the server trains;
        a client that waits for a gradient gets its next request with that gradient."""
        status = train_status(reply)
        if status.done or status.awaits_gradient:
            return None
        return TrainRequest(self.rnd, self.lr).message(node)

    def consume(self, node: int, reply: Message) -> tuple[Message | None, bool]:
        """Everything that can reject the reply runs before the server steps on it, and the
        step undoes itself if it is not finite: a rejected reply leaves no trace."""
        expected, received = self.expected[node], self._rows.get(node, 0)
        parsed = parse_train(reply, expected, received)
        counted = received + parsed.examples
        if parsed.acts is None and not parsed.done:
            raise PayloadError("reply carries neither activations nor the final weights")
        if parsed.done:
            if counted != expected.train_examples:
                raise PayloadError(
                    f"says it is done after sending {counted} of the "
                    f"{expected.train_examples} training examples it declared at set-up"
                )
            self.aggregator.check(parsed.weights)
        follow_up = None
        if parsed.acts is not None:
            first = self._seen.get(node, 0)
            flags = self._gradient_flags(first, parsed)
            result, grad = self.server.train_on(
                parsed.acts, parsed.labels, self.ledger.phases, flags
            )
            self._seen[node] = first + len(flags)
            self.ledger.add_server(result, parsed.examples, len(flags))
            self.progress.add(len(flags), parsed.examples)
            if grad is not None:  # the one message pure DSL never sends
                follow_up = self._gradient_message(node, grad)
        self._rows[node] = counted
        self.ledger.add_reply(parsed)
        if parsed.done:  # weighted by what the server counted, never by a claim
            self.aggregator.add(parsed.weights, counted)
        return follow_up, parsed.done

    def _gradient_message(self, node: int, grad) -> Message:
        """dL/d(acts) in the wire format; int8's stochastic rounding is seeded by the client
        and the batch, so a run is reproducible."""
        cfg = self.cfg
        rounding = seeded_generator(cfg.seed, self.rnd, self._partition[node], self._seen[node])
        record = encode_gradient(grad, cfg.payload_dtype, rounding)
        self.ledger.bytes["gradients"] += record_bytes(record)
        return TrainRequest(self.rnd, self.lr, gradient=record).message(node)

    def _gradient_flags(self, first: int, parsed: Reply) -> list[bool]:
        """Which batches of this payload get dL/d(acts) back: the method decides, by the
        batch's index in the epoch. A chunk must end at such a batch, where its client waits."""
        batches = math.ceil(parsed.examples / self.cfg.batch_size)
        flags = [self.method.needs_gradient(first + i) for i in range(batches)]
        if any(flags[:-1]) or flags[-1] != parsed.awaits_gradient:
            raise PayloadError(
                f"batches {first}..{first + batches - 1}: the chunk does not end where "
                f"{self.method.name} returns a gradient (awaits-gradient={parsed.awaits_gradient})"
            )
        return flags


class EvaluatePhase:
    """The test set of every client through the round's model; nothing waits for the others."""

    ordered = False

    def __init__(
        self,
        server: ServerSegment,
        rnd: int,
        arrays: ArrayRecord,
        clients: Sequence[ClientInfo],
        expected: Mapping[int, Expected],
    ) -> None:
        self.server, self.rnd, self.arrays = server, rnd, arrays
        self.clients, self.expected = list(clients), expected
        self.ledger = Ledger(evaluation=True)
        self._rows: dict[int, int] = {}  # test examples of each client scored so far

    def first_messages(self) -> list[Message]:
        request = EvaluateRequest(self.rnd, weights=self.arrays)
        messages = [request.message(c.node_id) for c in self.clients]
        self.ledger.bytes["eval"] += record_bytes(self.arrays) * len(messages)
        return messages

    def on_arrival(self, node: int, reply: Message) -> Message | None:
        return None if eval_status(reply).done else EvaluateRequest(self.rnd).message(node)

    def consume(self, node: int, reply: Message) -> tuple[None, bool]:
        expected, received = self.expected[node], self._rows.get(node, 0)
        parsed = parse_eval(reply, expected, received)
        counted = received + parsed.examples
        if parsed.done and expected.test_examples is not None:
            if counted != expected.test_examples:
                raise PayloadError(
                    f"says it is done after sending {counted} of the "
                    f"{expected.test_examples} test examples it declared at set-up"
                )
        self._rows[node] = counted
        self.ledger.add_reply(parsed)
        if parsed.acts is not None:
            result = self.server.evaluate_on(parsed.acts, parsed.labels, self.ledger.phases)
            self.ledger.add_server(result, parsed.examples, 0)
        return None, parsed.done


class QueryPhase:
    """One request per client and one reply each, handed to ``read`` in turn order."""

    ordered = True

    def __init__(
        self, messages: list[Message], read: Callable[[int, Message], None] | None = None
    ) -> None:
        self.messages, self.read = messages, read

    def first_messages(self) -> list[Message]:
        return self.messages

    def on_arrival(self, node: int, reply: Message) -> None:
        return None

    def consume(self, node: int, reply: Message) -> tuple[None, bool]:
        if self.read is not None:
            self.read(node, reply)
        return None, True
