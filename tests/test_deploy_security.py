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
import json
import os
import signal
import ssl
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from deploy.commands import Commands, Layout, Settings
from deploy.files import (
    DeployDirError,
    Recorded,
    append_pid,
    is_running,
    private_dir,
    read_pids,
    start_time,
)
from deploy.local import LocalDeployment
from deploy.local_superlink import free_port, free_port_block, write_app
from deploy.processes import descendants
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


# -- real processes: a --secure --warm deployment of one SuperNode --------------------------------


@pytest.fixture(scope="module")
def secure_warm(tmp_path_factory: pytest.TempPathFactory):
    directory = tmp_path_factory.mktemp("secure-warm") / "deploy"
    settings = Settings(
        nodes=1,
        secure=True,
        warm=True,
        superlink_port=free_port(),
        supernode_base_port=free_port_block(1),
    )
    dep = LocalDeployment(directory, settings)
    with dep:
        recorded = read_pids(dep.at.pids)
        yield dep
    assert not [e for e in recorded if is_running(e)]  # stopped, every one of them
    assert not dep.at.pids.exists()


def _acquire_unsigned(address: str, ca: Path | None) -> str:
    """An AcquireTask without the SuperExec signature: what another local user could send."""
    from flwr.proto.runtime_pb2 import AcquireTaskRequest
    from flwr.supercore.constant import TaskType
    from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor
    from flwr.supercore.runtime import RuntimeHttpClient

    from deploy.runtime_api import retry_invoker

    invoker = retry_invoker(max_time=10)
    invoker.max_tries = 1
    client = RuntimeHttpClient.from_server_address(
        server_address=address,
        insecure=ca is None,
        root_certificates=ca.read_bytes() if ca else None,
        interceptors=[RuntimeVersionHttpInterceptor(component_name="SuperExec")],
        retry_invoker=invoker,
    )
    types = [TaskType.CLIENT_APP, TaskType.SERVER_APP]
    with pytest.raises(httpx.HTTPStatusError) as refused:
        client.AcquireTask(AcquireTaskRequest(supported_task_types=types))
    client.close()
    return f"{refused.value.response.status_code} {refused.value.response.text}"


PROTOBUF = {"content-type": "application/protobuf"}  # an empty ListRunsRequest


@pytest.mark.slow
def test_secure_deployment_closes_its_doors(secure_warm: LocalDeployment):
    dep, ca = secure_warm, secure_warm.certs / "ca.crt"
    assert dep.dir.stat().st_mode & 0o777 == 0o700
    for path in [*dep.at.secrets.iterdir(), dep.certs / "ca.key", dep.certs / "supernode-0"]:
        assert path.stat().st_mode & 0o777 == 0o600, path
    # Neither Runtime API hands a task to a caller without the secret.
    node_api = f"127.0.0.1:{dep.commands.node_port(0)}"
    assert _acquire_unsigned(node_api, None).startswith("401 ")
    assert _acquire_unsigned(f"127.0.0.1:{dep.port}", ca).startswith("401 ")
    # The Control API answers the SuperLink's machine (127.0.0.1) only; Fleet and health anyone.
    verify = ssl.create_default_context(cafile=ca)
    for source, status in (("127.0.0.1", 200), ("127.0.0.2", 403)):
        transport = httpx.HTTPTransport(local_address=source, verify=verify)
        with httpx.Client(transport=transport, base_url=f"https://127.0.0.1:{dep.port}") as http:
            listed = http.post("/v1/control/list-runs", content=b"", headers=PROTOBUF)
            assert listed.status_code == status, (source, listed.text)
            assert http.get("/health").status_code == 200
    assert dep.flwr("ls", "local-deployment").returncode == 0


