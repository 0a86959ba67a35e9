"""The GPU check: one table of what the paper's setting costs on this machine's accelerator.

    bash benchmarks/gpu_check.sh            # ResNet-110 cut 27, full CIFAR-10 (< 8 min, one H100)
    bash benchmarks/gpu_check.sh --quick    # ResNet-8 cut 1, 128 images: checks the script itself

Rows: one epoch in process (no Flower; client and server on one device) and through Flower's
simulation, for DSL and CSL with K=1, in float32 and bfloat16 + channels_last; one DSL epoch
with K=10 through Flower. Columns: epoch seconds, images per second, CUDA peak per party, and
for Flower runs the seconds the server spent waiting for messages, as a share of the epoch and
per message. A part that cannot run here (no Ray on the machine, say) prints its reason instead.
"""

from __future__ import annotations

import argparse
import tempfile
import time
import traceback
from pathlib import Path

import torch

from experiments import reference
from flower_app.results import human_bytes, read_rounds
from split_core.config import RunConfig

FULL = {"depth": 110, "cut": 27, "samples-per-client": 0, "test-samples": 0}
QUICK = {"depth": 8, "cut": 1, "samples-per-client": 128, "test-samples": 64}
BF16 = {"compute-dtype": "bfloat16", "channels-last": True}


def in_process(config: dict) -> dict:
    cfg = RunConfig.from_run_config(config)
    device = cfg.resolve_device()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    run = reference.train(cfg, num_clients=1, rounds=1)
    (h,) = run.history
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    return {
        "epoch_s": h["train_seconds"],
        "img_s": h["train_examples"] / h["train_seconds"],
        "cuda": f"{human_bytes(peak)} (one device)",
        "wait": "-",
        "total_s": time.perf_counter() - t0,
        "accuracy": h["test_accuracy"],
    }


def through_flower(link, config: dict, clients: int, gpus_per_client: float, out: Path) -> dict:
    t0 = time.perf_counter()
    name = f"{config['method']}-{clients}-{config.get('compute-dtype', 'float32')}"
    result = link.run(
        config | {"output-dir": str(out), "run-name": name},
        clients=clients,
        cpus_per_client=2,
        gpus_per_client=gpus_per_client or None,
        timeout=900,
    )
    if not (result.run_dir / "rounds.jsonl").exists():
        raise RuntimeError(result.log[-2000:])
    (r,) = read_rounds(result.run_dir)
    share = r["wait_seconds"] / r["train_seconds"]
    per_message = r["wait_seconds"] / max(r["train_messages"], 1)
    return {
        "epoch_s": r["train_seconds"],
        "img_s": r["train_examples"] / r["train_seconds"],
        "cuda": f"{human_bytes(r['client_peak_cuda_bytes'])} / "
        f"{human_bytes(r['server_peak_cuda_bytes'])}",
        "wait": f"{100 * share:.0f} %, {1000 * per_message:.0f} ms/msg",
        "total_s": time.perf_counter() - t0,
        "accuracy": r["test_accuracy"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model and data (CPU check)")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    base = (QUICK if args.quick else FULL) | {"num-rounds": 1, "device": args.device}
    # --quick checks the script, often beside other work: one thread each, no spinning; else auto
    threads = 1 if args.quick else 0
    base |= {"client-threads": threads, "server-threads": threads, "progress-seconds": 0.0}
    if args.quick:
        torch.set_num_threads(1)
    many = 2 if args.quick else 10
    gpu = torch.cuda.is_available() and args.device != "cpu"
    out = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    plan = [
        ("in process", "dsl", 1, {}, None),
        ("in process", "csl", 1, {}, None),
        ("in process bf16+NHWC", "dsl", 1, BF16, None),
        ("in process bf16+NHWC", "csl", 1, BF16, None),
        ("Flower simulation", "dsl", 1, {}, 1.0),
        ("Flower simulation", "csl", 1, {}, 1.0),
        ("Flower simulation", "dsl", many, {}, 1.0 / min(many, 4)),
    ]
    device = torch.cuda.get_device_name() if gpu else "cpu"
    print(f"device: {device}; ResNet-{base['depth']} cut {base['cut']}; torch {torch.__version__}")
    header = f"{'run':22} {'method':6} {'K':>3} {'epoch s':>8} {'img/s':>8}  {'CUDA peak':28} wait"
    rows = [header, "-" * len(header)]
    link = None
    for where, method, k, extra, gpus in plan:
        config = base | extra | {"method": method}
        try:
            if gpus is None:
                r = in_process(config)
            else:
                if link is None:  # one SuperLink for every Flower row; needs Flower's CLI, Ray
                    from deploy.local_superlink import LocalSuperLink

                    link = LocalSuperLink(out / "flwr-home").start()
                r = through_flower(link, config, k, gpus if gpu else 0.0, out)
            line = (
                f"{where:22} {method:6} {k:>3} {r['epoch_s']:>8.1f} {r['img_s']:>8.0f}  "
                f"{r['cuda']:28} {r['wait']}"
            )
        except Exception as exc:  # noqa: BLE001 - a missing part is reported, the rest goes on
            traceback.print_exc()
            line = f"{where:22} {method:6} {k:>3}  n/a: {type(exc).__name__}: {exc}"[:200]
        rows.append(line)
        print(line, flush=True)
    if link is not None:
        link.stop()
    print("\n" + "\n".join(rows))
    print(f"\nresults in {out}")


if __name__ == "__main__":
    main()
