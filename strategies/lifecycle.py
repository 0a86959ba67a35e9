"""The messages around training: set-up, and each client's optimizer state for checkpoints.

  query.setup       run config -> partition size, resources, data source   (start, and rejoin)
  query.checkpoint  -> the client's optimizer state (momentum)             (end of a round)
  query.restore     optimizer state from a checkpoint ->                   (resume)

Each is one message per client through the same Exchange as training, so a client that fails
here is dropped with a reason, like anywhere else.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict

from split_core.payload import PayloadError, record_bytes
from strategies.exchange import Exchange, ExchangeReport
from strategies.roster import ClientInfo


def setup_clients(
    exchange: Exchange, nodes: list[int], config: ConfigRecord
) -> tuple[list[ClientInfo], ExchangeReport]:
    first = [_message(n, "query.setup", RecordDict({"config": config})) for n in nodes]
    clients: list[ClientInfo] = []

    def consume(node: int, reply: Message) -> tuple[None, bool]:
        clients.append(client_info(node, reply))
        return None, True

    report = exchange.run(first, request_next=lambda n, r: None, consume=consume)
    return clients, report


def collect_optimizers(
    exchange: Exchange, clients: list[ClientInfo], shapes: list[tuple[int, ...]]
) -> tuple[dict[int, dict[str, np.ndarray]], ExchangeReport, int]:
    """Each client's momentum buffers, checked against the client model's parameter shapes."""
    by_node = {c.node_id: c.partition_id for c in clients}
    first = [_message(c.node_id, "query.checkpoint", RecordDict()) for c in clients]
    states: dict[int, dict[str, np.ndarray]] = {}
    sizes = [0]

    def consume(node: int, reply: Message) -> tuple[None, bool]:
        record = reply.content.get("optim")
        if not isinstance(record, ArrayRecord):
            raise PayloadError("checkpoint reply carries no 'optim' arrays")
        states[by_node[node]] = _check_momentum(record, shapes)
        sizes[0] += record_bytes(record)
        return None, True

    report = exchange.run(first, request_next=lambda n, r: None, consume=consume)
    return states, report, sizes[0]


def restore_optimizers(
    exchange: Exchange, clients: list[ClientInfo], states: Mapping[int, dict[str, np.ndarray]]
) -> ExchangeReport:
    first = []
    for c in clients:
        if c.partition_id in states:
            optim = ArrayRecord({k: Array(v) for k, v in states[c.partition_id].items()})
            first.append(_message(c.node_id, "query.restore", RecordDict({"optim": optim})))
    return exchange.run(first, request_next=lambda n, r: None, consume=lambda n, r: (None, True))


def client_info(node: int, reply: Message) -> ClientInfo:
    try:
        m, info = reply.content["metrics"], reply.content["info"]
        client = ClientInfo(
            node,
            int(m["partition-id"]),
            int(m["train-examples"]),
            int(m["test-examples"]),
            str(info["data-source"]),
            str(info["device"]),
            float(m["cpus"]),
            float(m["gpus"]),
            int(m["torch-threads"]),
            int(m["state-bytes"]),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise PayloadError(f"set-up reply is malformed: {type(exc).__name__}: {exc}") from exc
    if min(client.partition_id, client.train_examples, client.test_examples) < 0:
        raise PayloadError(f"set-up reply has negative counts: {client}")
    return client


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


def _message(node: int, message_type: str, content: RecordDict) -> Message:
    return Message(content=content, dst_node_id=node, message_type=message_type)
