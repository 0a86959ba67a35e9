"""A Flower strategy that hosts the server segment and trains it on the clients' activations.

Data flow of one round (DSL and CSL share all of it but the gradient message):

  configure_train ──train.forward(global client weights)──▶ client: aux steps (DSL) or forward (CSL)
        ▲                                                           │ acts + labels
        │            CSL only: train.backward(dL/d acts) ◀── server_segment.train_on(acts, labels)
        └── aggregate_train: FedAvg of the client weights that come with each client's last reply
  configure_evaluate ──evaluate(weights)──▶ client: test activations ──▶ server_segment.evaluate_on
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy

from flower_app.client import client_modules
from flower_app.config import RunConfig
from flower_app.metering import cuda_peak_bytes, peak_rss_bytes, reset_cuda_peak, reset_peak_rss
from flower_app.payload import (
    PayloadError,
    check_weights,
    decode_activations,
    encode_gradient,
    encode_modules,
    record_bytes,
)
from models import cut_shape
from strategies.exchange import Exchange
from strategies.methods import METHODS
from strategies.server_segment import ServerSegment
from strategies.steps import Phases

log = logging.getLogger("flwr").getChild("split")


class SetupError(RuntimeError):
    """The clients could not start (missing data, bad node config): nothing was trained."""


@dataclass(frozen=True)
class ClientInfo:
    node_id: int
    partition_id: int
    train_examples: int
    test_examples: int
    data_source: str


@dataclass
class Ledger:
    """Sums of one phase of a round: bytes read off payloads, client and server measurements."""

    bytes: dict[str, int] = field(default_factory=lambda: dict.fromkeys(BYTE_KEYS, 0))
    client: dict[str, float] = field(default_factory=dict)
    client_peaks: dict[str, int] = field(default_factory=dict)
    server_loss: float = 0.0
    server_correct: int = 0
    server_examples: int = 0

    def add_client(self, metrics: MetricRecord) -> None:
        for key, value in metrics.items():
            if key.startswith(("peak-", "held-")):
                self.client_peaks[key] = max(self.client_peaks.get(key, 0), int(value))
            else:
                self.client[key] = self.client.get(key, 0.0) + float(value)


BYTE_KEYS = ("activations", "labels", "gradients", "model_sync", "eval")


class SplitLearningStrategy(Strategy):
    def __init__(
        self,
        cfg: RunConfig,
        on_round: Callable[[dict[str, Any]], None] | None = None,
        timeout: float = 3600.0,
    ) -> None:
        self.cfg = cfg
        self.method = METHODS[cfg.method]()
        self.server = ServerSegment(cfg)
        self.shape = cut_shape(cfg.depth, cfg.cut)
        self.on_round = on_round
        self.timeout = timeout
        self.clients: list[ClientInfo] = []
        self.history: list[dict[str, Any]] = []

    # ------------------------------------------------------------------------------ set-up
    def initial_arrays(self) -> ArrayRecord:
        """Global client weights for round 1, built from the seed exactly as the clients do."""
        return encode_modules(client_modules(self.cfg))

    def connect(self, grid: Grid, settle_seconds: float = 1.0) -> list[ClientInfo]:
        """Wait for the SuperNodes, then have every client find its data before any training."""
        nodes = _wait_for_nodes(grid, self.cfg.min_clients, settle_seconds, self.timeout)
        config = ConfigRecord(self.cfg.to_run_config())
        first = [_message(n, "query.setup", RecordDict({"config": config})) for n in nodes]
        replies: dict[int, Message] = {}

        def consume(node: int, reply: Message) -> tuple[None, bool]:
            replies[node] = reply
            return None, True

        report = Exchange(grid, self.timeout).run(first, arrive=lambda n, r: None, consume=consume)
        if report.failures:
            lines = "\n".join(f"  node {n}: {why}" for n, why in report.failures.items())
            raise SetupError(
                f"{len(report.failures)} of {len(nodes)} clients failed set-up:\n{lines}"
            )
        clients = []
        for node, reply in replies.items():
            m = reply.content["metrics"]
            clients.append(
                ClientInfo(
                    node,
                    int(m["partition-id"]),
                    int(m["train-examples"]),
                    int(m["test-examples"]),
                    str(reply.content["info"]["data-source"]),
                )
            )
        ids = sorted(c.partition_id for c in clients)
        if len(set(ids)) != len(ids):
            raise SetupError(f"two SuperNodes claim the same partition-id: {ids}")
        self.clients = sorted(clients, key=lambda c: c.partition_id)
        return self.clients

    # ------------------------------------------------------------------------- Flower hooks
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> list[Message]:
        content = {"arrays": arrays, "config": config}
        return [_message(c.node_id, "train.forward", RecordDict(content)) for c in self.clients]

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """FedAvg (SplitFed) of client segments and aux heads, weighted by examples seen."""
        records, weights = [], []
        for reply in replies:
            if reply.has_error() or "arrays" not in reply.content:
                continue
            records.append(reply.content["arrays"])
            weights.append(float(reply.content["metrics"]["epoch-examples"]))
        if not records:
            return None, None
        return fedavg(records, weights), MetricRecord({"num-examples": int(sum(weights))})

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> list[Message]:
        content = {"arrays": arrays, "config": config}
        return [_message(c.node_id, "evaluate", RecordDict(content)) for c in self.clients]

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        examples = aux_correct = 0
        aux_loss = 0.0
        for reply in replies:
            m = reply.content["metrics"]
            examples += int(m["num-examples"])
            aux_correct += int(m["aux-correct"])
            aux_loss += float(m["aux-loss-sum"])
        if not examples:
            return None
        return MetricRecord(
            {"aux-accuracy": aux_correct / examples, "aux-loss": aux_loss / examples}
        )

    def summary(self) -> None:
        c = self.cfg
        log.info(
            "%s: ResNet-%d cut after block %d (acts %s), aux-head %s, %d clients",
            c.method.upper(),
            c.depth,
            c.cut,
            "x".join(map(str, self.shape)),
            c.aux_head if self.method.uses_aux_head else "none",
            len(self.clients),
        )

    def start(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord,
        num_rounds: int = 3,
        timeout: float = 3600,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
    ) -> Result:
        """Flower's round loop, with each phase driven by the in-flight Exchange."""
        self.timeout = timeout
        if not self.clients:
            self.connect(grid)
        self.summary()
        result, arrays = Result(arrays=initial_arrays), initial_arrays
        for rnd in range(1, num_rounds + 1):
            t0 = time.perf_counter()
            new_arrays, train = self.train_round(grid, rnd, arrays)
            if new_arrays is None:
                raise RuntimeError(f"round {rnd}: every client failed ({train['failures']})")
            arrays = result.arrays = new_arrays
            t1 = time.perf_counter()
            evaluation = self.evaluate_round(grid, rnd, arrays)
            record = self._round_record(rnd, train, evaluation, t1 - t0, time.perf_counter() - t1)
            self.history.append(record)
            result.train_metrics_clientapp[rnd] = MetricRecord(_numeric(record, "train"))
            result.evaluate_metrics_clientapp[rnd] = MetricRecord(_numeric(record, "test"))
            if self.on_round:
                self.on_round(record)
        return result

    # ------------------------------------------------------------------------------ rounds
    def train_round(
        self, grid: Grid, rnd: int, arrays: ArrayRecord
    ) -> tuple[ArrayRecord | None, dict]:
        lr = self.cfg.lr_at(rnd)
        self.server.set_lr(lr)
        config = ConfigRecord({"round": rnd, "lr": lr})
        ledger, phases, finals = Ledger(), Phases(), {}
        self._start_server_measurement()
        first = self.configure_train(rnd, arrays, config, grid)
        ledger.bytes["model_sync"] += sum(record_bytes(m.content.get("arrays")) for m in first)

        def arrive(node: int, reply: Message) -> Message | None:
            content = reply.content
            acts = content.get("acts")
            ledger.bytes["activations"] += record_bytes(acts) - _labels_bytes(acts)
            ledger.bytes["labels"] += _labels_bytes(acts)
            ledger.bytes["model_sync"] += record_bytes(content.get("arrays"))
            if self.method.returns_gradient or content["metrics"]["done"]:
                return None
            return _message(node, "train.forward", RecordDict({"config": config}))

        def consume(node: int, reply: Message) -> tuple[Message | None, bool]:
            content, follow_up = reply.content, None
            if "acts" in content:
                acts, labels = decode_activations(
                    content["acts"], self.shape, self.cfg.num_classes, self.server.device
                )
                result, grad = self.server.train_on(
                    acts, labels, phases, input_grad=self.method.returns_gradient
                )
                ledger.server_loss += result.loss
                ledger.server_correct += result.correct
                ledger.server_examples += len(labels)
                if grad is not None:
                    record = encode_gradient(grad, self.cfg.payload_dtype)
                    ledger.bytes["gradients"] += record_bytes(record)
                    content_out = RecordDict({"grad": record, "config": config})
                    follow_up = _message(node, "train.backward", content_out)
            ledger.add_client(content["metrics"])
            done = bool(content["metrics"]["done"])
            if done:
                check_weights(content.get("arrays"), arrays)
                finals[node] = reply
            elif follow_up is None and self.method.returns_gradient:
                raise PayloadError("reply carries neither activations nor the final weights")
            return follow_up, done

        report = Exchange(grid, self.timeout).run(first, arrive=arrive, consume=consume)
        aggregated, _ = self.aggregate_train(rnd, finals.values())  # a done client cannot fail
        return aggregated, {
            "ledger": ledger,
            "phases": phases,
            "report": report,
            "lr": lr,
            "clients": len(finals),
            "failures": report.failures,
            "server_peaks": self._server_peaks(),
        }

    def evaluate_round(self, grid: Grid, rnd: int, arrays: ArrayRecord) -> dict:
        config = ConfigRecord({"round": rnd})
        ledger, phases, replies = Ledger(), Phases(), []
        first = self.configure_evaluate(rnd, arrays, config, grid)
        ledger.bytes["eval"] += sum(record_bytes(m.content.get("arrays")) for m in first)

        def arrive(node: int, reply: Message) -> Message | None:
            ledger.bytes["eval"] += record_bytes(reply.content.get("acts"))
            if reply.content["metrics"]["done"]:
                return None
            return _message(node, "evaluate", RecordDict({"config": config}))

        def consume(node: int, reply: Message) -> tuple[None, bool]:
            content = reply.content
            if "acts" in content:
                acts, labels = decode_activations(
                    content["acts"], self.shape, self.cfg.num_classes, self.server.device
                )
                result = self.server.evaluate_on(acts, labels, phases)
                ledger.server_loss += result.loss
                ledger.server_correct += result.correct
                ledger.server_examples += len(labels)
            ledger.add_client(content["metrics"])
            replies.append(reply)
            return None, bool(content["metrics"]["done"])

        report = Exchange(grid, self.timeout).run(first, arrive=arrive, consume=consume)
        aux = self.aggregate_evaluate(rnd, replies) if self.method.uses_aux_head else None
        return {"ledger": ledger, "phases": phases, "report": report, "aux": aux}

    # ------------------------------------------------------------------------ measurement
    def _start_server_measurement(self) -> None:
        self.server.meter.reset_peak()
        reset_peak_rss()
        reset_cuda_peak(self.server.device)

    def _server_peaks(self) -> dict[str, int]:
        return {
            "saved": self.server.meter.peak,
            "rss": peak_rss_bytes(),
            "cuda": cuda_peak_bytes(self.server.device),
        }

    def _round_record(self, rnd: int, train: dict, ev: dict, train_s: float, eval_s: float) -> dict:
        tl, el = train["ledger"], ev["ledger"]
        tp, ep = train["phases"], ev["phases"]
        c, peaks = tl.client, train["server_peaks"]
        aux_examples = c.get("num-examples", 0.0) if self.method.uses_aux_head else 0.0
        b = tl.bytes | {"eval": el.bytes["eval"]}
        return {
            "round": rnd,
            "method": self.cfg.method,
            "test_accuracy": _ratio(el.server_correct, el.server_examples),
            "test_loss": _ratio(el.server_loss, el.server_examples),
            "aux_test_accuracy": ev["aux"]["aux-accuracy"] if ev["aux"] else None,
            "aux_test_loss": ev["aux"]["aux-loss"] if ev["aux"] else None,
            "train_loss": _ratio(tl.server_loss, tl.server_examples),
            "train_accuracy": _ratio(tl.server_correct, tl.server_examples),
            "aux_train_loss": _ratio(c.get("aux-loss-sum", 0.0), aux_examples),
            "aux_train_accuracy": _ratio(c.get("aux-correct", 0.0), aux_examples),
            "lr": train["lr"],
            "num_clients": train["clients"],
            "failed_clients": len(train["failures"]) + len(ev["report"].failures),
            "failures": {str(k): v for k, v in (train["failures"] | ev["report"].failures).items()},
            "train_examples": tl.server_examples,
            "test_examples": el.server_examples,
            **{f"bytes_{k}": v for k, v in b.items()},
            "bytes_train_total": sum(v for k, v in b.items() if k != "eval"),
            "train_messages": train["report"].messages,
            "client_peak_saved_bytes": tl.client_peaks.get("peak-saved-bytes", 0),
            "server_peak_saved_bytes": peaks["saved"],
            "client_held_saved_bytes": tl.client_peaks.get("held-saved-bytes", 0),
            "client_peak_rss_bytes": tl.client_peaks.get("peak-rss-bytes", 0),
            "server_peak_rss_bytes": peaks["rss"],
            "client_peak_cuda_bytes": tl.client_peaks.get("peak-cuda-bytes", 0),
            "server_peak_cuda_bytes": peaks["cuda"],
            "round_seconds": train_s + eval_s,
            "train_seconds": train_s,
            "eval_seconds": eval_s,
            "client_forward_seconds": c.get("forward-seconds", 0.0),
            "client_backward_seconds": c.get("backward-seconds", 0.0),
            "client_compute_seconds": c.get("forward-seconds", 0.0)
            + c.get("backward-seconds", 0.0),
            "client_data_seconds": c.get("data-seconds", 0.0),
            "server_forward_seconds": tp.forward,
            "server_backward_seconds": tp.backward,
            "server_compute_seconds": tp.total,
            "wait_seconds": train["report"].wait_seconds,
            "eval_client_seconds": el.client.get("forward-seconds", 0.0),
            "eval_server_seconds": ep.forward,
        }


