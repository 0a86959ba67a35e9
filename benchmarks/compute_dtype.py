"""float32 vs bfloat16 autocast + channels_last: training speed and accuracy, side by side.

    python benchmarks/compute_dtype.py speed                  # images/s, ResNet-20 and ResNet-110
    python benchmarks/compute_dtype.py accuracy --epochs 10   # DSL and CSL at equal epochs

``speed`` times the shared training steps (client step, server step and, for CSL, the client
backward) in one process on a fixed set of real CIFAR-10 batches, after a warm-up. ``accuracy``
trains with the in-process reference trainer (the same steps as the Flower apps) on real
CIFAR-10 for the same epochs in both precisions and reports the final test accuracies.
"""

from __future__ import annotations

import argparse
import time

import torch

from experiments import reference
from split_core.client import SplitClient
from split_core.config import RunConfig, parse_overrides
from split_core.steps import Phases
from strategies.server_segment import ServerSegment

PRECISIONS = {
    "float32": {"compute-dtype": "float32", "channels-last": False},
    "bfloat16+NHWC": {"compute-dtype": "bfloat16", "channels-last": True},
}


def images_per_second(config: dict, batches: int = 12, warmup: int = 3) -> float:
    cfg = RunConfig.from_run_config(config)
    client, server = SplitClient.create(cfg, 0, 1, cfg.data_dir), ServerSegment(cfg)
    data = [client.train_batch(0, b % client.num_batches) for b in range(batches + warmup)]
    phases = Phases()
    for i, (x, y) in enumerate(data):
        if i == warmup:
            t0 = time.perf_counter()
        acts, _, pending = client.method.client_batch(client.parts, x, y, phases, i)
        _, grad = server.train_on(acts, y, phases, pending is not None)
        if grad is not None:
            client.method.client_gradient(client.parts, pending, grad, phases)
    return batches * cfg.batch_size / (time.perf_counter() - t0)


def speed(overrides: dict) -> None:
    print(f"{'model':12} {'method':6} " + " ".join(f"{p:>15}" for p in PRECISIONS) + "   ratio")
    for depth, cut in ((20, 3), (110, 27)):
        for method in ("dsl", "csl"):
            base = {"depth": depth, "cut": cut, "method": method, "samples-per-client": 2048}
            rates = [images_per_second(base | p | overrides) for p in PRECISIONS.values()]
            cells = " ".join(f"{r:>11.0f} img/s" for r in rates)
            print(f"ResNet-{depth:<5} {method:6} {cells}   x{rates[1] / rates[0]:.2f}", flush=True)


def accuracy(overrides: dict, epochs: int, methods: list[str]) -> None:
    base = {"num-rounds": epochs, "lr-schedule": "step", "samples-per-client": 10000}
    base |= {"test-samples": 10000} | overrides
    print(f"{'method':6} " + " ".join(f"{p:>15}" for p in PRECISIONS) + "   difference")
    for method in methods:
        accs = []
        for precision in PRECISIONS.values():
            cfg = RunConfig.from_run_config(base | precision | {"method": method})
            run = reference.train(cfg, num_clients=1)
            accs.append(run.history[-1]["test_accuracy"])
        cells = " ".join(f"{100 * a:>14.2f}%" for a in accs)
        print(f"{method:6} {cells}   {100 * (accs[1] - accs[0]):+.2f} pt", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["speed", "accuracy"])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--methods", nargs="+", default=["dsl", "csl"])
    parser.add_argument("overrides", nargs="*", help="run-config key=value (TOML values)")
    args = parser.parse_args()
    overrides = parse_overrides(args.overrides)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    if args.what == "speed":
        speed(overrides)
    else:
        accuracy(overrides, args.epochs, args.methods)


if __name__ == "__main__":
    main()
