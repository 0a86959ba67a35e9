"""Keep an executor running: start it, and start it again whenever it exits other than cleanly.

    python -m deploy.supervisor [--parent-pid P] [--name NAME] -- COMMAND ...

A SuperNode in ``--isolation process`` waits for ever for an executor to claim its tasks, so an
executor that crashed (or was killed) must come back on its own. Exit status 0 means "stopped
on purpose" (SIGTERM, or the SuperNode it serves is gone) and ends the supervisor too; status
75 asks for an immediate restart (the warm executor after a hung ClientApp, or for new app
code); anything else (a crash, a signal) restarts after a pause that doubles, from 0.5 s to
30 s, while the executor keeps dying within 10 s of its start. The executor itself picks up the
task a dead predecessor left half done (see deploy/warm_executor.py). SIGTERM/SIGINT to the
supervisor stop the executor (SIGTERM, then SIGKILL after 20 s) and end the supervisor.
The supervisor imports nothing of Flower: it stays small, and cannot fail the way its child can.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time

RESTART_NOW = 75  # EX_TEMPFAIL: the child asks to be replaced by a fresh process
QUICK_DEATH_SECONDS = 10.0
FIRST_PAUSE, LONGEST_PAUSE = 0.5, 30.0


def next_pause(previous: float, lived_seconds: float, status: int) -> float:
    """Seconds to wait before the next start, after a child that lived this long exited so."""
    if status == RESTART_NOW:
        return 0.0
    if lived_seconds >= QUICK_DEATH_SECONDS:
        return FIRST_PAUSE
    return min(LONGEST_PAUSE, max(FIRST_PAUSE, 2 * previous))


def describe(status: int) -> str:
    return f"signal {signal.Signals(-status).name}" if status < 0 else f"status {status}"


def _parent_alive(pid: int | None) -> bool:
    if pid is None:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def supervise(command: list[str], name: str, parent_pid: int | None = None) -> int:
    # The signal handler only records the signal: raised from the handler, it could land inside
    # subprocess.Popen after the fork, before `child` is bound, and leave the child running.
    signals: list[str] = []
    signal.signal(signal.SIGTERM, lambda signum, _: signals.append(signal.Signals(signum).name))
    signal.signal(signal.SIGINT, lambda signum, _: signals.append(signal.Signals(signum).name))

    def why_stop() -> str | None:
        if signals:
            return signals[0]
        return None if _parent_alive(parent_pid) else f"parent PID {parent_pid} is gone"

    pause, starts = 0.0, 0
    child: subprocess.Popen | None = None
    while (why := why_stop()) is None:
        starts += 1
        started = time.monotonic()
        child = subprocess.Popen(command, stdin=subprocess.DEVNULL)
        print(f"supervisor: started {name} (PID {child.pid}, start {starts})", flush=True)
        while (status := child.poll()) is None and (why := why_stop()) is None:
            time.sleep(0.2)
        if why is not None:
            break
        if status == 0:
            print(f"supervisor: {name} (PID {child.pid}) stopped; exiting", flush=True)
            return 0
        pause = next_pause(pause, time.monotonic() - started, status)
        print(
            f"supervisor: {name} (PID {child.pid}) exited with {describe(status)}; "
            f"restarting in {pause:.1f} s",
            flush=True,
        )
        resume_at = time.monotonic() + pause
        while time.monotonic() < resume_at and why_stop() is None:
            time.sleep(min(0.2, pause))
    print(f"supervisor: {why}; stopping {name}", flush=True)
    if child is not None and child.poll() is None:
        child.terminate()
        try:
            child.wait(timeout=20)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deploy.supervisor", description=__doc__)
    parser.add_argument("--name", default="executor")
    parser.add_argument("--parent-pid", type=int, help="stop when this process is gone")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command to supervise")
    return supervise(command, args.name, args.parent_pid)


if __name__ == "__main__":
    sys.exit(main())
