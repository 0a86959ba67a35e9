"""A split-learning client's whole state as records of Flower's ``context.state``.

``context.state`` is the source of truth: simulation may route a node's messages to any Ray
actor and deployment starts a fresh process for every message, so everything a client needs to
continue (weights, momentum, data cursor, its set-up) round-trips through these records. All
randomness is derived from the seed and the cursor, so none of it is stored.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from split_core.config import RunConfig
from split_core.protocol import NUM_PARTITIONS, PARTITION_ID

WEIGHTS = "split.weights"
OPTIMIZER = "split.optim"
CURSOR = "split.meta"
SETUP = "split.config"
PARTITION = "split.partition"
NODE_DATA_DIR = "node-data-dir"  # in the set-up record: the data dir this node resolved


@dataclass
class Cursor:
    """Where a client is: the version a process cache checks, and its place in the data."""

    version: int = 0
    epoch: int = 0
    cursor: int = 0  # next training batch of the epoch
    pending: int = -1  # batch whose activations await the server's gradient (CSL, feedback)
    eval_cursor: int = 0  # next test sample

    _KEYS = {"eval_cursor": "eval-cursor"}

    def record(self) -> ConfigRecord:
        names = ("version", "epoch", "cursor", "pending", "eval_cursor")
        return ConfigRecord({self._KEYS.get(n, n): getattr(self, n) for n in names})

    @classmethod
    def from_record(cls, record: ConfigRecord) -> Cursor:
        names = ("version", "epoch", "cursor", "pending", "eval_cursor")
        return cls(**{n: int(record[cls._KEYS.get(n, n)]) for n in names})


@dataclass(frozen=True)
class Setup:
    """What set-up decided for this node: the run config, its partition, where its data is."""

    cfg: RunConfig
    partition_id: int
    num_partitions: int
    data_dir: str
    train_idx: np.ndarray
    test_idx: np.ndarray

    def identity(self) -> dict[str, Any]:
        """The config record: a node set up again with the same identity keeps its state."""
        return identity(self.cfg, self.partition_id, self.num_partitions, self.data_dir)


def identity(cfg: RunConfig, partition_id: int, num_partitions: int, data_dir: str) -> dict:
    return cfg.to_run_config() | {
        PARTITION_ID: partition_id,
        NUM_PARTITIONS: num_partitions,
        NODE_DATA_DIR: data_dir,
    }


def has_setup(state: RecordDict) -> bool:
    return SETUP in state


def same_setup(state: RecordDict, wanted: dict[str, Any]) -> bool:
    """Was this node set up exactly so before (a client set up again after a failure)?"""
    return has_setup(state) and dict(state[SETUP]) == wanted


def saved_version(state: RecordDict) -> int | None:
    return int(state[CURSOR]["version"]) if CURSOR in state else None


def write(
    state: RecordDict, setup: Setup, weights: ArrayRecord, momentum: ArrayRecord, cursor: Cursor
) -> None:
    """Everything needed to continue; the set-up records only once (they never change)."""
    state[WEIGHTS] = weights
    state[OPTIMIZER] = momentum
    state[CURSOR] = cursor.record()
    if not has_setup(state):
        state[SETUP] = ConfigRecord(setup.identity())
        state[PARTITION] = ArrayRecord(
            {  # CIFAR has 60,000 images: int32 indices halve what travels with each message
                "train": Array(setup.train_idx.astype(np.int32)),
                "test": Array(setup.test_idx.astype(np.int32)),
            }
        )


def read_setup(state: RecordDict) -> Setup:
    if not has_setup(state):
        raise RuntimeError(
            "this node has no split-learning state: the set-up message never reached it"
        )
    conf = dict(state[SETUP])
    ids = (conf.pop(PARTITION_ID), conf.pop(NUM_PARTITIONS), conf.pop(NODE_DATA_DIR))
    part = state[PARTITION]
    train, test = (part[k].numpy().astype(np.int64) for k in ("train", "test"))
    return Setup(RunConfig.from_run_config(conf), ids[0], ids[1], ids[2], train, test)


def read_progress(state: RecordDict) -> tuple[ArrayRecord, ArrayRecord, Cursor]:
    """Weights, momentum and cursor, as ``write`` left them."""
    return state[WEIGHTS], state[OPTIMIZER], Cursor.from_record(state[CURSOR])


# ---------------------------------------------------------------------------- momentum
def momentum_record(optimizer: torch.optim.Optimizer) -> ArrayRecord:
    """SGD's momentum buffers by parameter index (parameters that have one yet)."""
    state = optimizer.state
    return ArrayRecord(
        {
            str(i): Array(state[p]["momentum_buffer"].detach().contiguous().cpu().numpy())
            for i, p in enumerate(_params(optimizer))
            if state.get(p, {}).get("momentum_buffer") is not None
        }
    )


def load_momentum(
    optimizer: torch.optim.Optimizer, record: ArrayRecord, device: torch.device
) -> None:
    """Momentum buffers by parameter index, as ``momentum_record`` writes them."""
    params = _params(optimizer)
    for key, array in record.items():
        buffer = torch.from_numpy(array.numpy().copy()).to(device)
        optimizer.state[params[int(key)]]["momentum_buffer"] = buffer


def _params(optimizer: torch.optim.Optimizer) -> list[torch.nn.Parameter]:
    return [p for g in optimizer.param_groups for p in g["params"]]
