"""How the ServerApp reads the SuperLink's answer to its own heartbeat as "stopped" or not.

`flwr stop` finishes the run's task and revokes its token, so the next heartbeat is refused with
HTTP 401; a transport error or a 5xx is a hiccup, not a stop (the run would otherwise end on a
network blip). Real httpx exceptions built from real responses, and Flower's own heartbeat
thread and HTTP client against a loopback server that refuses the task's token.
"""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
from flwr.supercore.runtime import RuntimeHttpClient

from flower_app.run_control import StopCheck, token_revoked

URL = "http://127.0.0.1:9091/v1/runtime/send-task-heartbeat"


def status_error(code: int) -> httpx.HTTPStatusError:
    request = httpx.Request("POST", URL)
    response = httpx.Response(code, request=request)
    with pytest.raises(httpx.HTTPStatusError) as raised:
        response.raise_for_status()
    return raised.value


def test_a_revoked_token_means_the_run_was_stopped():
    assert token_revoked(status_error(401))


@pytest.mark.parametrize("code", [403, 500, 503, 504])
def test_other_refusals_are_not_a_stop(code):
    assert not token_revoked(status_error(code))


def test_a_transport_error_is_not_a_stop():
    assert not token_revoked(httpx.ConnectError("refused", request=httpx.Request("POST", URL)))
    assert not token_revoked(ValueError("not an HTTP error"))


def test_outside_flower_there_is_no_heartbeat_and_no_stop():
    assert StopCheck()() is False


class RevokedToken(BaseHTTPRequestHandler):
    """A SuperLink after `flwr stop`: every heartbeat is refused with 401, once ``open`` is set."""

    open = threading.Event()
    calls = 0

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        RevokedToken.open.wait(30)
        RevokedToken.calls += 1
        self.send_response(401)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_stop_is_seen_after_flowers_own_heartbeat_thread_died_of_it():
    """Flower re-raises a 401 in its heartbeat thread, which ends the thread; the check made at
    the run's start keeps the connection and still reads the stop."""
    RevokedToken.open.clear()  # class state: the same from a fresh start on every run
    RevokedToken.calls = 0
    server = ThreadingHTTPServer(("127.0.0.1", 0), RevokedToken)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    client = RuntimeHttpClient(f"http://127.0.0.1:{server.server_port}")
    sender = HeartbeatSender(make_task_heartbeat_fn_http(client))
    try:
        sender.start()  # its first heartbeat waits in the server until the stop
        check = StopCheck()
        assert check.client is client
        RevokedToken.open.set()
        sender._thread.join(30)
        assert not sender._thread.is_alive() and RevokedToken.calls == 1  # died of the 401
        assert StopCheck().client is None  # a lookup now finds no heartbeat
        assert check() is True
        assert RevokedToken.calls == 2
    finally:
        server.shutdown()
        client.close()
