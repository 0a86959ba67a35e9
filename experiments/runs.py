"""Results directories as runs, and runs as arms: the same experiment over several seeds.

Every ``rounds.jsonl`` below a directory (with its ``config.json``) is one run. Runs whose
configs differ only in the seed (and in keys that do not change the experiment: where results
go, timeouts, threads) are one *arm*. Within a setting (dataset, depth, cut, K), an arm is
named by its method and the keys in which it departs from the setting's usual value, e.g.
``DSL aux-head=conv_mlp``: the plain CSL and DSL arms are the comparison, the others variants.
"""

from __future__ import annotations

import json
import statistics
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flower_app.results import read_rounds
from strategies.checkpoint import IGNORED_ON_RESUME, MAY_CHANGE_ON_RESUME

# Keys that do not make another experiment (num-rounds does: 40 cosine epochs are not 20)
NOT_THE_EXPERIMENT = (MAY_CHANGE_ON_RESUME - {"num-rounds"}) | IGNORED_ON_RESUME | {"seed"}
NOT_THE_EXPERIMENT |= {"live-clients", "max-active-clients", "checkpoint-every", "device"}


@dataclass(frozen=True)
class Setting:
    dataset: str
    depth: int
    cut: int
    clients: int

    def label(self) -> str:
        return f"ResNet-{self.depth} cut {self.cut}, K={self.clients}"


@dataclass
class Run:
    path: Path
    method: str
    setting: Setting
    rounds: list[dict[str, Any]]
    config: dict[str, Any] = field(default_factory=dict)  # the run config

    def mean(self, key: str) -> float:
        """Per-epoch average over rounds (every round is one epoch)."""
        values = [r[key] for r in self.rounds if r.get(key) is not None]
        return sum(values) / len(values) if values else float("nan")

    def median(self, key: str) -> float:
        """Median over rounds: an epoch time robust to a few rounds that shared the cores."""
        values = [r[key] for r in self.rounds if r.get(key) is not None]
        return statistics.median(values) if values else float("nan")

    def peak(self, key: str) -> float:
        return max((r[key] for r in self.rounds if r.get(key) is not None), default=float("nan"))

    def last(self, key: str) -> float | None:
        return self.rounds[-1].get(key) if self.rounds else None

    @property
    def final_accuracy(self) -> float | None:
        return self.last("test_accuracy")

    @property
    def seed(self) -> int:
        return int(self.config.get("seed", 0))

    @property
    def finished(self) -> bool:
        """All its epochs ran and the final model was written."""
        planned = self.config.get("num-rounds", len(self.rounds))
        return len(self.rounds) >= planned and (self.path / "model.pt").exists()

    def experiment(self) -> tuple[tuple[str, str], ...]:
        """What makes this run's experiment: its config without seed and bookkeeping keys."""
        kept = {k: v for k, v in self.config.items() if k not in NOT_THE_EXPERIMENT}
        return (("clients", str(self.setting.clients)),) + tuple(
            sorted((k, json.dumps(v)) for k, v in kept.items())
        )

    def forward_bytes_per_client(self) -> float:
        return (self.mean("bytes_activations") + self.mean("bytes_labels")) / self.setting.clients

    def backward_bytes_per_client(self) -> float:
        return self.mean("bytes_gradients") / self.setting.clients

    def time_split(self) -> dict[str, float]:
        """Epoch wall time split in forward compute, backward compute and the rest.

        Medians over epochs, like the grid table's epoch time: a few epochs that shared the
        cores with something else would otherwise set the figure. Client and server compute
        may overlap (DSL pipelines them), so the parts can sum to more than the wall time;
        "communication + idle" is what the wall time leaves over.
        """
        fwd = self.median("client_forward_seconds") + self.median("server_forward_seconds")
        bwd = self.median("client_backward_seconds") + self.median("server_backward_seconds")
        wall = self.median("train_seconds")
        return {
            "forward": fwd,
            "backward": bwd,
            "comm+idle": max(0.0, wall - fwd - bwd),
            "wall": wall,
        }


