"""Turn results directories into the paper's evidence: Figs. 4-7 as PNGs and a markdown table.

Fig. 8, beyond the paper: the distance correlation between inputs and cut activations.

    python -m experiments.report multirun/2026-11-25_17-30-00 [--out docs/cpu_compare]

Any directory works: every ``rounds.jsonl`` below it (with its ``config.json``) is one run. Runs
that differ only in the method are paired, CSL against DSL, for each dataset, depth, cut and
number of clients K.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from flower_app.results import read_rounds

METHOD_COLORS = {"csl": "tab:blue", "dsl": "tab:orange"}
MB = 1e6


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

    def mean(self, key: str) -> float:
        """Per-epoch average over rounds (every round is one epoch)."""
        values = [r[key] for r in self.rounds if r.get(key) is not None]
        return sum(values) / len(values) if values else float("nan")

    def peak(self, key: str) -> float:
        return max((r[key] for r in self.rounds if r.get(key) is not None), default=float("nan"))

    @property
    def final_accuracy(self) -> float | None:
        return self.rounds[-1]["test_accuracy"] if self.rounds else None

    def forward_bytes_per_client(self) -> float:
        return (self.mean("bytes_activations") + self.mean("bytes_labels")) / self.setting.clients

    def backward_bytes_per_client(self) -> float:
        return self.mean("bytes_gradients") / self.setting.clients

    def time_split(self) -> dict[str, float]:
        """Epoch wall time split in forward compute, backward compute and the rest.

        Client and server compute may overlap (DSL pipelines them), so the parts can sum to
        more than the wall time; "communication + idle" is what the wall time leaves over.
        """
        fwd = self.mean("client_forward_seconds") + self.mean("server_forward_seconds")
        bwd = self.mean("client_backward_seconds") + self.mean("server_backward_seconds")
        wall = self.mean("train_seconds")
        return {
            "forward": fwd,
            "backward": bwd,
            "comm+idle": max(0.0, wall - fwd - bwd),
            "wall": wall,
        }


def load_runs(root: str | Path) -> list[Run]:
    runs = []
    for rounds_path in sorted(Path(root).rglob("rounds.jsonl")):
        if any(part.startswith("run.partial-") for part in rounds_path.parts):
            continue  # a sweep moved this interrupted run aside and ran the job again
        config_path = rounds_path.parent / "config.json"
        rounds = read_rounds(rounds_path.parent)
        if not config_path.exists() or not rounds:
            continue
        config = json.loads(config_path.read_text())
        rc = config["run_config"]
        setting = Setting(rc["dataset"], rc["depth"], rc["cut"], len(config["clients"]))
        runs.append(Run(rounds_path.parent, rc["method"], setting, rounds))
    return runs


def pair(runs: list[Run]) -> dict[Setting, dict[str, Run]]:
    table: dict[Setting, dict[str, Run]] = defaultdict(dict)
    for run in runs:
        table[run.setting][run.method] = run
    return dict(
        sorted(table.items(), key=lambda kv: (kv[0].dataset, kv[0].depth, kv[0].cut, kv[0].clients))
    )


def fig_accuracy(runs: list[Run]) -> Figure:
    """Fig. 4: test accuracy per epoch, CSL vs DSL (dotted: DSL's aux head alone)."""
    return _per_round(runs, "test_accuracy", "test accuracy (%)", 100, aux="aux_test_accuracy")


def fig_probe(runs: list[Run]) -> Figure:
    """What the activations reveal: dCor(input, cut activations) on a fixed probe, per epoch."""
    return _per_round(runs, "probe_dcor", "dCor(input, activations)", 1)


def _per_round(
    runs: list[Run], key: str, ylabel: str, scale: float, aux: str | None = None
) -> Figure:
    pairs = pair(runs)
    fig = Figure(figsize=(4.2 * len(pairs), 3.4), layout="tight")
    axes = fig.subplots(1, len(pairs), squeeze=False)
    for ax, (setting, by_method) in zip(axes[0], pairs.items(), strict=True):
        for method, run in sorted(by_method.items()):
            color = METHOD_COLORS.get(method)
            rounds = [r for r in run.rounds if r.get(key) is not None]
            epochs, values = [r["round"] for r in rounds], [scale * r[key] for r in rounds]
            ax.plot(epochs, values, marker="o", ms=3, color=color, label=method.upper())
            extra = [r for r in run.rounds if aux and r.get(aux) is not None]
            if extra:
                ax.plot(
                    [r["round"] for r in extra],
                    [scale * r[aux] for r in extra],
                    ls=":",
                    color=color,
                    label=f"{method.upper()} aux head",
                )
        ax.set_title(f"{setting.dataset}: {setting.label()}", fontsize=9)
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return fig


BAR_WIDTH = 0.38
Part = tuple[str, Callable[[Run], float], dict[str, Any]]


def _method_bars(ax: Any, pairs: dict[Setting, dict[str, Run]], parts: list[Part]) -> list[float]:
    """CSL and DSL bars side by side for every setting, each bar stacked from ``parts``.

    Returns the x position of every bar, CSL first, for markers drawn on top.
    """
    xs = range(len(pairs))
    positions: list[float] = []
    top = 0.0
    for i, method in enumerate(("csl", "dsl")):
        pos = [x + (i - 0.5) * BAR_WIDTH for x in xs]
        bottom = [0.0] * len(pos)
        for name, value, style in parts:
            values = [value(by[method]) if method in by else 0.0 for by in pairs.values()]
            label = f"{method.upper()} {name}".strip()
            color = METHOD_COLORS[method]
            ax.bar(pos, values, BAR_WIDTH, bottom=bottom, color=color, label=label, **style)
            bottom = [b + v for b, v in zip(bottom, values, strict=True)]
        positions += pos
        top = max([top, *bottom])
    # An empty part on top of a stack (DSL's gradients, a zero "rest") leaves a sticky edge at
    # the stack's top, which stops autoscaling there and cuts the tallest bar: set the limit.
    ax.set_ylim(0, 1.08 * top if top > 0 else 1.0)
    ax.set_xticks(list(xs), [s.label().replace(", ", "\n") for s in pairs], fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return positions


def _figure(pairs: dict[Setting, dict[str, Run]], panels: int = 1) -> tuple[Figure, list[Any]]:
    width = max(5.0, 1.8 * len(pairs)) * panels
    fig = Figure(figsize=(width, 3.6), layout="tight")
    return fig, list(fig.subplots(1, panels, squeeze=False)[0])


def fig_communication(runs: list[Run]) -> Figure:
    """Fig. 5: bytes per epoch between ONE client and the server, forward vs backward."""
    pairs = pair(runs)
    fig, (ax,) = _figure(pairs)
    parts: list[Part] = [
        ("forward (activations + labels)", lambda r: r.forward_bytes_per_client() / MB, {}),
        (
            "backward (gradients)",
            lambda r: r.backward_bytes_per_client() / MB,
            {"alpha": 0.45, "hatch": "//"},
        ),
    ]
    _method_bars(ax, pairs, parts)
    ax.set_ylabel("MB per epoch, one client")
    ax.set_title("Communication per epoch (measured payload bytes)", fontsize=10)
    ax.legend(fontsize=7)
    return fig


def fig_memory(runs: list[Run]) -> Figure:
    """Fig. 6: peak bytes held for backward, client and server, per split and K."""
    pairs = pair(runs)
    fig, axes = _figure(pairs, panels=2)
    for ax, side in zip(axes, ("client", "server"), strict=True):
        key = f"{side}_peak_saved_bytes"
        _method_bars(ax, pairs, [("", lambda r, k=key: r.peak(k) / MB, {})])
        ax.set_ylabel("peak MB held for backward")
        ax.set_title(f"{side}: peak activation memory (saved-tensor hooks)", fontsize=9)
        ax.legend(fontsize=7)
    return fig


def fig_time(runs: list[Run]) -> Figure:
    """Fig. 7: epoch time split into forward compute, backward compute and the rest."""
    pairs = pair(runs)
    fig, (ax,) = _figure(pairs)
    parts: list[Part] = [
        (part, lambda r, p=part: r.time_split()[p], {"alpha": alpha, "hatch": hatch})
        for part, alpha, hatch in (
            ("forward", 1.0, ""),
            ("backward", 0.6, ""),
            ("comm+idle", 0.25, ".."),
        )
    ]
    positions = _method_bars(ax, pairs, parts)
    walls = [
        by[m].time_split()["wall"] if m in by else 0.0
        for m in ("csl", "dsl")
        for by in pairs.values()
    ]
    ax.scatter(positions, walls, marker="_", s=300, color="black", zorder=3, label="wall time")
    ax.set_ylim(0, max(ax.get_ylim()[1], 1.08 * max(walls, default=0.0)))
    ax.set_ylabel("seconds per epoch")
    ax.set_title(
        "Epoch time: compute summed over parties, and the rest\n"
        "(parties overlap, so bars can exceed the wall time, black)",
        fontsize=9,
    )
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0)
    return fig


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}" if b else "-"


