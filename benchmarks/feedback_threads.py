"""Why DSL with the server's gradient every k-th batch trains slower than CSL, in one run.

    python benchmarks/feedback_threads.py                     # ResNet-20 cut 3, K=1, 20 batches
    python benchmarks/feedback_threads.py --repeats 3 -- samples-per-client=5120

With ``feedback-every=k`` the client waits for a gradient at the end of every k-th batch. When
a chunk (``chunk-mib``) holds k batches or fewer, as at both of the grid's cuts with k=4, every
chunk ends in that wait: client and server then take turns, as in CSL, and DSL's pipelining is
gone. Automatic threads (``client-threads=0``) still give each party half the cores, as for
pipelined DSL, while CSL with one client gives each all of them. Four real `flwr run` arms,
one after another in each repeat, with the grid's recipe otherwise: DSL, CSL, DSL with
feedback on automatic threads, and the same with all cores per party. Printed: the epoch's
training seconds, each party's compute seconds, and the ratios to CSL, as ranges over repeats.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

from deploy.local_superlink import LocalSuperLink
from flower_app.results import read_rounds
from split_core.config import parse_overrides

GRID = {  # conf/experiment/grid.yaml's recipe, one epoch of 20 batches
    "depth": 20,
    "cut": 3,
    "num-rounds": 1,
    "batch-size": 128,
    "samples-per-client": 2560,
    "test-samples": 256,
    "compute-dtype": "float32",
    "channels-last": True,
}
CORES = os.cpu_count() or 1
ARMS = {
    "DSL": {"method": "dsl"},
    "CSL": {"method": "csl"},
    "DSL feedback-every=4, auto threads": {"method": "dsl", "feedback-every": 4},
    f"DSL feedback-every=4, {CORES} threads each": {
        "method": "dsl",
        "feedback-every": 4,
        "client-threads": CORES,
        "server-threads": CORES,
    },
}


def measure(config: dict, out: Path, name: str) -> dict:
    with LocalSuperLink(out / f"home-{name}") as link:
        result = link.run(config | {"output-dir": str(out), "run-name": name}, clients=1)
    rounds = read_rounds(result.run_dir) if (result.run_dir / "rounds.jsonl").exists() else []
    if not rounds:
        raise RuntimeError(f"{name} produced no round:\n{result.log[-3000:]}")
    (r,) = rounds
    return {k: r[k] for k in ("train_seconds", "client_compute_seconds", "server_compute_seconds")}


def span(values: list[float], fmt: str = "{:.2f}") -> str:
    low, high = min(values), max(values)
    return fmt.format(low) if low == high else f"{fmt.format(low)}-{fmt.format(high)}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("overrides", nargs="*", help="run-config keys, key=value (TOML values)")
    args = parser.parse_args()
    base = GRID | parse_overrides(args.overrides)
    runs: dict[str, list[dict]] = {arm: [] for arm in ARMS}
    with tempfile.TemporaryDirectory(prefix="feedback-threads-") as tmp:
        for repeat in range(args.repeats):
            for n, (arm, extra) in enumerate(ARMS.items()):
                runs[arm].append(measure(base | extra, Path(tmp), f"r{repeat}-arm{n}"))
                print(f"repeat {repeat + 1}/{args.repeats}: {arm}: {runs[arm][-1]}", flush=True)
    batches = base["samples-per-client"] // base["batch-size"]
    print(f"\nResNet-{base['depth']} cut {base['cut']}, K=1, {batches} batches, {CORES} cores")
    print("arm | train s | client compute s | server compute s | train s / CSL's")
    for arm, rs in runs.items():
        pairs = zip(rs, runs["CSL"], strict=True)
        ratios = [r["train_seconds"] / c["train_seconds"] for r, c in pairs]
        cells = [span([r[k] for r in rs]) for k in list(rs[0])]
        print(f"{arm} | {' | '.join(cells)} | x{span(ratios)}")


if __name__ == "__main__":
    main()
