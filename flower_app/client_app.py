"""Flower ClientApp: thin handlers around ``SplitClient``, with ``context.state`` as the truth.

Each handler decodes its request, lets the client answer it and encodes the reply; the message
types and their contents are in ``split_core.protocol``. A client's failure goes back as an
Error reply with a short reason, and never leaves a half-applied step in the cache.

A process keeps at most ``live-clients`` SplitClients warm (least recently used first out):
Ray hands a node's message to whichever actor is idle, so a cache per node would grow with
the number of nodes. A client that is not live, or whose version differs from the one in
``context.state``, is rebuilt from the state.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import traceback
from collections import OrderedDict
from collections.abc import Callable

import torch
from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode

from split_core import client_state, protocol
from split_core.client import SplitClient
from split_core.config import RunConfig
from split_core.payload import record_bytes
from split_core.protocol import (
    CheckpointReply,
    EvaluateRequest,
    RestoreReply,
    RestoreRequest,
    SetupReply,
    SetupRequest,
    TrainRequest,
)

app = ClientApp()
log = logging.getLogger(__name__)


def handles(message_type: str) -> Callable:
    """Register a handler for one of the protocol's message types."""
    category, action = protocol.split_type(message_type)
    register = getattr(app, category)
    return register(action) if action else register()


class LiveClients:
    """The warm SplitClients of this process, keyed by (run, node), bounded in number."""

    def __init__(self) -> None:
        self._clients: OrderedDict[tuple[int, int], SplitClient] = OrderedDict()

    def __len__(self) -> int:
        return len(self._clients)

    def get(self, key: tuple[int, int], version: int) -> SplitClient | None:
        client = self._clients.get(key)
        if client is None or client.version != version:
            return None
        self._clients.move_to_end(key)
        return client

    def put(self, key: tuple[int, int], client: SplitClient) -> None:
        self._clients[key] = client
        self._clients.move_to_end(key)
        while len(self._clients) > client.cfg.live_clients:
            _, evicted = self._clients.popitem(last=False)
            evicted.release()  # CSL's graph goes now, not when the GC finds it

    def drop(self, key: tuple[int, int]) -> None:
        client = self._clients.pop(key, None)
        if client is not None:
            client.release()


LIVE = LiveClients()


@handles(protocol.SETUP)
def setup(msg: Message, context: Context) -> Message:
    def run() -> RecordDict:
        cfg = RunConfig.from_run_config(SetupRequest.decode(msg.content).run_config)
        node = context.node_config
        missing = [k for k in (protocol.PARTITION_ID, protocol.NUM_PARTITIONS) if k not in node]
        if missing:
            raise ValueError(
                f"node config lacks {missing}: start the SuperNode with "
                f'--node-config "{protocol.PARTITION_ID}=<i> {protocol.NUM_PARTITIONS}=<n>"'
            )
        data_dir = str(node.get(protocol.DATA_DIR, cfg.data_dir))
        cpus, gpus = assigned_resources()
        pid, parts = int(node[protocol.PARTITION_ID]), int(node[protocol.NUM_PARTITIONS])
        _set_threads(cfg, parts)
        wanted = client_state.identity(cfg, pid, parts, data_dir)
        if client_state.same_setup(context.state, wanted):  # set up again after a failure
            client, _ = _restore(context)
        else:
            client = SplitClient.create(cfg, pid, parts, data_dir)
        client.save(context.state)
        LIVE.put(_key(context), client)
        reply = SetupReply(
            partition_id=client.partition_id,
            num_partitions=client.num_partitions,
            train_examples=len(client.train_idx),
            test_examples=len(client.test_idx),
            cpus=cpus,
            gpus=gpus,
            torch_threads=torch.get_num_threads(),
            state_bytes=state_bytes(context),
            data_source=client.data.source,
            device=str(client.compute.device),
        )
        return reply.content()

    return _reply(msg, context, run)


