"""The event loop of a round: messages in flight, replies consumed in a fixed order, bounded.

``grid.send_and_receive`` blocks on a whole batch of messages and sleeps between polls (0.1 s in
simulation, 3 s in deployment), which would cost that much per mini-batch. Instead this loop
pushes one message per client, polls ``pull_messages`` with a short back-off, and lets the
phase (``strategies.phases``: training, evaluation, a query) answer each reply as soon as it is
its turn.

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
from typing import Protocol

from flwr.app import Message
from flwr.serverapp import Grid

from split_core.payload import PayloadError

log = logging.getLogger(__name__)


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
    seconds: float = 0.0  # the whole exchange
    wait_seconds: float = 0.0  # of which the server waited for replies
    messages: int = 0
    peak_queued: int = 0  # replies of one client waiting to be consumed, at most
    peak_active: int = 0  # clients in flight at once, at most


class Phase(Protocol):
    """One kind of message exchanged with every client of a round (``strategies.phases``)."""

    ordered: bool  # consume replies in turn order (training) or as they arrive (evaluation)

    def first_messages(self) -> list[Message]:
        """One message per client, in partition order: the order of ``Turns``."""

    def on_arrival(self, node: int, reply: Message) -> Message | None:
        """A follow-up that needs no server computation, sent as soon as the reply lands
        (DSL's next chunk: the client computes while the server trains)."""

    def consume(self, node: int, reply: Message) -> tuple[Message | None, bool]:
        """Use the reply (in turn order when ``ordered``); returns a follow-up (CSL's gradient)
        and whether the client is finished."""


class Exchange:
    """Runs one phase over a window of clients: push, poll, answer each reply in turn.

    A ``PayloadError`` from the phase drops that client for the rest of the exchange; by then
    the reply has been validated, so the server model was not touched. So does any other
    exception raised while handling one client's reply (named with its type: one client's
    data never ends the run), an error reply (Flower's error code is kept: the roster tells
    dead nodes by it), a refused push, and no reply within ``timeout``; a timed-out message is
    forgotten (no longer polled). With ``phase_timeout`` > 0 (``round-timeout``), every client
    not finished that many seconds after the exchange began is dropped: in an ordered phase
    that includes those whose turn comes after a client that stalls.
    """

    def __init__(
        self,
        grid: Grid,
        timeout: float,
        window: int,
        max_queued: int,
        max_poll_interval: float = 0.02,
        should_stop: Callable[[], bool] | None = None,
        stop_check_seconds: float = 2.0,
        phase_timeout: float = 0.0,
    ) -> None:
        self.grid, self.timeout, self.max_poll = grid, timeout, max_poll_interval
        self.window, self.max_queued = window, max_queued
        self.should_stop, self.stop_check_seconds = should_stop, stop_check_seconds
        self.phase_timeout = phase_timeout  # 0: none
        self.in_flight: dict[str, tuple[int, float]] = {}  # message id -> node, time sent

    def run(self, phase: Phase) -> ExchangeReport:
        """Drive every client of ``phase`` until it is done or has failed."""
        self._begin(phase)
        self._start([n for n in self.turns.order if n in self.turns.active])
        while self.turns.active:
            progressed = self._collect()
            progressed |= self._consume_ready()
            self._expire()
            self._check_stop()
            self._pause(progressed)
        self.report.seconds = time.perf_counter() - self._t_start
        self.report.wait_seconds = self.report.seconds - self._busy
        return self.report

    # ------------------------------------------------------------------------- state
    def _begin(self, phase: Phase) -> None:
        self._t_start = time.perf_counter()
        first = phase.first_messages()
        order = [m.metadata.dst_node_id for m in first]
        self.phase, self.report = phase, ExchangeReport()
        self.turns = Turns(order, self.window)
        self.in_flight = {}
        self._not_started = {m.metadata.dst_node_id: m for m in first}
        self._queues: dict[int, deque[Message]] = {n: deque() for n in order}
        self._deferred: dict[int, Message] = {}  # asked for once a queued reply is consumed
        self._busy, self._idle_polls = 0.0, 0
        self._last_stop_check = time.monotonic()
        self._deadline = time.monotonic() + self.phase_timeout if self.phase_timeout else None

    # ---------------------------------------------------------------------- messages
    def _push(self, messages: list[Message]) -> None:
        if not messages:
            return
        ids = list(self.grid.push_messages(messages))
        self.report.messages += len(messages)
        if len(ids) != len(messages):  # some grids leave refused messages out of the list
            pushed = set(ids)
            ids = [
                m.metadata.message_id if m.metadata.message_id in pushed else None for m in messages
            ]
        now = time.monotonic()
        for msg, msg_id in zip(messages, ids, strict=True):
            node = msg.metadata.dst_node_id
            if msg_id:
                self.in_flight[msg_id] = (node, now)
            else:
                self._fail(node, "the SuperLink refused the message")

    def _start(self, nodes: list[int]) -> None:
        self._push([self._not_started.pop(n) for n in nodes])
        self.report.peak_active = max(self.report.peak_active, len(self.turns.active))

    def _fail(self, node: int, reason: str, code: int | None = None) -> None:
        if node in self.report.failures or (
            node not in self.turns.active and node not in self._not_started
        ):
            return
        log.error("client node %s dropped: %s", node, reason)
        self.report.failures[node] = reason
        if code is not None:
            self.report.codes[node] = code
        self._queues[node].clear()
        self._deferred.pop(node, None)
        self._not_started.pop(node, None)
        self._start(self.turns.remove(node))

    def _finish(self, node: int, follow_up: Message | None, done: bool) -> None:
        if follow_up is not None:
            self._push([follow_up])
        if node in self._deferred and len(self._queues[node]) < self.max_queued:
            self._push([self._deferred.pop(node)])
        if done and not self.phase.ordered:
            self._start(self.turns.remove(node))

    def _guarded(self, node: int, step: Callable[[], None]) -> None:
        t0 = time.perf_counter()
        try:
            step()
        except PayloadError as exc:
            self._fail(node, f"bad payload: {exc}")
        except RunStopped:
            raise
        except Exception as exc:  # noqa: BLE001 - one client's reply never ends the run
            log.exception("node %s: its reply could not be used", node)
            self._fail(node, f"its reply could not be used: {type(exc).__name__}: {exc}")
        finally:
            self._busy += time.perf_counter() - t0

    # ----------------------------------------------------------------------- replies
    def _collect(self) -> bool:
        """Pull the replies that are ready; returns whether any came for an active client."""
        if not self.in_flight:
            return False
        progressed = False
        for reply in self.grid.pull_messages(list(self.in_flight)):
            node, _ = self.in_flight.pop(reply.metadata.reply_to_message_id, (None, 0.0))
            if node not in self.turns.active:
                continue
            progressed = True
            if reply.has_error():
                code = int(reply.error.code)
                self._fail(node, f"error {code}: {_readable(reply.error.reason)}", code)
            else:
                self._guarded(node, lambda n=node, r=reply: self._arrived(n, r))
        return progressed

    def _arrived(self, node: int, reply: Message) -> None:
        follow_up = self.phase.on_arrival(node, reply)
        if self.phase.ordered:
            queue = self._queues[node]
            queue.append(reply)
            self.report.peak_queued = max(self.report.peak_queued, len(queue))
            if follow_up is not None and len(queue) >= self.max_queued:
                self._deferred[node] = follow_up  # back-pressure
                follow_up = None
        self._push([follow_up] if follow_up is not None else [])
        if not self.phase.ordered:
            self._finish(node, *self.phase.consume(node, reply))

    def _consume_ready(self) -> bool:
        """Consume queued replies while the client whose turn it is has one."""
        progressed = False
        while self.phase.ordered and (node := self.turns.current()) is not None:
            if not self._queues[node]:
                break
            self._guarded(node, lambda n=node: self._consume_in_turn(n))
            progressed = True
        return progressed

    def _consume_in_turn(self, node: int) -> None:
        follow_up, done = self.phase.consume(node, self._queues[node].popleft())
        self._start(self.turns.advance(done))
        self._finish(node, follow_up, done)

    # -------------------------------------------------------------------------- time
    def _expire(self) -> None:
        """Messages older than ``timeout`` are forgotten; their clients, if active, dropped."""
        now = time.monotonic()
        expired = [(i, n) for i, (n, sent) in self.in_flight.items() if now - sent > self.timeout]
        for msg_id, node in expired:
            self.in_flight.pop(msg_id, None)
            if node in self.turns.active:
                self._fail(node, f"no reply within {self.timeout:g} s (reply-timeout)")
        if self._deadline is not None and now > self._deadline:
            late = [n for n in self.turns.order if n in self.turns.waiting]
            late += [n for n in self.turns.order if n in self.turns.active]
            for node in late:  # the waiting first, so that none is started to be dropped
                self._fail(node, f"not finished within {self.phase_timeout:g} s (round-timeout)")

    def _check_stop(self) -> None:
        now = time.monotonic()
        if self.should_stop and now - self._last_stop_check > self.stop_check_seconds:
            self._last_stop_check = now
            if self.should_stop():
                raise RunStopped("the run was stopped while clients were still working")

    def _pause(self, progressed: bool) -> None:
        """Back off while nothing happens: 1, 2, 4 ... ms, at most ``max_poll``."""
        if self.turns.active and not progressed:
            self._idle_polls += 1
            time.sleep(min(self.max_poll, 0.001 * 2 ** min(self._idle_polls, 5)))
        else:
            self._idle_polls = 0


def _readable(reason: str, limit: int = 600) -> str:
    """An error reason without terminal colours, cut to a length a log line can hold."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", reason)
    return text if len(text) <= limit else text[: limit // 2] + " ... " + text[-limit // 2 :]
