"""Flower's SuperLink with its Control and Runtime APIs answering loopback callers only.

flwr 1.42 serves the Fleet API (SuperNodes), the Control API (``flwr run``, ``flwr ls``,
``flwr supernode register``) and the Runtime API (the ServerApp and its executor) on ONE port,
and its open-source Control API has no user authentication. Bound to an address SuperNodes can
reach, that port lets anyone who reaches it submit runs (code that every SuperNode executes)
and register SuperNode keys of their own. This launcher is Flower's ``flower-superlink`` with
one ASGI middleware in front: a request to ``/v1/control/...`` or ``/v1/runtime/...`` from a
peer address outside ``--control-from`` (default 127.0.0.1 and ::1) gets 403 and nothing else;
``/v1/fleet/...`` and ``/health`` are untouched. Operators then use ``flwr`` on the SuperLink's
machine, or through an SSH tunnel (whose connections arrive from 127.0.0.1).

    python -m deploy.superlink_guard [--control-from 127.0.0.1,::1] -- <flower-superlink args>

It wraps ``flwr.superlink.main.create_app`` (looked up at call time by flwr 1.42.0's
``flower-superlink``); any other flwr version is refused.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import sys
from collections.abc import Awaitable, Callable, Iterable

GUARDED_PREFIXES = ("/v1/control", "/v1/runtime")
DEFAULT_ALLOWED = "127.0.0.1,::1"

Scope = dict
Receive = Callable[[], Awaitable[dict]]
Send = Callable[[dict], Awaitable[None]]


def _address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    address = ipaddress.ip_address(text.strip().strip("[]"))
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped  # ::ffff:127.0.0.1 on a dual-stack socket
    return address


def parse_allowed(text: str) -> frozenset:
    """``"127.0.0.1,::1"`` -> the addresses; a bad one raises ValueError naming it."""
    allowed = set()
    for item in filter(None, (part.strip() for part in text.split(","))):
        try:
            allowed.add(_address(item))
        except ValueError:
            raise ValueError(f"--control-from: {item!r} is not an IP address") from None
    if not allowed:
        raise ValueError("--control-from: no address given")
    return frozenset(allowed)


class LoopbackOnly:
    """ASGI middleware: guarded paths answer only callers whose address is allowed."""

    def __init__(self, app, allowed: Iterable, prefixes: Iterable[str] = GUARDED_PREFIXES):  # noqa: ANN001
        self.app = app
        self.allowed = frozenset(allowed)
        self.prefixes = tuple(prefixes)

    def permits(self, scope: Scope) -> bool:
        if scope.get("type") != "http" or not scope.get("path", "").startswith(self.prefixes):
            return True
        client = scope.get("client")
        if not client:
            return False
        try:
            return _address(str(client[0])) in self.allowed
        except ValueError:
            return False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.permits(scope):
            await self.app(scope, receive, send)
            return
        body = json.dumps(
            {"detail": "this API answers only the SuperLink's own machine (see --control-from)"}
        ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 403,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


def main(argv: list[str] | None = None) -> int:
    from deploy.runtime_api import check_flwr_version

    if error := check_flwr_version("superlink_guard"):
        print(error, file=sys.stderr)
        return 2
    parser = argparse.ArgumentParser(prog="python -m deploy.superlink_guard", description=__doc__)
    parser.add_argument("--control-from", default=DEFAULT_ALLOWED, help="comma-separated IPs")
    parser.add_argument("superlink_args", nargs=argparse.REMAINDER)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        allowed = parse_allowed(args.control_from)
    except ValueError as err:
        parser.error(str(err))
    rest = args.superlink_args[1:] if args.superlink_args[:1] == ["--"] else args.superlink_args

    import flwr.superlink.main as superlink_main
    from flwr.superlink.cli.flower_superlink import flower_superlink

    create_app = superlink_main.create_app

    def guarded_create_app(*a, **kw):  # noqa: ANN002, ANN003, ANN202
        app = create_app(*a, **kw)
        app.add_middleware(LoopbackOnly, allowed=allowed)  # outermost: runs first
        return app

    superlink_main.create_app = guarded_create_app
    print(f"superlink_guard: Control and Runtime APIs answer only {sorted(map(str, allowed))}")
    sys.argv = ["flower-superlink", *rest]
    flower_superlink()
    return 0


if __name__ == "__main__":
    sys.exit(main())