PROBE_APP = '''\
"""A warm executor's bad days: its ClientApp process is killed mid-message, then hangs."""

import json
import os
import time
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

client = ClientApp()
server = ServerApp()


@client.query("pid")
def pid(msg: Message, context: Context) -> Message:
    return Message(RecordDict({"c": ConfigRecord({"pid": os.getpid()})}), reply_to=msg)


@client.query("stall")
def stall(msg: Message, context: Context) -> Message:
    Path(context.run_config["marker"]).write_text(str(os.getpid()))  # the test kills us now
    time.sleep(600)
    return Message(RecordDict(), reply_to=msg)


@client.query("hang")
def hang(msg: Message, context: Context) -> Message:
    time.sleep(600)  # far past reply-timeout
    return Message(RecordDict(), reply_to=msg)


def ask(grid: Grid, node: int, mtype: str) -> dict:
    start = time.monotonic()
    ids = list(grid.push_messages([Message(RecordDict(), dst_node_id=node, message_type=mtype)]))
    while not (replies := list(grid.pull_messages(ids))):
        if time.monotonic() > start + 240:
            raise TimeoutError(mtype)
        time.sleep(0.02)
    reply, out = replies[0], {"type": mtype, "seconds": time.monotonic() - start}
    if reply.has_error():
        out["error"] = [int(reply.error.code), reply.error.reason]
    else:
        out["pid"] = reply.content["c"]["pid"]
    return out


@server.main()
def main(grid: Grid, context: Context) -> None:
    while not list(grid.get_node_ids()):
        time.sleep(0.1)
    node = sorted(grid.get_node_ids())[0]
    steps = ["query.pid", "query.stall", "query.pid", "query.hang", "query.pid"]
    out = [ask(grid, node, mtype) for mtype in steps]
    Path(context.run_config["out"]).write_text(json.dumps(out))
'''


def _cmdlines(roots: list[int]) -> dict[int, list[str]]:
    found = {}
    for pid in [*roots, *descendants(roots)]:
        try:
            found[pid] = Path(f"/proc/{pid}/cmdline").read_text().split("\0")
        except OSError:
            pass
    return found


def _parent(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


@pytest.mark.slow
def test_killed_and_hung_client_apps_never_block_their_node(
    secure_warm: LocalDeployment, tmp_path: Path
):
    """SIGKILL the warm ClientApp process mid-message: that message gets an Error reply (code 8)
    at once, the supervisor starts a new process, the next message goes through. Then a handler
    hangs past reply-timeout (5 s): an Error reply (code 8), a fresh process, the next message
    goes through. The run finishes; no process ever had a task token on its command line."""
    dep = secure_warm
    marker, out = tmp_path / "marker", tmp_path / "out.json"
    app = write_app(
        tmp_path / "probe", "warm-probe", "warm_probe", PROBE_APP,
        'marker = ""\nout = ""\nreply-timeout = 5.0\n',
    )  # fmt: skip
    config = f"marker='{marker}' out='{out}'"
    started = dep.flwr(
        "run", str(app), "local-deployment", "--format", "json", "--run-config", config
    )
    run_id = json.loads(started.stdout)["run-id"]
    supervisor = dep.pids()["executor-0"]
    seen: dict[int, list[str]] = {}
    deadline = time.monotonic() + 240
    while not marker.exists() or not marker.read_text():
        assert time.monotonic() < deadline, (
            "the stall handler never ran\n" + dep.at.log("executor-0").read_text()
        )
        seen |= _cmdlines(list(dep.pids().values()))
        time.sleep(0.2)
    victim = int(marker.read_text())
    assert _parent(victim) == supervisor  # the warm process itself, a child of its supervisor
    seen |= _cmdlines(list(dep.pids().values()))
    os.kill(victim, signal.SIGKILL)
    while not out.exists():
        assert time.monotonic() < deadline, dep.at.log("executor-0").read_text()[-3000:]
        time.sleep(0.5)
    steps = json.loads(out.read_text())
    print(f"\n[warm-probe] {steps}")
    first, killed, second, hung, third = steps
    assert first["pid"] == victim
    assert killed["error"][0] == 8 and "died while handling this message" in killed["error"][1]
    assert killed["seconds"] < 45  # Flower alone answers after its 60 s heartbeat timeout
    assert second["pid"] not in (None, victim)
    assert hung["error"][0] == 8 and "did not answer within 5 s (reply-timeout)" in hung["error"][1]
    assert 5 <= hung["seconds"] < 45
    assert third["pid"] not in (None, victim, second["pid"])
    log = dep.at.log("executor-0").read_text()
    assert f"(PID {victim}) exited with signal SIGKILL; restarting" in log
    assert f"(PID {second['pid']}) exited with status 75; restarting in 0.0 s" in log
    assert dep.pids()["executor-0"] == supervisor and _parent(third["pid"]) == supervisor

    deadline = time.monotonic() + 60
    while True:
        runs = json.loads(dep.flwr("ls", "local-deployment", "--format", "json").stdout)["runs"]
        status = next(r["status"] for r in runs if r["run-id"] == run_id)
        if status.startswith("finished") or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert status == "finished:completed"
    argvs = [" ".join(argv) for argv in seen.values()]
    assert not [a for a in argvs if "--token " in f"{a} " or "--resume-token" in a], argvs
    assert [a for a in argvs if "serverapp" in a and "--token-file" in a], argvs  # the ServerApp
