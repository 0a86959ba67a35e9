"""What a round measured, summed over clients, and the ``rounds.jsonl`` record made from it.

Bytes come from the payloads themselves (see ``split_core.payload``); times and peaks come from
the clients' own metrics, each folded over replies as ``split_core.protocol`` declares it
(``Tally``), and from the server's meters. Float sums that reach the results (losses) are kept
per reply and added with ``math.fsum``, so they do not depend on arrival order.
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Generic

from split_core.config import RunConfig
from split_core.protocol import EvalMetrics, Fold, M, TrainMetrics, fold_of
from split_core.steps import Phases, StepResult
from strategies.exchange import ExchangeReport
from strategies.replies import Reply

BYTE_KEYS = ("activations", "labels", "gradients", "model_sync", "eval")


class Tally(Generic[M]):
    """A phase's client metrics over its replies, each folded as the protocol declares it:
    summed, fsum'd, or its maximum; control fields (``done``) are never combined."""

    def __init__(self, kind: type[M]) -> None:
        self.kind = kind
        self._fields = [f for f in dataclasses.fields(kind) if fold_of(f) is not Fold.NONE]
        self._values: dict[str, list[float]] = {f.name: [] for f in self._fields}

    def add(self, metrics: M) -> None:
        for f in self._fields:
            self._values[f.name].append(getattr(metrics, f.name))

    def totals(self) -> M:
        """One metrics object of the phase: 0 where no reply came."""
        folded = {}
        for f in self._fields:
            values, fold = self._values[f.name], fold_of(f)
            if fold is Fold.FSUM:
                folded[f.name] = math.fsum(values)
            elif fold is Fold.MAX:
                folded[f.name] = max(values, default=0)
            else:
                folded[f.name] = sum(values)
        return self.kind(**folded)


@dataclass
class Ledger:
    """Sums of one phase of a round (training or evaluation)."""

    evaluation: bool = False
    bytes: dict[str, int] = field(default_factory=lambda: dict.fromkeys(BYTE_KEYS, 0))
    client: Tally = field(init=False)
    phases: Phases = field(default_factory=Phases)
    losses: list[float] = field(default_factory=list)
    correct: int = 0
    examples: int = 0
    batches: int = 0
    ray_nodes: Counter[str] = field(default_factory=Counter)  # replies served per Ray node

    def __post_init__(self) -> None:
        self.client = Tally(EvalMetrics if self.evaluation else TrainMetrics)

    def add_reply(self, reply: Reply) -> None:
        """A validated reply's payload bytes and the client's own measurements."""
        if self.evaluation:
            self.bytes["eval"] += reply.bytes_activations + reply.bytes_labels
        else:
            self.bytes["activations"] += reply.bytes_activations
            self.bytes["labels"] += reply.bytes_labels
            self.bytes["model_sync"] += reply.bytes_weights
        self.client.add(reply.metrics)
        if reply.ray_node is not None:
            self.ray_nodes[reply.ray_node] += 1

    def add_server(self, result: StepResult, examples: int, batches: int) -> None:
        self.losses.append(result.loss)
        self.correct += result.correct
        self.examples += examples
        self.batches += batches

    def loss(self) -> float | None:
        return _ratio(math.fsum(self.losses), self.examples)

    def accuracy(self) -> float | None:
        return _ratio(self.correct, self.examples)


@dataclass
class Outcome:
    """One phase's ledger and how its exchange went."""

    ledger: Ledger
    report: ExchangeReport
    clients: int = 0  # clients that completed the phase

    @property
    def seconds(self) -> float:
        return self.report.seconds


