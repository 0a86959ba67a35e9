"""The messages around training: set-up, and each client's optimizer state for checkpoints.

  query.setup       run config -> partition size, resources, data source   (start, and rejoin)
  query.checkpoint  -> the client's optimizer state (momentum)             (end of a round)
  query.restore     optimizer state from a checkpoint ->                   (resume)

Each is one message per client through the same Exchange as training (a ``QueryPhase``), so a
client that fails here is dropped with a reason, like anywhere else.

A set-up reply is a claim the server holds the client to for the rest of the run, so it is
bounded here: ``train-examples`` is > 0 and no more than the dataset (and ``samples-per-client``)
holds, ``test-examples`` no more than the test set (and ``test-samples``), the partition-id
below ``num-partitions``. Two nodes that claim the same partition-id: the first (in node-id
order, the order replies are read) keeps it, the second is dropped with the reason.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, Message
from flwr.serverapp import Grid

from split_core.config import RunConfig
from split_core.methods import client_modules
from split_core.payload import PayloadError, record_bytes
from split_core.protocol import (
    CheckpointReply,
    CheckpointRequest,
    RestoreRequest,
    SetupReply,
    SetupRequest,
)
from strategies.exchange import Exchange, ExchangeReport
from strategies.nodes import SetupError, TooFewClients, wait_for_nodes
from strategies.phases import QueryPhase
from strategies.roster import ClientInfo, Roster

log = logging.getLogger("flwr").getChild("split")
# First contact starts a client's process (a Ray actor, a ClientApp in deployment), imports
# torch and may decode the dataset into its cache: reply-timeout alone would be too tight.
SETUP_TIMEOUT = 300.0
# Training and test images of each dataset: the most a client can hold.
DATASET_SIZES = {"cifar10": (50_000, 10_000), "cifar100": (50_000, 10_000)}


def connect(
    grid: Grid,
    cfg: RunConfig,
    exchange_for: Callable[[int], Exchange],
    timeout: float,
    settle_seconds: float,
    optimizers: Mapping[int, dict[str, np.ndarray]] | None = None,
) -> tuple[Roster, dict[int, str]]:
    """Wait for the SuperNodes, then have every client find its data before any training.

    Clients that fail set-up are left out (returned with their reasons); raises ``SetupError``
    unless at least ``min-clients`` succeeded. On resume, each client gets its ``optimizers``
    state back.
    """
    nodes = wait_for_nodes(grid, cfg.min_clients, settle_seconds, timeout)
    exchange = exchange_for(len(nodes))
    exchange.timeout = max(timeout, SETUP_TIMEOUT)
    clients, report = setup_clients(exchange, nodes, cfg)
    if len(clients) < cfg.min_clients or not clients:
        lines = "\n".join(f"  node {n}: {why}" for n, why in report.failures.items())
        raise SetupError(f"{len(report.failures)} of {len(nodes)} clients failed set-up:\n{lines}")
    for node, why in report.failures.items():
        log.warning("node %s left out: it failed set-up (%s)", node, why)
    roster = Roster(clients)
    if optimizers is not None:
        restored = restore_optimizers(exchange_for(len(clients)), clients, optimizers)
        roster.note_failures(restored.failures, restored.codes)
    return roster, report.failures


def take_part(
    grid: Grid, roster: Roster, exchange_for: Callable[[int], Exchange], cfg: RunConfig, rnd: int
) -> tuple[list[ClientInfo], dict[int, str]]:
    """A round's clients: listed by the SuperLink, not known dead, and set up again if they
    failed before (a restarted SuperNode has lost its ``context.state``; set-up keeps the state
    of one that has not). Returns them and the reason each other client is left out; raises
    ``TooFewClients`` when fewer than ``min-clients`` remain."""
    taking_part, left_out = roster.for_round(set(grid.get_node_ids()))
    rejoining = [c.node_id for c in taking_part if c.node_id in roster.needs_setup]
    if rejoining:
        taken = {c.partition_id: c.node_id for c in roster.clients if c.node_id not in rejoining}
        clients, report = setup_clients(exchange_for(len(rejoining)), rejoining, cfg, taken)
        for client in clients:
            roster.replace(client)
        roster.note_failures(report.failures, report.codes)
        left_out |= {node: f"set-up again failed: {why}" for node, why in report.failures.items()}
        taking_part, _ = roster.for_round(set(grid.get_node_ids()))
        taking_part = [c for c in taking_part if c.node_id not in report.failures]
    if len(taking_part) < cfg.min_clients:
        reasons = "; ".join(f"node {n}: {why}" for n, why in left_out.items())
        raise TooFewClients(
            f"round {rnd}: {len(taking_part)} clients left, min-clients is "
            f"{cfg.min_clients} ({reasons})"
        )
    for node, why in left_out.items():
        log.warning("round %d: node %s left out: %s", rnd, node, why)
    return taking_part, left_out


def setup_clients(
    exchange: Exchange, nodes: list[int], cfg: RunConfig, taken: dict[int, int] | None = None
) -> tuple[list[ClientInfo], ExchangeReport]:
    """Set up ``nodes``; ``taken``: partition-ids already held, by node."""
    request = SetupRequest(cfg.to_run_config())
    clients: list[ClientInfo] = []
    taken = dict(taken or {})

    def read(node: int, reply: Message) -> None:
        info = client_info(node, reply, cfg)
        if info.partition_id in taken:
            raise PayloadError(
                f"partition-id {info.partition_id} is already taken by node "
                f"{taken[info.partition_id]}"
            )
        taken[info.partition_id] = node
        clients.append(info)

    report = exchange.run(QueryPhase([request.message(n) for n in nodes], read))
    return clients, report


def collect_optimizers(
    exchange: Exchange, clients: list[ClientInfo], cfg: RunConfig
) -> tuple[dict[int, dict[str, np.ndarray]], ExchangeReport, int]:
    """Each client's momentum buffers (by partition id), checked against the client model's
    parameter shapes; and their bytes."""
    shapes = momentum_shapes(client_modules(cfg))
    by_node = {c.node_id: c.partition_id for c in clients}
    states: dict[int, dict[str, np.ndarray]] = {}
    sizes = [0]

    def read(node: int, reply: Message) -> None:
        record = CheckpointReply.decode(reply.content).optimizer
        states[by_node[node]] = _check_momentum(record, shapes)
        sizes[0] += record_bytes(record)

    messages = [CheckpointRequest().message(c.node_id) for c in clients]
    report = exchange.run(QueryPhase(messages, read))
    return states, report, sizes[0]


def restore_optimizers(
    exchange: Exchange, clients: list[ClientInfo], states: Mapping[int, dict[str, np.ndarray]]
) -> ExchangeReport:
    messages = [
        RestoreRequest(
            ArrayRecord({k: Array(v) for k, v in states[c.partition_id].items()})
        ).message(c.node_id)
        for c in clients
        if c.partition_id in states
    ]
    return exchange.run(QueryPhase(messages))


def momentum_shapes(modules: Mapping[str, Any]) -> list[tuple[int, ...]]:
    """Parameter shapes of the client model, in the order ``momentum_record`` numbers them."""
    return [tuple(p.shape) for m in modules.values() if m is not None for p in m.parameters()]


def client_info(node: int, reply: Message, cfg: RunConfig) -> ClientInfo:
    """A set-up reply, held to what this run's data allows."""
    s = SetupReply.decode(reply.content)
    check_setup(s, cfg)
    return ClientInfo(
        node,
        s.partition_id,
        s.train_examples,
        s.test_examples,
        s.data_source,
        s.device,
        s.cpus,
        s.gpus,
        s.torch_threads,
        s.state_bytes,
    )


