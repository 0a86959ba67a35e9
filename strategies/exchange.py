"""The event loop of a round: messages in flight, replies consumed in a fixed order, bounded.

``grid.send_and_receive`` blocks on a whole batch of messages and sleeps between polls (0.1 s in
simulation, 3 s in deployment), which would cost that much per mini-batch. Instead this loop
pushes one message per client, polls ``pull_messages`` with a short back-off, and lets the
strategy answer each reply as soon as it is its turn.

Two bounds keep the server's memory set by what is in flight, not by the data or by K:
  - at most ``window`` clients are active at once (``max-active-clients``); a client that is done
    or dropped hands its place to the next one waiting, in partition order;
  - a client is asked for its next chunk only while fewer than ``max_queued`` of its replies
    wait to be consumed (``max-queued-chunks``: back-pressure on fast clients).
The turn order (``Turns``) depends only on which replies were consumed, never on timing, so the
server segment sees the same sequence of batches on every run, whatever the actors or nodes do.
"""

from __future__ import annotations

import logging
import re
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from flwr.app import Message
from flwr.serverapp import Grid

from split_core.payload import PayloadError

log = logging.getLogger(__name__)

RequestNext = Callable[[int, Message], Message | None]
Consume = Callable[[int, Message], tuple[Message | None, bool]]


class Turns:
    """Whose reply is consumed next: round-robin in partition order over the active clients."""

    def __init__(self, clients: list[int], window: int) -> None:
        self.order = list(clients)
        self.active = set(self.order[:window])
        self.waiting = deque(self.order[window:])
        self._pos = 0

    def current(self) -> int | None:
        """The client whose reply comes next, or None when every client is finished."""
        if not self.active:
            return None
        while self.order[self._pos % len(self.order)] not in self.active:
            self._pos += 1
        return self.order[self._pos % len(self.order)]

    def advance(self, finished: bool) -> list[int]:
        """The current client's reply was consumed; returns the clients this activates."""
        node = self.current()
        self._pos += 1
        return self.remove(node) if finished else []

    def remove(self, node: int | None) -> list[int]:
        """``node`` is finished or dropped; the next waiting client takes its place."""
        if node in self.waiting:
            self.waiting.remove(node)
            return []
        if node not in self.active:
            return []
        self.active.discard(node)
        if self.waiting:
            new = self.waiting.popleft()
            self.active.add(new)
            return [new]
        return []


class RunStopped(RuntimeError):
    """The run was stopped from outside (``flwr stop``): nothing more is trained or written."""


@dataclass
class ExchangeReport:
    failures: dict[int, str] = field(default_factory=dict)
    codes: dict[int, int] = field(default_factory=dict)  # Flower's error code, where one came
    wait_seconds: float = 0.0
    messages: int = 0
    peak_queued: int = 0  # replies of one client waiting to be consumed, at most
    peak_active: int = 0  # clients in flight at once, at most


