"""The warm executor's parts that are not its loop: the ClientApp thread with a time limit, the
record of the task in progress that a successor process recovers from, and the per-task token.
"""

from __future__ import annotations

import json
import os
import queue
import threading
from pathlib import Path

from deploy.files import write_private

TIMEOUT_KEY = "reply-timeout"
# The split-learning server allows its set-up message at least this long (strategies'
# SETUP_TIMEOUT: first contact may decode the dataset); other messages get reply-timeout.
SETUP_TYPES, SETUP_SECONDS = frozenset({"query.setup"}), 300.0


class AppTimeout(Exception):
    """The ClientApp did not return within its time."""


def app_timeout(run_config: dict, message_type: str, default: float) -> float:
    """Seconds a ClientApp may take: the run's reply-timeout (the server stops waiting for the
    reply then), else ``default``; a set-up message at least ``SETUP_SECONDS``."""
    value = run_config.get(TIMEOUT_KEY)
    seconds = default
    if isinstance(value, int | float) and not isinstance(value, bool) and value > 0:
        seconds = float(value)
    return max(seconds, SETUP_SECONDS) if message_type in SETUP_TYPES else seconds


class TaskToken:
    """Like flwr's RuntimeTokenHttpInterceptor, with a token that changes per task."""

    def __init__(self) -> None:
        self.token = ""

    def intercept(self, context, call_next):  # noqa: ANN001, ANN201 (flwr's interceptor API)
        from flwr.supercore.constant import TASK_TOKEN_HEADER
        from flwr.supercore.interceptors.http.utils import add_headers

        add_headers(context.request, {TASK_TOKEN_HEADER: self.token})
        return call_next(context)


class AppThread:
    """Runs the ClientApp in one long-lived thread, so the main thread can stop waiting."""

    def __init__(self) -> None:
        self.jobs: queue.Queue = queue.Queue()
        threading.Thread(target=self._loop, name="client-app", daemon=True).start()

    def _loop(self) -> None:
        while True:
            func, box, done = self.jobs.get()
            try:
                box.append((True, func()))
            except BaseException as ex:  # noqa: BLE001 -- handed to the caller
                box.append((False, ex))
            done.set()

    def call(self, func, timeout: float):  # noqa: ANN001, ANN201
        box: list = []
        done = threading.Event()
        self.jobs.put((func, box, done))
        if not done.wait(timeout):
            raise AppTimeout(timeout)
        ok, value = box[0]
        if ok:
            return value
        raise value


class TaskFile:
    """The task in progress, for the process that comes after this one (mode 0600)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def record(self, token: str, stage: str, message: str = "") -> None:
        data = {"token": token, "stage": stage, "message": message}
        temp = self.path.with_suffix(".tmp")
        write_private(temp, json.dumps(data).encode())
        os.replace(temp, self.path)

    def read(self) -> dict | None:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            self.clear()
            return None
        ok = isinstance(data, dict) and all(isinstance(data.get(k), str) for k in data)
        return data if ok and data.get("token") else None

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)


def stub_message(recorded: str):  # noqa: ANN201
    """The recorded message's metadata (enough to address an Error reply to it)."""
    from flwr.common.serde import message_from_proto
    from flwr.proto.message_pb2 import Message as ProtoMessage

    data = json.loads(recorded)
    message = message_from_proto(ProtoMessage.FromString(bytes.fromhex(data["proto"])))
    message.metadata.__dict__["_message_id"] = data["id"]
    return message
