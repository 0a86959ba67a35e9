"""What a round measured, summed over clients, and the ``rounds.jsonl`` record made from it.

Bytes come from the payloads themselves (see ``split_core.payload``); times and peaks come from
the clients' own metrics and from the server's meters. Float sums that reach the results (losses)
are kept per reply and added with ``math.fsum``, so they do not depend on arrival order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from split_core.steps import Phases, StepResult
from strategies.exchange import ExchangeReport
from strategies.replies import Reply

BYTE_KEYS = ("activations", "labels", "gradients", "model_sync", "eval")


@dataclass
class Ledger:
    """Sums of one phase of a round (training or evaluation)."""

    bytes: dict[str, int] = field(default_factory=lambda: dict.fromkeys(BYTE_KEYS, 0))
    client: dict[str, float] = field(default_factory=dict)
    client_peaks: dict[str, int] = field(default_factory=dict)
    phases: Phases = field(default_factory=Phases)
    losses: list[float] = field(default_factory=list)
    aux_losses: list[float] = field(default_factory=list)
    correct: int = 0
    examples: int = 0
    batches: int = 0

    def add_reply(self, reply: Reply, *, evaluation: bool = False) -> None:
        """A validated reply's payload bytes and the client's own measurements."""
        if evaluation:
            self.bytes["eval"] += reply.bytes_activations + reply.bytes_labels
        else:
            self.bytes["activations"] += reply.bytes_activations
            self.bytes["labels"] += reply.bytes_labels
            self.bytes["model_sync"] += reply.bytes_weights
        for key, value in reply.metrics.items():
            if key.startswith(("peak-", "held-", "live-", "state-")):
                self.client_peaks[key] = max(self.client_peaks.get(key, 0), int(value))
            elif key == "aux-loss-sum":
                self.aux_losses.append(float(value))
            else:
                self.client[key] = self.client.get(key, 0.0) + float(value)

    def add_server(self, result: StepResult, examples: int, batches: int) -> None:
        self.losses.append(result.loss)
        self.correct += result.correct
        self.examples += examples
        self.batches += batches

    def loss(self) -> float | None:
        return _ratio(math.fsum(self.losses), self.examples)

    def accuracy(self) -> float | None:
        return _ratio(self.correct, self.examples)

    def aux(self, key: str) -> float:
        return self.client.get(key, 0.0)


@dataclass
class Phase:
    """One phase's ledger and how its exchange went."""

    ledger: Ledger
    report: ExchangeReport
    seconds: float
    clients: int = 0  # clients that completed the phase


def round_record(
    rnd: int,
    method: str,
    uses_aux: bool,
    lr: float,
    train: Phase,
    ev: Phase,
    server_peaks: dict[str, int],
    failures: dict[int, str],
    num_clients: int,
) -> dict[str, Any]:
    """One line of rounds.jsonl (keys documented in README)."""
    tl, el = train.ledger, ev.ledger
    c = tl.client
    aux_examples = c.get("num-examples", 0.0) if uses_aux else 0.0
    eval_examples = el.client.get("num-examples", 0.0) if uses_aux else 0.0
    b = tl.bytes | {"eval": el.bytes["eval"]}
    return {
        "round": rnd,
        "method": method,
        "test_accuracy": el.accuracy(),
        "test_loss": el.loss(),
        "aux_test_accuracy": _ratio(el.aux("aux-correct"), eval_examples),
        "aux_test_loss": _ratio(math.fsum(el.aux_losses), eval_examples),
        "train_loss": tl.loss(),
        "train_accuracy": tl.accuracy(),
        "aux_train_loss": _ratio(math.fsum(tl.aux_losses), aux_examples),
        "aux_train_accuracy": _ratio(c.get("aux-correct", 0.0), aux_examples),
        "lr": lr,
        "num_clients": num_clients,
        "failed_clients": len(failures),
        "failures": {str(k): v for k, v in failures.items()},
        "train_examples": tl.examples,
        "test_examples": el.examples,
        **{f"bytes_{k}": v for k, v in b.items()},
        "bytes_train_total": sum(v for k, v in b.items() if k != "eval"),
        "train_messages": train.report.messages,
        "client_peak_saved_bytes": tl.client_peaks.get("peak-saved-bytes", 0),
        "server_peak_saved_bytes": server_peaks["saved"],
        "client_held_saved_bytes": tl.client_peaks.get("held-saved-bytes", 0),
        "client_peak_rss_bytes": tl.client_peaks.get("peak-rss-bytes", 0),
        "server_peak_rss_bytes": server_peaks["rss"],
        "client_peak_cuda_bytes": tl.client_peaks.get("peak-cuda-bytes", 0),
        "server_peak_cuda_bytes": server_peaks["cuda"],
        "probe_dcor": _ratio(el.client.get("probe-dcor", 0.0), el.client.get("probe-count", 0)),
        "client_state_bytes": tl.client_peaks.get("state-bytes", 0),
        "client_live_max": tl.client_peaks.get("live-clients", 0),
        "client_rebuilds": int(c.get("rebuilt", 0)),
        "client_recomputes": int(c.get("recomputes", 0)),
        "client_recompute_seconds": c.get("recompute-seconds", 0.0),
        "server_peak_queued_chunks": train.report.peak_queued,
        "server_peak_active_clients": max(train.report.peak_active, ev.report.peak_active),
        "round_seconds": train.seconds + ev.seconds,
        "train_seconds": train.seconds,
        "eval_seconds": ev.seconds,
        "client_forward_seconds": c.get("forward-seconds", 0.0),
        "client_backward_seconds": c.get("backward-seconds", 0.0),
        "client_compute_seconds": c.get("forward-seconds", 0.0) + c.get("backward-seconds", 0.0),
        "client_data_seconds": c.get("data-seconds", 0.0),
        "client_handler_seconds": c.get("handler-seconds", 0.0),
        "server_forward_seconds": tl.phases.forward,
        "server_backward_seconds": tl.phases.backward,
        "server_compute_seconds": tl.phases.total,
        "wait_seconds": train.report.wait_seconds,
        "eval_client_seconds": el.client.get("forward-seconds", 0.0),
        "eval_server_seconds": el.phases.forward,
    }


def _ratio(num: float, den: float) -> float | None:
    return num / den if den else None


def rebuild_advice(record: dict[str, Any], live_clients: int, max_active: int) -> str | None:
    """Why a round was slow, when most of its messages rebuilt their client from context.state.

    A ClientApp process keeps its ``live-clients`` most recently used clients; the server sends
    to its active clients in turn. When one process serves more active clients than it keeps,
    that round-robin misses the cache on every message (measured: full data, K=5 on one Ray
    actor, 105 rebuilds in 105 messages a round). A fresh process per message (Flower's stock
    deployment executor) also rebuilds every time, but never fills its cache, so it is not
    flagged: only rebuilds with the cache full are.
    """
    messages, rebuilds = record["train_messages"], record["client_rebuilds"]
    if messages < 8 or 2 * rebuilds <= messages or record["client_live_max"] < live_clients:
        return None
    return (
        f"round {record['round']}: {rebuilds} of {messages} training messages rebuilt their "
        f"client from context.state, with every ClientApp process's cache full "
        f"(live-clients={live_clients}, max-active-clients={max_active}). Raise live-clients to "
        f"the clients one process serves, or lower max-active-clients to live-clients x processes."
    )