class Exchange:
    def __init__(
        self,
        grid: Grid,
        timeout: float,
        window: int,
        max_queued: int,
        max_poll_interval: float = 0.02,
        should_stop: Callable[[], bool] | None = None,
        stop_check_seconds: float = 2.0,
    ) -> None:
        self.grid, self.timeout, self.max_poll = grid, timeout, max_poll_interval
        self.window, self.max_queued = window, max_queued
        self.should_stop, self.stop_check_seconds = should_stop, stop_check_seconds

    def run(
        self,
        first: list[Message],
        *,
        request_next: RequestNext,
        consume: Consume,
        ordered: bool = True,
    ) -> ExchangeReport:
        """Drive every client until it is done or has failed.

        ``request_next(node, reply)`` runs when a reply lands and may return a follow-up that
        needs no server computation (DSL's next chunk: the client computes while the server
        trains). ``consume(node, reply)`` runs in turn order (``ordered``) or at arrival, and
        returns a follow-up (CSL's gradient) and whether the client is finished. A PayloadError
        from either drops that client for the rest of the exchange; by then the reply has been
        validated, so the server model was not touched.
        """
        report = ExchangeReport()
        order = [m.metadata.dst_node_id for m in first]
        turns = Turns(order, self.window)
        not_started = {m.metadata.dst_node_id: m for m in first}
        queues: dict[int, deque[Message]] = {n: deque() for n in order}
        deferred: dict[int, Message] = {}
        in_flight: dict[str, tuple[int, float]] = {}
        busy, idle_polls, t_start = 0.0, 0, time.perf_counter()
        last_stop_check = time.monotonic()

        def push(messages: list[Message]) -> None:
            if not messages:
                return
            ids = list(self.grid.push_messages(messages))
            report.messages += len(messages)
            for msg, msg_id in zip(messages, ids, strict=True):
                node = msg.metadata.dst_node_id
                if msg_id:
                    in_flight[msg_id] = (node, time.monotonic())
                else:
                    fail(node, "the SuperLink refused the message")

        def start(nodes: list[int]) -> None:
            push([not_started.pop(n) for n in nodes])
            report.peak_active = max(report.peak_active, len(turns.active))

        def fail(node: int, reason: str, code: int | None = None) -> None:
            if node in report.failures or (node not in turns.active and node not in not_started):
                return
            log.error("client node %s dropped: %s", node, reason)
            report.failures[node] = reason
            if code is not None:
                report.codes[node] = code
            queues[node].clear()
            deferred.pop(node, None)
            not_started.pop(node, None)
            start(turns.remove(node))

        def finish(node: int, follow_up: Message | None, done: bool) -> None:
            if follow_up is not None:
                push([follow_up])
            if node in deferred and len(queues[node]) < self.max_queued:
                push([deferred.pop(node)])
            if done and not ordered:
                start(turns.remove(node))

        def guarded(node: int, step: Callable[[], None]) -> None:
            nonlocal busy
            t0 = time.perf_counter()
            try:
                step()
            except PayloadError as exc:
                fail(node, f"bad payload: {exc}")
            finally:
                busy += time.perf_counter() - t0

        def arrived(node: int, reply: Message) -> None:
            follow_up = request_next(node, reply)
            if ordered:
                queues[node].append(reply)
                report.peak_queued = max(report.peak_queued, len(queues[node]))
                if follow_up is not None and len(queues[node]) >= self.max_queued:
                    deferred[node] = follow_up  # back-pressure: asked for once a reply is used
                    follow_up = None
            push([follow_up] if follow_up is not None else [])
            if not ordered:
                finish(node, *consume(node, reply))

        def consume_in_turn(node: int) -> None:
            follow_up, done = consume(node, queues[node].popleft())
            start(turns.advance(done))
            finish(node, follow_up, done)

        start([n for n in order if n in turns.active])
        while turns.active:
            progressed = False
            if in_flight:
                for reply in self.grid.pull_messages(list(in_flight)):
                    node, _ = in_flight.pop(reply.metadata.reply_to_message_id, (None, 0.0))
                    if node not in turns.active:
                        continue
                    progressed = True
                    if reply.has_error():
                        code = int(reply.error.code)
                        fail(node, f"error {code}: {_readable(reply.error.reason)}", code)
                    else:
                        guarded(node, lambda n=node, r=reply: arrived(n, r))

            while ordered and (node := turns.current()) is not None and queues[node]:
                guarded(node, lambda n=node: consume_in_turn(n))
                progressed = True

            now = time.monotonic()
            for node, sent in list(in_flight.values()):
                if node in turns.active and now - sent > self.timeout:
                    fail(node, f"no reply within {self.timeout:g} s (reply-timeout)")
            if self.should_stop and now - last_stop_check > self.stop_check_seconds:
                last_stop_check = now
                if self.should_stop():
                    raise RunStopped("the run was stopped while clients were still working")
            if turns.active and not progressed:
                idle_polls += 1
                time.sleep(min(self.max_poll, 0.001 * 2 ** min(idle_polls, 5)))
            else:
                idle_polls = 0
        report.wait_seconds = time.perf_counter() - t_start - busy
        return report


def _readable(reason: str, limit: int = 600) -> str:
    """An error reason without terminal colours, cut to a length a log line can hold."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", reason)
    return text if len(text) <= limit else text[: limit // 2] + " ... " + text[-limit // 2 :]
