"""``<run dir>/checkpoint.pt``: everything a run needs to continue exactly where it stopped.

Written at the end of a round, atomically (a temporary file, its fsync, ``os.replace``, then
the directory's fsync), so a crash or a power cut leaves either the previous checkpoint or the
new one, never half of one. What it holds, and why that is all:

- ``round``: the last round finished; the learning-rate schedule is a function of the round;
- the server segment and its optimizer (momentum);
- the global client weights (segment and aux head) that the next round starts from;
- each client's optimizer state, by partition id: client momentum carries over rounds;
- ``history``: the round records so far, so ``rounds.jsonl`` is rewritten to match;
- ``config_hash``: a hash of the keys that define the experiment, so a checkpoint is never
  continued under another experiment's config (see :data:`MAY_CHANGE_ON_RESUME`).
Data order and augmentation are functions of (seed, partition, epoch, batch), and a round
always starts at the first batch, so no cursor or random state needs saving.

On disk every array is a CPU tensor and everything else a plain container or primitive, so the
file loads with ``torch.load(weights_only=True)``: opening a checkpoint never runs code from it.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

CHECKPOINT = "checkpoint.pt"
FORMAT = 2  # 1: numpy arrays, pickled (weights_only=False); 2: tensors and a config hash

# Keys that may differ between a run and its resumption: they say how long a run goes, how
# patient or how fast it is, and where its data lies, not what one round computes. num-rounds
# extends a finished run (the lr schedule depends on it unless lr-schedule is constant);
# threads change float summation order, the device the hardware, but not the experiment.
MAY_CHANGE_ON_RESUME = frozenset(
    {
        "num-rounds",
        "reply-timeout",
        "round-timeout",
        "poll-seconds",
        "client-threads",
        "server-threads",
        "progress-seconds",
        "checkpoint-every",
        "min-clients",
        "live-clients",
        "max-active-clients",
        "max-queued-chunks",
        "data-dir",
        "device",
    }
)
# Keys that only say where a run's results go: a resumed run writes into its own directory.
IGNORED_ON_RESUME = frozenset({"resume-from", "output-dir", "run-name"})


class CheckpointError(ValueError):
    """A checkpoint that cannot be continued: unreadable, or from another configuration."""


@dataclass
class Checkpoint:
    round: int
    server_segment: dict[str, torch.Tensor]
    server_optimizer: dict[str, Any]
    client_weights: dict[str, np.ndarray]
    client_optimizers: dict[int, dict[str, np.ndarray]]  # partition id -> momentum arrays
    history: list[dict[str, Any]] = field(default_factory=list)
    config_hash: str = ""  # set by whoever knows the run config (the results writer)

    def global_arrays(self) -> ArrayRecord:
        return ArrayRecord({k: Array(v) for k, v in self.client_weights.items()})


def experiment_keys(run_config: Mapping[str, Any]) -> dict[str, Any]:
    """The keys that define what a run computes: all but those that may change on resume."""
    skip = MAY_CHANGE_ON_RESUME | IGNORED_ON_RESUME
    return {k: v for k, v in sorted(run_config.items()) if k not in skip}


def config_hash(run_config: Mapping[str, Any]) -> str:
    """SHA-256 of the experiment's keys, in a canonical JSON form (sorted, exact floats)."""
    canonical = json.dumps(experiment_keys(run_config), sort_keys=True, allow_nan=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def save(checkpoint: Checkpoint, run_dir: Path) -> Path:
    if not checkpoint.config_hash:
        raise CheckpointError("a checkpoint needs the hash of its run config (config_hash)")
    path = Path(run_dir) / CHECKPOINT
    payload = {
        "format": FORMAT,
        "config_hash": checkpoint.config_hash,
        "round": int(checkpoint.round),
        "server_segment": {k: v.detach().cpu() for k, v in checkpoint.server_segment.items()},
        "server_optimizer": _plain(checkpoint.server_optimizer),
        "client_weights": _tensors(checkpoint.client_weights),
        "client_optimizers": {
            int(pid): _tensors(arrays) for pid, arrays in checkpoint.client_optimizers.items()
        },
        "history": _plain(checkpoint.history),
    }
    write_atomically(path, lambda f: torch.save(payload, f))
    return path


def load(run_dir: Path) -> Checkpoint:
    path = Path(run_dir) / CHECKPOINT
    if not path.is_file():
        raise FileNotFoundError(
            f"no {CHECKPOINT} in {run_dir}: the run wrote none (checkpoint-every=0, or it "
            "stopped before its first round ended)"
        )
    try:
        payload = torch.load(path, weights_only=True)
    except Exception as exc:  # the unpickler refuses anything but tensors and plain data
        raise CheckpointError(
            f"{path} cannot be loaded safely (torch.load weights_only=True): {exc}. A "
            f"checkpoint written before format {FORMAT} holds pickled numpy arrays; it is not "
            "opened, because unpickling it could run code"
        ) from exc
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise CheckpointError(f"{path} is not a format-{FORMAT} checkpoint (found {found!r})")
    return Checkpoint(
        round=payload["round"],
        server_segment=payload["server_segment"],
        server_optimizer=payload["server_optimizer"],
        client_weights=_arrays(payload["client_weights"]),
        client_optimizers={
            pid: _arrays(arrays) for pid, arrays in payload["client_optimizers"].items()
        },
        history=payload["history"],
        config_hash=payload["config_hash"],
    )


def write_atomically(path: Path, write: Any) -> None:
    """``write(file)`` into a temporary file, fsync it, rename it over ``path``, fsync the
    directory: the rename itself is then on disk too, so after a crash ``path`` is the old or
    the new file, whole."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def optimizer_to_cpu(state: dict[str, Any]) -> dict[str, Any]:
    """A torch optimizer's state_dict with every tensor moved to the CPU."""
    return {
        "state": {
            k: {n: v.detach().cpu() if torch.is_tensor(v) else v for n, v in s.items()}
            for k, s in state["state"].items()
        },
        "param_groups": state["param_groups"],
    }


def _tensors(arrays: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
    # a copy: Flower's arrays may be read-only views, which torch.from_numpy warns about
    return {str(k): torch.from_numpy(np.array(v, copy=True)) for k, v in arrays.items()}


def _arrays(tensors: Mapping[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in tensors.items()}


def _plain(value: Any) -> Any:
    """Tensors to the CPU, numpy values to Python ones, containers rebuilt: what the
    weights_only unpickler accepts."""
    if torch.is_tensor(value):
        return value.detach().cpu()
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.array(value, copy=True))
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if isinstance(value, list):
        return [_plain(v) for v in value]
    for kind in (bool, int, float, str):  # bool first: it is an int; subclasses become plain
        if isinstance(value, kind):
            return kind(value)
    if value is None:
        return None
    raise CheckpointError(f"cannot store {type(value).__name__} {value!r} in a checkpoint")
