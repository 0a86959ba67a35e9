"""The results contract: <output-dir>/<run-name>/{config.json, rounds.jsonl, model.pt}.

One JSON object per round, written as soon as the round ends, so a sweep or a notebook can read
a run that is still going or that crashed; plus a readable line per round and a summary table.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from split_core.config import RunConfig
from strategies import checkpoint as checkpoints

log = logging.getLogger("flwr").getChild("split")

CONTRACT_KEYS = (
    "round",
    "method",
    "test_accuracy",
    "aux_test_accuracy",
    "train_loss",
    "aux_train_loss",
    "bytes_activations",
    "bytes_labels",
    "bytes_gradients",
    "bytes_model_sync",
    "bytes_eval",
    "client_peak_saved_bytes",
    "server_peak_saved_bytes",
    "client_peak_rss_bytes",
    "server_peak_rss_bytes",
    "round_seconds",
    "client_compute_seconds",
    "server_compute_seconds",
    "wait_seconds",
)


RUN_FILES = ("config.json", "rounds.jsonl", "checkpoint.pt", "model.pt")


class RunDirExists(FileExistsError):
    """A new run was pointed at a directory that already holds a run's results."""


def default_run_name(cfg: RunConfig, num_clients: int) -> str:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return f"{cfg.method}-resnet{cfg.depth}-cut{cfg.cut}-k{num_clients}-{stamp}"


def named_run_dir(cfg: RunConfig) -> Path | None:
    """``<output-dir>/<run-name>`` when run-name is set (the default name needs the clients)."""
    return (Path(cfg.output_dir).expanduser() / cfg.run_name).resolve() if cfg.run_name else None


def check_new_run_dir(path: Path) -> None:
    """Refuse a directory that holds a run: before set-up, so a mistake costs nothing."""
    held = [name for name in RUN_FILES if (path / name).exists()]
    if held:
        raise RunDirExists(
            f"{path} already holds a run ({', '.join(held)}); a new run never overwrites one. "
            f"Choose another run-name, remove that directory, or continue its run with "
            f"resume-from='{path}'"
        )


def claim_new_run_dir(cfg: RunConfig, num_clients: int) -> Path:
    """Create the directory of a new run and claim it by creating its ``rounds.jsonl``
    exclusively, so two runs never share one. A named run that finds its directory taken
    raises :class:`RunDirExists`; a default (timestamp) name that collides gets -2, -3, ..."""
    if cfg.run_name:
        path = named_run_dir(cfg)
        if not _claim(path):
            check_new_run_dir(path)
            raise RunDirExists(f"{path} was claimed by another run at the same time")
        return path
    base = default_run_name(cfg, num_clients)
    for n in range(1, 1000):
        path = (Path(cfg.output_dir).expanduser() / (base if n == 1 else f"{base}-{n}")).resolve()
        if _claim(path):
            return path
    raise RunDirExists(f"999 run directories named {base}[-n] exist in {cfg.output_dir}")


def _claim(path: Path) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    if any((path / name).exists() for name in RUN_FILES):
        return False
    try:
        with open(path / "rounds.jsonl", "x"):
            pass
    except FileExistsError:
        return False
    checkpoints.fsync_dir(path)
    return True


class ResultsWriter:
    """Writes one run's directory, durably: each round is fsynced as it is appended, and
    every other file is replaced atomically (temporary file, fsync, rename, directory fsync).

    A new run claims a directory of its own and never writes into another run's. A resumed
    run (``run_dir`` given) reopens its directory with the rounds its checkpoint holds, so
    ``rounds.jsonl`` lists every round once, whatever was written after that checkpoint.
    """

    def __init__(
        self,
        cfg: RunConfig,
        num_clients: int,
        run_dir: Path | None = None,
        history: list[dict[str, Any]] | None = None,
    ) -> None:
        self.cfg = cfg
        self.config_hash = checkpoints.config_hash(cfg.to_run_config())
        self.checkpoint_round: int | None = None  # the round of the newest checkpoint.pt
        self.run_dir = run_dir or claim_new_run_dir(cfg, num_clients)
        self.rounds_path = self.run_dir / "rounds.jsonl"
        if run_dir is not None:
            text = "".join(strict_json(r) + "\n" for r in history or [])
            checkpoints.write_atomically(self.rounds_path, lambda f: f.write(text.encode()))

    def write_config(self, extra: dict[str, Any]) -> None:
        """config.json; a resumed run records its config as it now is (num-rounds may have
        grown) and appends what this resumption was (``extra``) to its ``resumed`` list."""
        path = self.run_dir / "config.json"
        current = {"run_config": self.cfg.to_run_config(), "config_hash": self.config_hash}
        if self.cfg.resume_from and path.exists():
            payload = json.loads(path.read_text()) | current
            payload.setdefault("resumed", []).append(extra | {"time": time.strftime("%c")})
        else:
            payload = current | extra
        text = json.dumps(payload, indent=2, default=str) + "\n"
        checkpoints.write_atomically(path, lambda f: f.write(text.encode()))

    def write_checkpoint(self, checkpoint: checkpoints.Checkpoint) -> None:
        checkpoint = dataclasses.replace(checkpoint, config_hash=self.config_hash)
        checkpoints.save(checkpoint, self.run_dir)
        self.checkpoint_round = checkpoint.round

    def write_round(self, record: dict[str, Any]) -> None:
        """Append one line and fsync it: a round reported is a round on disk."""
        with self.rounds_path.open("a") as f:
            f.write(strict_json(record) + "\n")
            f.flush()
            os.fsync(f.fileno())
        log.info(round_line(record, self.cfg.num_rounds))

    def write_model(self, modules: dict[str, dict[str, torch.Tensor]]) -> None:
        checkpoints.write_atomically(self.run_dir / "model.pt", lambda f: torch.save(modules, f))


