"""One invocation of a sweep: its lock, its Flower processes, and one job's `flwr run` followed.

A sweep may be killed at any moment, SIGKILL included, and the same command run again must
pick up where it stopped. What makes that safe:

- **A lock** (``<sweep dir>/.sweep.lock``, ``flock``): two sweeps never share a directory. The
  kernel releases it when its holder dies, however it dies.
- **A token.** Every process this invocation starts for Flower (the SuperLink, its SuperExec,
  the simulation, Ray's daemons and actors, the `flwr` CLI) inherits ``SPLIT_SWEEP_TOKEN=<token>``
  in its environment, and ``<sweep dir>/.sweep.json`` records the token. A killed sweep's
  SuperLink dies, but its simulation and Ray live on, reparented, holding memory: they are found
  by the token, not by name or port, so other people's Flower processes are never touched.
- **A reaper**: a small process in its own session that waits for the sweep to die and then
  kills every process with its token, and their descendants (Ray's agents lose the token), at
  once. The next invocation does the same for the
  previous token, in case the reaper was killed too.
- **A fresh SuperLink** per invocation, on free ports with a private FLWR_HOME: nothing of a
  dead sweep's SuperLink can block or answer this one.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deploy.local_superlink import LocalSuperLink, process_alive
from deploy.processes import descendants

log = logging.getLogger(__name__)

TOKEN_VAR = "SPLIT_SWEEP_TOKEN"
LOCK_FILE, STATE_FILE = ".sweep.lock", ".sweep.json"
STOP_GRACE_S = 60.0  # how long a run stopped with `flwr stop` may take to end before it is killed
POLL_S = 2.0  # how often a running job's rounds.jsonl is read

# Run by `python -c` in its own session: no imports of ours, so it starts in milliseconds.
REAPER = """
import os, signal, sys, time
parent, marker = int(sys.argv[1]), sys.argv[2].encode()
while os.getppid() == parent:
    time.sleep(1)
def read(path):
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return b""
for _ in range(5):
    pids = [int(p) for p in os.listdir("/proc") if p.isdigit()]
    victims = {p for p in pids if marker in read("/proc/%d/environ" % p).split(b"\\0")}
    parents = {p: read("/proc/%d/stat" % p).rsplit(b")", 1)[-1].split()[1:2] for p in pids}
    grown = True
    while grown:  # descendants too: Ray's agents do not carry the token
        more = {p for p, pp in parents.items() if pp and int(pp[0]) in victims} - victims
        victims |= more
        grown = bool(more)
    victims.discard(os.getpid())
    if not victims:
        break
    for pid in victims:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    time.sleep(1)
"""


class SweepBusy(RuntimeError):
    """Another sweep holds this sweep directory."""


def tagged_pids(token: str) -> list[int]:
    """Live processes whose environment holds ``SPLIT_SWEEP_TOKEN=<token>``."""
    marker = f"{TOKEN_VAR}={token}".encode()
    found = []
    for name in filter(str.isdigit, os.listdir("/proc")):
        try:
            environ = Path(f"/proc/{name}/environ").read_bytes()
        except OSError:
            continue
        if marker in environ.split(b"\0") and process_alive(int(name)):
            found.append(int(name))
    return found


def kill_tagged(token: str, keep: Iterable[int] = (), rounds: int = 5) -> list[int]:
    """SIGKILL every process with this token, and every descendant of one, except ``keep``;
    returns the PIDs killed. Descendants count because not all of them carry the token: Ray's
    raylet starts its dashboard and runtime-env agents with an environment of its own, and
    they outlived every stopped sweep."""
    killed: list[int] = []
    spared = {*keep, os.getpid()}
    for _ in range(rounds):  # a process may start while its parent is being killed
        tagged = tagged_pids(token)
        victims = [p for p in [*tagged, *descendants(tagged)] if p not in spared]
        if not victims:
            break
        for pid in victims:
            try:
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            except OSError:
                pass
        time.sleep(0.5)
    return killed


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def parent_pid(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


class SweepSession:
    """The sweep directory's lock, the tagged Flower processes and the SuperLink they hang on.

    ``open()`` takes the lock, clears what a killed predecessor left and starts the reaper;
    ``link()`` starts the SuperLink on first use; ``close()`` stops everything this invocation
    started. Use it as a context manager.
    """

    def __init__(self, sweep_dir: Path) -> None:
        self.sweep_dir = Path(sweep_dir).resolve()
        self.token = uuid.uuid4().hex
        self._lock_fd: int | None = None
        self._link: LocalSuperLink | None = None
        self._home: Path | None = None

    def __enter__(self) -> SweepSession:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def open(self) -> SweepSession:
        self.sweep_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.sweep_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            holder = self._previous().get("pid", "?")
            raise SweepBusy(
                f"another sweep (pid {holder}) is running in {self.sweep_dir}; stop it first, "
                "or give this one another hydra.sweep.dir"
            ) from None
        self._lock_fd = fd
        self._clear_leftovers(self._previous())
        state = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "token": self.token,
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        (self.sweep_dir / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")
        subprocess.Popen(
            [sys.executable, "-c", REAPER, str(os.getpid()), f"{TOKEN_VAR}={self.token}"],
            start_new_session=True,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        return self

    def _previous(self) -> dict[str, Any]:
        try:
            return json.loads((self.sweep_dir / STATE_FILE).read_text())
        except (OSError, ValueError):
            return {}

    def _clear_leftovers(self, previous: Mapping[str, Any]) -> None:
        """Kill what a killed sweep in this directory left running (its token says what)."""
        token = previous.get("token")
        if not token or previous.get("host", socket.gethostname()) != socket.gethostname():
            return
        killed = kill_tagged(token)
        if killed:
            log.warning(
                "killed %d processes left by the previous sweep (pid %s) in %s",
                len(killed),
                previous.get("pid"),
                self.sweep_dir,
            )

    def link(self) -> LocalSuperLink:
        """The private SuperLink, started on first use; its processes carry the token."""
        if self._link is None:
            self._home = Path(tempfile.mkdtemp(prefix="sweep-flwr-home-"))
            self._link = LocalSuperLink(self._home, env={TOKEN_VAR: self.token}).start()
        return self._link

    def busy_pids(self) -> list[int]:
        """Tagged processes other than the SuperLink and its SuperExec: a run's simulation and
        Ray's processes, or a `flwr` CLI call. Empty once a run has really ended."""
        link = self._link.proc.pid if self._link and self._link.proc else None
        return [
            p
            for p in tagged_pids(self.token)
            if p != link and not (parent_pid(p) == link and "flower-superexec" in cmdline(p))
        ]

    def wait_idle(self, timeout: float) -> list[int]:
        """Wait until no run's process is left; kill those still there after ``timeout``.
        Returns the PIDs that had to be killed."""
        deadline = time.monotonic() + timeout
        while (busy := self.busy_pids()) and time.monotonic() < deadline:
            time.sleep(1)
        if not busy:
            return []
        link = self._link.proc.pid if self._link and self._link.proc else None
        superexec = [p for p in tagged_pids(self.token) if p not in busy and p != link]
        return kill_tagged(self.token, keep=[*superexec, *([link] if link else [])])

    def close(self) -> None:
        if self._link is not None:
            self._link.stop()
            self._link = None
        kill_tagged(self.token)
        if self._home is not None:
            shutil.rmtree(self._home, ignore_errors=True)
            self._home = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None


