"""A warm ClientApp executor for ``flower-supernode --isolation process`` (flwr 1.42.0 only).

Flower's own executor (``flower-superexec``) starts a fresh ``flwr-clientapp --token T`` process
for every message a SuperNode receives; that process imports torch and the app, handles ONE
message and exits (flwr/supernode/runtime/run_clientapp.py). This executor does the same work
in ONE long-lived process per SuperNode, so imports, the loaded ClientApp and the app's own
module-level caches (our ClientApp keeps its SplitClients warm) survive between messages:

    loop: AcquireTask (claims a task, gets its token)
          -> PullTaskInput (context, run, FAB; activates the task)
          -> PullMessages, retried while empty (the SuperNode creates the task just before it
             stores the message), then the message's objects (fast back-off)
          -> run the ClientApp -> PushMessages + PushObject (the reply; an Error reply when the
             app raised, as flwr-clientapp does: without a reply the SuperNode waits forever)
          -> PushTaskOutput (the context, so ``context.state`` is kept by the SuperNode)

The executor only uses the SuperNode's Runtime API, as Flower's executor and flwr-clientapp do.
When a task belongs to a FAB other than the loaded one (the
app's code changed), the process re-executes itself and hands the claimed task over, so app
modules are never reloaded in place. A heartbeat thread keeps long tasks alive (the SuperNode
fails a running task after 60 s without one). SIGTERM/SIGINT, or the SuperNode's exit
(--parent-pid), end the process; a task in progress gets an Error reply first (code 8).

Start one per SuperNode (``scripts/deploy_local.sh start N --warm`` does it):

    python -m flower_app.warm_executor supernode --insecure --superlink HOST:PORT \\
        --isolation process --port 9310 ...       # or plain `flower-supernode ...`
    python -m flower_app.warm_executor --runtime-api-address 127.0.0.1:9310 --insecure \\
        --parent-pid <SuperNode PID>

``warm_executor supernode`` is Flower's SuperNode, and ``warm_executor serverapp`` Flower's
``flwr-serverapp`` (deploy_local.sh puts a ``flwr-serverapp`` that runs it first on the
SuperLink's PATH), with the sleeps flwr hard-codes on the message path shortened (see
``supernode_main``, ``serverapp_main``): with a warm ClientApp they are most of what is left of
a round trip. Measurements: docs/deployment.md.

This uses flwr internals (the Runtime API client, serde, object pulls): it refuses to start on
any flwr other than the one it was written and tested against.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
from logging import ERROR, INFO, WARNING
from pathlib import Path

FLWR_VERSION = "1.42.0"
MESSAGE_WAIT_SECONDS = 60.0  # PullMessages stays empty this long: give the task up
HEARTBEAT_SECONDS = 10.0  # Flower fails a running task after 2 x 30 s without a heartbeat
TASK_RETRY_SECONDS = 60.0  # a Runtime API call of a task retries (transport errors) this long


class Stop(BaseException):
    """SIGTERM/SIGINT: finish the task in progress with an Error reply, then exit."""


def _on_signal(signum: int, _frame: object) -> None:
    raise Stop(signal.Signals(signum).name)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m flower_app.warm_executor",
        description="One long-lived ClientApp process for a SuperNode in --isolation process.",
    )
    parser.add_argument("--runtime-api-address", required=True, help="the SuperNode's --port")
    tls = parser.add_mutually_exclusive_group(required=True)
    tls.add_argument("--insecure", action="store_true", help="plain HTTP to the Runtime API")
    tls.add_argument("--root-certificates", help="CA of a TLS Runtime API (--ssl-certfile)")
    parser.add_argument(
        "--parent-pid", type=int, help="exit when this process (the SuperNode) does"
    )
    parser.add_argument(
        "--poll-interval",
        type=float,
        default=0.25,
        help="longest wait between AcquireTask polls (5 ms right after a task, then a tenth "
        "of the time idle)",
    )
    parser.add_argument("--resume-token", help=argparse.SUPPRESS)  # a task handed over on re-exec
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    import flwr

    if flwr.__version__ != FLWR_VERSION:
        print(
            f"warm_executor: written for flwr {FLWR_VERSION}, found {flwr.__version__}; "
            "use Flower's own executor (scripts/deploy_local.sh start without --warm)",
            file=sys.stderr,
        )
        return 2
    # `python -m flower_app.warm_executor` imported the package `flower_app` from wherever this
    # file lives. Apps must come from the run's FAB (as in flwr-clientapp/flwr-serverapp), so
    # forget it: `flower_app.client_app` is then imported afresh from the FAB's directory.
    for name in [m for m in sys.modules if m == "flower_app" or m.startswith("flower_app.")]:
        del sys.modules[name]
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["supernode"]:
        return supernode_main(argv[1:])
    if argv[:1] == ["serverapp"]:
        return serverapp_main(argv[1:])
    args = _parse_args(argv)
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    if args.parent_pid is not None:
        from flwr.supercore.app_utils import start_parent_process_monitor

        start_parent_process_monitor(args.parent_pid)  # SIGINT when the SuperNode is gone
    from flwr.supercore.logger import update_console_handler

    update_console_handler(timestamps=True)
    executor = WarmExecutor(args)
    try:
        executor.run()
    except Stop as stop:
        executor.log(INFO, "warm executor: %s, exiting", stop)
    finally:
        executor.close()
    return 0


def _retry_invoker(max_time: float | None):  # noqa: ANN202
    """Retry transport errors and 502/503/504 with back-off; give up on other HTTP errors.

    Not flwr's ``make_simple_http_retry_invoker``: on a 401 (e.g. the token of a task the
    SuperNode already failed) it SIGINTs its own process, right for a one-message flwr-clientapp,
    wrong for a process that should only drop that task.
    """
    import httpx
    from flwr.supercore.retry import RetryInvoker, exponential

    def should_giveup(exc: Exception) -> bool:
        if isinstance(exc, httpx.HTTPStatusError):
            return exc.response.status_code not in (502, 503, 504)
        return False

    return RetryInvoker(
        lambda: exponential(base_delay=0.1, max_delay=5),
        (httpx.TransportError, httpx.HTTPStatusError),
        max_tries=None,
        max_time=max_time,
        should_giveup=should_giveup,
    )


class _TaskToken:
    """Like flwr's RuntimeTokenHttpInterceptor, with a token that changes per task."""

    def __init__(self) -> None:
        self.token = ""

    def intercept(self, context, call_next):  # noqa: ANN001, ANN201 (flwr's interceptor API)
        from flwr.supercore.constant import TASK_TOKEN_HEADER
        from flwr.supercore.interceptors.http.utils import add_headers

        add_headers(context.request, {TASK_TOKEN_HEADER: self.token})
        return call_next(context)