def round_record(
    rnd: int,
    cfg: RunConfig,
    uses_aux: bool,
    train: Outcome,
    ev: Outcome,
    server_peaks: dict[str, int],
    failures: dict[int, str],
) -> dict[str, Any]:
    """One line of rounds.jsonl (keys documented in README); its clients are those that
    completed training."""
    tl, el = train.ledger, ev.ledger
    c: TrainMetrics = tl.client.totals()
    e: EvalMetrics = el.client.totals()
    aux_examples = c.num_examples if uses_aux else 0
    eval_examples = e.num_examples if uses_aux else 0
    b = tl.bytes | {"eval": el.bytes["eval"]}
    return {
        "round": rnd,
        "method": cfg.method,
        "test_accuracy": el.accuracy(),
        "test_loss": el.loss(),
        "aux_test_accuracy": _ratio(e.aux_correct, eval_examples),
        "aux_test_loss": _ratio(e.aux_loss_sum, eval_examples),
        "train_loss": tl.loss(),
        "train_accuracy": tl.accuracy(),
        "aux_train_loss": _ratio(c.aux_loss_sum, aux_examples),
        "aux_train_accuracy": _ratio(c.aux_correct, aux_examples),
        "lr": cfg.lr_at(rnd),
        "num_clients": train.clients,
        "failed_clients": len(failures),
        "failures": {str(k): v for k, v in failures.items()},
        "train_examples": tl.examples,
        "test_examples": el.examples,
        **{f"bytes_{k}": v for k, v in b.items()},
        "bytes_train_total": sum(v for k, v in b.items() if k != "eval"),
        "train_messages": train.report.messages,
        "client_peak_saved_bytes": c.peak_saved_bytes,
        "server_peak_saved_bytes": server_peaks["saved"],
        "client_held_saved_bytes": c.held_saved_bytes,
        "client_peak_rss_bytes": c.peak_rss_bytes,
        "server_peak_rss_bytes": server_peaks["rss"],
        "client_peak_cuda_bytes": c.peak_cuda_bytes,
        "server_peak_cuda_bytes": server_peaks["cuda"],
        "probe_dcor": _ratio(e.probe_dcor, e.probe_count),
        "client_state_bytes": c.state_bytes,
        "client_live_max": c.live_clients,
        "client_rebuilds": int(c.rebuilt),
        "client_recomputes": int(c.recomputes),
        "client_recompute_seconds": float(c.recompute_seconds),
        "server_peak_queued_chunks": train.report.peak_queued,
        "server_peak_active_clients": max(train.report.peak_active, ev.report.peak_active),
        "round_seconds": train.seconds + ev.seconds,
        "train_seconds": train.seconds,
        "eval_seconds": ev.seconds,
        "client_forward_seconds": float(c.forward_seconds),
        "client_backward_seconds": float(c.backward_seconds),
        "client_compute_seconds": float(c.forward_seconds + c.backward_seconds),
        "client_data_seconds": float(c.data_seconds),
        "client_handler_seconds": float(c.handler_seconds),
        "server_forward_seconds": tl.phases.forward,
        "server_backward_seconds": tl.phases.backward,
        "server_compute_seconds": tl.phases.total,
        "wait_seconds": train.report.wait_seconds,
        "eval_client_seconds": float(e.forward_seconds),
        "eval_server_seconds": el.phases.forward,
        "ray_nodes": dict(sorted((tl.ray_nodes + el.ray_nodes).items())),
    }


def _ratio(num: float, den: float) -> float | None:
    return num / den if den else None


def rebuild_advice(record: dict[str, Any], live_clients: int, max_active: int) -> str | None:
    """Why a round was slow, when most of its messages rebuilt their client from context.state.

    A ClientApp process keeps its ``live-clients`` most recently used clients; the server sends
    to its active clients in turn. When one process serves more active clients than it keeps,
    that round-robin misses the cache on every message. A fresh process per message (Flower's stock
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


def numeric(record: dict[str, Any], prefix: str) -> dict[str, float]:
    """The record's numbers whose key starts with ``prefix`` (for Flower's ``Result``)."""
    return {
        k: float(v)
        for k, v in record.items()
        if k.startswith(prefix) and isinstance(v, int | float)
    }
