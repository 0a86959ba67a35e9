"""A private simulation SuperLink and `flwr run` against it: for sweeps and tests.

`flwr run .` starts a detached SuperLink on fixed ports that keeps running afterwards and that
nothing stops. A sweep (or a test session) instead starts its own on free ports with its own
FLWR_HOME, knows its PID, and stops it, and whatever it spawned, when it is done.
"""

from __future__ import annotations

import atexit
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import httpx

APP_PACKAGES = ("flower_app", "strategies", "split_core", "models")


def _app_root() -> Path:
    """The Flower app `flwr run` builds its FAB from: a directory made once per process with
    pyproject.toml and the four packages the apps import.

    Not the checkout itself: Flower's FAB builder walks and resolves every file under the app
    directory before it filters them, and a checkout holds a virtual environment (about 50,000
    files: 4.5 s of CPU for each `flwr run`, which a test session pays dozens of times). An
    installed wheel has no pyproject.toml beside its packages: its copy is
    split_core/app_config.toml.
    """
    here = Path(__file__).resolve().parents[1]
    pyproject = here / "pyproject.toml"
    if not pyproject.is_file():
        pyproject = here / "split_core" / "app_config.toml"
    app = Path(tempfile.mkdtemp(prefix="split-learning-app-"))
    atexit.register(shutil.rmtree, app, ignore_errors=True)
    shutil.copyfile(pyproject, app / "pyproject.toml")
    for package in APP_PACKAGES:
        shutil.copytree(here / package, app / package, ignore=shutil.ignore_patterns("__pycache__"))
    return app


APP_ROOT = _app_root()
BIN = Path(os.environ.get("FLOWER_BIN") or Path(sys.executable).parent)  # flwr, flower-superlink
OFFLINE_ENV = {
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
    "PYTHONUNBUFFERED": "1",
}


def flower_env(home: Path, http_port: int, control_port: int) -> dict[str, str]:
    """The environment every Flower process we start gets: offline, private home and ports."""
    return (
        os.environ
        | OFFLINE_ENV
        | {
            "FLWR_HOME": str(home),
            "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(http_port),
            "FLWR_LOCAL_CONTROL_API_PORT": str(control_port),
        }
    )


def run_flwr(
    env: Mapping[str, str], *args: str, timeout: float = 60, cwd: Path | None = None
) -> subprocess.CompletedProcess:
    """The `flwr` CLI of this environment, its output captured."""
    return subprocess.run(
        [str(BIN / "flwr"), *args],
        env=dict(env),
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
    )


