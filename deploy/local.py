"""A local Flower Deployment Engine on loopback: one SuperLink and N SuperNodes, by PID.

    python -m deploy.local start 2 [--secure] [--warm]    # SuperLink + 2 SuperNodes
    python -m deploy.local status                         # processes, health, online nodes
    python -m deploy.local stop                           # stop them, by the PIDs recorded

``scripts/deploy_local.sh`` runs exactly this; the tests and the benchmarks use
``LocalDeployment``. What each process is started with, and why: ``deploy.commands``. Every
process starts in its own session (PID = process group); ``<dir>/pids`` records its name, PID
and start time; ``stop`` signals exactly those groups (executors and SuperNodes first, so they
de-register), then kills by PID whatever they spawned that is still alive. Nothing is stopped
by name, and nothing read from a file reaches a shell.

Environment (command line only): DEPLOY_DIR (default $XDG_STATE_HOME, else ~/.local/state,
then split-learning/deploy; created mode 0700, refused when another user owns it or others may
write it), SUPERLINK_PORT (9300), SUPERNODE_BASE_PORT (9310: node i on BASE+i), DATA_DIR (node
config data-dir; default unset: the app searches), FLOWER_BIN (default: this Python's),
FLWR_SUPEREXEC_TASK_POLL_INTERVAL (executors' task poll; 0.1 here, Flower 1.0), WARM_FAST_POLL
(1; 0 keeps Flower's sleeps with --warm), SUPERLINK_DATABASE (file, or "" for memory; default
<dir>/linkstate.db, --warm: memory).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import ssl
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import httpx

from deploy.certs import make_certs
from deploy.commands import CONNECTION, Commands, Layout, Settings
from deploy.files import (
    DeployDirError,
    Recorded,
    append_pid,
    is_running,
    new_secret,
    private_dir,
    read_pids,
)
from deploy.local_superlink import OFFLINE_ENV, run_flwr
from deploy.processes import descendants, port_in_use, start_process, stop_group

REPO = Path(__file__).resolve().parents[1]
__all__ = ["CONNECTION", "DeploymentError", "LocalDeployment", "Settings"]


class DeploymentError(RuntimeError):
    """Start-up failed or was refused; the message says why and where the logs are."""


def default_dir() -> Path:
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state) / "split-learning" / "deploy"


class LocalDeployment:
    """``with LocalDeployment(dir, Settings(nodes=2, secure=True)) as dep: dep.flwr("ls")``."""

    def __init__(self, directory: Path | None = None, settings: Settings | None = None) -> None:
        self.dir = Path(directory or os.environ.get("DEPLOY_DIR") or default_dir()).absolute()
        self.settings = settings or Settings()
        self.at = Layout(self.dir)
        self.commands = Commands(self.settings, self.at)
        self.bin = self.commands.bin
        self.port = self.settings.superlink_port
        self.home, self.certs = self.at.home, self.at.certs

    @property
    def env(self) -> dict[str, str]:
        """The environment of every process started here, and of `flwr` against it."""
        env = dict(os.environ) | OFFLINE_ENV | {"FLWR_HOME": str(self.home)}
        # Should `flwr` ever start a local SuperLink, it fails on our busy port instead.
        for api in ("SUPERLINK_HTTP_API", "CONTROL_API"):
            env[f"FLWR_LOCAL_{api}_PORT"] = str(self.port)
        for key in ("FLWR_INTERNAL_GRPC_CONTROL_API", "FLWR_INTERNAL_GRPC_FLEET_API"):
            env.pop(key, None)  # never Flower's legacy gRPC servers on their fixed ports
        # Flower starts its helpers by bare name (flower-superexec, flwr-clientapp, ...).
        env["PATH"] = os.pathsep.join([str(self.bin), env.get("PATH", "")])
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        env.pop("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", None)  # for the SuperNodes' executors only
        return env

    def flwr(self, *args: str, timeout: float = 60):  # noqa: ANN201
        """Any `flwr` command against this SuperLink, its output captured."""
        return run_flwr(self.env, *args, timeout=timeout)

    def online_nodes(self) -> list[int]:
        proc = self.flwr("supernode", "ls", CONNECTION, "--format", "json")
        if proc.returncode != 0:
            return []
        nodes = json.loads(proc.stdout).get("nodes", [])
        return [int(n["node-id"]) for n in nodes if n["status"] == "online"]

    def pids(self) -> dict[str, int]:
        return {e.name: e.pid for e in read_pids(self.at.pids)}

    def healthy(self) -> bool:
        scheme, verify = "http", True
        if self.settings.secure:
            scheme, verify = "https", ssl.create_default_context(cafile=self.certs / "ca.crt")
        try:
            url = f"{scheme}://127.0.0.1:{self.port}/health"
            return httpx.get(url, verify=verify, timeout=2).is_success
        except httpx.HTTPError:
            return False

    # -- start ---------------------------------------------------------------------------------
    def start(self) -> LocalDeployment:
        s, c = self.settings, self.commands
        private_dir(self.dir)
        if running := [e for e in read_pids(self.at.pids) if is_running(e)]:
            raise DeploymentError(
                f"already running ({running[0].name} PID {running[0].pid}); stop it first"
            )
        ports = [self.port, *(c.node_port(i) for i in range(s.nodes))]
        if busy := [p for p in ports if port_in_use(p)]:
            raise DeploymentError(
                f"port {busy[0]} is in use (set SUPERLINK_PORT / SUPERNODE_BASE_PORT)"
            )
        db = self.at.database
        for stale in (
            self.at.pids,
            self.at.state,
            db,
            *(Path(f"{db}-{x}") for x in ("wal", "shm")),
        ):
            stale.unlink(missing_ok=True)
        private_dir(self.home)
        if s.secure:
            for made in make_certs(self.certs, s.nodes):
                print(f"deploy: new {made} in {self.certs}")
            private_dir(self.at.secrets)
        for name in c.secret_names():  # fresh each start: nothing else has ever seen them
            new_secret(self.at.secret(name))
        if s.process_isolation:
            private_dir(self.at.tokens)
        self.at.state.write_text(json.dumps(asdict(s), indent=1))
        (self.home / "config.toml").write_text(c.connection_toml())
        try:
            link = self._spawn("superlink", c.superlink())
            self._wait(60, "the SuperLink", self.healthy, [link])
            if s.process_isolation:
                self._spawn("serverapp-executor", c.serverapp_executor(link.pid))
            if s.secure:
                self._register_keys()
            nodes = [self._spawn(f"supernode-{i}", c.supernode(i)) for i in range(s.nodes)]
            for i, node in enumerate(nodes if s.process_isolation else []):
                self._spawn(f"executor-{i}", c.executor(i, node.pid))
            self._wait(
                90,
                f"{s.nodes} SuperNodes to register",
                lambda: len(self.online_nodes()) >= s.nodes,
                read_pids(self.at.pids),
            )
        except BaseException:
            self.stop(quiet=True)
            raise
        return self

    def _spawn(self, name: str, cmd: list[str]) -> Recorded:
        env = self.env
        if name.startswith(("supernode-", "executor-")):  # how often to look for a new task
            env["FLWR_SUPEREXEC_TASK_POLL_INTERVAL"] = str(self.settings.task_poll)
        proc = start_process(cmd, self.at.log(name), env, cwd=self.dir)
        return append_pid(self.at.pids, name, proc.pid)

    def _register_keys(self) -> None:
        for i in range(self.settings.nodes):
            key = str(self.certs / f"supernode-{i}.pub")
            proc = self.flwr("supernode", "register", key, CONNECTION)
            self.at.log(f"register-{i}").write_text(proc.stdout + proc.stderr)
            if proc.returncode != 0:
                raise DeploymentError(f"could not register supernode-{i}:\n{proc.stdout}")

    def _wait(
        self, seconds: float, what: str, ready: Callable[[], bool], watch: list[Recorded]
    ) -> None:
        deadline = time.monotonic() + seconds
        while not ready():
            if dead := [e for e in watch if not is_running(e)]:
                log = self.at.log(dead[0].name)
                raise DeploymentError(f"{dead[0].name} exited while waiting for {what}; see {log}")
            if time.monotonic() > deadline:
                raise DeploymentError(f"timed out waiting for {what}; logs in {self.dir}")
            time.sleep(0.5)

    # -- stop, status --------------------------------------------------------------------------
    def stop(self, quiet: bool = False) -> list[str]:
        """Stop every recorded process (reverse start order), then whatever they spawned."""
        entries = read_pids(self.at.pids)
        spawned = descendants([e.pid for e in entries if is_running(e)])
        lines = []
        for entry in reversed(entries):
            if not is_running(entry):
                lines.append(f"{entry.name} (PID {entry.pid}) had already exited")
                continue
            stop_group(entry)
            lines.append(f"stopped {entry.name} (PID {entry.pid})")
        for pid in spawned:
            try:
                os.kill(pid, signal.SIGKILL)
                lines.append(f"killed leftover PID {pid}")
            except ProcessLookupError:
                pass
        self.at.pids.unlink(missing_ok=True)
        if not quiet:
            print("\n".join(lines) or f"deploy: nothing to stop (no {self.at.pids})")
        return lines

    def status(self) -> str:
        entries = read_pids(self.at.pids)
        if not entries:
            return f"not running (no {self.at.pids})"
        s = self.settings
        lines = [f"mode: secure={int(s.secure)} warm={int(s.warm)}"]
        lines += [f"{e.name} PID {e.pid} {'running' if is_running(e) else 'gone'}" for e in entries]
        lines.append(f"SuperLink health: {'ok' if self.healthy() else 'FAILED'}")
        nodes = self.flwr("supernode", "ls", CONNECTION)
        return "\n".join([*lines, nodes.stdout + nodes.stderr])

    def __enter__(self) -> LocalDeployment:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop(quiet=True)


def recorded_settings(directory: Path) -> Settings | None:
    """The settings `start` recorded (for `status` and `stop` in a later process)."""
    path = Layout(directory).state
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    fields = Settings.__dataclass_fields__
    return Settings(**{k: v for k, v in data.items() if k in fields})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deploy.local", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    start = sub.add_parser("start", help="start a SuperLink and N SuperNodes")
    start.add_argument("nodes", type=int, nargs="?", default=2)
    start.add_argument("--secure", action="store_true", help="TLS, authentication everywhere")
    start.add_argument("--warm", action="store_true", help="one warm ClientApp per SuperNode")
    sub.add_parser("stop", help="stop what `start` started, by PID")
    sub.add_parser("status", help="processes, health, online nodes")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    directory = Path(os.environ.get("DEPLOY_DIR") or default_dir()).absolute()
    try:
        if args.command == "start":
            if args.nodes < 1:
                parser.error("the number of SuperNodes must be at least 1")
            settings = Settings.from_env(args.nodes, args.secure, args.warm)
            _print_started(LocalDeployment(directory, settings).start())
            return 0
        if not directory.exists():
            print(f"not running (no {directory})")
            return 0
        private_dir(directory)  # refuses a directory someone else could have written
        dep = LocalDeployment(directory, recorded_settings(directory))
        if args.command == "stop":
            dep.stop()
        else:
            print(dep.status())
        return 0
    except (DeployDirError, DeploymentError) as err:
        print(f"deploy: {err}", file=sys.stderr)
        return 1


def _print_started(dep: LocalDeployment) -> None:
    s = dep.settings
    what = f"SuperLink on 127.0.0.1:{dep.port}"
    if s.secure:
        what += " (TLS, SuperNode authentication, authenticated executors, loopback-only "
        what += f"Control API; certificates in {dep.certs})"
    what += f" with {s.nodes} SuperNodes"
    what += " (each with one warm ClientApp process)" if s.warm else ""
    print(f"{what}; logs and PIDs in {dep.dir}")
    print("Run the app with:")
    print(f"  FLWR_HOME={dep.home} FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1 \\")
    print(f"    {dep.bin / 'flwr'} run {REPO} {CONNECTION} --stream \\")
    print(f'    --run-config "min-clients={s.nodes}"')
    print("Stop with: python -m deploy.local stop   (or scripts/deploy_local.sh stop)")


if __name__ == "__main__":
    sys.exit(main())
