"""Epoch time against link bandwidth and latency, for CSL, DSL, DSL-int8 and DSL with feedback.

    python benchmarks/network_model.py RESULTS_DIR [--out docs/network_model.png]
    python benchmarks/network_model.py RESULTS_DIR --validate --latency 0.05 --bandwidth 1e9

RESULTS_DIR holds one CSL and one DSL run of the same setting (``rounds.jsonl`` +
``config.json``, e.g. two `flwr run` results or a sweep). From them the model takes what was
measured per mini-batch: client and server compute seconds, activation and gradient bytes, and
how many batches ride in one message. A link is a one-way latency L (seconds per message,
everything a message costs besides its bytes) and a bandwidth B (bytes per second), the same for
every client; the server is shared.

Per epoch, with n batches per client, K clients, m batches per DSL message, c the client's
compute per batch (building it included), s the server's, a and g the bytes of a batch's
activations and gradient, and for every message a hop h = 2S/B + o_c + o_s (S: one node's
context.state, which travels both ways with every message; o_c, o_s: what client and server
spend per message besides computing, measured in the run):

  CSL           n+1 round trips, one per batch and the last for the weights:
                n (c_fwd + a/B + s + g/B + c_bwd) + (n+1) (2L + h)
  DSL           one way, pipelined: n/m (m c + m a/B + 2L + h - o_s) + m s  (the request for the
                next chunk leaves when a chunk arrives; the server trains the last chunk after
                it lands)
  DSL-int8      DSL with a/4 (per-channel int8, scales negligible)
  DSL-fb(k)     every k-th batch waits for its gradient: n/k (k c + k a/B + k s + g/B + 2L + h)

and the epoch can never be shorter than the server's work, K n s + M o_s, nor than the clients'
work shared by the ``--workers`` that run them, (K n c + M o_c + M L) / workers (a worker that
serves several clients waits, once for each of the M messages, for the next request; with a
worker per client that term is 0). Each method's time is the largest of the three.
``--validate`` predicts the
measured runs themselves from a measured link (``benchmarks/link_probe.py`` for the simulation
engine, ``scripts/bench_messages.py`` for a deployment) and prints the error.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from flower_app.results import read_rounds

METHODS = ("CSL", "DSL", "DSL-int8", "DSL-fb(2)")
COLORS = {"CSL": "tab:blue", "DSL": "tab:orange", "DSL-int8": "tab:green", "DSL-fb(2)": "tab:red"}


@dataclass(frozen=True)
class Measured:
    """Per-batch costs of one run, averaged over its rounds."""

    method: str
    clients: int
    batches: float  # per client per epoch
    client_forward: float  # seconds per batch
    client_backward: float
    client_data: float  # building the batch (augmentation)
    client_overhead: float  # per message: restore, decode, encode, save context.state
    server_overhead: float  # per message: decode, validate, bookkeeping
    state_bytes: float  # one node's context.state: it travels both ways with every message
    server: float
    act_bytes: float  # per batch, labels included
    grad_bytes: float  # per batch that gets one back
    per_message: float  # batches per training message (DSL chunks)

    messages: float  # training messages per epoch, all clients
    epoch_seconds: float  # measured: mean train_seconds

    @property
    def client(self) -> float:
        return self.client_forward + self.client_backward + self.client_data

    @classmethod
    def from_run(cls, run_dir: Path) -> Measured:
        config = json.loads((run_dir / "config.json").read_text())
        rc, rounds = config["run_config"], read_rounds(run_dir)
        k = len(config["clients"])
        per_client = [math.ceil(c["train_examples"] / rc["batch-size"]) for c in config["clients"]]
        total = sum(per_client)

        def mean(key: str) -> float:
            return float(np.mean([r[key] for r in rounds]))

        grad_batches = total if rc["method"] == "csl" else 0
        if rc["method"] == "dsl" and rc.get("feedback-every", 0):
            grad_batches = sum(n // rc["feedback-every"] for n in per_client)
        return cls(
            method=rc["method"],
            clients=k,
            batches=total / k,
            client_forward=mean("client_forward_seconds") / total,
            client_backward=mean("client_backward_seconds") / total,
            client_data=mean("client_data_seconds") / total,
            client_overhead=(
                mean("client_handler_seconds")
                - mean("client_compute_seconds")
                - mean("client_data_seconds")
            )
            / mean("train_messages"),
            server_overhead=(
                mean("train_seconds") - mean("server_compute_seconds") - mean("wait_seconds")
            )
            / mean("train_messages"),
            state_bytes=mean("client_state_bytes"),
            server=mean("server_compute_seconds") / total,
            act_bytes=(mean("bytes_activations") + mean("bytes_labels")) / total,
            grad_bytes=mean("bytes_gradients") / grad_batches if grad_batches else 0.0,
            per_message=max(1.0, total / max(mean("train_messages"), 1)),
            messages=mean("train_messages"),
            epoch_seconds=mean("train_seconds"),
        )


@dataclass(frozen=True)
class Link:
    latency: float  # seconds, one way, per message
    bandwidth: float  # bytes per second


def epoch_seconds(method: str, csl: Measured, dsl: Measured, link: Link, workers: int) -> float:
    L, B = link.latency, link.bandwidth  # noqa: N806 - the symbols of the docstring
    if method == "CSL":
        m = csl
        hop = m.state_bytes * 2 / B + m.client_overhead + m.server_overhead  # per message
        per_batch = m.client_forward + m.act_bytes / B + m.server + m.grad_bytes / B
        chain = m.batches * (per_batch + m.client_backward) + (m.batches + 1) * (2 * L + hop)
    elif method.startswith("DSL-fb"):
        k, m = int(method[7:-1]), dsl
        hop = m.state_bytes * 2 / B + m.client_overhead + m.server_overhead
        grad = csl.grad_bytes  # a gradient is as big as its batch's activations
        group = k * m.client + k * m.act_bytes / B + k * m.server + grad / B + 2 * L + hop
        chain = m.batches / k * group
    else:
        m = dsl if method == "DSL" else replace(dsl, act_bytes=dsl.act_bytes / 4)
        chunk = m.per_message
        hop = m.state_bytes * 2 / B + m.client_overhead  # the server answers on arrival
        chain = m.batches / chunk * (chunk * m.client + chunk * m.act_bytes / B + 2 * L + hop)
        chain += chunk * m.server
    messages = m.clients * m.batches / (1 if method == "CSL" else m.per_message)
    server_bound = m.clients * m.batches * m.server + messages * m.server_overhead
    # a worker shared by several clients also waits, once per message, for the next request
    shared = workers < m.clients
    client_work = m.clients * m.batches * m.client + messages * (
        m.client_overhead + (L if shared else 0.0)
    )
    client_bound = client_work / max(1, min(workers, m.clients))
    return max(chain, server_bound, client_bound)


def load(results: Path) -> tuple[Measured, Measured]:
    runs = {}
    for path in sorted(results.rglob("rounds.jsonl")):
        measured = Measured.from_run(path.parent)
        runs.setdefault(measured.method, measured)
    missing = {"csl", "dsl"} - set(runs)
    if missing:
        raise SystemExit(f"{results} lacks a run of {sorted(missing)}")
    return runs["csl"], runs["dsl"]


LABELS = {
    "CSL": "CSL (a gradient back per batch)",
    "DSL": "DSL (activations one way)",
    "DSL-int8": "DSL, int8 activations",
    "DSL-fb(2)": "DSL + gradient every 2nd batch",
}


def plot(csl: Measured, dsl: Measured, workers: int, latencies: list[float], out: Path) -> None:
    bandwidths = np.logspace(5, 10, 200)  # 0.8 Mbit/s .. 80 Gbit/s
    fig = Figure(figsize=(4.6 * len(latencies), 4.0), layout="constrained")
    axes = fig.subplots(1, len(latencies), squeeze=False, sharey=True)[0]
    for ax, latency in zip(axes, latencies, strict=True):
        for method in METHODS:
            times = [epoch_seconds(method, csl, dsl, Link(latency, b), workers) for b in bandwidths]
            ax.loglog(bandwidths * 8 / 1e6, times, label=LABELS[method], color=COLORS[method])
        ax.set_title(f"one-way latency {1000 * latency:g} ms per message", fontsize=9)
        ax.set_xlabel("link bandwidth per client (Mbit/s)")
        ax.grid(alpha=0.3, which="both")
    axes[0].set_ylabel("predicted epoch time (s)")
    axes[0].legend(fontsize=7, loc="upper right")
    fig.suptitle(
        f"Network model: predicted epoch time against the link, from measured compute and "
        f"bytes ({csl.clients} clients x {csl.batches:.0f} batches; client workers: {workers})",
        fontsize=10,
    )
    fig.savefig(out, dpi=120)


def winners(csl: Measured, dsl: Measured, workers: int, latency: float) -> list[str]:
    """Which methods are fastest (within 1 %) over which bandwidths, at one latency."""
    lines, current, start = [], None, None
    for b in np.logspace(5, 10, 400):
        times = {m: epoch_seconds(m, csl, dsl, Link(latency, b), workers) for m in METHODS}
        best = min(times.values())
        tied = " = ".join(m for m in METHODS if times[m] <= best * 1.01)
        if tied != current:
            if current is not None:
                lines.append(f"  {current:24} from {_rate(start)} to {_rate(b)}")
            current, start = tied, b
    lines.append(f"  {current:24} from {_rate(start)} up")
    return lines


def _rate(bytes_per_s: float) -> str:
    bits = bytes_per_s * 8
    return f"{bits / 1e9:.2f} Gbit/s" if bits >= 1e9 else f"{bits / 1e6:.1f} Mbit/s"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path)
    parser.add_argument("--workers", type=int, default=1, help="clients that compute at once")
    parser.add_argument("--latencies", type=float, nargs="+", default=[0.001, 0.03])
    parser.add_argument("--out", type=Path, default=Path("network_model.png"))
    parser.add_argument("--validate", action="store_true")
    parser.add_argument("--latency", type=float, help="measured link, for --validate")
    parser.add_argument("--bandwidth", type=float, help="measured link, bytes/s")
    args = parser.parse_args()
    csl, dsl = load(args.results)
    for m in (csl, dsl):
        print(
            f"{m.method.upper()}: K={m.clients}, {m.batches:.0f} batches/client, client "
            f"{1000 * m.client:.1f} ms, server {1000 * m.server:.1f} ms, "
            f"acts {m.act_bytes / 1e6:.2f} MB, grad {m.grad_bytes / 1e6:.2f} MB per batch, "
            f"{m.per_message:.1f} batches/message"
        )
    if args.validate:
        link = Link(args.latency, args.bandwidth)
        for name, m in (("CSL", csl), ("DSL", dsl)):
            predicted = epoch_seconds(name, csl, dsl, link, args.workers)
            error = predicted / m.epoch_seconds - 1
            print(
                f"validate {name}: predicted {predicted:.2f} s, measured {m.epoch_seconds:.2f} s "
                f"({100 * error:+.1f} %)"
            )
        return
    plot(csl, dsl, args.workers, args.latencies, args.out)
    print(f"plot: {args.out}")
    for latency in args.latencies:
        print(f"fastest at latency {1000 * latency:g} ms:")
        print("\n".join(winners(csl, dsl, args.workers, latency)))


if __name__ == "__main__":
    main()
