"""Has this run been stopped (``flwr stop``)? Asked now, through Flower's own connection.

Flower learns of a stop through a heartbeat that its ServerApp process (deployment) or
simulation process sends about every 20 s; a refused heartbeat raises SIGINT in the heartbeat's
own thread. In a simulation the ServerApp runs in a second thread while the main thread waits in
a join, so that signal is not handled until the run has ended: a stopped simulation ran on to
its last round (measured: `flwr stop` after round 2 of 4 with 2 s rounds, rounds 3 and 4 were
still written). The ServerApp therefore asks itself, at every round's end and every few seconds
inside a round, with the same authenticated request (``SendTaskHeartbeat``) that Flower's
heartbeat sends, on the connection that heartbeat uses (``StopCheck``). Two answers mean
"stopped": a refused heartbeat (``success=False``, the task is finished but its token still
known) and HTTP 401 (the SuperLink revoked the task's token when `flwr stop` finished the task,
which is the usual case; CI once ran a stopped run to its end because only the first answer was
read).

The connection is found once, when the run starts. A heartbeat that gets 401 re-raises it in
Flower's heartbeat thread, and that ends the thread. If the thread was looked up only at each
check, a heartbeat that came first after `flwr stop` left nothing to find, and the run went on
(CI saw a run stopped after round 1 write rounds 2 to 5).

This reads flwr internals (the ``HeartbeatSender`` thread and its function's closure); flwr is
pinned at 1.42.0, and where anything is not as expected the answer is "not stopped".
"""

from __future__ import annotations

import logging
import threading

log = logging.getLogger("flwr").getChild("split")


class StopCheck:
    """Called as ``should_stop()``: has `flwr stop` ended this run? Made when the run starts."""

    def __init__(self) -> None:
        self.client = _runtime_client()

    def __call__(self) -> bool:
        if self.client is None:  # outside Flower, or before its heartbeat started
            self.client = _runtime_client()
        if self.client is None:
            return False
        try:
            from flwr.proto.runtime_pb2 import SendTaskHeartbeatRequest

            return not self.client.SendTaskHeartbeat(SendTaskHeartbeatRequest()).success
        except Exception as exc:  # noqa: BLE001 - a connection hiccup is not a stop
            log.debug("stop check failed: %s", exc)
            return token_revoked(exc)


def token_revoked(exc: BaseException) -> bool:
    """Did the SuperLink refuse this task's token (401)? It does so once the task is finished."""
    import httpx

    return isinstance(exc, httpx.HTTPStatusError) and exc.response.status_code == 401


def _runtime_client() -> object | None:
    """The HTTP client of this process's Flower heartbeat, if there is one."""
    from flwr.supercore.heartbeat import HeartbeatSender

    for thread in threading.enumerate():
        sender = getattr(getattr(thread, "_target", None), "__self__", None)
        if isinstance(sender, HeartbeatSender):
            fn = sender.heartbeat_fn
            cells = dict(zip(fn.__code__.co_freevars, fn.__closure__ or (), strict=False))
            cell = cells.get("client")
            return cell.cell_contents if cell is not None else None
    return None