class WarmExecutor:
    def __init__(self, args: argparse.Namespace) -> None:
        from flwr.supercore import log
        from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor
        from flwr.supercore.runtime import RuntimeHttpClient
        from flwr.supercore.tls import validate_and_resolve_root_certificates

        self.args = args
        self.log = log
        certificates = validate_and_resolve_root_certificates(args.root_certificates, args.insecure)
        self.token = _TaskToken()
        self.retry_invoker = _retry_invoker(max_time=TASK_RETRY_SECONDS)
        # What flower-superexec uses to claim tasks, and what flwr-clientapp uses for a task.
        self.superexec = RuntimeHttpClient.from_server_address(
            server_address=args.runtime_api_address,
            insecure=args.insecure,
            root_certificates=certificates,
            interceptors=[RuntimeVersionHttpInterceptor(component_name="SuperExec")],
            retry_invoker=_retry_invoker(max_time=None),
        )
        self.client = RuntimeHttpClient.from_server_address(
            server_address=args.runtime_api_address,
            insecure=args.insecure,
            root_certificates=certificates,
            interceptors=[
                RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
                self.token,
            ],
            retry_invoker=self.retry_invoker,
        )
        self.fab_hash: str | None = None  # the FAB whose ClientApp this process has loaded
        self.client_app = None
        self.messages = 0
        from flwr.proto.runtime_pb2 import SendTaskHeartbeatRequest

        self._heartbeat_request = SendTaskHeartbeatRequest()
        self._beat = threading.Event()  # set while a task runs: the heartbeat thread beats
        self._closed = threading.Event()
        threading.Thread(target=self._heartbeats, name="task-heartbeat", daemon=True).start()

    # -- the loop ------------------------------------------------------------------------------
    def run(self) -> None:
        from flwr.proto.runtime_pb2 import AcquireTaskRequest
        from flwr.supercore.constant import TaskType

        self.log(
            INFO,
            "warm executor: PID %s, Runtime API %s",
            os.getpid(),
            self.args.runtime_api_address,
        )
        if self.args.resume_token:
            self.handle(self.args.resume_token)
        request = AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP])
        last_task = time.monotonic()
        while True:
            res = self.superexec.AcquireTask(request)
            if res.HasField("task") and res.token:
                task_fab = res.task.fab_hash if res.task.HasField("fab_hash") else ""
                if self.fab_hash is not None and task_fab and task_fab != self.fab_hash:
                    self.restart(res.token, f"the app changed (FAB {task_fab[:12]})")
                self.handle(res.token)
                last_task = time.monotonic()
                continue  # another task may be waiting already
            time.sleep(idle_poll(time.monotonic() - last_task, 0.005, self.args.poll_interval))

    def handle(self, token: str) -> None:
        """One task: exactly what flwr-clientapp does, minus starting a process."""
        from flwr.app import Error, Message
        from flwr.clientapp.client_app import LoadClientAppError
        from flwr.common.constant import ErrorCode, SubStatus
        from flwr.supernode.runtime.run_clientapp import push_message, push_task_output

        self.token.token = token
        self._beat.set()
        context = message = reply = None
        sub_status, details = SubStatus.FAILED, "ClientApp task failed due to unknown reason"
        restart_reason = None
        stop: Stop | None = None
        times = [time.perf_counter()]  # start, input, message, app, reply pushed, output pushed
        try:
            context, client_app = self._task_input()
            times.append(time.perf_counter())
            message = self._pull_message(context)
            times.append(time.perf_counter())
            reply = client_app(message=message, context=context)
            times.append(time.perf_counter())
            sub_status, details = SubStatus.COMPLETED, ""
        except (Exception, Stop) as ex:  # noqa: BLE001 -- every failure becomes an Error reply
            code, reason = ErrorCode.CLIENT_APP_RAISED_EXCEPTION, f"{type(ex)}:<'{ex}'>"
            if isinstance(ex, Stop):  # as when Flower finds a ClientApp process gone
                stop = ex
                code, reason = ErrorCode.CLIENT_APP_CRASHED, f"ClientApp process stopped ({ex})"
            elif isinstance(ex, LoadClientAppError | ImportError):
                code = ErrorCode.LOAD_CLIENT_APP_EXCEPTION
                reason = "An exception was raised when attempting to load `ClientApp`"
                restart_reason = "the ClientApp failed to load"  # no half-imported modules
            if stop is None:
                self.log(ERROR, "ClientApp raised an exception", exc_info=ex)
            details = reason
            if message is not None:
                reply = Message(Error(code=code, reason=reason), reply_to=message)
        finally:
            if stop is not None:
                self.retry_invoker.max_tries = 1  # exiting: do not block on retries
            try:
                if reply is not None and context is not None:
                    push_message(self.client, reply, context)
            except Exception as ex:  # noqa: BLE001
                self.log(ERROR, "Failed to push the reply message", exc_info=ex)
            times.append(time.perf_counter())
            push_task_output(self.client, context, sub_status, details)
            times.append(time.perf_counter())
            self._beat.clear()
            self.token.token = ""
        self.messages += 1
        if len(times) == 6:  # each step's seconds
            steps = ("input", "message", "app", "reply", "output")
            pairs = zip(steps, times, times[1:], strict=False)
            spent = ", ".join(f"{k} {b - a:.3f}" for k, a, b in pairs)
        else:
            spent = f"total {times[-1] - times[0]:.3f}"
        mtype = message.metadata.message_type if message is not None else "-"
        self.log(
            INFO,
            "warm executor: message %d (%s) %s, s: %s",
            self.messages,
            mtype,
            sub_status,
            spent,
        )
        if stop is not None:
            raise stop
        if restart_reason is not None:
            self.restart(None, restart_reason)

    # -- steps ---------------------------------------------------------------------------------
    def _task_input(self):  # noqa: ANN202
        from flwr.cli.install import install_from_fab
        from flwr.clientapp.client_app import LoadClientAppError
        from flwr.clientapp.utils import get_load_client_app_fn
        from flwr.common.serde import context_from_proto, fab_from_proto, run_from_proto
        from flwr.proto.runtime_pb2 import PullTaskInputRequest
        from flwr.supercore.task_identity import TaskIdentity

        res = self.client.PullTaskInput(PullTaskInputRequest())
        TaskIdentity.task_id = res.task_id
        TaskIdentity.run_id = res.run.run_id
        TaskIdentity.node_id = res.context.node_id
        context = context_from_proto(res.context)
        run = run_from_proto(res.run)
        fab = fab_from_proto(res.fab)
        if self.fab_hash is not None and fab.hash_str != self.fab_hash:
            raise LoadClientAppError(f"this process holds the ClientApp of FAB {self.fab_hash}")
        if self.client_app is None:
            install_from_fab(fab.content, skip_prompt=True)
            load = get_load_client_app_fn(default_app_ref="", app_path=None, multi_app=True)
            self.client_app = load(run.fab_id, run.fab_version, fab.hash_str)
            self.fab_hash = fab.hash_str
            self.log(INFO, "warm executor: loaded the ClientApp of FAB %s", fab.hash_str[:12])
        return context, self.client_app

    def _pull_message(self, context):  # noqa: ANN001, ANN202
        from flwr.app import Message
        from flwr.proto.node_pb2 import Node
        from flwr.proto.runtime_pb2 import PullAppMessagesRequest
        from flwr.supercore.inflatable.inflatable_protobuf_utils import (
            make_confirm_message_received_fn_protobuf,
            make_pull_object_fn_protobuf,
        )
        from flwr.supercore.inflatable.inflatable_utils import pull_and_inflate_object_from_tree

        # The SuperNode creates the task, then stores the message: the first pulls can be empty.
        deadline, delay = time.monotonic() + MESSAGE_WAIT_SECONDS, 0.002
        while not (res := self.client.PullMessages(PullAppMessagesRequest())).messages_list:
            if time.monotonic() > deadline:
                raise RuntimeError(f"no message for this task after {MESSAGE_WAIT_SECONDS} s")
            time.sleep(delay)
            delay = min(2 * delay, 0.05)
        node = Node(node_id=context.node_id)
        tree = res.message_object_trees[0]
        message = pull_and_inflate_object_from_tree(
            tree,
            make_pull_object_fn_protobuf(self.client.PullObject, node, context.run_id),
            make_confirm_message_received_fn_protobuf(
                self.client.ConfirmMessageReceived, node, context.run_id
            ),
            return_type=Message,
            # The SuperNode may still be fetching the objects from the SuperLink: Flower's
            # default back-off starts at 1 s; a local Runtime API can be asked more often.
            initial_backoff=0.01,
            backoff_cap=0.25,
        )
        message.metadata.__dict__["_message_id"] = tree.object_id  # as flwr-clientapp does
        return message

    def _heartbeats(self) -> None:
        while not self._closed.wait(HEARTBEAT_SECONDS):
            if self._beat.is_set() and self.token.token:
                try:
                    self.client.SendTaskHeartbeat(self._heartbeat_request)
                except Exception as ex:  # noqa: BLE001 -- the next beat may get through
                    self.log(WARNING, "task heartbeat failed: %s", ex)

    def restart(self, token: str | None, reason: str) -> None:
        """Replace this process by a fresh one (same arguments), handing a claimed task over."""
        self.log(INFO, "warm executor: restarting, %s", reason)
        self.close()
        a = self.args
        argv = [
            "--runtime-api-address",
            a.runtime_api_address,
            "--poll-interval",
            str(a.poll_interval),
        ]
        argv += ["--insecure"] if a.insecure else ["--root-certificates", a.root_certificates]
        if a.parent_pid is not None:
            argv += ["--parent-pid", str(a.parent_pid)]
        if token is not None:
            argv += ["--resume-token", token]
        sys.stdout.flush()
        sys.stderr.flush()
        os.execv(sys.executable, [sys.executable, "-m", "flower_app.warm_executor", *argv])

    def close(self) -> None:
        self._closed.set()
        for client in (self.superexec, self.client):
            try:
                client.close()
            except Exception:  # noqa: BLE001
                pass