RUN_STARTED = re.compile(r"Successfully started run (\d+)")


@dataclass
class RunOutcome:
    seconds: float
    timed_out: bool
    stop_note: str  # how a timed-out run ended; "" otherwise
    log: str  # this attempt's part of the log


def follow_run(
    session: SweepSession,
    run_config: Mapping[str, Any],
    run_dir: Path,
    log_path: Path,
    *,
    clients: int,
    cpus_per_client: float,
    gpus_per_client: float,
    timeout: float,
    on_round: Callable[[dict[str, Any]], None],
) -> RunOutcome:
    """`flwr run --stream` one job, calling ``on_round`` for each round it adds to
    ``rounds.jsonl``; a run past ``timeout`` seconds is stopped with `flwr stop`, and killed if
    its simulation has not ended ``STOP_GRACE_S`` later. Returns once no process of it is left.
    """
    link = session.link()
    start = log_path.stat().st_size if log_path.exists() else 0
    seen = _round_numbers(run_dir)
    t0 = time.monotonic()
    timed_out, note = False, ""
    with log_path.open("a") as log_file:
        proc = link.start_run(
            run_config,
            log_file,
            clients=clients,
            cpus_per_client=cpus_per_client,
            gpus_per_client=gpus_per_client,
        )
        while True:
            ended = proc.poll() is not None
            for record in _new_rounds(run_dir, seen):
                on_round(record)
            if ended:
                break
            if time.monotonic() - t0 > timeout:
                timed_out = True
                note = _stop(session, proc, log_path, start)
                for record in _new_rounds(run_dir, seen):
                    on_round(record)
                break
            time.sleep(POLL_S)
    killed = session.wait_idle(STOP_GRACE_S)
    if killed and not note:
        note = f"killed {len(killed)} processes the run left behind"
    return RunOutcome(time.monotonic() - t0, timed_out, note, _read_from(log_path, start))


def _stop(session: SweepSession, proc: subprocess.Popen, log_path: Path, start: int) -> str:
    """`flwr stop` the job's run; say whether that ended it or it had to be killed."""
    match = RUN_STARTED.search(_read_from(log_path, start))
    if match is None:  # not even started: nothing for `flwr stop` to name
        proc.kill()
        proc.wait()
        killed = session.wait_idle(0)
        return f"killed before its run started ({len(killed)} processes)"
    run_id = match.group(1)
    stopped = session.link().flwr("stop", run_id, timeout=120)
    t0 = time.monotonic()
    try:
        proc.wait(timeout=STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    killed = session.wait_idle(max(0.0, STOP_GRACE_S - (time.monotonic() - t0)))
    if stopped.returncode != 0:
        reason = (stopped.stdout + stopped.stderr).strip().splitlines()[-1:]
        return f"flwr stop {run_id} failed ({' '.join(reason)}); killed {len(killed)} processes"
    if killed:
        return f"stopped with flwr stop {run_id}, then killed: it had not ended"
    return f"stopped with flwr stop {run_id}; its simulation ended"


def _read_from(path: Path, offset: int) -> str:
    with path.open("rb") as f:
        f.seek(offset)
        return f.read().decode(errors="replace")


def _round_numbers(run_dir: Path) -> set[int]:
    return {r["round"] for r in complete_rounds(run_dir)}


def _new_rounds(run_dir: Path, seen: set[int]) -> list[dict[str, Any]]:
    """Records of rounds not reported yet (a resumed run rewrites the file: rounds repeat)."""
    new = [r for r in complete_rounds(run_dir) if r["round"] not in seen]
    seen.update(r["round"] for r in new)
    return new


def complete_rounds(run_dir: Path) -> list[dict[str, Any]]:
    """The whole lines of rounds.jsonl; one being written is skipped until it is whole."""
    try:
        text = (run_dir / "rounds.jsonl").read_text()
    except OSError:
        return []
    records = []
    for line in text.splitlines(keepends=True):
        if not line.endswith("\n"):
            break
        try:
            records.append(json.loads(line))
        except ValueError:
            break
    return records
