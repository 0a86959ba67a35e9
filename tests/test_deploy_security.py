"""What keeps a local deployment to its own nodes and its own owner (deploy/, docs/security.md).

Fast tests, no Flower process: the deployment directory (mode 0700, owner and mode checked),
the PID file (name, number and start time only; a reused PID is never signalled), the commands
(``--secure``: every Runtime API authenticated, no token on a command line), the loopback guard
of the Control and Runtime APIs (an in-process ASGI call), the warm executor's time limit, and
the supervisor (real, tiny child processes).

Slow tests, real processes on 127.0.0.1: a ``--secure --warm`` deployment of one SuperNode
refuses unsigned task claims on both Runtime APIs and Control calls from another address; a
probe app's ClientApp process is SIGKILLed in the middle of a message (the message gets an
Error reply at once, the supervisor starts a new process, the next message goes through), then
hangs past its reply-timeout (an Error reply, code 8, then a fresh process again); and no
process of the deployment ever has a task token on its command line.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from deploy.commands import Commands, Layout, Settings
from deploy.files import (
    DeployDirError,
    Recorded,
    append_pid,
    private_dir,
    read_pids,
    start_time,
)
from deploy.local import LocalDeployment
from deploy.superlink_guard import LoopbackOnly, parse_allowed
from deploy.supervisor import RESTART_NOW, next_pause
from deploy.warm_parts import SETUP_SECONDS, app_timeout
from tests.conftest import ROOT

# -- the deployment directory -------------------------------------------------------------------


def test_deploy_dir_is_created_private(tmp_path: Path):
    made = private_dir(tmp_path / "deploy")
    assert made.stat().st_mode & 0o777 == 0o700 and made.stat().st_uid == os.geteuid()


def test_deploy_dir_of_ours_readable_by_others_is_tightened(tmp_path: Path):
    (tmp_path / "d").mkdir(mode=0o755)
    os.chmod(tmp_path / "d", 0o755)
    assert private_dir(tmp_path / "d").stat().st_mode & 0o777 == 0o700


@pytest.mark.parametrize("mode", [0o775, 0o757, 0o777])
def test_deploy_dir_writable_by_others_is_refused(tmp_path: Path, mode: int):
    (tmp_path / "d").mkdir()
    os.chmod(tmp_path / "d", mode)
    with pytest.raises(DeployDirError, match=f"writable by group or others \\(mode {mode:o}\\)"):
        private_dir(tmp_path / "d")
    assert (tmp_path / "d").stat().st_mode & 0o777 == mode  # left as it was


def test_deploy_dir_of_another_user_is_refused(tmp_path: Path):
    if os.geteuid() == 0:
        theirs = tmp_path / "theirs"
        theirs.mkdir(mode=0o700)
        os.chown(theirs, 65534, 65534)
        uid = 65534
    else:
        theirs, uid = Path("/"), 0  # root's, and not writable by us
    with pytest.raises(DeployDirError, match=f"owned by uid {uid}, not by us"):
        private_dir(theirs)


def test_deploy_dir_symlink_is_refused(tmp_path: Path):
    (tmp_path / "real").mkdir(mode=0o700)
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with pytest.raises(DeployDirError, match="is a symbolic link"):
        private_dir(tmp_path / "link")


def test_cli_refuses_a_deploy_dir_others_can_write(tmp_path: Path):
    (tmp_path / "d").mkdir()
    os.chmod(tmp_path / "d", 0o777)
    (tmp_path / "d" / "pids").write_text("superlink 1 1\n")  # PID 1: never to be signalled
    proc = subprocess.run(
        [sys.executable, "-m", "deploy.local", "stop"],
        env=os.environ | {"DEPLOY_DIR": str(tmp_path / "d")},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1
    assert "writable by group or others (mode 777)" in proc.stderr, proc.stderr


# -- the PID file ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "line",
    [
        "superlink $(touch /tmp/x) 5",
        "superlink 12; kill -9 1",
        "superlink -1 5",
        "superlink 12",
        "superlink 12 5 extra",
        "Superlink 12 5",
    ],
)
def test_pid_file_accepts_names_and_numbers_only(tmp_path: Path, line: str):
    pids = tmp_path / "pids"
    pids.write_text(f"supernode-0 4242 17\n{line}\n")
    os.chmod(pids, 0o600)
    with pytest.raises(DeployDirError, match="line 2: expected '<name> <pid> <start time>'"):
        read_pids(pids)


def test_pid_file_writable_by_others_is_refused(tmp_path: Path):
    pids = tmp_path / "pids"
    pids.write_text("superlink 4242 17\n")
    os.chmod(pids, 0o666)
    with pytest.raises(DeployDirError, match="not a regular file of ours"):
        read_pids(pids)


def test_stop_never_signals_a_reused_pid(tmp_path: Path):
    """A PID whose start time differs from the recorded one belongs to another process."""
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        directory = private_dir(tmp_path / "d")
        entry = append_pid(directory / "pids", "supernode-0", bystander.pid)
        assert entry == Recorded("supernode-0", bystander.pid, start_time(bystander.pid))
        stale = f"supernode-0 {bystander.pid} {entry.start + 1}\n"
        (directory / "pids").write_text(stale)
        lines = LocalDeployment(directory, Settings()).stop(quiet=True)
        assert lines == [f"supernode-0 (PID {bystander.pid}) had already exited"]
        assert bystander.poll() is None  # still running: not ours, not signalled
        assert not (directory / "pids").exists()
    finally:
        bystander.kill()
        bystander.wait()


# -- what the processes are started with ----------------------------------------------------------


def _all_commands(settings: Settings) -> dict[str, list[str]]:
    c = Commands(settings, Layout(Path("/deploy")))
    cmds = {"superlink": c.superlink(), "serverapp-executor": c.serverapp_executor(100)}
    for i in range(settings.nodes):
        cmds[f"supernode-{i}"] = c.supernode(i)
        cmds[f"executor-{i}"] = c.executor(i, 200 + i)
    return cmds


def _value(cmd: list[str], flag: str) -> str:
    return cmd[cmd.index(flag) + 1]


@pytest.mark.parametrize("warm", [False, True])
def test_secure_commands_authenticate_every_runtime_api(warm: bool):
    cmds = _all_commands(Settings(nodes=2, secure=True, warm=warm))
    secret = "--superexec-auth-secret-file"
    link = cmds["superlink"]
    assert link[1:4] == ["-m", "deploy.superlink_guard", "--"]  # loopback-only Control API
    assert "--enable-supernode-auth" in link and "--insecure" not in link
    assert _value(link, "--isolation") == "process" and _value(link, "--host") == "127.0.0.1"
    assert _value(cmds["serverapp-executor"], secret) == _value(link, secret)
    for i in range(2):
        node, executor = cmds[f"supernode-{i}"], cmds[f"executor-{i}"]
        assert _value(node, "--isolation") == "process"
        assert _value(node, secret) == f"/deploy/secrets/supernode-{i}"
        assert _value(executor, secret) == _value(node, secret)  # its own, shared with no one
        assert _value(node, "--auth-supernode-private-key") == f"/deploy/certs/supernode-{i}"
        module = "deploy.warm_executor" if warm else "deploy.cold_executor"
        assert executor[executor.index("--") + 1 :][1:3] == ["-m", module]
    secrets = [_value(c, secret) for n, c in cmds.items() if n.startswith("supernode")]
    assert len(set(secrets)) == 2
    for name, cmd in cmds.items():
        assert not [a for a in cmd if a in ("--token", "--resume-token")], name


def test_plain_commands_are_flowers_own_programs():
    settings = Settings(nodes=1)
    c = Commands(settings, Layout(Path("/deploy")))
    assert c.superlink()[:2] == [f"{settings.flower_bin}/flower-superlink", "--insecure"]
    node = c.supernode(0)
    assert node[0].endswith("/flower-supernode") and "--insecure" in node
    assert "--isolation" not in node and "--isolation" not in c.superlink()
    assert c.secret_names() == []


def test_connection_pins_the_ca_when_secure():
    secure = Commands(Settings(secure=True), Layout(Path("/d"))).connection_toml()
    assert 'root-certificates = "/d/certs/ca.crt"' in secure and "insecure" not in secure
    assert "insecure = true" in Commands(Settings(), Layout(Path("/d"))).connection_toml()


# -- the Control and Runtime APIs answer loopback only --------------------------------------------


def _call(guard: LoopbackOnly, path: str, peer: str) -> tuple[int, bytes]:
    sent: list[dict] = []

    async def send(event: dict) -> None:
        sent.append(event)

    async def receive() -> dict:
        return {"type": "http.request", "body": b""}

    scope = {"type": "http", "path": path, "client": (peer, 50000)}
    asyncio.run(guard(scope, receive, send))
    return sent[0]["status"], b"".join(e.get("body", b"") for e in sent[1:])


async def _ok_app(scope: dict, receive, send) -> None:  # noqa: ANN001
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


@pytest.mark.parametrize(
    ("path", "peer", "status"),
    [
        ("/v1/control/start-run", "127.0.0.1", 200),
        ("/v1/control/start-run", "::1", 200),
        ("/v1/control/start-run", "::ffff:127.0.0.1", 200),
        ("/v1/control/start-run", "127.0.0.2", 403),
        ("/v1/control/register-node", "203.0.113.7", 403),
        ("/v1/runtime/acquire-task", "203.0.113.7", 403),
        ("/v1/fleet/pull-messages", "203.0.113.7", 200),
        ("/health", "203.0.113.7", 200),
    ],
)
def test_guard_lets_only_loopback_reach_control_and_runtime(path: str, peer: str, status: int):
    guard = LoopbackOnly(_ok_app, allowed=parse_allowed("127.0.0.1,::1"))
    got, body = _call(guard, path, peer)
    assert got == status
    if status == 403:
        assert b"answers only the SuperLink's own machine" in body


def test_guard_addresses_are_checked():
    with pytest.raises(ValueError, match="'localhost' is not an IP address"):
        parse_allowed("127.0.0.1,localhost")
    with pytest.raises(ValueError, match="no address given"):
        parse_allowed(" , ")


# -- the warm executor's time limit ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "mtype", "seconds"),
    [
        ({"reply-timeout": 5.0}, "train.forward", 5.0),
        ({"reply-timeout": 7}, "evaluate", 7.0),
        ({"reply-timeout": 5.0}, "query.setup", SETUP_SECONDS),
        ({"reply-timeout": 900.0}, "query.setup", 900.0),
        ({}, "train.forward", 600.0),
        ({"reply-timeout": True}, "train.forward", 600.0),
        ({"reply-timeout": "5"}, "train.forward", 600.0),
        ({"reply-timeout": -1.0}, "train.forward", 600.0),
    ],
)
def test_app_timeout_follows_reply_timeout(config: dict, mtype: str, seconds: float):
    assert app_timeout(config, mtype, 600.0) == seconds


# -- the supervisor -------------------------------------------------------------------------------


def test_next_pause():
    assert next_pause(5.0, 0.1, RESTART_NOW) == 0.0
    assert next_pause(0.0, 1.0, -9) == 0.5
    assert next_pause(0.5, 1.0, 1) == 1.0
    assert next_pause(20.0, 1.0, 1) == 30.0
    assert next_pause(20.0, 60.0, 1) == 0.5  # lived long: start over


CHILD = """
import os, sys
from pathlib import Path
runs = Path(sys.argv[1])
n = len(runs.read_text().split()) if runs.exists() else 0
runs.write_text(runs.read_text() + f"{os.getpid()} " if runs.exists() else f"{os.getpid()} ")
codes = [int(c) for c in sys.argv[2].split(",")]
code = codes[n]
if code < 0:
    os.kill(os.getpid(), -code)
