"""How much of the machine a training epoch uses: its FLOP/s over a large matmul's, same run.

    python benchmarks/roofline.py                           # ResNet-20 cut 3, DSL and CSL
    python benchmarks/roofline.py --threads 1 --settings fp32 fp32+NHWC fp32+NHWC+compile

FLOPs of one real training step (client and server, forward and backward, both parties in this
process through the shared steps) are counted with torch.utils.flop_counter.FlopCounterMode,
which counts the matmuls and convolutions (2 per multiply-add; BatchNorm, ReLU and the
optimizer are left out, as in every FLOP count of a ResNet). The step's images/s, measured
after a warm-up on real CIFAR-10 batches, turns them into FLOP/s. The ceiling is the FLOP/s of
a large square matmul in float32 and in bfloat16 on the same threads, measured before and after
the steps; the better of the two measurements counts.

``--clock cpu`` times with this process's CPU seconds instead of wall seconds: with one thread
that is the work done, whatever else loads the machine (with more threads, OpenMP's waiting
counts too, so keep wall there).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.compile_speed import BASE, Pair
from split_core.config import RunConfig, parse_overrides

SETTINGS: dict[str, tuple[dict, bool]] = {  # name: (run-config overrides, compiled)
    "fp32": ({"compute-dtype": "float32", "channels-last": False}, False),
    "bf16+NHWC": ({"compute-dtype": "bfloat16", "channels-last": True}, False),
    "fp32+NHWC": ({"compute-dtype": "float32", "channels-last": True}, False),
    "fp32+NHWC+compile": ({"compute-dtype": "float32", "channels-last": True}, True),
    "bf16+NHWC+compile": ({"compute-dtype": "bfloat16", "channels-last": True}, True),
}
DEFAULT_SETTINGS = ["fp32", "bf16+NHWC", "fp32+NHWC"]


def counted_flops(step: Callable[[], object]) -> int:
    """FLOPs that ``step`` performs, forward and backward, as FlopCounterMode counts them."""
    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def matmul_flops_per_second(
    dtype: torch.dtype, n: int = 2048, seconds: float = 2.0, clock: str = "wall"
) -> float:
    """Best FLOP/s of an n x n matmul in ``dtype`` over about ``seconds`` of repeats."""
    now = CLOCKS[clock]
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    torch.mm(a, b)  # first call: allocation and kernel choice
    best, spent = float("inf"), 0.0
    while spent < seconds:
        t0 = now()
        torch.mm(a, b)
        took = now() - t0
        best, spent = min(best, took), spent + took
    return 2 * n**3 / best


def native_bf16() -> str:
    """The CPU's bfloat16 instructions: without them bfloat16 math is emulated (and slower)."""
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.is_file():
        return "unknown"
    flags = set(cpuinfo.read_text().split())
    found = [f for f in ("avx512_bf16", "amx_bf16") if f in flags]
    return ", ".join(found) or "none (no avx512_bf16, no amx_bf16)"


def step_rate(
    pair: Pair, batches: list, warmup: int, steps: int, clock: str = "wall"
) -> tuple[float, float]:
    """(warm-up wall seconds, steady-state images/s) of ``pair`` on these batches."""
    now = CLOCKS[clock]
    t0 = time.perf_counter()
    for x, y in batches[:warmup]:
        pair.step(x, y)
    warm = time.perf_counter() - t0
    t0 = now()
    for i in range(steps):
        x, y = batches[(warmup + i) % len(batches)]
        pair.step(x, y)
    return warm, steps * len(batches[0][1]) / (now() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=["dsl", "csl"])
    parser.add_argument("--settings", nargs="+", default=DEFAULT_SETTINGS, choices=SETTINGS)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--clock", choices=CLOCKS, default="wall")
    parser.add_argument("overrides", nargs="*", help="run-config key=value (TOML values)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    overrides = BASE | parse_overrides(args.overrides)
    dtypes = (torch.float32, torch.bfloat16)
    peaks = {d: matmul_flops_per_second(d, clock=args.clock) for d in dtypes}
    rows = []
    for method in args.methods:
        cfg = RunConfig.from_run_config(overrides | {"method": method})
        counter_pair = Pair(cfg, compiled=False)
        x, y = counter_pair.client.train_batch(0, 0)
        flops_per_image = counted_flops(partial(counter_pair.step, x, y)) / len(y)
        for name in args.settings:
            extra, compiled = SETTINGS[name]
            pair = Pair(RunConfig.from_run_config(overrides | extra | {"method": method}), compiled)
            batches = [pair.client.train_batch(0, b) for b in range(pair.client.num_batches)]
            warmup = args.warmup + 5 * compiled
            warm, rate = step_rate(pair, batches, warmup, args.steps, args.clock)
            rows.append((method, name, flops_per_image, warm, rate))
            print(f"  {method} {name}: {rate:.0f} img/s (warm-up {warm:.0f} s)", flush=True)
    for d in peaks:  # again after the steps; the better measurement is the ceiling
        peaks[d] = max(peaks[d], matmul_flops_per_second(d, clock=args.clock))
    f32, bf16 = peaks[torch.float32], peaks[torch.bfloat16]
    print(
        f"\nResNet-{cfg.depth} cut {cfg.cut}, batch {cfg.batch_size}, {torch.get_num_threads()} "
        f"threads, torch {torch.__version__}, {args.clock} clock\n"
        f"matmul 2048^2: float32 {f32 / 1e9:.1f} GFLOP/s, "
        f"bfloat16 {bf16 / 1e9:.1f} GFLOP/s; CPU bfloat16 instructions: {native_bf16()}\n"
    )
    head = f"{'method':6} {'setting':18} {'GFLOP/img':>9} {'img/s':>7} {'GFLOP/s':>8}"
    print(f"{head} {'/fp32 mm':>9} {'/bf16 mm':>9} {'warm-up':>8}")
    for method, name, per_image, warm, rate in rows:
        achieved = per_image * rate
        print(
            f"{method:6} {name:18} {per_image / 1e9:9.3f} {rate:7.0f} {achieved / 1e9:8.1f} "
            f"{achieved / f32:9.3f} {achieved / bf16:9.3f} {warm:7.0f}s"
        )


if __name__ == "__main__":
    main()
