"""One in-memory Grid of our own, for tests that drive the server without a Flower engine.

It has the three calls the server uses (push_messages, pull_messages, get_node_ids). Each node
is a function from a request to its reply, or None while it has none (a node that never
answers returns None for ever); a reply is computed when it is pulled, so a test sees the same
turn order every time. Messages are real Flower ``Message`` objects, which Flower 1.42 builds
only inside a task: tests that use this grid ask for the ``task_identity`` fixture (conftest).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Hashable
from pathlib import Path

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp

from flower_app.server_app import run
from split_core import protocol
from split_core.config import RunConfig

Respond = Callable[[Message], Message | None]  # None: no reply (yet)

# Flower's ErrorCode.CLIENT_APP_RAISED_EXCEPTION: what a SuperNode sends when its ClientApp raises
CLIENT_APP_RAISED_EXCEPTION = 2


class MemoryGrid:
    """Nodes answer when polled, after their ``delay`` in seconds; with ``errors_as_replies``
    an exception becomes an error reply, as Flower makes it (else it reaches the test).

    Every push and pull is logged: ``events`` holds ``("push", node, label(message))`` in
    order (tests append their own events to it, to check what happened before what), ``pulls``
    the ids asked for by each pull, ``ids`` the message id of each ``(node, label)``. A node in
    ``refuse`` gets no id, as a message Flower's grid refuses.
    """

    def __init__(
        self,
        nodes: dict[int, Respond],
        delay: dict[int, float] | None = None,
        errors_as_replies: bool = False,
        label: Callable[[Message], Hashable] = lambda msg: msg.metadata.message_type,
    ) -> None:
        self.nodes, self.delay, self.label = nodes, delay or {}, label
        self.errors_as_replies = errors_as_replies
        self.events: list[tuple] = []
        self.pulls: list[list[str]] = []
        self.refuse: set[int] = set()
        self.ids: dict[tuple[int, Hashable], str] = {}
        self._inbox: dict[str, tuple[Message, float]] = {}  # id -> (request, ready at)

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)

    def push_messages(self, messages: list[Message]) -> list[str]:
        ids = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            if node in self.refuse:
                continue  # as Flower's in-memory grid: a refused message has no id
            msg.metadata.__dict__["_message_id"] = msg_id = str(uuid.uuid4())
            self.events.append(("push", node, self.label(msg)))
            self.ids[node, self.label(msg)] = msg_id
            self._inbox[msg_id] = (msg, time.monotonic() + self.delay.get(node, 0.0))
            ids.append(msg_id)
        return ids

    def pull_messages(self, message_ids: list[str]) -> list[Message]:
        self.pulls.append(list(message_ids))
        replies = []
        for msg_id in message_ids:
            msg, ready_at = self._inbox.get(msg_id, (None, 0.0))
            if msg is None or time.monotonic() < ready_at:
                continue
            reply = self._answer(msg)
            if reply is not None:
                del self._inbox[msg_id]
                replies.append(reply)
        return replies

    def _answer(self, msg: Message) -> Message | None:
        respond = self.nodes[msg.metadata.dst_node_id]
        if not self.errors_as_replies:
            return respond(msg)
        try:
            return respond(msg)
        except Exception as exc:  # noqa: BLE001 - any raise, as a SuperNode reports it
            reason = f"{type(exc).__name__}: {exc}"
            return Message(Error(code=CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=msg)


def app_grid(
    app: ClientApp, clients: int, run_id: int = 1, errors_as_replies: bool = False
) -> MemoryGrid:
    """Nodes 101, 102, ... run ``app`` in this process, each with its own Context (partition-id
    i of ``clients``), as SuperNodes would, with no Flower engine in between."""

    def node(i: int) -> Respond:
        context = Context(
            run_id=run_id,
            node_id=101 + i,
            node_config={protocol.PARTITION_ID: i, protocol.NUM_PARTITIONS: clients},
            state=RecordDict(),
            run_config={},
        )
        return lambda msg: app(msg, context)

    nodes = {101 + i: node(i) for i in range(clients)}
    return MemoryGrid(nodes, errors_as_replies=errors_as_replies)


def run_in_process(config: dict, app: ClientApp, clients: int) -> Path:
    """The run of ``config`` through ``flower_app.server_app.run`` and ``app`` in this process,
    each failing reply an error reply as Flower makes it: the twin of a simulation, bit for bit,
    without its engine (a test's own ClientApp, compared with a real run of it)."""
    run_id = uuid.uuid4().int % 2**62  # its own, so no other run's warm clients are reused
    run(
        app_grid(app, clients, run_id=run_id, errors_as_replies=True),
        RunConfig.from_run_config(config),
    )
    return Path(config["output-dir"]) / config["run-name"]
