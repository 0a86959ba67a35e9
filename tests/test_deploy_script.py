"""scripts/deploy_local.sh (``python -m deploy.local``) for real: TLS with SuperNode
authentication and authenticated executors, the insecure default, and the opt-in warm ClientApp
executor (deploy/warm_executor.py). The doors ``--secure`` closes: tests/test_deploy_security.py.

Real processes on loopback, no mocks: each deployment gets free ports and a DEPLOY_DIR of its
own, and is stopped by `scripts/deploy_local.sh stop` (by the PIDs it recorded) in its fixture's
teardown, which then checks that every recorded PID is gone. `flwr run --stream` exits 0 even
when the run fails, so runs are judged by their rounds.jsonl.

The runs of the secure deployment (one fresh `flwr-clientapp` per message, started by
deploy/cold_executor.py) and of the warm one must train the same model, bit for bit: the warm
process keeps the app's clients live between messages, the cold path rebuilds them from
`context.state` for every message.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import ssl
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import torch

from deploy.files import read_pids
from deploy.local_superlink import (
    APP_ROOT,
    BIN,
    free_port,
    free_port_block,
    listen_port_range,
    process_alive,
    run_flwr,
    write_app,
)
from flower_app.results import read_rounds
from tests.conftest import ROOT, data_dir

SCRIPT = ROOT / "scripts" / "deploy_local.sh"
CONNECTION = "local-deployment"
NODES = 2
RUN_CONFIG = {
    "depth": 8,
    "cut": 1,
    "batch-size": 32,
    "lr": 0.05,
    "samples-per-client": 32,  # one batch: on the stock path each message is a fresh process
    "test-samples": 32,
    "num-rounds": 1,
    "chunk-mib": 64.0,
    "client-threads": 1,
    "server-threads": 1,
    "min-clients": NODES,
    "checkpoint-every": 0,  # one message less per run: each costs seconds on the stock path
    "chunk-taper": False,  # one chunk per client, likewise
}
STOCK_MODELS: dict[str, Path] = {}  # method -> model.pt of the secure (cold executor) run


def _plain(text: str) -> str:
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


class Deployment:
    """One `deploy_local.sh` deployment: its settings, files, and the commands run against it."""

    def __init__(self, directory: Path, flags: list[str]) -> None:
        self.dir, self.flags = directory, flags
        self.port, self.base = free_port(), free_port_block(NODES)
        self.home = directory / "flwr-home"
        self.certs = directory / "certs"
        self.env = os.environ | {
            "DEPLOY_DIR": str(directory),
            "SUPERLINK_PORT": str(self.port),
            "SUPERNODE_BASE_PORT": str(self.base),
            "DATA_DIR": data_dir(),
            "FLOWER_BIN": str(BIN),
            "FLWR_HOME": str(self.home),
            "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        }
        self.recorded: dict[str, int] = {}
        self.apps_run: set[Path] = set()

    def script(self, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(SCRIPT), *args], env=self.env, capture_output=True, text=True, timeout=timeout
        )

    def flwr(self, *args: str, home: Path | None = None, timeout: float = 60):
        return run_flwr(self.env | {"FLWR_HOME": str(home or self.home)}, *args, timeout=timeout)

    def pids(self) -> dict[str, int]:
        return {e.name: e.pid for e in read_pids(self.dir / "pids")}

    def mode(self) -> dict[str, bool]:
        state = json.loads((self.dir / "deployment.json").read_text())
        return {"secure": state["secure"], "warm": state["warm"]}

    def online_nodes(self) -> list[str]:
        proc = self.flwr("supernode", "ls", CONNECTION, "--format", "json")
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return [n["node-id"] for n in json.loads(proc.stdout)["nodes"] if n["status"] == "online"]

    def logs(self) -> str:
        return "\n".join(
            f"--- {p.name}\n{_plain(p.read_text())[-2500:]}" for p in sorted(self.dir.glob("*.log"))
        )

    def run(self, app: Path, run_config: str, timeout: float = 600) -> tuple[str, float]:
        start = time.monotonic()
        proc = self.flwr(
            "run", str(app), CONNECTION, "--stream", "--run-config", run_config, timeout=timeout
        )
        log = proc.stdout + proc.stderr
        assert proc.returncode == 0, log[-3000:]
        self.apps_run.add(app)
        return log, time.monotonic() - start

    def run_apps(self, methods: list[str], out: Path) -> dict[str, dict]:
        """One round of the split-learning app per method, one run after the other (at once,
        they only compete for the 2 cores); returns each (checked) round record."""
        tag = "-".join(f.strip("-") for f in self.flags) or "insecure"
        records = {}
        for method in methods:
            name = f"{tag}-{method}"
            config = RUN_CONFIG | {
                "method": method,
                "output-dir": str(out),
                "run-name": name,
                "data-dir": data_dir(),
            }
            log, seconds = self.run(
                APP_ROOT, " ".join(f"{k}={json.dumps(v)}" for k, v in config.items())
            )
            rounds = read_rounds(out / name) if (out / name / "rounds.jsonl").exists() else []
            assert len(rounds) == 1, log[-3000:] + self.logs()
            r = rounds[0]
            assert r["round"] == 1 and r["method"] == method
            assert r["num_clients"] == NODES and r["failed_clients"] == 0, r["failures"]
            assert r["train_examples"] == NODES * RUN_CONFIG["samples-per-client"]
            print(f"\n[{name}] flwr run {seconds:.1f} s, round {r['round_seconds']:.1f} s")
            records[method] = r | {"model": out / name / "model.pt"}
        return records


def _deploy(directory: Path, flags: list[str]):
    """Start, yield, stop; the teardown checks every PID the script recorded is gone."""
    dep = Deployment(directory, flags)
    try:
        started = dep.script("start", str(NODES), *flags)
        dep.recorded = dep.pids()
        if started.returncode != 0:
            pytest.fail(f"start failed:\n{started.stdout}{started.stderr}\n{dep.logs()}")
        assert "Run the app with:" in started.stdout
        yield dep
    finally:
        stopped = dep.script("stop")
        assert stopped.returncode == 0, stopped.stdout + stopped.stderr
        left = [f"{n} {p}" for n, p in dep.recorded.items() if process_alive(p)]
        assert not left, f"still running after stop: {left}"
        assert not (directory / "pids").exists()


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("runs")


@pytest.fixture(scope="class")
def secure(tmp_path_factory: pytest.TempPathFactory):
    yield from _deploy(tmp_path_factory.mktemp("secure"), ["--secure"])


@pytest.fixture(scope="class")
def warm(tmp_path_factory: pytest.TempPathFactory):
    yield from _deploy(tmp_path_factory.mktemp("warm"), ["--warm"])


def _cmdline(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/cmdline").read_text().split("\0")


def _parent(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


class TestSecure:
    def test_certificates_keys_and_connection(self, secure: Deployment):
        certs = secure.certs
        for name in ("ca.crt", "ca.key", "server.pem", "server.key"):
            assert (certs / name).stat().st_size > 0, name
        for i in range(NODES):
            assert (certs / f"supernode-{i}.pub").read_text().startswith("ecdsa-sha2-nistp384 ")
            assert "PRIVATE KEY" in (certs / f"supernode-{i}").read_text()
        verify = subprocess.run(
            ["openssl", "verify", "-CAfile", str(certs / "ca.crt"), str(certs / "server.pem")],
            capture_output=True,
            text=True,
        )
        assert verify.returncode == 0, verify.stdout + verify.stderr
        sans = subprocess.run(
            [
                "openssl",
                "x509",
                "-in",
                str(certs / "server.pem"),
                "-noout",
                "-ext",
                "subjectAltName",
            ],
            capture_output=True,
            text=True,
        ).stdout
        assert all(s in sans for s in ("DNS:localhost", "IP Address:127.0.0.1", "IP Address:0:0"))

        config = (secure.home / "config.toml").read_text()
        assert f'root-certificates = "{certs / "ca.crt"}"' in config
        assert Path(re.search(r'root-certificates = "(.+)"', config).group(1)).is_absolute()
        assert "insecure" not in config
        assert secure.mode() == {"secure": True, "warm": False}

        pids = secure.pids()
        assert list(pids) == [
            "superlink",
            "serverapp-executor",
            *(f"supernode-{i}" for i in range(NODES)),
            *(f"executor-{i}" for i in range(NODES)),
        ]
        superlink = _cmdline(pids["superlink"])
        assert superlink[1:3] == ["-m", "deploy.superlink_guard"]
        for flag in (
            "--ssl-ca-certfile",
            "--ssl-certfile",
            "--ssl-keyfile",
            "--enable-supernode-auth",
            "--superexec-auth-secret-file",
        ):
            assert flag in superlink
        assert "--insecure" not in superlink
        assert superlink[superlink.index("--isolation") + 1] == "process"
        for i in range(NODES):
            cmd = _cmdline(pids[f"supernode-{i}"])
            assert cmd[cmd.index("--root-certificates") + 1] == str(certs / "ca.crt")
            key = cmd[cmd.index("--auth-supernode-private-key") + 1]
            assert key == str(certs / f"supernode-{i}")
            assert cmd[cmd.index("--isolation") + 1] == "process"
            executor = _cmdline(pids[f"executor-{i}"])
            assert executor[executor.index("--") + 1 :][1:3] == ["-m", "deploy.cold_executor"]
        assert len(secure.online_nodes()) == NODES
        status = secure.script("status")
        assert "SuperLink health: ok" in status.stdout  # https, checked against ca.crt
        assert (
            "mode: secure=1 warm=0" in status.stdout
            and _plain(status.stdout).count("online") == NODES
        )

    def test_plain_http_and_insecure_client_refused(self, secure: Deployment, tmp_path: Path):
        ca = ssl.create_default_context(cafile=secure.certs / "ca.crt")
        assert httpx.get(f"https://127.0.0.1:{secure.port}/health", verify=ca).is_success
        with pytest.raises(httpx.HTTPError):  # plain HTTP to the TLS port
            httpx.get(f"http://127.0.0.1:{secure.port}/health", timeout=10)
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            httpx.get(f"https://127.0.0.1:{secure.port}/health", timeout=10)  # system CAs only

        # `flwr` with an `insecure = true` connection to the same SuperLink
        (tmp_path / "config.toml").write_text(
            f'[superlink]\ndefault = "plain"\n\n[superlink.plain]\n'
            f'address = "127.0.0.1:{secure.port}"\ninsecure = true\n'
        )
        plain = secure.flwr("ls", "plain", home=tmp_path)
        assert plain.returncode != 0
        assert "Connection to the SuperLink is unavailable" in _plain(plain.stdout + plain.stderr)
        assert secure.flwr("ls", CONNECTION).returncode == 0  # the CA-pinned connection works

    def test_unregistered_supernode_refused(self, secure: Deployment, tmp_path: Path):
        key = tmp_path / "rogue"
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ecdsa", "-b", "384", "-N", "", "-f", str(key)], check=True
        )
        log = tmp_path / "rogue.log"
        with log.open("wb") as fh:
            proc = subprocess.Popen(
                [
                    str(BIN / "flower-supernode"),
                    "--root-certificates", str(secure.certs / "ca.crt"),
                    "--auth-supernode-private-key", str(key),
                    "--superlink", f"127.0.0.1:{secure.port}",
                    "--host", "127.0.0.1",
                    "--port", str(free_port()),
                    "--node-config", f"partition-id=0 num-partitions={NODES}",
                ],
                env=secure.env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        try:
            code = proc.wait(timeout=90)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        text = _plain(log.read_text())
        # Flower logs its exit code (305) and exits with status 1.
        assert code == 1, text[-2000:]
        assert "Exit Code: 305" in text and "Failed to activate SuperNode" in text, text[-2000:]
        assert len(secure.online_nodes()) == NODES  # the registered ones only

    @pytest.mark.slow
    def test_secure_runs(self, secure: Deployment, runs: Path):
        """DSL and CSL end to end through TLS, one fresh ClientApp process per message."""
        records = secure.run_apps(["dsl", "csl"], runs)
        assert records["dsl"]["bytes_gradients"] == 0
        assert records["csl"]["bytes_gradients"] == records["csl"]["bytes_activations"] > 0
        STOCK_MODELS.update({m: r["model"] for m, r in records.items()})


def test_insecure_start_status_stop(tmp_path: Path):
    """`start 2` (no flags) is the loopback deployment it always was; status and stop work."""
    gen = _deploy(tmp_path / "plain", [])
    dep = next(gen)
    try:
        config = (dep.home / "config.toml").read_text()
        assert "insecure = true" in config and "root-certificates" not in config
        assert dep.mode() == {"secure": False, "warm": False}
        assert not dep.certs.exists()
        assert httpx.get(f"http://127.0.0.1:{dep.port}/health").is_success
        pids = dep.pids()
        for i in range(NODES):
            cmd = _cmdline(pids[f"supernode-{i}"])
            assert "--insecure" in cmd and "--isolation" not in cmd
            assert cmd[1].endswith("flower-supernode")
        status = dep.script("status")
        assert "SuperLink health: ok" in status.stdout
        assert "mode: secure=0 warm=0" in status.stdout
        assert _plain(status.stdout).count("online") == NODES
    finally:
        next(gen, None)  # stop, and check every PID is gone
    assert "not running" in dep.script("status").stdout


PROBE_APP = '''\
"""Asks each node for its ClientApp process id, makes its ClientApp raise, asks again."""

import json
import os
import time

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

client = ClientApp()
server = ServerApp()


@client.query("boom")
def boom(msg: Message, context: Context) -> Message:
    raise ValueError("boom on purpose")


@client.query("pid")
def pid(msg: Message, context: Context) -> Message:
    return Message(RecordDict({"c": ConfigRecord({"pid": os.getpid()})}), reply_to=msg)


def ask(grid: Grid, node: int, mtype: str) -> Message:
    ids = list(grid.push_messages([Message(RecordDict(), dst_node_id=node, message_type=mtype)]))
    deadline = time.monotonic() + 120
    while not (replies := list(grid.pull_messages(ids))):
        if time.monotonic() > deadline:
            raise TimeoutError(mtype)
        time.sleep(0.01)
    return replies[0]


@server.main()
def main(grid: Grid, context: Context) -> None:
    while len(list(grid.get_node_ids())) < 2:
        time.sleep(0.1)
    out = {}
    for node in sorted(grid.get_node_ids()):
        before, err, after = (ask(grid, node, t) for t in ("query.pid", "query.boom", "query.pid"))
        out[str(node)] = {
            "pids": [r.content["c"]["pid"] for r in (before, after)],
            "error": [int(err.error.code), err.error.reason] if err.has_error() else None,
        }
    with open(context.run_config["out"], "w") as fh:
        json.dump(out, fh)
'''


class TestWarm:
    @pytest.mark.slow
    def test_warm_runs_equal_stock(self, warm: Deployment, runs: Path):
        """The same models as the cold executor's runs, every message served by one process."""
        records = warm.run_apps(["dsl", "csl"], runs)
        for r in records.values():
            assert r["client_rebuilds"] == 0  # the live clients were used: no rebuild from state
        pids = warm.pids()
        assert list(pids) == [
            "superlink",
            "serverapp-executor",
            *(f"supernode-{i}" for i in range(NODES)),
            *(f"executor-{i}" for i in range(NODES)),
        ]
        assert pids == warm.recorded and all(process_alive(p) for p in pids.values())
        for i in range(NODES):
            supernode = _plain((warm.dir / f"supernode-{i}.log").read_text())
            executor = _plain((warm.dir / f"executor-{i}.log").read_text())
            assert "Start `flwr-clientapp` process" not in supernode + executor
            assert executor.count("supervisor: started") == 1  # one process, never restarted
            served = len(re.findall(r"warm executor: message \d+ ", executor))
            assert supernode.count("Receiving: ") == served > 0
            assert "--isolation" in _cmdline(pids[f"supernode-{i}"])

        missing = [m for m in records if m not in STOCK_MODELS]
        if missing:
            pytest.skip(f"no stock run of {missing} to compare with (test_secure_runs deselected)")
        for method, r in records.items():
            stock, ours = torch.load(STOCK_MODELS[method]), torch.load(r["model"])
            for part in ("client", "server_segment"):
                assert stock[part].keys() == ours[part].keys()
                for key, value in stock[part].items():
                    assert torch.equal(value, ours[part][key]), f"{method} {part}.{key}"

    @pytest.mark.slow
    def test_raising_app_and_app_change(self, warm: Deployment, tmp_path: Path):
        """A ClientApp that raises gets an Error reply back and the process lives on; a run of
        another app (another FAB) replaces the warm process by a fresh one (fresh modules),
        which its supervisor starts."""
        app = tmp_path / "probe"
        app.mkdir()
        write_app(app, "warm-probe", "warm_probe", PROBE_APP, 'out = ""\n')
        out = tmp_path / "probe.json"
        app_changed = APP_ROOT in warm.apps_run  # the executors hold the split-learning app
        log, _ = warm.run(app, f"out='{out}'", timeout=300)
        assert out.exists(), log[-3000:] + warm.logs()
        result = json.loads(out.read_text())
        supervisors = {warm.pids()[f"executor-{i}"] for i in range(NODES)}
        assert len(result) == NODES
        for node in result.values():
            assert node["error"][0] == 2  # ErrorCode.CLIENT_APP_RAISED_EXCEPTION
            assert "boom on purpose" in node["error"][1]
            assert node["pids"][0] == node["pids"][1]  # the same process before and after
        assert {_parent(n["pids"][0]) for n in result.values()} == supervisors
        for i in range(NODES):
            executor = _plain((warm.dir / f"executor-{i}.log").read_text())
            assert "ValueError: boom on purpose" in executor
            assert ("restarting, the app changed" in executor) == app_changed
            assert ("exited with status 75; restarting in 0.0 s" in executor) == app_changed


def test_free_ports_lie_above_rays_and_below_the_kernels_and_bind():
    ports = listen_port_range()
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    assert ports.start == 20000 and ports.stop == max(20000, low)
    base = free_port_block(4)
    assert base in ports and base + 3 in ports
    for port in range(base, base + 4):
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))
