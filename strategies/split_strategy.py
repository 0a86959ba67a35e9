"""A Flower strategy that hosts the server segment and trains it on the clients' activations.

Data flow of one round (DSL and CSL share all of it but the gradient message):

  configure_train ──train.forward(global client weights)──▶ client: aux steps (DSL) or forward (CSL)
        ▲                                                           │ acts + labels
        │            CSL only: train.backward(dL/d acts) ◀── server_segment.train_on(acts, labels)
        └── FedAvg of the client weights that come with each client's last reply
  configure_evaluate ──evaluate(weights)──▶ client: test activations ──▶ server_segment.evaluate_on

Every reply is validated (``replies``) before the server uses it; the bookkeeping lives in
``ledger``, the event loop in ``exchange``, the aggregation in ``aggregation``.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy

from models import cut_shape
from split_core.config import RunConfig
from split_core.metering import cuda_peak_bytes, peak_rss_bytes, reset_cuda_peak, reset_peak_rss
from split_core.methods import METHODS, client_modules
from split_core.payload import PayloadError, encode_gradient, encode_modules, record_bytes
from strategies.aggregation import FedAvg
from strategies.exchange import Exchange
from strategies.ledger import Ledger, Phase, round_record
from strategies.nodes import SetupError, wait_for_nodes
from strategies.progress import Progress
from strategies.replies import Expected, is_done, parse_eval, parse_train
from strategies.server_segment import ServerSegment

log = logging.getLogger("flwr").getChild("split")


@dataclass(frozen=True)
class ClientInfo:
    node_id: int
    partition_id: int
    train_examples: int
    test_examples: int
    data_source: str
    device: str
    cpus: float
    gpus: float
    torch_threads: int
    state_bytes: int


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
        self.setup_failures: dict[int, str] = {}
        self.history: list[dict[str, Any]] = []
        self.global_arrays: ArrayRecord | None = None  # the client weights the round starts from

    # ------------------------------------------------------------------------------ set-up
    def initial_arrays(self) -> ArrayRecord:
        """Global client weights for round 1, built from the seed exactly as the clients do."""
        return encode_modules(client_modules(self.cfg))

    def connect(self, grid: Grid, settle_seconds: float = 1.0) -> list[ClientInfo]:
        """Wait for the SuperNodes, then have every client find its data before any training.

        Clients that fail set-up are left out (with their reason); the run starts if at least
        ``min-clients`` succeeded.
        """
        nodes = wait_for_nodes(grid, self.cfg.min_clients, settle_seconds, self.timeout)
        config = ConfigRecord(self.cfg.to_run_config())
        first = [_message(n, "query.setup", RecordDict({"config": config})) for n in nodes]
        clients: list[ClientInfo] = []

        def consume(node: int, reply: Message) -> tuple[None, bool]:
            clients.append(_client_info(node, reply))
            return None, True

        exchange = Exchange(grid, self.timeout, window=len(nodes), max_queued=1)
        report = exchange.run(first, request_next=lambda n, r: None, consume=consume)
        self.setup_failures = report.failures
        if len(clients) < self.cfg.min_clients or not clients:
            lines = "\n".join(f"  node {n}: {why}" for n, why in report.failures.items())
            raise SetupError(
                f"{len(report.failures)} of {len(nodes)} clients failed set-up:\n{lines}"
            )
        for node, why in report.failures.items():
            log.warning("node %s left out: it failed set-up (%s)", node, why)
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
        """FedAvg (SplitFed) of final replies' client weights, weighted by examples.

        ``train_round`` does the same one reply at a time, so no reply outlives its turn.
        """
        fedavg, expected = FedAvg(self.global_arrays), self._expected(self.global_arrays)
        for reply in replies:
            if not reply.has_error() and is_done(reply):
                parsed = parse_train(reply, expected[reply.metadata.src_node_id])
                fedavg.add(parsed.weights, parsed.metrics["epoch-examples"])
        return fedavg.result(), MetricRecord({"num-examples": int(fedavg.total)})

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> list[Message]:
        content = {"arrays": arrays, "config": config}
        return [_message(c.node_id, "evaluate", RecordDict(content)) for c in self.clients]

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """The aux head's test accuracy over replies (``evaluate_round`` scores as they come)."""
        ledger, expected = Ledger(), self._expected(None)
        for reply in replies:
            if not reply.has_error():
                ledger.add_reply(parse_eval(reply, expected[reply.metadata.src_node_id]))
        examples = ledger.aux("num-examples")
        if not examples:
            return None
        return MetricRecord(
            {
                "aux-accuracy": ledger.aux("aux-correct") / examples,
                "aux-loss": math.fsum(ledger.aux_losses) / examples,
            }
        )

    def summary(self) -> None:
        c = self.cfg
        log.info(
            "%s: ResNet-%d cut after block %d (acts %s), aux-head %s, %d clients, %s %s",
            c.method.upper(),
            c.depth,
            c.cut,
            "x".join(map(str, self.shape)),
            c.aux_head if self.method.uses_aux_head else "none",
            len(self.clients),
            self.server.device,
            c.compute_dtype,
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
        """Flower's round loop: train (streaming FedAvg), evaluate, record; one round per epoch."""
        self.timeout = timeout
        if not self.clients:
            self.connect(grid)
        self.summary()
        result, arrays = Result(arrays=initial_arrays), initial_arrays
        self.global_arrays = initial_arrays
        for rnd in range(1, num_rounds + 1):
            self._start_server_measurement()
            new_arrays, train = self.train_round(grid, rnd, arrays)
            if new_arrays is None:
                raise RuntimeError(f"round {rnd}: every client failed ({train.report.failures})")
            arrays = result.arrays = self.global_arrays = new_arrays
            evaluation = self.evaluate_round(grid, rnd, arrays)
            failures = self.setup_failures | train.report.failures | evaluation.report.failures
            record = round_record(
                rnd,
                self.cfg.method,
                self.method.uses_aux_head,
                self.cfg.lr_at(rnd),
                train,
                evaluation,
                self._server_peaks(),
                failures,
                num_clients=train.clients,
            )
            self.history.append(record)
            result.train_metrics_clientapp[rnd] = MetricRecord(_numeric(record, "train"))
            result.evaluate_metrics_clientapp[rnd] = MetricRecord(_numeric(record, "test"))
            if self.on_round:
                self.on_round(record)
        return result

    # ------------------------------------------------------------------------------ rounds
    def train_round(self, grid: Grid, rnd: int, arrays: ArrayRecord) -> tuple[ArrayRecord, Phase]:
        """One epoch over every client's data; returns the FedAvg'd client weights."""
        t0, lr = time.perf_counter(), self.cfg.lr_at(rnd)
        self.server.set_lr(lr)
        config = ConfigRecord({"round": rnd, "lr": lr})
        ledger, fedavg, expected = Ledger(), FedAvg(arrays), self._expected(arrays)
        progress = Progress(f"round {rnd}", self._batches_per_epoch(), self.cfg.progress_seconds)
        first = self.configure_train(rnd, arrays, config, grid)
        ledger.bytes["model_sync"] += record_bytes(arrays) * len(first)

        def request_next(node: int, reply: Message) -> Message | None:
            """DSL: ask for the next chunk at once; the client computes while the server trains."""
            if self.method.returns_gradient or is_done(reply):
                return None
            return _message(node, "train.forward", RecordDict({"config": config}))

        def consume(node: int, reply: Message) -> tuple[Message | None, bool]:
            parsed = parse_train(reply, expected[node])  # raises before anything is touched
            ledger.add_reply(parsed)
            follow_up = None
            if parsed.acts is not None:
                result, grad = self.server.train_on(
                    parsed.acts,
                    parsed.labels,
                    ledger.phases,
                    input_grad=self.method.returns_gradient,
                )
                batches = math.ceil(parsed.examples / self.cfg.batch_size)
                ledger.add_server(result, parsed.examples, batches)
                progress.add(batches, parsed.examples)
                if grad is not None:  # CSL: the one message DSL never sends
                    record = encode_gradient(grad, self.cfg.payload_dtype)
                    ledger.bytes["gradients"] += record_bytes(record)
                    content = RecordDict({"grad": record, "config": config})
                    follow_up = _message(node, "train.backward", content)
            if parsed.done:
                fedavg.add(parsed.weights, parsed.metrics["epoch-examples"])
            elif follow_up is None and self.method.returns_gradient:
                raise PayloadError("reply carries neither activations nor the final weights")
            return follow_up, parsed.done

        report = self._exchange(grid).run(first, request_next=request_next, consume=consume)
        phase = Phase(ledger, report, time.perf_counter() - t0, clients=fedavg.clients)
        return fedavg.result(), phase

    def evaluate_round(self, grid: Grid, rnd: int, arrays: ArrayRecord) -> Phase:
        """Test activations are scored as they arrive; nothing waits for the others."""
        t0, config = time.perf_counter(), ConfigRecord({"round": rnd})
        ledger, expected = Ledger(), self._expected(None)
        first = self.configure_evaluate(rnd, arrays, config, grid)
        ledger.bytes["eval"] += record_bytes(arrays) * len(first)

        def request_next(node: int, reply: Message) -> Message | None:
            return (
                None
                if is_done(reply)
                else _message(node, "evaluate", RecordDict({"config": config}))
            )

        def consume(node: int, reply: Message) -> tuple[None, bool]:
            parsed = parse_eval(reply, expected[node])
            ledger.add_reply(parsed, evaluation=True)
            if parsed.acts is not None:
                result = self.server.evaluate_on(parsed.acts, parsed.labels, ledger.phases)
                ledger.add_server(result, parsed.examples, 0)
            return None, parsed.done

        report = self._exchange(grid).run(
            first, request_next=request_next, consume=consume, ordered=False
        )
        return Phase(ledger, report, time.perf_counter() - t0)

    # ------------------------------------------------------------------------------ helpers
    def _exchange(self, grid: Grid) -> Exchange:
        c = self.cfg
        return Exchange(grid, self.timeout, c.max_active_clients, c.max_queued_chunks)

    def _expected(self, arrays: ArrayRecord | None) -> dict[int, Expected]:
        return {
            c.node_id: Expected(
                self.shape, self.cfg.num_classes, self.server.device, c.train_examples, arrays
            )
            for c in self.clients
        }

    def _batches_per_epoch(self) -> int:
        return sum(math.ceil(c.train_examples / self.cfg.batch_size) for c in self.clients)

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


def _client_info(node: int, reply: Message) -> ClientInfo:
    try:
        m, info = reply.content["metrics"], reply.content["info"]
        client = ClientInfo(
            node,
            int(m["partition-id"]),
            int(m["train-examples"]),
            int(m["test-examples"]),
            str(info["data-source"]),
            str(info["device"]),
            float(m["cpus"]),
            float(m["gpus"]),
            int(m["torch-threads"]),
            int(m["state-bytes"]),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise PayloadError(f"set-up reply is malformed: {type(exc).__name__}: {exc}") from exc
    if min(client.partition_id, client.train_examples, client.test_examples) < 0:
        raise PayloadError(f"set-up reply has negative counts: {client}")
    return client


def _message(node: int, message_type: str, content: RecordDict) -> Message:
    return Message(content=content, dst_node_id=node, message_type=message_type)


def _numeric(record: dict[str, Any], prefix: str) -> dict[str, float]:
    return {
        k: float(v)
        for k, v in record.items()
        if k.startswith(prefix) and isinstance(v, int | float)
    }