def strict_json(record: Any) -> str:
    """One line of strict JSON: NaN and infinities (a diverged loss) become ``null``."""
    return json.dumps(_finite(record), allow_nan=False)


def _finite(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, str | bytes):  # numpy scalars
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def human_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def _num(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


def _secs(v: float) -> str:
    return f"{v:.1f}"


def round_line(r: dict[str, Any], num_rounds: int) -> str:
    aux = (
        "" if r["aux_test_accuracy"] is None else f"  aux-acc {100 * r['aux_test_accuracy']:5.1f}%"
    )
    return (
        f"[round {r['round']}/{num_rounds}] {r['method'].upper()}  test-acc "
        f"{_pct(r['test_accuracy'])}{aux}  train-loss {_num(r['train_loss'])}  "
        f"sent {human_bytes(r['bytes_train_total'])} (acts {human_bytes(r['bytes_activations'])}, "
        f"grads {human_bytes(r['bytes_gradients'])})  {r['round_seconds']:.1f} s"
    )


SUMMARY_COLUMNS = (
    ("round", "round", str),
    ("test acc", "test_accuracy", _pct),
    ("aux acc", "aux_test_accuracy", _pct),
    ("train loss", "train_loss", _num),
    ("acts", "bytes_activations", human_bytes),
    ("labels", "bytes_labels", human_bytes),
    ("grads", "bytes_gradients", human_bytes),
    ("sync", "bytes_model_sync", human_bytes),
    ("eval", "bytes_eval", human_bytes),
    ("client saved", "client_peak_saved_bytes", human_bytes),
    ("server saved", "server_peak_saved_bytes", human_bytes),
    ("client rss", "client_peak_rss_bytes", human_bytes),
    ("server rss", "server_peak_rss_bytes", human_bytes),
    ("round s", "round_seconds", _secs),
    ("client s", "client_compute_seconds", _secs),
    ("server s", "server_compute_seconds", _secs),
    ("wait s", "wait_seconds", _secs),
)


def summary_table(history: list[dict[str, Any]]) -> str:
    """A plain-text table of every round: what the paper's figures are made of."""
    rows = [[title for title, _, _ in SUMMARY_COLUMNS]]
    rows += [[fmt(r[key]) for _, key, fmt in SUMMARY_COLUMNS] for r in history]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.rjust(w) for cell, w in zip(row, widths, strict=True)) for row in rows]
    return "\n".join([lines[0], "-" * len(lines[0]), *lines[1:]])


def read_run_config(run_dir: str | Path) -> dict[str, Any]:
    """The run config a run recorded in its config.json."""
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: {run_dir} is not a run directory")
    return json.loads(path.read_text())["run_config"]


def read_rounds(run_dir: str | Path) -> list[dict[str, Any]]:
    """Every round recorded. A last line cut off mid-write (a crash, or a run still writing)
    is skipped with a warning; any other line that is not JSON is an error."""
    path = Path(run_dir) / "rounds.jsonl"
    lines = [(n, line) for n, line in enumerate(path.read_text().splitlines(), 1) if line.strip()]
    rounds = []
    for n, line in lines:
        try:
            rounds.append(json.loads(line))
        except json.JSONDecodeError as exc:
            if n != lines[-1][0]:
                raise ValueError(f"{path}: line {n} is not JSON ({exc})") from exc
            warnings.warn(f"{path}: skipped line {n}, cut off mid-write ({exc})", RuntimeWarning, 2)
    return rounds
