"""Waiting for SuperNodes: they register asynchronously, in simulation and in deployment."""

from __future__ import annotations

import time

from flwr.serverapp import Grid


class SetupError(RuntimeError):
    """The clients could not start (missing data, bad node config): nothing was trained."""


class TooFewClients(RuntimeError):
    """Fewer than ``min-clients`` are left mid-run: the run ends cleanly, resumable."""


def wait_for_nodes(grid: Grid, minimum: int, settle: float, timeout: float) -> list[int]:
    """Wait for ``minimum`` nodes, then until the count has not changed for ``settle`` seconds."""
    deadline, last, stable_since = time.monotonic() + timeout, [], time.monotonic()
    while time.monotonic() < deadline:
        nodes = sorted(grid.get_node_ids())
        if nodes != last:
            last, stable_since = nodes, time.monotonic()
        elif len(nodes) >= minimum and time.monotonic() - stable_since >= settle:
            return nodes
        time.sleep(0.1)
    raise SetupError(
        f"only {len(last)} SuperNodes connected within {timeout:.0f} s; need {minimum}"
    )
