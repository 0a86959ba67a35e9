"""A SuperExec of our own for ``--isolation process``: one fresh app process per task, as
Flower's, but with the task's token in a file instead of on the command line.

Flower's ``flower-superexec`` starts ``flwr-clientapp --token T`` (or ``flwr-serverapp``) for
each task: the token is then in the process list, readable by every local user, for the life of
the process (a whole run, for the ServerApp), and with it anyone on the machine can pull the
task's message and context and push replies. This executor claims tasks the same way (signing
AcquireTask with the shared secret when one is given) and starts the same programs with
``--token-file F`` instead, F being a mode-0600 file in a 0700 directory, removed when the
process exits.

    python -m deploy.cold_executor --task-type clientapp --runtime-api-address 127.0.0.1:9310 \\
        --insecure --superexec-auth-secret-file S --token-dir D [--patched-sleeps]
"""

from __future__ import annotations

import argparse
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

from deploy.files import private_dir, write_private
from deploy.runtime_api import add_connection_args, check_flwr_version, connection_argv

DEFAULT_COMMANDS = {"clientapp": "flwr-clientapp", "serverapp": "flwr-serverapp"}


def _parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m deploy.cold_executor", description=__doc__)
    add_connection_args(parser)
    parser.add_argument("--task-type", choices=sorted(DEFAULT_COMMANDS), required=True)
    parser.add_argument("--token-dir", type=Path, required=True, help="a private directory")
    parser.add_argument(
        "--patched-sleeps",
        action="store_true",
        help="start `python -m deploy.patched_sleeps serverapp|...` instead of Flower's program",
    )
    parser.add_argument(
        "--poll-interval",
        type=float,
        default=float(os.environ.get("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", "1.0")),
        help="seconds between AcquireTask polls (Flower's variable, default 1.0)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    if error := check_flwr_version("cold_executor"):
        print(error, file=sys.stderr)
        return 2
    args = _parse_args(sys.argv[1:] if argv is None else argv)
    from flwr.proto.runtime_pb2 import AcquireTaskRequest
    from flwr.supercore.app_utils import start_parent_process_monitor
    from flwr.supercore.constant import TaskType

    from deploy.runtime_api import make_client

    token_dir = private_dir(args.token_dir)
    command = [DEFAULT_COMMANDS[args.task_type]]
    if args.patched_sleeps and args.task_type == "serverapp":
        command = [sys.executable, "-m", "deploy.patched_sleeps", "serverapp"]
    task_type = TaskType.CLIENT_APP if args.task_type == "clientapp" else TaskType.SERVER_APP
    client = make_client(args, "SuperExec")
    request = AcquireTaskRequest(supported_task_types=[task_type])
    running: dict[subprocess.Popen, Path] = {}

    def stop(signum: int, _frame: object) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    if args.parent_pid is not None:
        start_parent_process_monitor(args.parent_pid)
    print(f"cold executor: PID {os.getpid()}, {args.task_type} tasks", flush=True)
    try:
        while True:
            for proc in [p for p in running if p.poll() is not None]:
                running.pop(proc).unlink(missing_ok=True)
            res = client.AcquireTask(request)
            if not (res.HasField("task") and res.token):
                time.sleep(args.poll_interval)
                continue
            token_file = write_private(
                token_dir / f"task-{secrets.token_hex(8)}", res.token.encode(), exclusive=True
            )
            argv = [*command, "--runtime-api-address", args.runtime_api_address]
            argv += ["--token-file", str(token_file), *connection_argv(args)]
            argv += ["--parent-pid", str(os.getpid())]
            running[subprocess.Popen(argv, stdin=subprocess.DEVNULL)] = token_file
            print(f"cold executor: task {res.task.task_id} -> {command[-1]}", flush=True)
    finally:
        for proc, token_file in running.items():
            if proc.poll() is None:
                proc.terminate()
            token_file.unlink(missing_ok=True)
        client.close()


if __name__ == "__main__":
    sys.exit(main())
