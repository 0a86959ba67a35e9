"""The run configuration: flat kebab-case keys, defaults from pyproject, all checked up front.

``[tool.flwr.app.config]`` in pyproject.toml is the single source of the defaults: `flwr run`
reads it, and in-process callers (the reference trainer, notebooks, tests) read the same file
through :func:`default_run_config`. Validation happens before any message is sent, so a wrong
value fails in one clear error instead of half-way through a round.
"""

from __future__ import annotations

import dataclasses
import math
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import torch

from models import AUX_HEADS, check_cut, cut_shape
from split_core.compute import COMPUTE_DTYPES
from split_core.data import DATASETS
from split_core.methods import METHODS, make_method
from split_core.payload import WIRE_ITEMSIZE
from split_core.protocol import train_rows_per_message

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"
# The same file inside an installed wheel, which has no source tree (hatch force-include).
PACKAGED_PYPROJECT = Path(__file__).resolve().parent / "app_config.toml"
PARTITIONS = ("iid", "dirichlet")
LR_SCHEDULES = ("constant", "step", "cosine")
AGGREGATIONS = ("fedavg", "median", "trimmed-mean")  # strategies/aggregation.py


class ConfigError(ValueError):
    """A run-config value is missing, of the wrong type, or out of range."""


@cache
def default_run_config() -> dict[str, Any]:
    """``[tool.flwr.app.config]``, from the wheel's copy of pyproject.toml when installed, else
    from the source tree's (a checkout or an editable install never holds the copy)."""
    source = PACKAGED_PYPROJECT if PACKAGED_PYPROJECT.is_file() else PYPROJECT
    with source.open("rb") as f:
        return dict(tomllib.load(f)["tool"]["flwr"]["app"]["config"])


