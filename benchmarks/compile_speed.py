"""torch.compile (inductor) vs eager: training images/s and loss agreement, side by side.

    python benchmarks/compile_speed.py --threads 1            # ResNet-20 cut 3, bf16 + NHWC
    python benchmarks/compile_speed.py --threads 1 compute-dtype='float32' channels-last=true
    python benchmarks/compile_speed.py --threads 1 compute-dtype='float32' channels-last=false

One thread is what each party gets in a Flower run on a 2-core CPU, and with one thread this
process's CPU seconds measure the work done even while other processes load the machine; wall
seconds are printed too. The app has no compile switch: compiled, the steps did not gain the
1.2x over the best eager setting that would pay for minutes of warm-up in every process.

Both parties run in this one process through the shared training steps (client step, server
step and, for CSL, the client backward), as ``compute_dtype.py speed`` does. For each method an
eager and a compiled pair of client and server are built from the same seed and trained on the
same real CIFAR-10 batches. The first ``--check-steps`` steps of both are compared loss by loss
(this is also the compiled pair's warm-up, whose seconds are reported apart); then the two
pairs are timed in alternating blocks, so that load from other processes falls on both alike.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from split_core.client import SplitClient
from split_core.config import RunConfig, parse_overrides
from split_core.steps import Phases
from strategies.server_segment import ServerSegment

BASE = {
    "depth": 20,
    "cut": 3,
    "batch-size": 128,
    "compute-dtype": "bfloat16",
    "channels-last": True,
    "samples-per-client": 4096,
}


class Pair:
    """A client and the server segment, trained together one batch at a time."""

    def __init__(self, cfg: RunConfig, compiled: bool) -> None:
        self.client = SplitClient.create(cfg, 0, 1, cfg.data_dir)
        self.server = ServerSegment(cfg)
        if compiled:  # in place: same module objects, same parameters, same state_dict keys
            for module in (*self.client.modules.values(), self.server.segment):
                if module is not None:
                    module.compile(dynamic=False)
        self.step_index = 0

    def step(self, x: torch.Tensor, y: torch.Tensor) -> float:
        """One training step of both parties; returns the server's loss."""
        phases, method = Phases(), self.client.method
        acts, _, pending = method.client_batch(self.client.parts, x, y, phases, self.step_index)
        result, grad = self.server.train_on(acts, y, phases, pending is not None)
        if grad is not None:
            method.client_gradient(self.client.parts, pending, grad, phases)
        self.step_index += 1
        return result.loss / len(y)


def compare(cfg: RunConfig, check_steps: int, steps: int) -> dict:
    eager, compiled = Pair(cfg, False), Pair(cfg, True)
    client = eager.client
    batches = [client.train_batch(0, b % client.num_batches) for b in range(client.num_batches)]
    losses: dict[str, list[float]] = {"eager": [], "compiled": []}
    seconds = {}
    for name, pair in (("eager", eager), ("compiled", compiled)):
        t0 = time.perf_counter()
        for x, y in batches[:check_steps]:
            losses[name].append(pair.step(x, y))
        seconds[name] = time.perf_counter() - t0
    # Steady state: the two pairs take turns step by step, so load from other processes falls
    # on both alike. Wall seconds and this process's CPU seconds are booked per pair.
    wall = {"eager": [], "compiled": []}
    cpu = {"eager": [], "compiled": []}
    for i in range(steps):
        x, y = batches[(check_steps + i) % len(batches)]
        for name, pair in (("eager", eager), ("compiled", compiled)):
            w0, c0 = time.perf_counter(), time.process_time()
            pair.step(x, y)
            wall[name].append(time.perf_counter() - w0)
            cpu[name].append(time.process_time() - c0)
    return {"losses": losses, "first_seconds": seconds, "wall": wall, "cpu": cpu}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=["dsl", "csl"])
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    parser.add_argument("--check-steps", type=int, default=8)
    parser.add_argument("--steps", type=int, default=32, help="timed steps per pair")
    parser.add_argument("overrides", nargs="*", help="run-config key=value (TOML values)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    overrides = BASE | parse_overrides(args.overrides)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {overrides}", flush=True)
    for method in args.methods:
        cfg = RunConfig.from_run_config(overrides | {"method": method})
        r = compare(cfg, args.check_steps, args.steps)
        le, lc = r["losses"]["eager"], r["losses"]["compiled"]
        diffs = [abs(a - b) for a, b in zip(le, lc, strict=True)]
        print(f"\n{method.upper()}: first {len(le)} steps, server loss eager vs compiled")
        for i, (a, b) in enumerate(zip(le, lc, strict=True)):
            print(f"  step {i}: {a:.4f} {b:.4f}  |diff| {abs(a - b):.4f}")
        print(f"  max |diff| {max(diffs):.4f}")
        fe, fc = r["first_seconds"]["eager"], r["first_seconds"]["compiled"]
        print(f"  first {len(le)} steps: eager {fe:.1f} s, compiled {fc:.1f} s (compile warm-up)")
        for clock in ("wall", "cpu"):
            te, tc = r[clock]["eager"], r[clock]["compiled"]
            ie, ic = len(te) * cfg.batch_size / sum(te), len(tc) * cfg.batch_size / sum(tc)
            me, mc = statistics.median(te), statistics.median(tc)
            print(
                f"  {clock:4} seconds, {len(te)} alternating steps: eager {ie:.0f} img/s, "
                f"compiled {ic:.0f} img/s = x{ic / ie:.2f} (median step x{me / mc:.2f})",
                flush=True,
            )


if __name__ == "__main__":
    main()