def check_setup(reply: SetupReply, cfg: RunConfig) -> None:
    """The counts a client declares at set-up, against what the run's data can hold."""
    train_size, test_size = DATASET_SIZES[cfg.dataset]
    most_train = min(train_size, cfg.samples_per_client or train_size)
    most_test = min(test_size, cfg.test_samples or test_size)
    if not 0 < reply.train_examples <= most_train:
        raise PayloadError(
            f"train-examples is {reply.train_examples}: a client holds 1 to {most_train} "
            f"training examples in this run"
        )
    if reply.test_examples > most_test:
        raise PayloadError(
            f"test-examples is {reply.test_examples}: a client holds at most {most_test} "
            f"test examples in this run"
        )
    if not reply.partition_id < reply.num_partitions:
        raise PayloadError(
            f"partition-id {reply.partition_id} is not below num-partitions {reply.num_partitions}"
        )


def _check_momentum(record: ArrayRecord, shapes: list[tuple[int, ...]]) -> dict[str, np.ndarray]:
    out = {}
    for key in record:
        if not key.isdigit() or int(key) >= len(shapes):
            raise PayloadError(f"optimizer state has an unknown parameter {key!r}")
        try:
            array = record[key].numpy()
        except Exception as exc:  # noqa: BLE001 - garbage bytes are a rejection, not a crash
            raise PayloadError(f"optimizer state {key!r} cannot be decoded: {exc}") from exc
        expected = shapes[int(key)]
        if array.shape != expected or array.dtype != np.float32:
            raise PayloadError(
                f"optimizer state {key!r} is {array.dtype}{list(array.shape)}, "
                f"expected float32{list(expected)}"
            )
        if not np.isfinite(array).all():
            raise PayloadError(f"optimizer state {key!r} is not finite")
        out[key] = array
    return out
