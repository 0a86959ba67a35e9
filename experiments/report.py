"""Turn results directories into the paper's evidence: Figs. 4-7 as PNGs and markdown tables.

Fig. 8, beyond the paper: the distance correlation between inputs and cut activations.

    python -m experiments.report results/grid [--out docs/grid] [--exact <subset.npz>]

Any directory works: every ``rounds.jsonl`` below it (with its ``config.json``) is one run (see
experiments/runs.py). table.md pairs the plain CSL and DSL runs (lowest seed) of each dataset,
depth, cut and number of clients K; grid.md has every arm over its seeds, a verdict per setting
and the variants' share of DSL's gap closed (experiments/grid_table.py). Fig. 4 draws the
variants too, dashed.
"""

from __future__ import annotations

import argparse
import itertools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from experiments.exact_pixels import ExactTest, default_exact
from experiments.grid_table import MB, grid_table
from experiments.runs import Run, Setting, arms, load_runs, pair

METHOD_COLORS = {"csl": "tab:blue", "dsl": "tab:orange"}
VARIANT_STYLES: list[dict[str, Any]] = [
    {"ls": "--", "marker": "s", "ms": 3},
    {"ls": "-.", "marker": "^", "ms": 3},
    {"ls": "--", "marker": "x", "ms": 4},
]


def fig_accuracy(runs: list[Run]) -> Figure:
    """Fig. 4: test accuracy per epoch, CSL vs DSL (dotted: DSL's aux head alone)."""
    return _per_round(runs, "test_accuracy", "test accuracy (%)", 100, aux="aux_test_accuracy")


def fig_probe(runs: list[Run]) -> Figure:
    """What the activations reveal: dCor(input, cut activations) on a fixed probe, per epoch."""
    return _per_round(runs, "probe_dcor", "dCor(input, activations)", 1)


def _per_round(
    runs: list[Run], key: str, ylabel: str, scale: float, aux: str | None = None
) -> Figure:
    pairs, all_arms = pair(runs), arms(runs)
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
        variants = [a for a in all_arms if a.setting == setting and a.variant]
        for arm, style in zip(variants, itertools.cycle(VARIANT_STYLES)):
            rounds = [r for r in arm.runs[0].rounds if r.get(key) is not None]
            ax.plot(
                [r["round"] for r in rounds],
                [scale * r[key] for r in rounds],
                color=METHOD_COLORS.get(arm.method),
                label=arm.label,
                **style,
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


def make_report(
    root: str | Path, out: str | Path | None = None, exact: str | Path | None = None
) -> dict[str, Path]:
    """Write the figures, table.md (CSL/DSL ratios per setting) and grid.md (every arm over
    seeds, verdicts, gap-closing rows; exact-pixel accuracy when ``exact`` names the subset)."""
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
    test = ExactTest.load(exact) if exact else None
    (out_dir / "grid.md").write_text(grid_table(runs, test) + "\n")
    written["grid.md"] = out_dir / "grid.md"
    return written


README_BEGIN, README_END = "<!-- grid:begin (docs/grid/grid.md) -->", "<!-- grid:end -->"


def put_in_readme(readme: str | Path, grid_md: str) -> None:
    """Replace what stands between the README's grid markers with ``grid_md``."""
    path = Path(readme)
    text = path.read_text()
    if text.count(README_BEGIN) != 1 or text.count(README_END) != 1:
        raise ValueError(f"{path} needs one {README_BEGIN!r} and one {README_END!r} line")
    head, rest = text.split(README_BEGIN)
    _, tail = rest.split(README_END)
    path.write_text(f"{head}{README_BEGIN}\n{grid_md.strip()}\n{README_END}{tail}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("root", help="a sweep directory, or any directory holding runs")
    parser.add_argument(
        "--out", help="where to write the figures and tables (default: <root>/report)"
    )
    parser.add_argument(
        "--exact",
        type=Path,
        default=default_exact(),
        help="the exact-pixel CIFAR-10 subset (subset.npz) for grid.md's exact-pixel column "
        "(default: found beside SPLIT_LEARNING_DATA_DIR; none: the column stays empty)",
    )
    parser.add_argument(
        "--readme", type=Path, help="also put grid.md between this file's grid markers"
    )
    args = parser.parse_args()
    written = make_report(args.root, args.out, args.exact)
    if args.readme:
        put_in_readme(args.readme, written["grid.md"].read_text())
    for name, path in written.items():
        print(f"{name}: {path}")
    for name in ("table.md", "grid.md"):
        print()
        print(written[name].read_text())


if __name__ == "__main__":
    main()