sys.exit(code)
"""


def _supervise(tmp_path: Path, codes: str, timeout: float = 30) -> tuple[list[str], str]:
    runs = tmp_path / "runs"
    proc = subprocess.run(
        [sys.executable, "-m", "deploy.supervisor", "--name", "probe", "--"]
        + [sys.executable, "-c", CHILD, str(runs), codes],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stderr
    return runs.read_text().split(), proc.stdout


def test_supervisor_restarts_a_child_that_died_until_it_stops_cleanly(tmp_path: Path):
    pids, log = _supervise(tmp_path, f"-{int(signal.SIGKILL)},{RESTART_NOW},3,0")
    assert len(pids) == 4 and len(set(pids)) == 4  # four processes, one after the other
    assert f"(PID {pids[0]}) exited with signal SIGKILL; restarting in 0.5 s" in log
    assert f"(PID {pids[1]}) exited with status 75; restarting in 0.0 s" in log
    assert f"(PID {pids[2]}) exited with status 3; restarting in 0.5 s" in log
    assert f"probe (PID {pids[3]}) stopped; exiting" in log


def test_supervisor_stops_its_child_on_sigterm(tmp_path: Path):
    pid_file = tmp_path / "child"
    child = f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(60)"
    sup = subprocess.Popen(
        [sys.executable, "-m", "deploy.supervisor", "--", sys.executable, "-c", child],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 20
        while not pid_file.exists() or not pid_file.read_text():
            assert time.monotonic() < deadline and sup.poll() is None
            time.sleep(0.05)
        child_pid = int(pid_file.read_text())
        sup.send_signal(signal.SIGTERM)
        assert sup.wait(timeout=30) == 0
        assert not Path(f"/proc/{child_pid}").exists() or _zombie(child_pid)
        assert "supervisor: SIGTERM; stopping executor" in sup.stdout.read()
    finally:
        if sup.poll() is None:
            sup.kill()
            sup.wait()


def _zombie(pid: int) -> bool:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"