def fedavg(records: list[ArrayRecord], weights: list[float]) -> ArrayRecord:
    """Example-weighted mean of client weights (equal shares if no client saw an example)."""
    total = sum(weights)
    shares = [w / total for w in weights] if total else [1 / len(weights)] * len(weights)
    keys = set(records[0].keys())
    for record in records[1:]:
        if set(record.keys()) != keys:
            diff = sorted(keys.symmetric_difference(record.keys()))
            raise PayloadError(f"client weights disagree in their keys: {diff}")
    averaged = {}
    for key in records[0]:
        arrays = [r[key].numpy() for r in records]
        if any(a.shape != arrays[0].shape for a in arrays):
            raise PayloadError(f"client weights {key!r} disagree in shape")
        if np.issubdtype(arrays[0].dtype, np.floating):
            mean = sum(s * a.astype(np.float64) for s, a in zip(shares, arrays, strict=True))
            averaged[key] = Array(mean.astype(arrays[0].dtype))
        else:  # BatchNorm's step counter: not an average
            averaged[key] = Array(max(arrays, key=lambda a: int(a.sum())))
    return ArrayRecord(averaged)


def _message(node: int, message_type: str, content: RecordDict) -> Message:
    return Message(content=content, dst_node_id=node, message_type=message_type)


def _labels_bytes(acts: ArrayRecord | None) -> int:
    return (
        0
        if acts is None or "labels" not in acts
        else record_bytes(ArrayRecord({"labels": acts["labels"]}))
    )


def _ratio(num: float, den: float) -> float | None:
    return num / den if den else None


def _numeric(record: dict[str, Any], prefix: str) -> dict[str, float]:
    return {
        k: float(v)
        for k, v in record.items()
        if k.startswith(prefix) and isinstance(v, int | float)
    }


def _wait_for_nodes(grid: Grid, minimum: int, settle: float, timeout: float) -> list[int]:
    """Nodes register asynchronously: wait for ``minimum``, then until the count stops changing."""
    deadline, last, stable_since = time.monotonic() + timeout, [], time.monotonic()
    while time.monotonic() < deadline:
        nodes = sorted(grid.get_node_ids())
        if nodes != last:
            last, stable_since = nodes, time.monotonic()
        elif len(nodes) >= minimum and time.monotonic() - stable_since >= settle:
            return nodes
        time.sleep(0.1)
    raise SetupError(
        f"only {len(last)} SuperNodes connected within {timeout:.0f} s; need {minimum}"
    )