COLUMNS = (
    "dataset", "setting", "epochs", "acc CSL", "acc DSL", "DSL-CSL (pt)", "within 1 pt",
    "fwd MB/epoch", "bwd MB/epoch CSL", "total MB/epoch CSL", "total MB/epoch DSL",
    "bytes DSL/CSL", "client peak MB CSL", "client peak MB DSL", "client DSL/CSL",
    "server peak MB CSL", "server peak MB DSL", "server DSL/CSL", "epoch s CSL (fwd/bwd/rest)",
    "epoch s DSL (fwd/bwd/rest)",
)  # fmt: skip


def _time_cell(t: dict[str, float]) -> str:
    return f"{t['wall']:.1f} ({t['forward']:.1f}/{t['backward']:.1f}/{t['comm+idle']:.1f})"


def comparison_table(runs: list[Run]) -> str:
    """Per configuration: accuracy, bytes, memory and time of CSL and DSL, with DSL/CSL ratios.

    Bytes are per client and epoch; memory is the peak over epochs of the bytes held for
    backward (saved-tensor hooks); time is the epoch wall time with its compute split.
    """
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for setting, by in pair(runs).items():
        csl, dsl = by.get("csl"), by.get("dsl")
        if csl is None or dsl is None:
            continue
        acc_c, acc_d = 100 * (csl.final_accuracy or 0), 100 * (dsl.final_accuracy or 0)
        total = [r.mean("bytes_train_total") / setting.clients / MB for r in (csl, dsl)]
        client = [r.peak("client_peak_saved_bytes") / MB for r in (csl, dsl)]
        server = [r.peak("server_peak_saved_bytes") / MB for r in (csl, dsl)]
        cells = [
            setting.dataset,
            f"ResNet-{setting.depth} cut {setting.cut} K={setting.clients}",
            str(min(len(csl.rounds), len(dsl.rounds))),
            f"{acc_c:.1f}%",
            f"{acc_d:.1f}%",
            f"{acc_d - acc_c:+.1f}",
            "yes" if abs(acc_d - acc_c) <= 1.0 else "no",
            f"{dsl.forward_bytes_per_client() / MB:.1f}",
            f"{csl.backward_bytes_per_client() / MB:.1f}",
            f"{total[0]:.1f}",
            f"{total[1]:.1f}",
            _ratio(total[1], total[0]),
            f"{client[0]:.1f}",
            f"{client[1]:.1f}",
            _ratio(client[1], client[0]),
            f"{server[0]:.1f}",
            f"{server[1]:.1f}",
            _ratio(server[1], server[0]),
            _time_cell(csl.time_split()),
            _time_cell(dsl.time_split()),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def failed_jobs(root: str | Path) -> list[dict[str, Any]]:
    """Jobs whose latest attempt failed: a sweep run again appends a line per job to
    jobs.jsonl, and a job that failed once and then resumed to its end has not failed."""
    path = Path(root) / "jobs.jsonl"
    if not path.exists():
        return []
    jobs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    latest = {j.get("run_dir", j["job"]): j for j in jobs}
    return [j for j in latest.values() if j.get("status") == "failed"]


FIGURES = {
    "fig4_accuracy.png": fig_accuracy,
    "fig5_communication.png": fig_communication,
    "fig6_memory.png": fig_memory,
    "fig7_time.png": fig_time,
    "fig8_probe_dcor.png": fig_probe,
}


def make_report(root: str | Path, out: str | Path | None = None) -> dict[str, Path]:
    """Write the figures and table.md; returns their paths."""
    runs = load_runs(root)
    if not runs:
        raise FileNotFoundError(f"no results (rounds.jsonl + config.json) found under {root}")
    out_dir = Path(out) if out else Path(root) / "report"
    out_dir.mkdir(parents=True, exist_ok=True)
    written = {}
    for name, make in FIGURES.items():
        fig = make(runs)
        fig.savefig(out_dir / name, dpi=120)
        written[name] = out_dir / name
    table = comparison_table(runs)
    failures = failed_jobs(root)
    if failures:
        table += "\n\nFailed jobs:\n" + "\n".join(
            f"- job {j['job']} ({' '.join(j.get('overrides', []))}): {j['reason']}"
            for j in failures
        )
    (out_dir / "table.md").write_text(table + "\n")
    written["table.md"] = out_dir / "table.md"
    return written


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("root", help="a sweep directory, or any directory holding runs")
    parser.add_argument(
        "--out", help="where to write the figures and table (default: <root>/report)"
    )
    args = parser.parse_args()
    for name, path in make_report(args.root, args.out).items():
        print(f"{name}: {path}")
    print()
    print((Path(args.out or Path(args.root) / "report") / "table.md").read_text())


if __name__ == "__main__":
    main()
