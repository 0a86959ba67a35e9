"""Flower ClientApp: thin handlers around ``SplitClient``, with ``context.state`` as the truth.

Message types (server -> client):
  query.setup     run config; the client finds its data and cuts its partition
  train.forward   next batch (CSL) or next chunk of batches (DSL); the first of a round
                  carries the global client weights
  train.backward  CSL only: dL/d(activations) of the last batch, and a request for the next
  evaluate        test-set activations; the first of a round carries the global weights

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
from flwr.app import ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode

from flower_app.client import SplitClient
from split_core.config import RunConfig
from split_core.payload import record_bytes

app = ClientApp()
log = logging.getLogger(__name__)


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


@app.query("setup")
def setup(msg: Message, context: Context) -> Message:
    def run() -> RecordDict:
        cfg = RunConfig.from_run_config(dict(msg.content["config"]))
        node = context.node_config
        missing = [k for k in ("partition-id", "num-partitions") if k not in node]
        if missing:
            raise ValueError(
                f"node config lacks {missing}: start the SuperNode with "
                '--node-config "partition-id=<i> num-partitions=<n>"'
            )
        data_dir = str(node.get("data-dir", cfg.data_dir))
        cpus, gpus = assigned_resources()
        _set_threads(cfg, int(node["num-partitions"]))
        pid, parts = int(node["partition-id"]), int(node["num-partitions"])
        if _same_setup(context, cfg, pid, parts, data_dir):  # set up again after a failure
            client, _ = _restore(context)
        else:
            client = SplitClient.create(cfg, pid, parts, data_dir)
        client.save(context.state)
        LIVE.put(_key(context), client)
        metrics = {
            "partition-id": client.partition_id,
            "num-partitions": client.num_partitions,
            "train-examples": len(client.train_idx),
            "test-examples": len(client.test_idx),
            "cpus": cpus,
            "gpus": gpus,
            "torch-threads": torch.get_num_threads(),
            "state-bytes": state_bytes(context),
        }
        return RecordDict(
            {
                "metrics": MetricRecord(metrics),
                "info": ConfigRecord(
                    {"data-source": client.data.source, "device": str(client.compute.device)}
                ),
            }
        )

    return _reply(msg, context, run)


@app.query("checkpoint")
def checkpoint(msg: Message, context: Context) -> Message:
    """The client's optimizer state, for the server's checkpoint (momentum spans rounds)."""
    return _reply(msg, context, lambda: RecordDict({"optim": _restore(context)[0].momentum()}))


@app.query("restore")
def restore(msg: Message, context: Context) -> Message:
    """Optimizer state from a checkpoint, when a run resumes."""

    def run() -> RecordDict:
        client, _ = _restore(context)
        client.load_momentum(msg.content["optim"])
        client.save(context.state)
        LIVE.put(_key(context), client)
        return RecordDict({"metrics": MetricRecord({"restored": len(msg.content["optim"])})})

    return _reply(msg, context, run)


@app.train("forward")
@app.train("backward")
def train(msg: Message, context: Context) -> Message:
    """Both types go to ``SplitClient.train``: a backward message just also carries a gradient."""
    return _reply(msg, context, lambda: _step(context, SplitClient.train, msg.content))


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    return _reply(msg, context, lambda: _step(context, SplitClient.evaluate, msg.content))


def _step(
    context: Context, handler: Callable[[SplitClient, RecordDict], RecordDict], content: RecordDict
) -> RecordDict:
    t0 = time.perf_counter()
    client, rebuilt = _restore(context)
    reply = handler(client, content)
    client.save(context.state)
    LIVE.put(_key(context), client)
    reply["metrics"]["handler-seconds"] = time.perf_counter() - t0  # restore + step + save
    reply["metrics"]["rebuilt"] = int(rebuilt)
    reply["metrics"]["live-clients"] = len(LIVE)
    reply["metrics"]["state-bytes"] = state_bytes(context)
    return reply


def _restore(context: Context) -> tuple[SplitClient, bool]:
    """The live client if it is exactly the one ``context.state`` describes, else a rebuild."""
    meta = context.state.get("split.meta")
    cached = LIVE.get(_key(context), meta["version"]) if meta is not None else None
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


def _same_setup(context: Context, cfg: RunConfig, pid: int, parts: int, data_dir: str) -> bool:
    saved = context.state.get("split.config")
    wanted = cfg.to_run_config() | {
        "partition-id": pid,
        "num-partitions": parts,
        "node-data-dir": data_dir,
    }
    return saved is not None and dict(saved) == wanted


def assigned_resources() -> tuple[float, float]:
    """CPUs and GPUs this process was given: its Ray actor's share in simulation, else all it
    may run on (a SuperNode's ClientApp process)."""
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        assigned = ray.get_runtime_context().get_assigned_resources()
        return float(assigned.get("CPU", 0.0)), float(assigned.get("GPU", 0.0))
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return float(len(os.sched_getaffinity(0))), float(gpus)


def state_bytes(context: Context) -> int:
    """Array bytes of this node's ``context.state``: they travel with every simulated message."""
    return sum(record_bytes(r) for r in context.state.array_records.values())


def _set_threads(cfg: RunConfig, num_clients: int) -> None:
    threads = cfg.torch_threads(cfg.client_threads, num_clients, assigned_resources()[0])
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


def _key(context: Context) -> tuple[int, int]:
    return context.run_id, context.node_id