@handles(protocol.CHECKPOINT)
def checkpoint(msg: Message, context: Context) -> Message:
    """The client's optimizer state, for the server's checkpoint (momentum spans rounds)."""
    return _reply(msg, context, lambda: CheckpointReply(_restore(context)[0].momentum()).content())


@handles(protocol.RESTORE)
def restore(msg: Message, context: Context) -> Message:
    """Optimizer state from a checkpoint, when a run resumes."""

    def run() -> RecordDict:
        request = RestoreRequest.decode(msg.content)
        client, _ = _restore(context)
        client.load_momentum(request.optimizer)
        client.save(context.state)
        LIVE.put(_key(context), client)
        return RestoreReply(len(request.optimizer)).content()

    return _reply(msg, context, run)


@handles(protocol.TRAIN_FORWARD)
@handles(protocol.TRAIN_BACKWARD)
def train(msg: Message, context: Context) -> Message:
    """Both types go to ``SplitClient.train``: a backward message just also carries a gradient."""

    def step(client: SplitClient) -> protocol.TrainReply:
        client.start_measuring()  # this message's peaks
        return client.train(TrainRequest.decode(msg.content))

    return _reply(msg, context, lambda: _step(context, step))


@handles(protocol.EVALUATE)
def evaluate(msg: Message, context: Context) -> Message:
    def step(client: SplitClient) -> protocol.EvaluateReply:
        return client.evaluate(EvaluateRequest.decode(msg.content))

    return _reply(msg, context, lambda: _step(context, step))


def _step(
    context: Context,
    handler: Callable[[SplitClient], protocol.TrainReply | protocol.EvaluateReply],
) -> RecordDict:
    t0 = time.perf_counter()
    client, rebuilt = _restore(context)
    reply = handler(client)
    client.save(context.state)
    LIVE.put(_key(context), client)
    m = reply.metrics
    m.handler_seconds = time.perf_counter() - t0  # restore + step + save
    m.rebuilt, m.live_clients, m.state_bytes = int(rebuilt), len(LIVE), state_bytes(context)
    reply.ray_node = ray_node_id()
    return reply.content()


def _restore(context: Context) -> tuple[SplitClient, bool]:
    """The live client if it is exactly the one ``context.state`` describes, else a rebuild."""
    version = client_state.saved_version(context.state)
    cached = LIVE.get(_key(context), version) if version is not None else None
    if cached is not None:
        return cached, False
    client = SplitClient.from_state(context.state)
    _set_threads(client.cfg, client.num_partitions)
    return client, True


def _reply(msg: Message, context: Context, run: Callable[[], RecordDict]) -> Message:
    """Errors go back as a short reason naming the problem, not a Ray traceback."""
    try:
        return Message(run(), reply_to=msg)
    except Exception as exc:
        LIVE.drop(_key(context))  # a half-applied step must not be reused
        log.error("node %s: %s", context.node_id, traceback.format_exc())
        reason = f"{type(exc).__name__}: {exc}"
        return Message(
            Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=msg
        )


def assigned_resources() -> tuple[float, float]:
    """CPUs and GPUs this process was given: its Ray actor's share in simulation, else all it
    may run on (a SuperNode's ClientApp process)."""
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        assigned = ray.get_runtime_context().get_assigned_resources()
        return float(assigned.get("CPU", 0.0)), float(assigned.get("GPU", 0.0))
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return float(len(os.sched_getaffinity(0))), float(gpus)


def ray_node_id() -> str | None:
    """The Ray node of the actor running this message (None outside a Ray simulation): on a
    multi-node Ray cluster, rounds.jsonl shows where the clients' work ran."""
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return None
    return ray.get_runtime_context().get_node_id()


def state_bytes(context: Context) -> int:
    """Array bytes of this node's ``context.state``: they travel with every simulated message."""
    return sum(record_bytes(r) for r in context.state.array_records.values())


def _set_threads(cfg: RunConfig, num_clients: int) -> None:
    threads = cfg.torch_threads(cfg.client_threads, num_clients, assigned_resources()[0])
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


def _key(context: Context) -> tuple[int, int]:
    return context.run_id, context.node_id
