#!/usr/bin/env python
"""Per-message round trips and one-epoch runs of the app, for each deployment setup.

For every setup it starts a ``deploy.local.LocalDeployment`` of 2 SuperNodes (what
``scripts/deploy_local.sh start 2 [...]`` starts) on its own ports and directory, runs
``scripts/bench_messages.py`` (one message at a time to one SuperNode), then one round (= one
epoch over each client's data) of the app with CSL and with DSL, and stops it:

  stock       Flower's executor with Flower's task poll    FLWR_SUPEREXEC_TASK_POLL_INTERVAL=1.0
  tuned       Flower's executor, task poll 0.1 s            (deploy_local.sh's default)
  secure      --secure: TLS, authenticated executors, one fresh ClientApp process per message
  warm0       warm ClientApp process, stock sleeps          --warm, WARM_FAST_POLL=0
  warmdb      warm, SuperLink state in a SQLite file        --warm, SUPERLINK_DATABASE=<file>
  warm        warm ClientApp process, short sleeps, in-memory SuperLink state   --warm
  securewarm  --secure --warm

    python scripts/measure_deployment.py --out measure [--setups stock,tuned,warm0,warm]

writes <out>/summary.md (the tables of docs/deployment.md) and <out>/summary.json. The epoch
runs of all setups must produce identical models (model.pt); the summary says whether they do.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

from deploy.local import CONNECTION, LocalDeployment, Settings
from deploy.local_superlink import free_port_block

ROOT = Path(__file__).resolve().parents[1]
SETUPS: dict[str, dict] = {  # Settings of each setup ("{deploy}": its deployment directory)
    "stock": {"task_poll": 1.0},
    "tuned": {"task_poll": 0.1},
    "secure": {"secure": True},
    "warm0": {"warm": True, "fast_poll": False},
    "warmdb": {"warm": True, "database": "{deploy}/linkstate.db"},
    "warm": {"warm": True},
    "securewarm": {"secure": True, "warm": True},
}
TINY = {
    "depth": 8,
    "cut": 1,
    "batch-size": 32,
    "lr": 0.05,
    "test-samples": 64,
    "num-rounds": 1,
    "chunk-mib": 64.0,
    "client-threads": 1,
    "server-threads": 1,
    "min-clients": 2,
}


def sh(cmd: list[str], env: dict[str, str], timeout: float = 900) -> subprocess.CompletedProcess:
    print("+", " ".join(shlex.quote(c) for c in cmd), flush=True)
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def measure(label: str, out: Path, reps: int, samples: int, data_dir: str) -> dict:
    """``label``: a setup's name, or ``<setup>.<k>`` for its k-th repetition."""
    deploy_dir = out / f"deploy-{label}"
    options = {
        k: v.format(deploy=deploy_dir) if isinstance(v, str) else v
        for k, v in SETUPS[label.split(".")[0]].items()
    }
    settings = Settings(
        nodes=2,
        superlink_port=free_port_block(1),
        supernode_base_port=free_port_block(2),
        data_dir=data_dir,
        **options,
    )
    result: dict = {"setup": label, "load_before": os.getloadavg()[0]}
    with LocalDeployment(deploy_dir, settings) as dep:
        bench = out / f"rtt-{label}.json"
        proc = sh(
            [sys.executable, str(ROOT / "scripts" / "bench_messages.py")]
            + ["--reps", str(reps), "--out", str(bench)],
            dep.env,
        )
        print(proc.stdout, proc.stderr[-2000:], flush=True)
        result["rtt"] = json.loads(bench.read_text()) if bench.exists() else None
        for method in ("csl", "dsl"):
            name = f"{label}-{method}"
            config = TINY | {
                "method": method,
                "samples-per-client": samples,
                "output-dir": str(out / "runs"),
                "run-name": name,
                "data-dir": data_dir,
            }
            overrides = " ".join(f"{k}={json.dumps(v)}" for k, v in config.items())
            t0 = time.monotonic()
            run = [str(dep.bin / "flwr"), "run", str(ROOT), CONNECTION, "--stream"]
            proc = sh([*run, "--run-config", overrides], dep.env)
            wall = time.monotonic() - t0
            rounds = out / "runs" / name / "rounds.jsonl"
            if not rounds.exists():
                print(proc.stdout[-3000:], proc.stderr[-3000:], flush=True)
                result[method] = None
                continue
            r = json.loads(rounds.read_text().splitlines()[0])
            keys = (
                "round_seconds",
                "train_seconds",
                "eval_seconds",
                "train_messages",
                "client_rebuilds",
                "failed_clients",
                "test_accuracy",
            )
            result[method] = {"flwr_run_seconds": wall, **{k: r.get(k) for k in keys}}
        result["load_after"] = os.getloadavg()[0]
    return result


