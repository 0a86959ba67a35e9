"""The grid's evidence in one table: every arm over its seeds, a verdict per cut, and how much
of DSL's gap each variant closes.

Accuracy is the final epoch's test accuracy of finished runs, as mean ± half the range over
seeds (with two seeds: the two values are mean - x and mean + x). DSL − CSL is taken per seed
(both methods of one seed share the initial weights and the data order) and then averaged the
same way. A run still going is shown by its epoch and latest accuracy and left out of the
means and the verdicts, so a table of a grid half done says only what is known.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from experiments.exact_pixels import ExactTest, accuracy
from experiments.runs import Arm, Run, Setting, arms, common_seeds

MB = 1e6
ON_PAR_PT = 1.0  # |DSL - CSL| within this many points counts as on par, as the paper's claim
GRID_COLUMNS = (
    "setting", "arm", "seeds done", "test acc %", "aux head acc %", "exact-pixel acc %",
    "train MB/epoch/client (grad)", "client peak MB", "server peak MB", "epoch s (median)",
)  # fmt: skip


@dataclass(frozen=True)
class Spread:
    mean: float
    half_range: float
    n: int

    @classmethod
    def of(cls, values: list[float]) -> Spread | None:
        if not values:
            return None
        return cls(sum(values) / len(values), (max(values) - min(values)) / 2, len(values))

    def text(self, signed: bool = False) -> str:
        mean = f"{self.mean:+.1f}" if signed else f"{self.mean:.1f}"
        return mean if self.n == 1 else f"{mean} ± {self.half_range:.1f}"


def _pct(values: list[float | None]) -> Spread | None:
    return Spread.of([100 * v for v in values if v is not None])


def _cell(spread: Spread | None) -> str:
    return spread.text() if spread else "-"


def _progress(arm: Arm) -> str:
    """A run in progress: its epoch and latest test accuracy."""
    going = [r for r in arm.runs if not r.finished]
    return "; ".join(
        f"seed {r.seed}: {100 * (r.final_accuracy or 0):.1f} at epoch "
        f"{len(r.rounds)}/{r.config.get('num-rounds', '?')}"
        for r in going
    )


def _mean(runs: list[Run], value: Callable[[Run], float]) -> float:
    return sum(value(r) for r in runs) / len(runs)


def arm_row(arm: Arm, exact: dict[Path, float]) -> list[str]:
    done = arm.finished
    shown = done or arm.runs  # bytes, memory and time: from what ran so far if nothing finished
    acc = _cell(_pct([r.final_accuracy for r in done]))
    if len(done) < len(arm.runs):
        acc = f"{acc} (running: {_progress(arm)})" if done else f"running: {_progress(arm)}"
    k = arm.setting.clients
    total = _mean(shown, lambda r: r.mean("bytes_train_total")) / k / MB
    grad = _mean(shown, lambda r: r.mean("bytes_gradients")) / k / MB
    return [
        arm.setting.label(),
        arm.label,
        f"{len(done)}/{len(arm.runs)}",
        acc,
        _cell(_pct([r.last("aux_test_accuracy") for r in done])) if arm.method == "dsl" else "-",
        _cell(_pct([exact.get(r.path) for r in done])),
        f"{total:,.0f} ({grad:,.0f})",
        f"{max(r.peak('client_peak_saved_bytes') for r in shown) / MB:.0f}",
        f"{max(r.peak('server_peak_saved_bytes') for r in shown) / MB:.0f}",
        f"{_mean(shown, lambda r: r.median('train_seconds')):.0f}",
    ]


def paired_gap(better: Arm, worse: Arm) -> Spread | None:
    """better − worse in points, per seed that both finished, then over seeds."""
    a = {r.seed: r.final_accuracy for r in better.finished}
    b = {r.seed: r.final_accuracy for r in worse.finished}
    return Spread.of([100 * (a[s] - b[s]) for s in sorted(a.keys() & b.keys())])


def verdicts(all_arms: list[Arm]) -> list[str]:
    """One line per setting: DSL vs CSL, then each variant's share of the gap closed."""
    lines = []
    by_setting: dict[Setting, list[Arm]] = {}
    for arm in all_arms:
        by_setting.setdefault(arm.setting, []).append(arm)
    for setting, group in by_setting.items():
        plain = {a.method: a for a in group if a.variant == ""}
        csl, dsl = plain.get("csl"), plain.get("dsl")
        if csl is None or dsl is None:
            continue
        gap = paired_gap(dsl, csl)
        if gap is None:
            lines.append(f"- {setting.label()}: pending (no seed has both methods finished)")
            continue
        on_par = abs(gap.mean) <= ON_PAR_PT
        noise = ""
        if gap.n > 1:
            beyond = abs(gap.mean) > gap.half_range
            noise = ", beyond the seed spread" if beyond else ", within the seed spread"
        word = "on par" if on_par else ("DSL behind" if gap.mean < 0 else "DSL ahead")
        lines.append(
            f"- {setting.label()}: **{word}**, DSL − CSL = {gap.text(signed=True)} pt "
            f"over {gap.n} seed{'s' if gap.n > 1 else ''}{noise}"
        )
        for variant in (a for a in group if a.variant and a.method == "dsl"):
            lines.append(f"  - {variant.label}: {closing(variant, dsl, csl)}")
    return lines


def closing(variant: Arm, dsl: Arm, csl: Arm) -> str:
    """How much of CSL − DSL the variant recovers, on the seeds all three finished."""
    seeds = common_seeds([variant, dsl, csl])
    if not seeds:
        return "pending"
    acc = {
        name: 100 * sum(r.final_accuracy for r in arm.finished if r.seed in seeds) / len(seeds)
        for name, arm in (("v", variant), ("d", dsl), ("c", csl))
    }
    gap, gained = acc["c"] - acc["d"], acc["v"] - acc["d"]
    where = (
        f"{acc['v']:.1f} % vs DSL {acc['d']:.1f} % and CSL {acc['c']:.1f} % (seeds {sorted(seeds)})"
    )
    if gap <= 0.1:
        return f"{gained:+.1f} pt over DSL; no gap to close: {where}"
    return f"closes {100 * gained / gap:.0f} % of the gap ({gained:+.1f} of {gap:.1f} pt): {where}"


def exact_accuracies(runs: list[Run], test: ExactTest | None) -> dict[Path, float]:
    """Each finished run's final model on the exact-pixel test images (none without the subset)."""
    if test is None:
        return {}
    return {r.path: accuracy(r.path, test.exact, test.labels) for r in runs if r.finished}


def grid_table(runs: list[Run], test: ExactTest | None = None) -> str:
    all_arms = arms(runs)
    exact = exact_accuracies(runs, test)
    lines = ["| " + " | ".join(GRID_COLUMNS) + " |", "|" + "---|" * len(GRID_COLUMNS)]
    lines += ["| " + " | ".join(arm_row(a, exact)) + " |" for a in all_arms]
    found = verdicts(all_arms)
    if found:
        lines += ["", "Verdicts (on par: |DSL − CSL| ≤ 1 pt):", *found]
    if test is not None:
        lines += ["", f"Exact-pixel column: {len(test.labels)} test images with their original "
                  f"pixels (the JPEG copies differ by {test.mae:.2f}/255 on average)."]  # fmt: skip
    return "\n".join(lines)
