"""Has this run been stopped (``flwr stop``)? Asked now, through Flower's own connection.

Flower learns of a stop through a heartbeat that its ServerApp process (deployment) or
simulation process sends about every 20 s; a refused heartbeat raises SIGINT in the heartbeat's
own thread. In a simulation the ServerApp runs in a second thread while the main thread waits in
a join, so that signal is not handled until the run has ended: a stopped simulation ran on to
its last round (measured: `flwr stop` after round 2 of 4 with 2 s rounds, rounds 3 and 4 were
still written). The ServerApp therefore asks itself, at every round's end and every few seconds
inside a round, with the same authenticated request (``SendTaskHeartbeat``) that Flower's
heartbeat sends, on the connection that heartbeat uses. Two answers mean "stopped": a refused
heartbeat (``success=False``, the task is finished but its token still known) and HTTP 401 (the
SuperLink revoked the task's token when `flwr stop` finished the task, which is the usual case;
CI once ran a stopped run to its end because only the first answer was read).

This reads flwr internals (the ``HeartbeatSender`` thread and its function's closure); flwr is
pinned at 1.42.0, and where anything is not as expected the answer is "not stopped".
"""

from __future__ import annotations

import logging
import threading

log = logging.getLogger("flwr").getChild("split")


def stop_requested() -> bool:
    client = _runtime_client()
    if client is None:
        return False
    try:
        from flwr.proto.runtime_pb2 import SendTaskHeartbeatRequest

        return not client.SendTaskHeartbeat(SendTaskHeartbeatRequest()).success
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