def _moved_aside(run_dir: Path) -> bool:
    """A run a sweep moved aside (``run.partial-*``, or ``run.<why>`` beside a newer ``run``)."""
    name = run_dir.name
    return name.startswith("run.partial-") or (
        name.startswith("run.") and (run_dir.parent / "run").is_dir()
    )


def load_runs(root: str | Path) -> list[Run]:
    runs = []
    for rounds_path in sorted(Path(root).rglob("rounds.jsonl")):
        if _moved_aside(rounds_path.parent):
            continue
        config_path = rounds_path.parent / "config.json"
        rounds = read_rounds(rounds_path.parent)
        if not config_path.exists() or not rounds:
            continue
        config = json.loads(config_path.read_text())
        rc = config["run_config"]
        setting = Setting(rc["dataset"], rc["depth"], rc["cut"], len(config["clients"]))
        runs.append(Run(rounds_path.parent, rc["method"], setting, rounds, rc))
    return runs


@dataclass
class Arm:
    """One experiment over seeds: its runs, lowest seed first."""

    setting: Setting
    method: str
    variant: str  # "" for the setting's plain CSL/DSL; else "key=value, ..."
    runs: list[Run]

    @property
    def label(self) -> str:
        return f"{self.method.upper()} {self.variant}".strip()

    @property
    def finished(self) -> list[Run]:
        """Its runs that ran every epoch and wrote their model: the only ones a verdict counts."""
        return [r for r in self.runs if r.finished]


def arms(runs: list[Run]) -> list[Arm]:
    """Group runs into arms and name each by how it departs from its setting's usual config."""
    grouped: dict[tuple[Setting, str, tuple], list[Run]] = defaultdict(list)
    for run in runs:
        grouped[(run.setting, run.method, run.experiment())].append(run)
    by_setting: dict[Setting, list[dict[str, str]]] = defaultdict(list)
    for setting, _, experiment in grouped:
        by_setting[setting].append(dict(experiment))
    result = []
    for (setting, method, experiment), members in grouped.items():
        configs = by_setting[setting]
        usual = {
            key: Counter(c.get(key) for c in configs).most_common(1)[0][0]
            for key in {k for c in configs for k in c}
        }
        departs = [
            f"{k}={json.loads(v)}"
            for k, v in experiment
            if k not in ("method", "clients") and v != usual[k]
        ]
        members.sort(key=lambda r: (r.seed, str(r.path)))
        result.append(Arm(setting, method, ", ".join(departs), members))
    return sorted(
        result,
        key=lambda a: (a.setting.dataset, a.setting.depth, a.setting.cut, a.setting.clients,
                       a.variant != "", a.variant, a.method),
    )  # fmt: skip


def common_seeds(group: list[Arm], started: bool = False) -> set[int]:
    """The seeds that every arm of the group finished (or, with ``started``, has begun)."""
    return set.intersection(*({r.seed for r in (a.runs if started else a.finished)} for a in group))


def shared_seed(plain: list[Arm]) -> int | None:
    """The lowest seed that every arm finished, else the lowest every arm has started: a figure
    then sets CSL beside DSL of the same seed (same initial weights, same data order)."""
    seeds = common_seeds(plain) or common_seeds(plain, started=True)
    return min(seeds) if seeds else None


def pair(runs: list[Run]) -> dict[Setting, dict[str, Run]]:
    """Per setting, the plain CSL and DSL runs of one seed (``shared_seed``; variants aside)."""
    plain: dict[Setting, dict[str, Arm]] = defaultdict(dict)
    for arm in arms(runs):
        plain[arm.setting].setdefault(arm.method, arm)  # plain arms come first
    table: dict[Setting, dict[str, Run]] = {}
    for setting, by_method in plain.items():
        seed = shared_seed(list(by_method.values()))
        table[setting] = {
            method: next((r for r in arm.runs if r.seed == seed), arm.runs[0])
            for method, arm in by_method.items()
        }
    return dict(
        sorted(table.items(), key=lambda kv: (kv[0].dataset, kv[0].depth, kv[0].cut, kv[0].clients))
    )