@dataclass(frozen=True)
class RunConfig:
    method: str
    dataset: str
    data_dir: str
    depth: int
    cut: int
    aux_head: str
    aux_weight: float
    feedback_every: int
    feedback_alpha: float
    num_rounds: int
    batch_size: int
    lr: float
    lr_schedule: str
    lr_warmup_rounds: int
    momentum: float
    weight_decay: float
    partition: str
    dirichlet_alpha: float
    samples_per_client: int
    test_samples: int
    seed: int
    chunk_mib: float
    chunk_taper: bool
    payload_dtype: str
    compute_dtype: str
    channels_last: bool
    device: str
    client_threads: int
    server_threads: int
    live_clients: int
    max_active_clients: int
    max_queued_chunks: int
    poll_seconds: float
    min_clients: int
    reply_timeout: float
    round_timeout: float
    max_activation: float
    max_weight: float
    server_grad_clip: float
    aggregation: str
    trim_fraction: float
    max_update_norm: float
    checkpoint_every: int
    resume_from: str
    progress_seconds: float
    probe_samples: int
    output_dir: str
    run_name: str

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any] | None = None) -> RunConfig:
        """Defaults overlaid with ``run_config``; raises one ConfigError listing every problem."""
        values = default_run_config() | dict(run_config or {})
        known = {_key(f.name): f for f in dataclasses.fields(cls)}
        problems = [f"unknown key {k!r}" for k in values if k not in known]
        kwargs = {}
        for key, field in known.items():
            if key not in values:
                problems.append(f"missing key {key!r}")
                continue
            try:
                kwargs[field.name] = _coerce(values[key], field.type)
            except TypeError as exc:
                problems.append(f"{key}: {exc}")
        if not problems:
            cfg = cls(**kwargs)
            problems = cfg._problems()
        if problems:
            raise ConfigError("invalid run config: " + "; ".join(problems))
        return cfg

    def _problems(self) -> list[str]:
        checks = [
            (self.method in METHODS, f"method {self.method!r} is not one of {sorted(METHODS)}"),
            (self.dataset in DATASETS, f"dataset {self.dataset!r} is not one of {list(DATASETS)}"),
            (self.aux_head in AUX_HEADS, f"aux-head {self.aux_head!r} not in {sorted(AUX_HEADS)}"),
            (self.partition in PARTITIONS, f"partition {self.partition!r} not in {PARTITIONS}"),
            (
                self.lr_schedule in LR_SCHEDULES,
                f"lr-schedule {self.lr_schedule!r} not in {LR_SCHEDULES}",
            ),
            (
                self.payload_dtype in WIRE_ITEMSIZE,
                f"payload-dtype {self.payload_dtype!r} not in {tuple(WIRE_ITEMSIZE)}",
            ),
            (self.num_rounds >= 1, f"num-rounds must be >= 1, got {self.num_rounds}"),
            (self.aux_weight >= 0, f"aux-weight must be >= 0, got {self.aux_weight}"),
            (self.feedback_every >= 0, "feedback-every must be >= 0 (0 = pure DSL)"),
            (
                self.feedback_every == 0 or self.method == "dsl",
                f"feedback-every applies to method 'dsl', not {self.method!r}",
            ),
            (self.batch_size >= 1, f"batch-size must be >= 1, got {self.batch_size}"),
            (self.lr > 0, f"lr must be > 0, got {self.lr}"),
            (
                0 <= self.lr_warmup_rounds <= self.num_rounds,
                f"lr-warmup-rounds must be in [0, num-rounds], got {self.lr_warmup_rounds}",
            ),
            (0 <= self.momentum < 1, f"momentum must be in [0, 1), got {self.momentum}"),
            (self.weight_decay >= 0, f"weight-decay must be >= 0, got {self.weight_decay}"),
            (self.dirichlet_alpha > 0, f"dirichlet-alpha must be > 0, got {self.dirichlet_alpha}"),
            (self.samples_per_client >= 0, "samples-per-client must be >= 0 (0 = all)"),
            (self.test_samples >= 0, "test-samples must be >= 0 (0 = all)"),
            (self.chunk_mib > 0, f"chunk-mib must be > 0, got {self.chunk_mib}"),
            (
                self.compute_dtype in COMPUTE_DTYPES,
                f"compute-dtype {self.compute_dtype!r} not in {tuple(COMPUTE_DTYPES)}",
            ),
            (self.client_threads >= 0 and self.server_threads >= 0, "threads must be >= 0"),
            (self.live_clients >= 1, f"live-clients must be >= 1, got {self.live_clients}"),
            (
                self.max_active_clients >= 1,
                f"max-active-clients must be >= 1, got {self.max_active_clients}",
            ),
            (
                self.max_queued_chunks >= 1,
                f"max-queued-chunks must be >= 1, got {self.max_queued_chunks}",
            ),
            (self.progress_seconds >= 0, "progress-seconds must be >= 0 (0 = no progress log)"),
            (self.probe_samples >= 0, "probe-samples must be >= 0 (0 = no privacy probe)"),
            (
                0 < self.poll_seconds <= 10,
                f"poll-seconds must be in (0, 10], got {self.poll_seconds}",
            ),
            (self.reply_timeout > 0, f"reply-timeout must be > 0 s, got {self.reply_timeout}"),
            (self.round_timeout >= 0, "round-timeout must be >= 0 s (0 = none)"),
            (self.max_activation > 0, f"max-activation must be > 0, got {self.max_activation}"),
            (self.max_weight > 0, f"max-weight must be > 0, got {self.max_weight}"),
            (self.server_grad_clip >= 0, "server-grad-clip must be >= 0 (0 = no clipping)"),
            (
                self.aggregation in AGGREGATIONS,
                f"aggregation {self.aggregation!r} not in {AGGREGATIONS}",
            ),
            (
                0 <= self.trim_fraction < 0.5,
                f"trim-fraction must be in [0, 0.5), got {self.trim_fraction}",
            ),
            (self.max_update_norm >= 0, "max-update-norm must be >= 0 (0 = no bound)"),
            (self.checkpoint_every >= 0, "checkpoint-every must be >= 0 (0 = no checkpoint)"),
            (self.min_clients >= 1, f"min-clients must be >= 1, got {self.min_clients}"),
            (bool(self.output_dir), "output-dir must not be empty"),
        ]
        problems = [msg for ok, msg in checks if not ok]
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, float) and not math.isfinite(value):
                problems.append(f"{_key(field.name)} must be a finite number, got {value}")
        try:
            check_cut(self.depth, self.cut)
        except ValueError as exc:
            problems.append(str(exc))
        try:
            torch.device("cuda" if self.device == "auto" else self.device)
        except RuntimeError:
            problems.append(f"device {self.device!r} is not 'auto', 'cpu', 'cuda' or 'cuda:N'")
        return problems

    @property
    def num_classes(self) -> int:
        return DATASETS[self.dataset]

    def to_run_config(self) -> dict[str, Any]:
        """The flat kebab-case form, as it travels in a ConfigRecord and lands in config.json."""
        return {_key(k): v for k, v in dataclasses.asdict(self).items()}

    def lr_at(self, server_round: int) -> float:
        """The learning rate of a round (1-based; one round is one epoch).

        "step" (He et al.) divides by 10 at 50 % and 75 % of training; "cosine" anneals from lr
        towards 0 as 0.5 lr (1 + cos(pi (r-1) / R)), so the last round still learns. A linear
        warm-up scales the first lr-warmup-rounds W by r / W: a large lr on an untrained
        network can diverge in its first epoch, and one factor keeps it valid for any schedule.
        """
        done = (server_round - 1) / self.num_rounds
        if self.lr_schedule == "step":
            lr = self.lr * (0.1 ** ((done >= 0.5) + (done >= 0.75)))
        elif self.lr_schedule == "cosine":
            lr = 0.5 * self.lr * (1 + math.cos(math.pi * done))
        else:
            lr = self.lr
        if server_round <= self.lr_warmup_rounds:
            lr *= server_round / self.lr_warmup_rounds
        return lr

    def torch_threads(self, requested: int, num_clients: int, cpus: float | None = None) -> int:
        """Threads for one party; 0 = auto from measurements on 2 cores (see README).

        Client and server compute at the same time in DSL (pipelined chunks) and with several
        clients, and then each is fastest with half the cores; when they take turns (see
        ``parties_take_turns``) each may use them all. ``cpus`` is what the party was given (a
        Ray actor's CPUs in simulation): auto never uses more than that.
        """
        if requested:
            return requested
        cores = os.cpu_count() or 1
        threads = cores if self.parties_take_turns(num_clients) else max(1, cores // 2)
        return max(1, min(threads, int(cpus))) if cpus else threads

    def parties_take_turns(self, num_clients: int) -> bool:
        """One client whose every chunk ends at a batch that waits for the server's gradient:
        CSL, and DSL with ``feedback-every`` at most a chunk's batches (4 at cut 3 with the
        default chunk-mib). Client and server then never compute at once, and DSL's pipelining
        is gone (benchmarks/feedback_threads.py measures both thread counts)."""
        if num_clients != 1:
            return False
        return make_method(self).waits_every_batch or (
            0 < self.feedback_every <= self.batches_per_chunk()
        )

    def batches_per_chunk(self) -> int:
        """Mini-batches in a full training chunk (``chunk-mib``), before a wait may end it."""
        shape = cut_shape(self.depth, self.cut)
        itemsize = WIRE_ITEMSIZE[self.payload_dtype]
        return train_rows_per_message(self.chunk_mib, shape, itemsize, self.batch_size) // (
            self.batch_size
        )

    def resolve_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)


def parse_overrides(args: list[str]) -> dict[str, Any]:
    """``key=value`` arguments with TOML values, as `flwr run --run-config` takes them."""
    overrides = {}
    for arg in args:
        key, sep, value = arg.partition("=")
        if not sep:
            raise ConfigError(f"expected key=value, got {arg!r}")
        overrides[key] = tomllib.loads(f"v = {value}")["v"]
    return overrides


def _key(field_name: str) -> str:
    return field_name.replace("_", "-")


def _coerce(value: Any, type_name: str) -> Any:
    """Run-config values arrive from TOML or the command line: accept 1 for 1.0, never "1" for 1."""
    if type_name == "float" and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if type_name == "int" and isinstance(value, int) and not isinstance(value, bool):
        return value
    if type_name == "int" and isinstance(value, float) and value.is_integer():
        return int(value)
    if type_name == "str" and isinstance(value, str):
        return value
    if type_name == "bool" and isinstance(value, bool):
        return value
    raise TypeError(f"expected {type_name}, got {type(value).__name__} {value!r}")
