"""Memory and time against the number of clients K, both methods, with the same data per client.

    python benchmarks/scale_clients.py                    # K in 2 4 10 50 100, + 500 tiny
    python benchmarks/scale_clients.py --ks 4 100 --methods csl -- live-clients=8
    python benchmarks/scale_clients.py --app /path/to/another/checkout    # e.g. an older commit

Every run is a real `flwr run` simulation (ResNet-20 cut 3, 128 training images and 32 test
images per client, one round, 2 Ray actors of 1 CPU each) on a SuperLink of its own, started
for that run so that every process it spawns, Ray's actors included, is under it. Reported:
peak PSS of that whole process tree, peak machine memory above its reading before the run
(what `free` shows), the round's seconds, and one node's context.state bytes (which travel
with every simulated message). The last lines print the K=100 / K=4 ratios of the extra memory.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from deploy.local_superlink import APP_ROOT, LocalSuperLink
from experiments.run_memory import RunMemory, settle
from flower_app.results import human_bytes, read_rounds
from split_core.config import parse_overrides

BASE = {"depth": 20, "cut": 3, "num-rounds": 1, "samples-per-client": 128}


def measure(method: str, k: int, samples: int, overrides: dict, out: Path, app: Path) -> dict:
    config = BASE | {"method": method, "samples-per-client": samples, "test-samples": 32 * k}
    config |= overrides | {"output-dir": str(out), "run-name": f"{method}-k{k}-n{samples}"}
    idle = settle()
    with LocalSuperLink(out / f"home-{method}-{k}-{samples}") as link:
        with RunMemory(link.proc.pid, idle) as memory:
            result = link.run(config, clients=k, cpus_per_client=1, timeout=3600, app=app)
    rounds = read_rounds(result.run_dir) if (result.run_dir / "rounds.jsonl").exists() else []
    if not rounds:
        raise RuntimeError(f"{method} K={k} produced no round:\n{result.log[-3000:]}")
    (r,) = rounds
    return {
        "method": method,
        "clients": k,
        "samples_per_client": samples,
        "tree_pss": memory.peak_tree_pss,
        "machine_above_idle": memory.machine_above_idle,
        "processes": memory.peak_processes,
        "round_seconds": r["round_seconds"],
        "state_bytes": r.get("client_state_bytes"),
        "live_max": r.get("client_live_max"),
        "test_accuracy": r["test_accuracy"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ks", type=int, nargs="+", default=[2, 4, 10, 50, 100])
    parser.add_argument("--methods", nargs="+", default=["dsl", "csl"])
    parser.add_argument("--tiny-k", type=int, default=500, help="one more K with tiny partitions")
    parser.add_argument("--tiny-samples", type=int, default=32)
    parser.add_argument("--app", type=Path, default=APP_ROOT, help="the Flower app to run")
    parser.add_argument("overrides", nargs="*", help="run-config key=value (TOML values)")
    args = parser.parse_args()
    overrides = parse_overrides(args.overrides)
    out = Path(tempfile.mkdtemp(prefix="scale-"))
    rows = []
    for method in args.methods:
        plan = [(k, BASE["samples-per-client"]) for k in args.ks]
        plan += [(args.tiny_k, args.tiny_samples)] if args.tiny_k else []
        for k, samples in plan:
            row = measure(method, k, samples, overrides, out, args.app)
            rows.append(row)
            print(_line(row), flush=True)
            (out / "rows.jsonl").open("a").write(json.dumps(row) + "\n")
    print(f"\n{_header()}\n" + "\n".join(_line(r) for r in rows))
    for method in args.methods:
        by_k = {r["clients"]: r for r in rows if r["method"] == method}
        if 4 in by_k and 100 in by_k:
            for key in ("tree_pss", "machine_above_idle"):
                ratio = by_k[100][key] / by_k[4][key]
                print(f"{method.upper()} {key}: K=100 / K=4 = {ratio:.2f}")
    print(f"\nruns in {out}")


def _header() -> str:
    return (
        f"{'method':6} {'K':>4} {'img/client':>10} {'tree PSS':>10} {'machine +':>10} "
        f"{'procs':>5} {'round s':>8} {'state/node':>10} {'live max':>8}"
    )


def _line(r: dict) -> str:
    return (
        f"{r['method']:6} {r['clients']:>4} {r['samples_per_client']:>10} "
        f"{human_bytes(r['tree_pss']):>10} {human_bytes(r['machine_above_idle']):>10} "
        f"{r['processes']:>5} {r['round_seconds']:>8.1f} {human_bytes(r['state_bytes']):>10} "
        f"{r['live_max'] if r['live_max'] is not None else '-':>8}"
    )


if __name__ == "__main__":
    main()