def write_app(directory: Path, name: str, module: str, source: str, config: str = "") -> Path:
    """A throw-away Flower app: ``directory/pyproject.toml`` and ``directory/<module>.py``,
    whose ``server`` and ``client`` are the ServerApp and ClientApp; ``config`` is the body of
    its ``[tool.flwr.app.config]``."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "pyproject.toml").write_text(
        f'''[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "{name}"
version = "0.1.0"
dependencies = ["flwr==1.42.0", "numpy"]

[tool.flwr.app]
publisher = "split-learning"

[tool.flwr.app.components]
serverapp = "{module}:server"
clientapp = "{module}:client"

[tool.flwr.app.config]
{config}'''
    )
    (directory / f"{module}.py").write_text(source)
    return directory


def listen_port_range() -> range:
    """Ports for servers we start: below the kernel's ephemeral range.

    Outgoing connections (gRPC, Ray, httpx) take ports from the ephemeral range at any moment,
    so a port found free there can be taken by another process before our server binds it (CI
    once saw a SuperNode's HTTP API fail to start). Below that range only a server that binds
    the same port by choice can collide, and a random choice makes that unlikely. It starts
    above Ray's worker ports (10002-19999 by default), which Ray's workers bind as they start.
    """
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768  # Linux's default
    return range(20000, max(20000, low))


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    return free_port_block(1)


def free_port_block(n: int) -> int:
    """A port p with p .. p+n-1 all free on 127.0.0.1 (a SuperNode base port for n nodes)."""
    ports = listen_port_range()
    choose = random.SystemRandom()  # not the seeded `random`: parallel tests share its seed
    for _ in range(200):
        if len(ports) > n:
            base = choose.randrange(ports.start, ports.stop - n)
        else:  # an unusual kernel setting: let the kernel choose
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                base = s.getsockname()[1]
        if base + n <= 65536 and all(_bindable(p) for p in range(base, base + n)):
            return base
    raise RuntimeError(f"no block of {n} free ports on 127.0.0.1")


def process_alive(pid: int) -> bool:
    """Running, and not a zombie waiting for its parent."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def stop_process(proc: subprocess.Popen, timeout: float = 20) -> None:
    """Stop a process started in its own session, and its process group, by PID."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@dataclass
class FlwrRunResult:
    log: str
    run_dir: Path


class LocalSuperLink:
    """``with LocalSuperLink(home) as link: link.run(config, clients=2)``."""

    def __init__(
        self, home: Path, startup_timeout: float = 60, env: Mapping[str, str] | None = None
    ) -> None:
        """``env``: extra variables for the SuperLink and every process it starts (a sweep
        tags its processes with one, to find them again after it was killed)."""
        self.home = Path(home)
        self.home.mkdir(parents=True, exist_ok=True)
        self.http_port, self.control_port = free_port(), free_port()
        self.startup_timeout = startup_timeout
        self.proc: subprocess.Popen | None = None
        self.env = flower_env(self.home, self.http_port, self.control_port) | dict(env or {})

    def start(self) -> LocalSuperLink:
        log = self.home / "superlink.log"
        self.proc = subprocess.Popen(
            [
                str(BIN / "flower-superlink"),
                "--insecure",
                "--simulation",
                "--isolation",
                "subprocess",
                "--control-api-address",
                f"127.0.0.1:{self.control_port}",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.http_port),
                "--log-file",
                str(log),
            ],
            env=self.env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.monotonic() + self.startup_timeout
        while not self._healthy():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the local SuperLink did not start; see {log}")
            time.sleep(0.2)
        return self

    def _healthy(self) -> bool:
        try:
            return httpx.get(f"http://127.0.0.1:{self.http_port}/health", timeout=0.5).is_success
        except httpx.HTTPError:
            return False

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)
            self.proc = None

    def __enter__(self) -> LocalSuperLink:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def run(
        self,
        run_config: Mapping[str, Any],
        clients: int = 2,
        cpus_per_client: float | None = None,
        gpus_per_client: float | None = None,
        timeout: float | None = None,
        app: Path = APP_ROOT,
        ray_cpus: int | None = None,
    ) -> FlwrRunResult:
        """`flwr run <app> --stream` with these run-config overrides; blocks until the run ends.

        `flwr run` exits 0 even when the ServerApp fails: callers judge a run by its results
        files (``rounds.jsonl``), and by the log.
        """
        cmd = self._run_command(
            run_config, clients, cpus_per_client, gpus_per_client, app, ray_cpus
        )
        proc = subprocess.run(
            [*cmd, "--stream"],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=app,
        )
        run_dir = Path(run_config.get("output-dir", "outputs")) / str(run_config.get("run-name"))
        return FlwrRunResult(proc.stdout + proc.stderr, run_dir)

    def start_run(
        self,
        run_config: Mapping[str, Any],
        log_file: IO[str],
        clients: int = 2,
        cpus_per_client: float | None = None,
        gpus_per_client: float | None = None,
        app: Path = APP_ROOT,
    ) -> subprocess.Popen:
        """`flwr run <app> --stream` without waiting, its output into ``log_file``: for a
        caller that follows the run (results files, a timeout) while it goes."""
        cmd = self._run_command(run_config, clients, cpus_per_client, gpus_per_client, app, None)
        return subprocess.Popen(
            [*cmd, "--stream"],
            env=self.env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=app,
        )

    def submit(self, run_config: Mapping[str, Any], clients: int = 2, app: Path = APP_ROOT) -> int:
        """`flwr run` without waiting: returns the run id."""
        cmd = [*self._run_command(run_config, clients, None, None, app, None), "--format", "json"]
        proc = subprocess.run(cmd, env=self.env, capture_output=True, text=True, cwd=app)
        try:
            return int(json.loads(proc.stdout)["run-id"])
        except (ValueError, KeyError) as exc:
            raise RuntimeError(
                f"flwr run did not start a run:\n{proc.stdout}{proc.stderr}"
            ) from exc

    def flwr(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        """Any `flwr` command against this SuperLink (e.g. ``"stop", "3"``)."""
        return run_flwr(self.env, *args, timeout=timeout)

    def _run_command(
        self,
        run_config: Mapping[str, Any],
        clients: int,
        cpus_per_client: float | None,
        gpus_per_client: float | None,
        app: Path,
        ray_cpus: int | None,
    ) -> list[str]:
        federation = f"num-supernodes={clients}"
        if cpus_per_client:  # Flower wants an int here when the value is whole
            cpus = int(cpus_per_client) if float(cpus_per_client).is_integer() else cpus_per_client
            federation += f" client-resources-num-cpus={cpus}"
        if gpus_per_client:
            federation += f" client-resources-num-gpus={gpus_per_client}"
        if ray_cpus:  # CPUs Ray may hand out: more than the machine's gives more actors
            federation += f" init-args-num-cpus={ray_cpus}"
        return [
            str(BIN / "flwr"),
            "run",
            str(app),
            "--run-config",
            " ".join(f"{k}={json.dumps(v)}" for k, v in run_config.items()),
            "--federation-config",
            federation,
        ]
