"""A warm ClientApp executor for ``flower-supernode --isolation process`` (flwr 1.42.0 only).

Flower's own executor starts a fresh ``flwr-clientapp`` process for every message a SuperNode
receives; that process imports torch and the app, handles ONE message and exits. This executor
does the same work in ONE long-lived process per SuperNode, so imports, the loaded ClientApp
and the app's module-level caches (our ClientApp keeps its SplitClients warm) survive:

    loop: AcquireTask (claims a task, gets its token; signed with the SuperExec secret)
          -> PullTaskInput (context, run, FAB; activates the task)
          -> PullMessages, retried while empty (the SuperNode creates the task just before it
             stores the message), then the message's objects (fast back-off)
          -> run the ClientApp, at most reply-timeout seconds
          -> PushMessages + PushObject (the reply; an Error reply when the app raised or hung,
             as flwr-clientapp does: without a reply the SuperNode waits for ever)
          -> PushTaskOutput (the context, so ``context.state`` is kept by the SuperNode)

It runs under ``deploy.supervisor``, which starts it again whenever it exits other than cleanly,
and it never leaves its SuperNode blocked:
- A ClientApp that runs past the run's ``reply-timeout`` (set-up: at least 300 s, as the
  server allows) gets an Error reply (code 8, CLIENT_APP_CRASHED), and the process exits for a
  fresh one (a hung thread cannot be stopped, and may hold locks).
- The task in progress is recorded in ``--task-file`` (mode 0600): its token and, once pulled,
  the message's metadata. A process that finds the file at start finishes what its predecessor
  left: a task not yet started is handled; one whose process died mid-message gets an Error
  reply (code 8) at once, instead of after Flower's 60 s heartbeat timeout.
- New app code (a task of another FAB), or an app that failed to load, hands the claimed task
  to a fresh process the same way (stage ``handover``), so app modules are never reloaded in
  place. No token is ever on a command line.
SIGTERM/SIGINT, or the SuperNode's exit (--parent-pid), end the process (status 0); a task in
progress gets an Error reply first (code 8). A heartbeat thread keeps long tasks alive.

About 400 lines, on purpose: the loop and each of its failure paths (a hung app, a dead
predecessor, new app code, a stop) read best together; the helpers are in deploy/warm_parts.py.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from logging import ERROR, INFO, WARNING
from pathlib import Path
from types import SimpleNamespace

from deploy.patched_sleeps import idle_poll
from deploy.runtime_api import (
    add_connection_args,
    check_flwr_version,
    make_client,
    retry_invoker,
)
from deploy.supervisor import RESTART_NOW
from deploy.warm_parts import (
    TIMEOUT_KEY,
    AppThread,
    AppTimeout,
    TaskFile,
    TaskToken,
    app_timeout,
    stub_message,
)

MESSAGE_WAIT_SECONDS = 60.0  # PullMessages stays empty this long: give the task up
HEARTBEAT_SECONDS = 10.0  # Flower fails a running task after 2 x 30 s without a heartbeat
TASK_RETRY_SECONDS = 60.0  # a Runtime API call of a task retries (transport errors) this long
# Our packages: the ClientApp must import them from the run's FAB, never from this checkout.
APP_PACKAGES = ("flower_app", "split_core", "strategies", "models")


class Stop(BaseException):
    """SIGTERM/SIGINT: finish the task in progress with an Error reply, then exit."""


def _on_signal(signum: int, _frame: object) -> None:
    raise Stop(signal.Signals(signum).name)


def _parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m deploy.warm_executor",
        description="One long-lived ClientApp process for a SuperNode in --isolation process.",
    )
    add_connection_args(parser)
    parser.add_argument(
        "--task-file", type=Path, required=True, help="where the task in progress is recorded"
    )
    parser.add_argument(
        "--app-timeout",
        type=float,
        default=600.0,
        help=f"seconds a ClientApp may take when the run config has no {TIMEOUT_KEY!r}",
    )
    parser.add_argument(
        "--poll-interval",
        type=float,
        default=0.25,
        help="longest wait between AcquireTask polls (5 ms right after a task, then a tenth "
        "of the time idle)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    if error := check_flwr_version("warm_executor"):
        print(f"{error}; use Flower's own executor (start without --warm)", file=sys.stderr)
        return 2
    for name in [m for m in sys.modules if m.split(".")[0] in APP_PACKAGES]:
        del sys.modules[name]
    args = _parse_args(sys.argv[1:] if argv is None else argv)
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    if args.parent_pid is not None:
        from flwr.supercore.app_utils import start_parent_process_monitor

        start_parent_process_monitor(args.parent_pid)  # SIGINT when the SuperNode is gone
    from flwr.supercore.logger import update_console_handler

    update_console_handler(timestamps=True)
    executor = WarmExecutor(args)
    try:
        executor.recover()
        executor.run()
    except Stop as stop:
        executor.log(INFO, "warm executor: %s, exiting", stop)
    finally:
        executor.close()
    return 0


class WarmExecutor:
    def __init__(self, args: argparse.Namespace) -> None:
        from flwr.proto.runtime_pb2 import SendTaskHeartbeatRequest
        from flwr.supercore import log

        self.args = args
        self.log = log
        self.token = TaskToken()
        self.superexec = make_client(args, "SuperExec")  # claims tasks (signed)
        self.retry_invoker = retry_invoker(max_time=TASK_RETRY_SECONDS)
        # what flwr-clientapp uses for one task: the task's token on every request
        self.client = make_client(args, "flwr-clientapp", [self.token], self.retry_invoker)
        self.task_file = TaskFile(args.task_file)
        self.app_thread = AppThread()
        self.fab_hash: str | None = None  # the FAB whose ClientApp this process has loaded
        self.client_app = None
        self.messages = 0
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
        request = AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP])
        last_task = time.monotonic()
        while True:
            res = self.superexec.AcquireTask(request)
            if res.HasField("task") and res.token:
                self.task_file.record(res.token, "claimed")
                task_fab = res.task.fab_hash if res.task.HasField("fab_hash") else ""
                if self.fab_hash is not None and task_fab and task_fab != self.fab_hash:
                    self.restart(res.token, f"the app changed (FAB {task_fab[:12]})")
                self.handle(res.token)
                last_task = time.monotonic()
                continue  # another task may be waiting already
            time.sleep(idle_poll(time.monotonic() - last_task, 0.005, self.args.poll_interval))

    def recover(self) -> None:
        """Finish the task a predecessor left: hand it on, or answer it with an Error reply."""
        task = self.task_file.read()
        if task is None:
            return
        if task["stage"] in ("claimed", "handover"):  # its input was never pulled: run it
            self.log(INFO, "warm executor: taking over a task (%s)", task["stage"])
            self.handle(task["token"])
            return
        self.log(WARNING, "warm executor: the previous process died during a task; failing it")
        self.token.token = task["token"]
        try:
            message = stub_message(task["message"]) if task["message"] else None
            if message is None:  # died between PullTaskInput and PullMessages
                message = self._pull_message_metadata(deadline_seconds=5.0)[0]
            reason = "the ClientApp process died while handling this message (restarted)"
            self._fail(message, reason)
        except Exception as ex:  # noqa: BLE001 -- e.g. the token expired meanwhile
            self.log(ERROR, "warm executor: could not fail the orphaned task: %s", ex)
        finally:
            self.token.token = ""
            self.task_file.clear()

    def handle(self, token: str) -> None:
        """One task: exactly what flwr-clientapp does, minus starting a process."""
        from flwr.app import Error, Message
        from flwr.clientapp.client_app import LoadClientAppError
        from flwr.common.constant import ErrorCode, SubStatus
        from flwr.supernode.runtime.run_clientapp import push_message, push_task_output

        self.token.token = token
        self._beat.set()
        context = message = reply = None
        output_context = None  # the context pushed back (None: the SuperNode keeps its own)
        sub_status, details = SubStatus.FAILED, "ClientApp task failed due to unknown reason"
        restart_reason = None
        stop: Stop | None = None
        times = [time.perf_counter()]  # start, input, message, app, reply pushed, output pushed
        try:
            context, client_app = self._task_input()
            self.task_file.record(token, "input")
            times.append(time.perf_counter())
            message = self._pull_message(context, token)
            times.append(time.perf_counter())
            timeout = app_timeout(
                context.run_config, message.metadata.message_type, self.args.app_timeout
            )
            reply = self.app_thread.call(
                lambda: client_app(message=message, context=context), timeout
            )
            output_context = context
            times.append(time.perf_counter())
            sub_status, details = SubStatus.COMPLETED, ""
        except (Exception, Stop) as ex:  # noqa: BLE001 -- every failure becomes an Error reply
            code, reason = ErrorCode.CLIENT_APP_RAISED_EXCEPTION, f"{type(ex)}:<'{ex}'>"
            output_context = context
            if isinstance(ex, Stop):  # as when Flower finds a ClientApp process gone
                stop = ex
                code, reason = ErrorCode.CLIENT_APP_CRASHED, f"ClientApp process stopped ({ex})"
            elif isinstance(ex, AppTimeout):
                code = ErrorCode.CLIENT_APP_CRASHED
                reason = (
                    f"ClientApp did not answer within {ex.args[0]:g} s ({TIMEOUT_KEY}); "
                    "the warm executor restarts"
                )
                output_context = None  # the hung app may still be changing it
                restart_reason = "a ClientApp hung"
            elif isinstance(ex, LoadClientAppError | ImportError):
                code = ErrorCode.LOAD_CLIENT_APP_EXCEPTION
                reason = "An exception was raised when attempting to load `ClientApp`"
                restart_reason = "the ClientApp failed to load"  # no half-imported modules
            if stop is None:
                trace = None if isinstance(ex, AppTimeout) else ex
                self.log(ERROR, "ClientApp failed: %s", reason, exc_info=trace)
            details = reason
            if message is None and stop is None:  # e.g. the app failed to load: the message
                message = self._unpulled_message()  # still needs a reply, or the node waits
            if message is not None:
                reply = Message(Error(code=code, reason=reason), reply_to=message)
        finally:
            if stop is not None:
                self.retry_invoker.max_tries = 1  # exiting: do not block on retries
            try:
                if reply is not None:
                    push_message(self.client, reply, _addressee(message))
            except Exception as ex:  # noqa: BLE001
                self.log(ERROR, "Failed to push the reply message", exc_info=ex)
            times.append(time.perf_counter())
            push_task_output(self.client, output_context, sub_status, details)
            times.append(time.perf_counter())
            self._beat.clear()
            self.token.token = ""
            self.task_file.clear()
        self.messages += 1
        self._log_timing(message, sub_status, times)
        if stop is not None:
            raise stop
        if restart_reason is not None:
            self.restart(None, restart_reason)

    def _log_timing(self, message, sub_status: str, times: list[float]) -> None:  # noqa: ANN001
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

    def _pull_message_metadata(self, deadline_seconds: float):  # noqa: ANN202
        """The task's message without its content (PullMessages marks it as retrieved)."""
        from flwr.common.serde import message_from_proto
        from flwr.proto.runtime_pb2 import PullAppMessagesRequest

        # The SuperNode creates the task, then stores the message: the first pulls can be empty.
        deadline, delay = time.monotonic() + deadline_seconds, 0.002
        while not (res := self.client.PullMessages(PullAppMessagesRequest())).messages_list:
            if time.monotonic() > deadline:
                raise RuntimeError(f"no message for this task after {deadline_seconds:g} s")
            time.sleep(delay)
            delay = min(2 * delay, 0.05)
        proto, tree = res.messages_list[0], res.message_object_trees[0]
        message = message_from_proto(proto)
        message.metadata.__dict__["_message_id"] = tree.object_id  # as flwr-clientapp does
        return message, proto, tree

    def _unpulled_message(self):  # noqa: ANN202
        try:
            return self._pull_message_metadata(deadline_seconds=5.0)[0]
        except Exception as ex:  # noqa: BLE001 -- nothing to answer, then
            self.log(WARNING, "warm executor: no message to answer for this task: %s", ex)
            return None

    def _pull_message(self, context, token: str):  # noqa: ANN001, ANN202
        from flwr.app import Message
        from flwr.proto.node_pb2 import Node
        from flwr.supercore.inflatable.inflatable_protobuf_utils import (
            make_confirm_message_received_fn_protobuf,
            make_pull_object_fn_protobuf,
        )
        from flwr.supercore.inflatable.inflatable_utils import pull_and_inflate_object_from_tree

        _, proto, tree = self._pull_message_metadata(MESSAGE_WAIT_SECONDS)
        stub = json.dumps({"proto": proto.SerializeToString().hex(), "id": tree.object_id})
        self.task_file.record(token, "message", stub)
        node = Node(node_id=context.node_id)
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

    def _fail(self, message, reason: str) -> None:  # noqa: ANN001
        """Answer ``message`` with an Error reply (code 8) and finish its task as failed."""
        from flwr.app import Error, Message
        from flwr.common.constant import ErrorCode, SubStatus
        from flwr.supernode.runtime.run_clientapp import push_message, push_task_output

        reply = Message(Error(code=ErrorCode.CLIENT_APP_CRASHED, reason=reason), reply_to=message)
        push_message(self.client, reply, _addressee(message))
        push_task_output(self.client, None, SubStatus.FAILED, reason)
        self.log(
            INFO,
            "warm executor: answered %s with an Error reply (code 8)",
            message.metadata.message_type,
        )

    def _heartbeats(self) -> None:
        while not self._closed.wait(HEARTBEAT_SECONDS):
            if self._beat.is_set() and self.token.token:
                try:
                    self.client.SendTaskHeartbeat(self._heartbeat_request)
                except Exception as ex:  # noqa: BLE001 -- the next beat may get through
                    self.log(WARNING, "task heartbeat failed: %s", ex)

    def restart(self, token: str | None, reason: str) -> None:
        """Exit for a fresh process (the supervisor starts it), handing a claimed task over."""
        self.log(INFO, "warm executor: restarting, %s", reason)
        if token is not None:
            self.task_file.record(token, "handover")
        self.close()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(RESTART_NOW)  # not sys.exit: a hung ClientApp thread must not delay it

    def close(self) -> None:
        self._closed.set()
        for client in (self.superexec, self.client):
            try:
                client.close()
            except Exception:  # noqa: BLE001
                pass


def _addressee(message) -> SimpleNamespace:  # noqa: ANN001
    """What ``push_message`` reads of a context (node and run) for a reply to ``message``."""
    return SimpleNamespace(node_id=message.metadata.dst_node_id, run_id=message.metadata.run_id)


if __name__ == "__main__":
    sys.exit(main())
