"""What each process of a local deployment is started with: one place to read the doors.

``Settings`` says what kind of deployment it is; ``Layout`` where its files live; ``Commands``
turns both into argument lists (never shell strings). With ``--secure`` or ``--warm`` the
SuperLink and the SuperNodes run in ``--isolation process`` and the executors are ours:
- ``--secure``: every Runtime API (the SuperLink's for the ServerApp, each SuperNode's for its
  ClientApp) hands out tasks only to a caller that signs AcquireTask with a secret of its own
  (``--superexec-auth-secret-file``, mode 0600), and tokens reach app processes in 0600 files,
  never on a command line; the SuperLink serves TLS, admits registered SuperNode keys only, and
  answers Control and Runtime calls from loopback only (``deploy.superlink_guard``).
- ``--warm``: each SuperNode's executor is one long-lived ClientApp process
  (``deploy.warm_executor``) under ``deploy.supervisor``; with ``fast_poll`` the SuperNodes and
  the ServerApp are Flower's with shorter sleeps (``deploy.patched_sleeps``).
Plain deployments (neither flag) are Flower's own programs, as a reference.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from deploy.local_superlink import BIN

CONNECTION = "local-deployment"


@dataclass
class Settings:
    nodes: int = 2
    secure: bool = False
    warm: bool = False
    superlink_port: int = 9300
    supernode_base_port: int = 9310
    data_dir: str = ""  # node config data-dir; "" = the app searches its usual places
    flower_bin: str = str(BIN)
    task_poll: float = 0.1  # executors' AcquireTask poll, s (Flower's default: 1.0)
    fast_poll: bool = True  # --warm: Flower's message-path sleeps shortened
    database: str | None = None  # None: <dir>/linkstate.db, or memory with --warm; "": memory
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_env(cls, nodes: int, secure: bool, warm: bool) -> Settings:
        """The command line's settings: flags, plus the documented environment variables."""
        env = os.environ
        return cls(
            nodes=nodes,
            secure=secure,
            warm=warm,
            superlink_port=int(env.get("SUPERLINK_PORT", 9300)),
            supernode_base_port=int(env.get("SUPERNODE_BASE_PORT", 9310)),
            data_dir=env.get("DATA_DIR", ""),
            flower_bin=env.get("FLOWER_BIN") or str(BIN),
            task_poll=float(env.get("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", 0.1)),
            fast_poll=env.get("WARM_FAST_POLL", "1") == "1",
            database=env.get("SUPERLINK_DATABASE"),
        )

    @property
    def process_isolation(self) -> bool:
        """Our executors run the apps (secure: authenticated; warm: warm)."""
        return self.secure or self.warm


@dataclass(frozen=True)
class Layout:
    """The files of a deployment directory."""

    dir: Path

    @property
    def pids(self) -> Path:
        return self.dir / "pids"

    @property
    def state(self) -> Path:
        return self.dir / "deployment.json"

    @property
    def certs(self) -> Path:
        return self.dir / "certs"

    @property
    def home(self) -> Path:
        return self.dir / "flwr-home"

    @property
    def secrets(self) -> Path:
        return self.dir / "secrets"

    @property
    def tokens(self) -> Path:
        return self.dir / "tokens"

    @property
    def database(self) -> Path:
        return self.dir / "linkstate.db"

    def log(self, name: str) -> Path:
        return self.dir / f"{name}.log"

    def secret(self, name: str) -> Path:
        return self.secrets / name


