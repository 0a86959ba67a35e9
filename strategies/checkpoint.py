"""``<run dir>/checkpoint.pt``: everything a run needs to continue exactly where it stopped.

Written at the end of a round, atomically (a temporary file, then ``os.replace``), so a crash
leaves either the previous checkpoint or the new one, never half of one. All tensors are on
the CPU. What it holds, and why that is all:

- ``round``: the last round finished; the learning-rate schedule is a function of the round;
- the server segment and its optimizer (momentum);
- the global client weights (segment and aux head) that the next round starts from;
- each client's optimizer state, by partition id: client momentum carries over rounds;
- ``history``: the round records so far, so ``rounds.jsonl`` is rewritten to match.
Data order and augmentation are functions of (seed, partition, epoch, batch), and a round
always starts at the first batch, so no cursor or random state needs saving.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

CHECKPOINT = "checkpoint.pt"


@dataclass
class Checkpoint:
    round: int
    server_segment: dict[str, torch.Tensor]
    server_optimizer: dict[str, Any]
    client_weights: dict[str, np.ndarray]
    client_optimizers: dict[int, dict[str, np.ndarray]]  # partition id -> momentum arrays
    history: list[dict[str, Any]] = field(default_factory=list)

    def global_arrays(self) -> ArrayRecord:
        return ArrayRecord({k: Array(v) for k, v in self.client_weights.items()})


def save(checkpoint: Checkpoint, run_dir: Path) -> Path:
    path = Path(run_dir) / CHECKPOINT
    tmp = path.with_suffix(".tmp")
    torch.save(checkpoint.__dict__, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def load(run_dir: Path) -> Checkpoint:
    path = Path(run_dir) / CHECKPOINT
    if not path.is_file():
        raise FileNotFoundError(
            f"no {CHECKPOINT} in {run_dir}: the run wrote none (checkpoint-every=0, or it "
            "stopped before its first round ended)"
        )
    return Checkpoint(**torch.load(path, weights_only=False))


def optimizer_to_cpu(state: dict[str, Any]) -> dict[str, Any]:
    """A torch optimizer's state_dict with every tensor moved to the CPU."""
    return {
        "state": {
            k: {n: v.detach().cpu() if torch.is_tensor(v) else v for n, v in s.items()}
            for k, s in state["state"].items()
        },
        "param_groups": state["param_groups"],
    }
