"""The event loop of a round: messages in flight to every client, replies consumed in order.

``grid.send_and_receive`` blocks on a whole batch of messages and sleeps between polls (0.1 s in
simulation, 3 s in deployment), which would cost that much per mini-batch. Instead this loop
pushes one message per client, polls ``pull_messages`` with a short back-off, and lets the
strategy answer each reply as soon as it is its turn. The turn goes round-robin over clients in
partition order, so the server segment sees the same sequence of batches on every run: results
are reproducible whatever the timing, while clients still compute concurrently with the server.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from flwr.app import Message
from flwr.serverapp import Grid

from flower_app.payload import PayloadError

log = logging.getLogger(__name__)

Arrive = Callable[[int, Message], Message | None]
Consume = Callable[[int, Message], tuple[Message | None, bool]]


@dataclass
class ExchangeReport:
    failures: dict[int, str] = field(default_factory=dict)
    wait_seconds: float = 0.0
    messages: int = 0


class Exchange:
    def __init__(self, grid: Grid, timeout: float, max_poll_interval: float = 0.02) -> None:
        self.grid, self.timeout, self.max_poll = grid, timeout, max_poll_interval

    def run(self, first: list[Message], *, arrive: Arrive, consume: Consume) -> ExchangeReport:
        """Drive every client until it is done or has failed.

        ``arrive(node, reply)`` runs when a reply lands and may return a follow-up that needs no
        server computation (DSL's next chunk request: the client computes while the server
        trains). ``consume(node, reply)`` runs in the fixed turn order and returns a follow-up
        (CSL's gradient) and whether the client is finished. A PayloadError from either drops
        that client for the rest of the exchange; the server model was not touched.
        """
        report = ExchangeReport()
        order = [m.metadata.dst_node_id for m in first]
        active = set(order)
        queues: dict[int, deque[Message]] = {n: deque() for n in order}
        in_flight: dict[str, tuple[int, float]] = {}
        turn, busy, idle_polls, t_start = 0, 0.0, 0, time.perf_counter()

        def fail(node: int, reason: str) -> None:
            if node in active:
                log.error("client node %s dropped: %s", node, reason)
                report.failures[node] = reason
                active.discard(node)
                queues[node].clear()

        def push(messages: list[Message]) -> None:
            ids = list(self.grid.push_messages(messages))
            report.messages += len(messages)
            for msg, msg_id in zip(messages, ids, strict=True):
                node = msg.metadata.dst_node_id
                if msg_id:
                    in_flight[msg_id] = (node, time.monotonic())
                else:
                    fail(node, "the SuperLink refused the message")

        push(first)
        while active:
            progressed = False
            if in_flight:
                for reply in self.grid.pull_messages(list(in_flight)):
                    node, _ = in_flight.pop(reply.metadata.reply_to_message_id, (None, 0.0))
                    if node not in active:
                        continue
                    if reply.has_error():
                        fail(node, f"error {reply.error.code}: {reply.error.reason}")
                        continue
                    queues[node].append(reply)
                    t0 = time.perf_counter()
                    try:
                        follow_up = arrive(node, reply)
                    except PayloadError as exc:
                        fail(node, f"bad payload: {exc}")
                        continue
                    finally:
                        busy += time.perf_counter() - t0
                    if follow_up is not None:
                        push([follow_up])
                    progressed = True

            while active:
                node = order[turn % len(order)]
                if node not in active:
                    turn += 1
                    continue
                if not queues[node]:
                    break
                t0 = time.perf_counter()
                try:
                    follow_up, done = consume(node, queues[node].popleft())
                except PayloadError as exc:
                    fail(node, f"bad payload: {exc}")
                    continue
                finally:
                    busy += time.perf_counter() - t0
                if follow_up is not None:
                    push([follow_up])
                if done:
                    active.discard(node)
                turn += 1
                progressed = True

            now = time.monotonic()
            for node, sent in list(in_flight.values()):
                if node in active and now - sent > self.timeout:
                    fail(node, f"no reply within {self.timeout:.0f} s")
            if active and not progressed:
                idle_polls += 1
                time.sleep(min(self.max_poll, 0.001 * 2 ** min(idle_polls, 5)))
            else:
                idle_polls = 0
        report.wait_seconds = time.perf_counter() - t_start - busy
        return report
