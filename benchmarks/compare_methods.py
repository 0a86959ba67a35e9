"""DSL vs CSL side by side, in one run: bytes, memory and epoch time, as measured ratios.

    python benchmarks/compare_methods.py                      # ResNet-20 cut 3, 2 clients
    python benchmarks/compare_methods.py depth=110 cut=18 samples-per-client=1000 clients=4

Arguments are run-config keys with TOML values, as in `flwr run --run-config` (strings quoted).

For each method it runs (1) the in-process reference trainer (no Flower, torch's default threads:
the speed baseline; one SavedTensorsMeter over client and server, the paper's one-device setting)
and (2) a real `flwr run` simulation on a private SuperLink. Every number printed is measured in
this invocation; the ratios compare runs made minutes apart on the same machine.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import torch

from flower_app import reference
from flower_app.local_superlink import LocalSuperLink
from flower_app.results import human_bytes, read_rounds
from split_core.config import RunConfig, parse_overrides

DEFAULTS = {"num-rounds": 2, "samples-per-client": 2000, "test-samples": 1000}


def main(argv: list[str]) -> None:
    overrides = DEFAULTS | parse_overrides(argv)
    clients = int(overrides.pop("clients", 2))
    out = Path(tempfile.mkdtemp(prefix="bench-"))
    results: dict[str, dict] = {}
    with LocalSuperLink(out / "flwr-home") as link:
        for method in ("dsl", "csl"):
            run_config = overrides | {"method": method}
            cfg = RunConfig.from_run_config(run_config)
            t0 = time.perf_counter()
            ref = reference.train(cfg, clients)
            ref_seconds = time.perf_counter() - t0
            flwr = link.run(run_config | {"output-dir": str(out), "run-name": method}, clients)
            rounds = read_rounds(flwr.run_dir)
            results[method] = {
                "ref_epoch_s": sum(h["train_seconds"] for h in ref.history) / len(ref.history),
                "ref_total_s": ref_seconds,
                "one_device_peak": max(h["combined_peak_saved_bytes"] for h in ref.history),
                "flwr_epoch_s": _mean(rounds, "train_seconds"),
                "flwr_server_s": _mean(rounds, "server_compute_seconds"),
                "flwr_wait_s": _mean(rounds, "wait_seconds"),
                "flwr_client_s": _mean(rounds, "client_compute_seconds"),
                "flwr_client_data_s": _mean(rounds, "client_data_seconds"),
                "flwr_messages": _mean(rounds, "train_messages"),
                "bytes": _mean(rounds, "bytes_train_total"),
                "grad_bytes": _mean(rounds, "bytes_gradients"),
                "client_peak": max(r["client_peak_saved_bytes"] for r in rounds),
                "client_held": max(r["client_held_saved_bytes"] for r in rounds),
                "server_peak": max(r["server_peak_saved_bytes"] for r in rounds),
                "acc": rounds[-1]["test_accuracy"],
                "ref_acc": ref.history[-1]["test_accuracy"],
            }
    d, c = results["dsl"], results["csl"]
    cfg = RunConfig.from_run_config(overrides)
    print(
        f"\nResNet-{cfg.depth} cut {cfg.cut}, {clients} clients x {cfg.samples_per_client} "
        f"samples, {cfg.num_rounds} rounds, batch {cfg.batch_size}, {torch.get_num_threads()} "
        f"threads, device {cfg.resolve_device()}\n"
    )
    rows = [
        ("training bytes per round (Flower)", "bytes", human_bytes),
        ("gradient bytes per round (Flower)", "grad_bytes", human_bytes),
        ("client peak held for backward (Flower)", "client_peak", human_bytes),
        ("client bytes held while waiting (Flower)", "client_held", human_bytes),
        ("server peak held for backward (Flower)", "server_peak", human_bytes),
        ("one-device peak held for backward (reference)", "one_device_peak", human_bytes),
        ("epoch seconds, Flower simulation", "flwr_epoch_s", lambda v: f"{v:.2f} s"),
        ("epoch seconds, in-process reference", "ref_epoch_s", lambda v: f"{v:.2f} s"),
        ("final test accuracy (Flower)", "acc", lambda v: f"{100 * v:.1f}%"),
        ("final test accuracy (reference)", "ref_acc", lambda v: f"{100 * v:.1f}%"),
    ]
    print(f"{'metric':48} {'DSL':>12} {'CSL':>12} {'DSL/CSL':>8}")
    for title, key, fmt in rows:
        ratio = f"{d[key] / c[key]:.3f}" if c[key] else "-"
        print(f"{title:48} {fmt(d[key]):>12} {fmt(c[key]):>12} {ratio:>8}")
    for method, r in results.items():
        print(
            f"Flower overhead {method.upper()}: epoch {r['flwr_epoch_s']:.2f} s vs "
            f"{r['ref_epoch_s']:.2f} s in process = x{r['flwr_epoch_s'] / r['ref_epoch_s']:.2f}"
        )
    print("\nWhere a Flower epoch goes (server side; the client computes at the same time):")
    for method, r in results.items():
        rest = r["flwr_epoch_s"] - r["flwr_server_s"] - r["flwr_wait_s"]
        print(
            f"  {method.upper()}: server compute {r['flwr_server_s']:.2f} s, waiting for replies "
            f"{r['flwr_wait_s']:.2f} s, decoding/bookkeeping {rest:.2f} s; client compute "
            f"{r['flwr_client_s']:.2f} s (+ {r['flwr_client_data_s']:.2f} s data), "
            f"{r['flwr_messages']:.0f} messages, in-process total {r['ref_epoch_s']:.2f} s"
        )
    print(f"\nrun directories: {out}")


def _mean(rounds: list[dict], key: str) -> float:
    return sum(r[key] for r in rounds) / len(rounds)


if __name__ == "__main__":
    main(sys.argv[1:])
