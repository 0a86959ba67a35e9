"""DSL vs CSL side by side, in one run: bytes, memory and epoch time, and what Flower costs.

    python benchmarks/compare_methods.py                      # ResNet-20 cut 3, 2 clients
    python benchmarks/compare_methods.py --repeats 3          # time ratios as ranges over 3 runs
    python benchmarks/compare_methods.py depth=110 cut=18 samples-per-client=1000 clients=4

Arguments are run-config keys with TOML values, as in `flwr run --run-config` (strings quoted).

Each repeat runs, per method: (1) a real `flwr run` simulation on a private SuperLink, then the
in-process reference trainer (no Flower; one SavedTensorsMeter over client and server, the
paper's one-device setting) (2) with the threads each party had in the Flower run and (3) with
torch's default threads for the whole model. What Flower itself costs is read two ways:

- the Flower epoch over max(client compute, server compute) of the same run: the parties
  compute at the same time, so that maximum is the epoch Flower could at best achieve;
- the Flower epoch over the in-process epoch at equal threads per party (2).

The Flower epoch over (3) is printed too, labelled as what it is: in (3) one process runs
the whole model on every thread while in Flower each party has its share of the cores, so
that ratio mostly measures how the two use threads. Time ratios are printed as ranges over
the repeats (each repeat's runs follow one another minutes apart); bytes and memory do not
change between repeats and come from the first. The load average is printed before and after.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

import torch

from deploy.local_superlink import LocalSuperLink
from experiments import reference
from flower_app.results import human_bytes, read_rounds
from split_core.config import RunConfig, parse_overrides

DEFAULTS = {"num-rounds": 2, "samples-per-client": 2000, "test-samples": 1000}
METHODS = ("dsl", "csl")


def main(argv: list[str]) -> None:
    repeats = 1
    if "--repeats" in argv:
        at = argv.index("--repeats")
        repeats, argv = int(argv[at + 1]), argv[:at] + argv[at + 2 :]
    overrides = DEFAULTS | parse_overrides(argv)
    clients = int(overrides.pop("clients", 2))
    machine_threads = torch.get_num_threads()
    load_before = os.getloadavg()
    out = Path(tempfile.mkdtemp(prefix="bench-"))
    runs: dict[str, list[dict]] = {m: [] for m in METHODS}
    with LocalSuperLink(out / "flwr-home") as link:
        for rep in range(repeats):
            for method in METHODS:
                name = f"{method}-{rep}"
                run_config = overrides | {"method": method}
                flwr = link.run(run_config | {"output-dir": str(out), "run-name": name}, clients)
                runs[method].append(measure(run_config, flwr.run_dir, clients, machine_threads))
                print(f"repeat {rep + 1}/{repeats} {method}: {summary(runs[method][-1])}")
    torch.set_num_threads(machine_threads)
    cfg = RunConfig.from_run_config(overrides)
    print(
        f"\nResNet-{cfg.depth} cut {cfg.cut}, {clients} clients x {cfg.samples_per_client} "
        f"samples, {cfg.num_rounds} rounds, batch {cfg.batch_size}, {machine_threads} threads "
        f"on {os.cpu_count()} cores, device {cfg.resolve_device()}, {repeats} repeat(s); load "
        f"average {load_before[0]:.1f} before, {os.getloadavg()[0]:.1f} after\n"
    )
    print_table({m: r[0] for m, r in runs.items()})
    print_overhead(runs)
    print(f"\nrun directories: {out}")


def measure(run_config: dict, run_dir: Path, clients: int, machine_threads: int) -> dict:
    """One Flower run's figures and the in-process reference's at the same config, twice:
    with the Flower run's threads per party and with the machine's."""
    rounds = read_rounds(run_dir)
    cfg = RunConfig.from_run_config(run_config)
    client_threads = {
        c["torch_threads"] for c in json.loads((run_dir / "config.json").read_text())["clients"]
    }
    server_threads = cfg.torch_threads(cfg.server_threads, clients)  # as the ServerApp sets it
    party_threads = max(client_threads | {server_threads})
    ref = {}
    for label, threads in (("party", party_threads), ("machine", machine_threads)):
        torch.set_num_threads(threads)
        ref[label] = reference.train(cfg, clients)
    ref_epoch = {k: _mean(r.history, "train_seconds") for k, r in ref.items()}
    flwr_client, flwr_server = (
        _mean(rounds, k) for k in ("client_compute_seconds", "server_compute_seconds")
    )
    return {
        "party_threads": party_threads,
        "ref_epoch_s": ref_epoch["machine"],
        "ref_party_epoch_s": ref_epoch["party"],
        "one_device_peak": max(h["combined_peak_saved_bytes"] for h in ref["machine"].history),
        "flwr_epoch_s": _mean(rounds, "train_seconds"),
        "flwr_server_s": flwr_server,
        "flwr_wait_s": _mean(rounds, "wait_seconds"),
        "flwr_client_s": flwr_client,
        "flwr_client_data_s": _mean(rounds, "client_data_seconds"),
        "flwr_messages": _mean(rounds, "train_messages"),
        "bytes": _mean(rounds, "bytes_train_total"),
        "grad_bytes": _mean(rounds, "bytes_gradients"),
        "client_peak": max(r["client_peak_saved_bytes"] for r in rounds),
        "client_held": max(r["client_held_saved_bytes"] for r in rounds),
        "server_peak": max(r["server_peak_saved_bytes"] for r in rounds),
        "acc": rounds[-1]["test_accuracy"],
        "ref_acc": ref["machine"].history[-1]["test_accuracy"],
        "vs_compute": _mean(rounds, "train_seconds") / max(flwr_client, flwr_server),
        "vs_party": _mean(rounds, "train_seconds") / ref_epoch["party"],
        "vs_machine": _mean(rounds, "train_seconds") / ref_epoch["machine"],
    }


def summary(r: dict) -> str:
    return (
        f"Flower epoch {r['flwr_epoch_s']:.2f} s (client compute {r['flwr_client_s']:.2f} s, "
        f"server {r['flwr_server_s']:.2f} s), in process {r['ref_party_epoch_s']:.2f} s on "
        f"{r['party_threads']} thread(s), {r['ref_epoch_s']:.2f} s on all"
    )


def print_table(first: dict[str, dict]) -> None:
    d, c = first["dsl"], first["csl"]
    rows = [
        ("training bytes per round (Flower)", "bytes", human_bytes),
        ("gradient bytes per round (Flower)", "grad_bytes", human_bytes),
        ("client peak held for backward (Flower)", "client_peak", human_bytes),
        ("client bytes held while waiting (Flower)", "client_held", human_bytes),
        ("server peak held for backward (Flower)", "server_peak", human_bytes),
        ("one-device peak held for backward (reference)", "one_device_peak", human_bytes),
        ("epoch seconds, Flower simulation", "flwr_epoch_s", lambda v: f"{v:.2f} s"),
        (
            "epoch seconds, in-process, threads per party",
            "ref_party_epoch_s",
            lambda v: f"{v:.2f} s",
        ),
        ("epoch seconds, in-process, all threads", "ref_epoch_s", lambda v: f"{v:.2f} s"),
        ("final test accuracy (Flower)", "acc", lambda v: f"{100 * v:.1f}%"),
        ("final test accuracy (reference)", "ref_acc", lambda v: f"{100 * v:.1f}%"),
    ]
    print(f"{'metric (first repeat)':48} {'DSL':>12} {'CSL':>12} {'DSL/CSL':>8}")
    for title, key, fmt in rows:
        ratio = f"{d[key] / c[key]:.3f}" if c[key] else "-"
        print(f"{title:48} {fmt(d[key]):>12} {fmt(c[key]):>12} {ratio:>8}")


def print_overhead(runs: dict[str, list[dict]]) -> None:
    print("\nWhat Flower costs (ranges over the repeats):")
    for method, rs in runs.items():
        m = method.upper()
        print(
            f"Flower overhead {m}: epoch / max(client, server compute) of the same run = "
            f"{_range(rs, 'vs_compute')}"
        )
        print(
            f"Flower overhead {m}: epoch / in-process epoch at {rs[0]['party_threads']} thread(s) "
            f"per party = {_range(rs, 'vs_party')}"
        )
        print(
            f"  {m} Flower epoch / in-process epoch on all {torch.get_num_threads()} threads "
            f"(measures thread use more than Flower) = {_range(rs, 'vs_machine')}"
        )
    print("\nWhere a Flower epoch goes (server side; the client computes at the same time):")
    for method, rs in runs.items():
        r = rs[0]
        rest = r["flwr_epoch_s"] - r["flwr_server_s"] - r["flwr_wait_s"]
        print(
            f"  {method.upper()}: server compute {r['flwr_server_s']:.2f} s, waiting for replies "
            f"{r['flwr_wait_s']:.2f} s, decoding/bookkeeping {rest:.2f} s; client compute "
            f"{r['flwr_client_s']:.2f} s (+ {r['flwr_client_data_s']:.2f} s data), "
            f"{r['flwr_messages']:.0f} messages, in-process total {r['ref_epoch_s']:.2f} s"
        )


def _range(rs: list[dict], key: str) -> str:
    values = [r[key] for r in rs]
    if len(values) == 1:
        return f"x{values[0]:.2f}"
    return f"x{min(values):.2f}-{max(values):.2f} (median x{statistics.median(values):.2f})"


def _mean(rounds: list[dict], key: str) -> float:
    return sum(r[key] for r in rounds) / len(rounds)


if __name__ == "__main__":
    main(sys.argv[1:])
