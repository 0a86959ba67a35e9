"""Flower ClientApp: thin handlers around ``SplitClient``, with ``context.state`` as the truth.

Message types (server -> client):
  query.setup     run config; the client finds its data and cuts its partition
  train.forward   next batch (CSL) or next chunk of batches (DSL); the first of a round
                  carries the global client weights
  train.backward  CSL only: dL/d(activations) of the last batch, and a request for the next
  evaluate        test-set activations; the first of a round carries the global weights

An in-process cache keeps the live ``SplitClient`` (and CSL's autograd graph) between
messages; it is used only when its version matches the one in ``context.state``.
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import Callable

import torch
from flwr.app import ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode

from flower_app.client import SplitClient
from flower_app.config import RunConfig

app = ClientApp()
log = logging.getLogger(__name__)

_LIVE: dict[tuple[int, int], SplitClient] = {}


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
        _set_threads(cfg, int(node["num-partitions"]))
        client = SplitClient.create(
            cfg, int(node["partition-id"]), int(node["num-partitions"]), data_dir
        )
        client.save(context.state)
        _LIVE[_key(context)] = client
        return RecordDict(
            {
                "metrics": MetricRecord(
                    {
                        "partition-id": client.partition_id,
                        "num-partitions": client.num_partitions,
                        "train-examples": len(client.train_idx),
                        "test-examples": len(client.test_idx),
                    }
                ),
                "info": ConfigRecord({"data-source": client.data.source}),
            }
        )

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
    client = _restore(context)
    reply = handler(client, content)
    client.save(context.state)
    _LIVE[_key(context)] = client
    return reply


def _restore(context: Context) -> SplitClient:
    """The cached client if it is exactly the one ``context.state`` describes, else a rebuild."""
    cached = _LIVE.get(_key(context))
    meta = context.state.get("split.meta")
    if cached is not None and meta is not None and cached.version == meta["version"]:
        return cached
    client = SplitClient.from_state(context.state)
    _set_threads(client.cfg, client.num_partitions)
    return client


def _reply(msg: Message, context: Context, run: Callable[[], RecordDict]) -> Message:
    """Errors go back as a short reason naming the problem, not a Ray traceback."""
    try:
        return Message(run(), reply_to=msg)
    except Exception as exc:
        _LIVE.pop(_key(context), None)  # a half-applied step must not be reused
        log.error("node %s: %s", context.node_id, traceback.format_exc())
        reason = f"{type(exc).__name__}: {exc}"
        return Message(
            Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=msg
        )


def _set_threads(cfg: RunConfig, num_clients: int) -> None:
    threads = cfg.torch_threads(cfg.client_threads, num_clients)
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


def _key(context: Context) -> tuple[int, int]:
    return context.run_id, context.node_id