def same_models(out: Path, setups: list[str], method: str) -> bool | None:
    import torch

    paths = [out / "runs" / f"{s}-{method}" / "model.pt" for s in setups]
    paths = [p for p in paths if p.exists()]
    if len(paths) < 2:
        return None
    ref = torch.load(paths[0])
    for path in paths[1:]:
        other = torch.load(path)
        for part in ("client", "server_segment"):
            if ref[part].keys() != other[part].keys():
                return False
            if not all(torch.equal(ref[part][k], other[part][k]) for k in ref[part]):
                return False
    return True


def summary(results: list[dict], out: Path, samples: int) -> str:
    lines = [
        "| setup | query.setup (tiny) | train.forward 2 MiB | train.forward 8 MiB | first message |"
        " load avg |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        cells = []
        rtt = r.get("rtt") or {"samples": {}, "first": None}
        for kind in ("query.setup", "train.forward-2MiB", "train.forward-8MiB"):
            v = rtt["samples"].get(kind) or []
            cells.append(f"{statistics.median(v):.2f} s ({min(v):.2f}-{max(v):.2f})" if v else "-")
        first = rtt["first"]
        cells.append(f"{first['seconds']:.2f} s" if first else "-")
        load = f"{r['load_before']:.1f} / {r.get('load_after', float('nan')):.1f}"
        lines.append(f"| {r['setup']} | " + " | ".join(cells) + f" | {load} |")
    lines += [
        "",
        f"| setup | CSL epoch: round s (train / eval) | CSL flwr run s | DSL epoch: round s "
        f"(train / eval) | DSL flwr run s |  ({samples} samples per client, 2 clients)",
        "|---|---|---|---|---|",
    ]
    for r in results:
        row = []
        for m in ("csl", "dsl"):
            e = r.get(m)
            if e:
                row.append(
                    f"{e['round_seconds']:.1f} ({e['train_seconds']:.1f} / "
                    f"{e['eval_seconds']:.1f}), {e['train_messages']} train msgs"
                )
                row.append(f"{e['flwr_run_seconds']:.1f}")
            else:
                row += ["failed", "-"]
        lines.append(f"| {r['setup']} | " + " | ".join(row) + " |")
    setups = [r["setup"] for r in results]
    for m in ("csl", "dsl"):
        lines.append(
            f"\n{m.upper()} model.pt identical across {setups}: {same_models(out, setups, m)}"
        )
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--setups", default="stock,tuned,warm0,warm")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--samples-per-client", type=int, default=128)
    parser.add_argument(
        "--data-dir",
        default=os.environ.get("SPLIT_LEARNING_DATA_DIR", ""),
        help="CIFAR-10 folder (default: SPLIT_LEARNING_DATA_DIR; '' = the app's search roots)",
    )
    args = parser.parse_args()
    if args.data_dir:  # the apps run in other working directories
        args.data_dir = str(Path(args.data_dir).expanduser().resolve())
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    results = []
    setups = args.setups.split(",")
    for i, setup in enumerate(setups):
        label = setup if setups.count(setup) == 1 else f"{setup}.{setups[:i].count(setup) + 1}"
        results.append(measure(label, out, args.reps, args.samples_per_client, args.data_dir))
        (out / "summary.json").write_text(json.dumps(results, indent=1))
    text = summary(results, out, args.samples_per_client)
    (out / "summary.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
