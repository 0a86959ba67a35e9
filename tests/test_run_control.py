"""How the ServerApp reads the SuperLink's answer to its own heartbeat as "stopped" or not.

`flwr stop` finishes the run's task and revokes its token, so the next heartbeat is refused with
HTTP 401; a transport error or a 5xx is a hiccup, not a stop (the run would otherwise end on a
network blip). Real httpx exceptions built from real responses.
"""

from __future__ import annotations

import httpx
import pytest

from flower_app.run_control import stop_requested, token_revoked

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
    assert stop_requested() is False
