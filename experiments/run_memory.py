"""Peak memory of a whole run: every process under a SuperLink, Ray's actors included.

A simulation is many processes (SuperLink, SuperExec, ServerApp, the simulation engine, Ray's
GCS, raylet and one worker per actor), and Ray's object store lives in shared memory, so no one
process's RSS says what a run costs. Two readings are sampled while the run goes:

- ``tree_pss``: the proportional set size summed over the process tree (shared pages split
  between the processes that map them, so nothing is counted twice);
- ``machine_used``: MemTotal - MemAvailable of the whole machine, the figure ``free`` shows,
  to be compared with its value before the run started.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import psutil


def machine_used_bytes() -> int:
    fields = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    kib = int(fields["MemTotal"].split()[0]) - int(fields["MemAvailable"].split()[0])
    return kib * 1024


def settle(timeout: float = 60.0, quiet_seconds: float = 3.0) -> int:
    """Wait until no Ray or Flower process of an earlier run is left and memory stops falling;
    returns the machine's reading then (the idle baseline of the next run)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        leftovers = [
            p
            for p in psutil.process_iter(["cmdline"])
            if any(("ray::" in a or "flwr-simulation" in a) for a in (p.info["cmdline"] or []))
        ]
        if not leftovers:
            break
        time.sleep(0.5)
    before = machine_used_bytes()
    time.sleep(quiet_seconds)
    return min(before, machine_used_bytes())


def tree_pss_bytes(root_pid: int) -> tuple[int, int]:
    """(summed PSS, number of processes) of ``root_pid`` and all its descendants."""
    try:
        root = psutil.Process(root_pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0, 0
    total = 0
    for proc in procs:
        try:
            total += proc.memory_full_info().pss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return total, len(procs)


class RunMemory:
    """``with RunMemory(pid) as mem: ...`` then ``mem.peak_tree_pss``, ``mem.peak_machine_used``."""

    def __init__(self, root_pid: int, idle_machine_used: int | None = None, interval=0.25) -> None:
        """``idle_machine_used``: the machine's reading before the run's first process started."""
        self.root_pid, self.interval = root_pid, interval
        self.idle_machine_used = idle_machine_used or machine_used_bytes()
        self.peak_tree_pss = self.peak_machine_used = self.peak_processes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> RunMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def machine_above_idle(self) -> int:
        return self.peak_machine_used - self.idle_machine_used

    def _sample(self) -> None:
        while True:
            pss, processes = tree_pss_bytes(self.root_pid)
            self.peak_tree_pss = max(self.peak_tree_pss, pss)
            self.peak_processes = max(self.peak_processes, processes)
            self.peak_machine_used = max(self.peak_machine_used, machine_used_bytes())
            if self._stop.wait(self.interval):
                return
