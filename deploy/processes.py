"""Processes of a deployment: started in sessions of their own, stopped by PID, never by name.

Each process we start leads its own session and process group (PID = group id), so one signal
to the group reaches it and whatever it started there. Flower's SuperLink starts its SuperExec
in another session, so ``descendants`` (read from /proc before anything is signalled) finds
what the groups missed.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

from deploy.files import Recorded, is_running


def start_process(cmd: list[str], log: Path, env: dict[str, str], cwd: Path) -> subprocess.Popen:
    """``cmd`` in a new session, stdin closed, stdout and stderr to ``log`` (mode 0600)."""
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "wb") as out:
        return subprocess.Popen(
            cmd,
            env=env,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def stop_group(entry: Recorded, timeout: float = 20.0) -> None:
    """SIGTERM to the process group ``entry`` leads; SIGKILL when still alive after ``timeout``."""
    try:
        os.killpg(entry.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while is_running(entry) and time.monotonic() < deadline:
        time.sleep(0.1)
    if is_running(entry):
        try:
            os.killpg(entry.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    _reap(entry.pid)


def _reap(pid: int) -> None:
    """Collect the exit status when the process is our own child (started in this process)."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        tree.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    return tree


def descendants(pids: list[int]) -> list[int]:
    """Every live descendant of ``pids``, parents before children."""
    tree, found, todo = _children(), [], list(pids)
    while todo:
        for child in tree.get(todo.pop(0), []):
            if child not in found:
                found.append(child)
                todo.append(child)
    return found


def port_in_use(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is no listener
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False
