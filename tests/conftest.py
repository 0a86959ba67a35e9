"""Fixtures that run the app for real: a private SuperLink for `flwr run`, tiny configs, data.

The SuperLink is started here (not by `flwr run`) so that its PID is known and it is stopped at
the end of the session; it gets its own FLWR_HOME and ports, so it never touches a developer's.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[1]
REAL_CIFAR10 = ROOT.parent / "shared" / "data" / "cifar10"
BIN = Path(sys.executable).parent

# ResNet-8 cut after its first block, a few hundred real CIFAR-10 images per client: seconds per
# run, yet enough to learn well above chance in two rounds.
TINY = {
    "depth": 8,
    "cut": 1,
    "batch-size": 32,
    "lr": 0.05,
    "samples-per-client": 600,
    "test-samples": 400,
    "num-rounds": 2,
    "chunk-mib": 4.0,
}


def data_dir() -> str:
    if not (REAL_CIFAR10 / "train.zip").exists():
        pytest.skip(f"real CIFAR-10 not found at {REAL_CIFAR10}")
    return str(REAL_CIFAR10)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def flower_env(home: Path, http_port: int, control_port: int) -> dict[str, str]:
    return os.environ | {
        "FLWR_HOME": str(home),
        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(http_port),
        "FLWR_LOCAL_CONTROL_API_PORT": str(control_port),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
        "PYTHONUNBUFFERED": "1",
    }


def stop(proc: subprocess.Popen) -> None:
    """Stop a process we started, and its process group, by PID."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


class FlowerRunner:
    """`flwr run .` against the session's SuperLink; returns the log and the run directory."""

    def __init__(self, env: dict[str, str], out: Path) -> None:
        self.env, self.out = env, out

    def __call__(
        self, name: str, config: dict, clients: int = 2, timeout: float = 600
    ) -> tuple[str, Path]:
        overrides = {"output-dir": str(self.out), "run-name": name, "data-dir": data_dir()} | config
        cmd = [
            str(BIN / "flwr"),
            "run",
            str(ROOT),
            "--stream",
            "--run-config",
            " ".join(f"{k}={json.dumps(v)}" for k, v in overrides.items()),
            "--federation-config",
            f"num-supernodes={clients}",
        ]
        proc = subprocess.run(
            cmd, env=self.env, capture_output=True, text=True, timeout=timeout, cwd=ROOT
        )
        return proc.stdout + proc.stderr, Path(overrides["output-dir"]) / name


@pytest.fixture(scope="session")
def flwr_run(tmp_path_factory: pytest.TempPathFactory) -> FlowerRunner:
    home = tmp_path_factory.mktemp("flwr-home")
    http_port, control_port = _free_port(), _free_port()
    env = flower_env(home, http_port, control_port)
    log = home / "superlink.log"
    proc = subprocess.Popen(
        [
            str(BIN / "flower-superlink"),
            "--insecure",
            "--simulation",
            "--isolation",
            "subprocess",
            "--control-api-address",
            f"127.0.0.1:{control_port}",
            "--host",
            "127.0.0.1",
            "--port",
            str(http_port),
            "--log-file",
            str(log),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{http_port}/health", timeout=0.5).is_success:
                break
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            stop(proc)
            pytest.fail(f"SuperLink did not start; see {log}")
        time.sleep(0.2)
    yield FlowerRunner(env, tmp_path_factory.mktemp("runs"))
    stop(proc)


def read_rounds(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "rounds.jsonl").read_text().splitlines()]