class Commands:
    def __init__(self, settings: Settings, layout: Layout) -> None:
        self.s, self.at = settings, layout
        self.bin = Path(settings.flower_bin)

    def node_port(self, i: int) -> int:
        return self.s.supernode_base_port + i

    def connection_toml(self) -> str:
        """`flwr`'s connection to this SuperLink (CA pinned with --secure)."""
        tls = "insecure = true"
        if self.s.secure:
            tls = f'root-certificates = "{self.at.certs / "ca.crt"}"'
        return (
            "# written by deploy.local\n[superlink]\n"
            f'default = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
            f'address = "127.0.0.1:{self.s.superlink_port}"\n{tls}\n'
        )

    def secret_names(self) -> list[str]:
        """The SuperExec secrets to make (one per Runtime API) before anything starts."""
        if not self.s.secure:
            return []
        return ["superlink", *(f"supernode-{i}" for i in range(self.s.nodes))]

    def _secret_args(self, name: str) -> list[str]:
        return ["--superexec-auth-secret-file", str(self.at.secret(name))] if self.s.secure else []

    def _ca(self) -> list[str]:
        return ["--root-certificates", str(self.at.certs / "ca.crt")]

    def superlink(self) -> list[str]:
        s, certs = self.s, self.at.certs
        if s.secure:
            cmd = [sys.executable, "-m", "deploy.superlink_guard", "--"]
            cmd += ["--ssl-ca-certfile", str(certs / "ca.crt")]
            cmd += ["--ssl-certfile", str(certs / "server.pem")]
            cmd += ["--ssl-keyfile", str(certs / "server.key"), "--enable-supernode-auth"]
        else:
            cmd = [str(self.bin / "flower-superlink"), "--insecure"]
        if s.process_isolation:
            cmd += ["--isolation", "process", *self._secret_args("superlink")]
        database = s.database
        if database is None:  # --warm: every array would otherwise go through SQLite twice
            database = "" if s.warm else str(self.at.database)
        cmd += ["--disable-runtime-dependency-installation"]
        cmd += ["--host", "127.0.0.1", "--port", str(s.superlink_port)]
        return cmd + (["--database", database] if database else [])

    def serverapp_executor(self, superlink_pid: int) -> list[str]:
        """Starts each run's ServerApp (process isolation only)."""
        cmd = [sys.executable, "-m", "deploy.cold_executor", "--task-type", "serverapp"]
        cmd += ["--runtime-api-address", f"127.0.0.1:{self.s.superlink_port}"]
        cmd += self._ca() if self.s.secure else ["--insecure"]
        cmd += [*self._secret_args("superlink"), "--token-dir", str(self.at.tokens)]
        cmd += ["--parent-pid", str(superlink_pid)]
        cmd += ["--patched-sleeps"] if self.s.warm and self.s.fast_poll else []
        return self.supervised("serverapp-executor", superlink_pid, cmd)

    def supernode(self, i: int) -> list[str]:
        s = self.s
        cmd = [str(self.bin / "flower-supernode")]
        if s.warm and s.fast_poll:
            cmd = [sys.executable, "-m", "deploy.patched_sleeps", "supernode"]
        if s.secure:
            key = self.at.certs / f"supernode-{i}"
            cmd += [*self._ca(), "--auth-supernode-private-key", str(key)]
        else:
            cmd += ["--insecure"]
        if s.process_isolation:
            cmd += ["--isolation", "process", *self._secret_args(f"supernode-{i}")]
        config = f"partition-id={i} num-partitions={s.nodes}"
        config += f" data-dir='{s.data_dir}'" if s.data_dir else ""
        cmd += ["--superlink", f"127.0.0.1:{s.superlink_port}", "--host", "127.0.0.1"]
        return cmd + ["--port", str(self.node_port(i)), "--node-config", config]

    def executor(self, i: int, supernode_pid: int) -> list[str]:
        """Runs SuperNode i's ClientApps (process isolation only), under a supervisor."""
        s = self.s
        where = ["--runtime-api-address", f"127.0.0.1:{self.node_port(i)}", "--insecure"]
        where += self._secret_args(f"supernode-{i}")
        if s.warm:
            cmd = [sys.executable, "-m", "deploy.warm_executor", *where]
            cmd += ["--task-file", str(self.at.tokens / f"executor-{i}.task")]
        else:
            cmd = [sys.executable, "-m", "deploy.cold_executor", "--task-type", "clientapp"]
            cmd += [*where, "--token-dir", str(self.at.tokens)]
            cmd += ["--poll-interval", str(s.task_poll)]
        cmd += ["--parent-pid", str(supernode_pid)]
        return self.supervised(f"executor-{i}", supernode_pid, cmd)

    @staticmethod
    def supervised(name: str, parent: int, cmd: list[str]) -> list[str]:
        supervisor = [sys.executable, "-m", "deploy.supervisor", "--name", name]
        return [*supervisor, "--parent-pid", str(parent), "--", *cmd]
