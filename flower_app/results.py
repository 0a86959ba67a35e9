"""The results contract: <output-dir>/<run-name>/{config.json, rounds.jsonl, model.pt}.

One JSON object per round, written as soon as the round ends, so a sweep or a notebook can read
a run that is still going or that crashed; plus a readable line per round and a summary table.
"""

from __future__ import annotations

import json
import logging
import time
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


def default_run_name(cfg: RunConfig, num_clients: int) -> str:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return f"{cfg.method}-resnet{cfg.depth}-cut{cfg.cut}-k{num_clients}-{stamp}"


class ResultsWriter:
    """Writes one run's directory; a resumed run reopens it with the rounds its checkpoint holds,
    so ``rounds.jsonl`` lists every round once, whatever was written after that checkpoint."""

    def __init__(
        self,
        cfg: RunConfig,
        num_clients: int,
        run_dir: Path | None = None,
        history: list[dict[str, Any]] | None = None,
    ) -> None:
        self.cfg = cfg
        name = cfg.run_name or default_run_name(cfg, num_clients)
        self.run_dir = run_dir or (Path(cfg.output_dir).expanduser() / name).resolve()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.rounds_path = self.run_dir / "rounds.jsonl"
        self.rounds_path.write_text("".join(json.dumps(r) + "\n" for r in history or []))

    def write_config(self, extra: dict[str, Any]) -> None:
        path = self.run_dir / "config.json"
        if self.cfg.resume_from and path.exists():  # keep the recorded run; note the resume
            payload = json.loads(path.read_text())
            payload.setdefault("resumed", []).append(extra | {"time": time.strftime("%c")})
        else:
            payload = {"run_config": self.cfg.to_run_config(), **extra}
        path.write_text(json.dumps(payload, indent=2, default=str) + "\n")

    def write_checkpoint(self, checkpoint: checkpoints.Checkpoint) -> None:
        checkpoints.save(checkpoint, self.run_dir)

    def write_round(self, record: dict[str, Any]) -> None:
        with self.rounds_path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        log.info(round_line(record, self.cfg.num_rounds))

    def write_model(self, modules: dict[str, dict[str, torch.Tensor]]) -> None:
        torch.save(modules, self.run_dir / "model.pt")


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
    ("test acc", "test_accuracy", lambda v: _pct(v)),
    ("aux acc", "aux_test_accuracy", lambda v: _pct(v)),
    ("train loss", "train_loss", lambda v: _num(v)),
    ("acts", "bytes_activations", lambda v: human_bytes(v)),
    ("labels", "bytes_labels", lambda v: human_bytes(v)),
    ("grads", "bytes_gradients", lambda v: human_bytes(v)),
    ("sync", "bytes_model_sync", lambda v: human_bytes(v)),
    ("eval", "bytes_eval", lambda v: human_bytes(v)),
    ("client saved", "client_peak_saved_bytes", lambda v: human_bytes(v)),
    ("server saved", "server_peak_saved_bytes", lambda v: human_bytes(v)),
    ("client rss", "client_peak_rss_bytes", lambda v: human_bytes(v)),
    ("server rss", "server_peak_rss_bytes", lambda v: human_bytes(v)),
    ("round s", "round_seconds", lambda v: f"{v:.1f}"),
    ("client s", "client_compute_seconds", lambda v: f"{v:.1f}"),
    ("server s", "server_compute_seconds", lambda v: f"{v:.1f}"),
    ("wait s", "wait_seconds", lambda v: f"{v:.1f}"),
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
    with (Path(run_dir) / "rounds.jsonl").open() as f:
        return [json.loads(line) for line in f if line.strip()]


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