# -- the SuperNode's own sleeps ------------------------------------------------------------------


def idle_poll(idle_seconds: float, shortest: float, longest: float) -> float:
    """Wait before the next poll: a tenth of the time idle so far, within [shortest, longest].

    Right after a message the next one usually follows within milliseconds to a second (CSL: the
    server's step; DSL: the next chunk), so poll often; a long-idle node polls rarely. A message
    arriving after T s idle is seen at most ~0.1 T (+ shortest) late.
    """
    return min(longest, max(shortest, 0.1 * idle_seconds))


IDLE_POLL_SHORTEST = 0.02  # the SuperNode's pulls from the SuperLink: 20 ms ... Flower's 3 s
REPLY_POLL = 0.01  # Flower: 0.5 s between looks for the ClientApp's reply (an in-memory check)


def supernode_main(argv: list[str]) -> int:
    """``flower-supernode <argv>`` with shorter sleeps on the message path (flwr 1.42.0).

    flwr/supernode/start_client_internal.py hard-codes them: 3 s after every empty pull from the
    SuperLink, 0.5 s between looks for the ClientApp's reply (and for its objects), and a 1 s
    (doubling) back-off for objects of a message not yet uploaded. A warm ClientApp answers in
    milliseconds, so these sleeps are then most of a round trip. Here an empty pull waits a
    tenth of the time since the last message, from 20 ms up to Flower's 3 s (``idle_poll``),
    reply looks take 10 ms, and object pulls start at 20 ms. Only the module's names `time`,
    `pull_objects` and `_pull_and_store_message` (wrapped, to time the last message) are
    replaced; the SuperNode is otherwise Flower's own.
    """
    import functools
    import inspect
    import types

    import flwr.supernode.start_client_internal as sci
    from flwr.supercore.inflatable import inflatable_utils
    from flwr.supercore.logger import update_console_handler
    from flwr.supernode.cli.flower_supernode import flower_supernode

    expected = {
        sci.start_client_internal: "time.sleep(3)",
        sci._push_messages: "time.sleep(0.5)",
        sci._pull_and_store_message: "pull_objects(",
    }
    for func, text in expected.items():
        if text not in inspect.getsource(func):
            print(f"warm_executor: {func.__name__} lacks {text!r}; not patching", file=sys.stderr)
            return 2

    real_sleep, last_message = time.sleep, [time.monotonic()]
    pull_and_store = sci._pull_and_store_message

    def timed_pull_and_store(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        run_id = pull_and_store(*args, **kwargs)
        if run_id is not None:
            last_message[0] = time.monotonic()
        return run_id

    def sleep(seconds: float) -> None:
        if seconds == 3:  # the idle pull loop
            seconds = idle_poll(time.monotonic() - last_message[0], IDLE_POLL_SHORTEST, 3.0)
        elif seconds == 0.5:  # waiting for the reply, or its objects, in the SuperNode's state
            seconds = REPLY_POLL
        real_sleep(seconds)

    fast_time = types.ModuleType("time")
    fast_time.__dict__.update({k: v for k, v in vars(time).items() if not k.startswith("__")})
    fast_time.sleep = sleep
    sci.time = fast_time
    sci._pull_and_store_message = timed_pull_and_store
    sci.pull_objects = functools.partial(
        inflatable_utils.pull_objects, initial_backoff=0.02, backoff_cap=1.0
    )
    update_console_handler(timestamps=True)  # ms timestamps: where a round trip's time goes
    sys.argv = ["flower-supernode", *argv]
    flower_supernode()
    return 0


def serverapp_main(argv: list[str]) -> int:
    """``flwr-serverapp <argv>`` whose reply pulls start their object back-off at 20 ms.

    The SuperLink hands a reply to the ServerApp as soon as the reply message is stored, while
    the SuperNode may still be uploading its arrays; flwr's grid (superlink/grid/http_grid.py)
    then waits 1 s (doubling, +-20 %) before asking again. With a warm ClientApp that second is
    most of a CSL round trip. Only the grid module's name `pull_objects` is replaced.
    """
    import functools
    import inspect

    from flwr.supercore.inflatable import inflatable_utils
    from flwr.superlink.cli import flwr_serverapp
    from flwr.superlink.grid import http_grid

    if "pull_objects(" not in inspect.getsource(http_grid.HttpGrid.pull_messages):
        print("warm_executor: HttpGrid.pull_messages changed; not patching", file=sys.stderr)
        return 2
    http_grid.pull_objects = functools.partial(
        inflatable_utils.pull_objects, initial_backoff=0.02, backoff_cap=1.0
    )
    sys.argv = ["flwr-serverapp", *argv]
    flwr_serverapp()
    return 0


if __name__ == "__main__":
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).parent]
    sys.exit(main())
