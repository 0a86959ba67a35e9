"""Clients of a Flower Runtime API (a SuperNode's or the SuperLink's), as our executors use them.

Shared by the warm executor and the cold one. What is ours here:
- SuperExec authentication: with ``--superexec-auth-secret-file`` (process isolation), Flower
  1.42 only hands out a task (AcquireTask) to a caller that signs the request with an HMAC of
  that secret; every other Runtime call needs the task's token. So a local user who can reach
  the port but cannot read the secret cannot claim tasks.
- The retry policy: flwr's own SIGINTs its process on a 401 (right for a one-message
  ``flwr-clientapp``, wrong for a long-lived executor that should only drop that task).
"""

from __future__ import annotations

import argparse
from pathlib import Path

FLWR_VERSION = "1.42.0"  # these executors use flwr internals: refuse any other version
ACQUIRE_TASK = "/flwr.proto.Runtime/AcquireTask"


def check_flwr_version(program: str) -> str | None:
    """An error message when the installed flwr is not the one this code was tested with."""
    import flwr

    if flwr.__version__ != FLWR_VERSION:
        return f"{program}: written for flwr {FLWR_VERSION}, found {flwr.__version__}"
    return None


def add_connection_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--runtime-api-address", required=True, help="HOST:PORT of the API")
    tls = parser.add_mutually_exclusive_group(required=True)
    tls.add_argument("--insecure", action="store_true", help="plain HTTP to the Runtime API")
    tls.add_argument("--root-certificates", help="CA of a TLS Runtime API")
    parser.add_argument(
        "--superexec-auth-secret-file",
        help="sign AcquireTask with this shared secret (the API's --superexec-auth-secret-file)",
    )
    parser.add_argument("--parent-pid", type=int, help="exit when this process does")


def retry_invoker(max_time: float | None):  # noqa: ANN201
    """Retry transport errors and 502/503/504 with back-off; give up on other HTTP errors."""
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


def make_client(
    args: argparse.Namespace,
    component: str,
    interceptors: list | None = None,
    invoker=None,  # noqa: ANN001
):  # noqa: ANN201
    """A RuntimeHttpClient for ``component`` ("SuperExec" signs AcquireTask when a secret is
    given); ``interceptors`` are added after the version check; ``invoker``: a retry policy
    (default: ``retry_invoker(None)``, retrying for ever)."""
    from flwr.supercore.interceptors import (
        RuntimeVersionHttpInterceptor,
        SuperExecAuthHttpInterceptor,
    )
    from flwr.supercore.runtime import RuntimeHttpClient
    from flwr.supercore.tls import validate_and_resolve_root_certificates

    chain = [RuntimeVersionHttpInterceptor(component_name=component), *(interceptors or [])]
    if component == "SuperExec" and args.superexec_auth_secret_file:
        secret = Path(args.superexec_auth_secret_file).read_bytes()
        if not secret:
            raise ValueError(f"{args.superexec_auth_secret_file} is empty")
        chain.append(
            SuperExecAuthHttpInterceptor(master_secret=secret, protected_methods=[ACQUIRE_TASK])
        )
    return RuntimeHttpClient.from_server_address(
        server_address=args.runtime_api_address,
        insecure=args.insecure,
        root_certificates=validate_and_resolve_root_certificates(
            args.root_certificates, args.insecure
        ),
        interceptors=chain,
        retry_invoker=invoker or retry_invoker(max_time=None),
    )


def connection_argv(args: argparse.Namespace) -> list[str]:
    """The TLS arguments an app process started for a task needs to reach the same API."""
    return ["--insecure"] if args.insecure else ["--root-certificates", args.root_certificates]
