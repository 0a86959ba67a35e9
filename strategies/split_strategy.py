"""A Flower strategy that hosts the server segment and trains it on the clients' activations.

Data flow of one round (DSL and CSL share all of it but the gradient message):

  configure_train ──train.forward(global client weights)──▶ client: aux steps (DSL) or forward (CSL)
        ▲                                                           │ acts + labels
        │            CSL only: train.backward(dL/d acts) ◀── server_segment.train_on(acts, labels)
        └── FedAvg of the client weights that come with each client's last reply
  configure_evaluate ──evaluate(weights)──▶ client: test activations ──▶ server_segment.evaluate_on
  then: the round's record, and a checkpoint (with each client's optimizer state)

Every reply is validated (``replies``) before the server uses it; the bookkeeping lives in
``ledger``, the event loop in ``exchange``, who takes part in ``roster``, the messages around
training in ``lifecycle``, the aggregation in ``aggregation``.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy

from models import cut_shape
from split_core.compute import seeded_generator
from split_core.config import RunConfig
from split_core.metering import cuda_peak_bytes, peak_rss_bytes, reset_cuda_peak, reset_peak_rss
from split_core.methods import client_modules, make_method
from split_core.payload import PayloadError, encode_gradient, encode_modules, record_bytes
from strategies import lifecycle
from strategies.aggregation import FedAvg
from strategies.checkpoint import Checkpoint, optimizer_to_cpu
from strategies.exchange import Exchange, RunStopped
from strategies.ledger import Ledger, Phase, rebuild_advice, round_record
from strategies.nodes import SetupError, TooFewClients, wait_for_nodes
from strategies.progress import Progress
from strategies.replies import (
    Expected,
    Reply,
    awaits_gradient,
    is_done,
    parse_eval,
    parse_train,
)
from strategies.roster import ClientInfo, Roster
from strategies.server_segment import ServerSegment

log = logging.getLogger("flwr").getChild("split")
# First contact starts a client's process (a Ray actor, a ClientApp in deployment), imports
# torch and may decode the dataset into its cache: reply-timeout alone would be too tight.
SETUP_TIMEOUT = 300.0


class SplitLearningStrategy(Strategy):
    def __init__(
        self,
        cfg: RunConfig,
        on_round: Callable[[dict[str, Any]], None] | None = None,
        on_checkpoint: Callable[[Checkpoint], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> None:
        self.cfg = cfg
        self.method = make_method(cfg)
        self.server = ServerSegment(cfg)
        self.shape = cut_shape(cfg.depth, cfg.cut)
        self.on_round, self.on_checkpoint = on_round, on_checkpoint
        self.should_stop = should_stop or (lambda: False)
        self.timeout = cfg.reply_timeout
        self.roster = Roster([])
        self.round_clients: list[ClientInfo] = []
        self.setup_failures: dict[int, str] = {}
        self.history: list[dict[str, Any]] = []
        self.global_arrays: ArrayRecord | None = None  # the client weights the round starts from
        self.resumed: Checkpoint | None = None
        self.client_optimizers: dict[int, dict] = {}  # partition id -> momentum, for checkpoints

    @property
    def clients(self) -> list[ClientInfo]:
        return self.roster.clients

    # ------------------------------------------------------------------------------ set-up
    def initial_arrays(self) -> ArrayRecord:
        """Global client weights for round 1, built from the seed exactly as the clients do."""
        if self.resumed is not None:
            return self.resumed.global_arrays()
        return encode_modules(client_modules(self.cfg))

    def restore(self, checkpoint: Checkpoint) -> None:
        """Continue from ``checkpoint``: server segment, optimizer, history; clients at connect."""
        self.server.segment.load_state_dict(checkpoint.server_segment)
        self.server.optimizer.load_state_dict(checkpoint.server_optimizer)
        self.history = list(checkpoint.history)
        self.client_optimizers = dict(checkpoint.client_optimizers)
        self.resumed = checkpoint

    def connect(self, grid: Grid, settle_seconds: float = 1.0) -> list[ClientInfo]:
        """Wait for the SuperNodes, then have every client find its data before any training.

        Clients that fail set-up are left out (with their reason); the run starts if at least
        ``min-clients`` succeeded. A resumed run hands each client its optimizer state back.
        """
        nodes = wait_for_nodes(grid, self.cfg.min_clients, settle_seconds, self.timeout)
        config = ConfigRecord(self.cfg.to_run_config())
        exchange = self._exchange(grid, len(nodes))
        exchange.timeout = max(self.timeout, SETUP_TIMEOUT)
        clients, report = lifecycle.setup_clients(exchange, nodes, config)
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
        self.roster = Roster(clients)
        if self.resumed is not None:
            exchange = self._exchange(grid, len(clients))
            restored = lifecycle.restore_optimizers(
                exchange, clients, self.resumed.client_optimizers
            )
            self.roster.note_failures(restored.failures, restored.codes)
        return self.clients

    # ------------------------------------------------------------------------- Flower hooks
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> list[Message]:
        content = {"arrays": arrays, "config": config}
        return [
            _message(c.node_id, "train.forward", RecordDict(content)) for c in self.round_clients
        ]

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
        return [_message(c.node_id, "evaluate", RecordDict(content)) for c in self.round_clients]

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
        timeout: float | None = None,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
    ) -> Result:
        """Flower's round loop: who takes part, train (streaming FedAvg), evaluate, record."""
        self.timeout = timeout or self.timeout
        if not self.clients:
            self.connect(grid)
        self.summary()
        result, arrays = Result(arrays=initial_arrays), initial_arrays
        self.global_arrays = initial_arrays
        first = self.resumed.round + 1 if self.resumed is not None else 1
        for rnd in range(first, num_rounds + 1):
            self._start_server_measurement()
            left_out = self.begin_round(grid, rnd)
            new_arrays, train = self.train_round(grid, rnd, arrays)
            if new_arrays is None:
                raise RuntimeError(f"round {rnd}: every client failed ({train.report.failures})")
            arrays = result.arrays = self.global_arrays = new_arrays
            evaluation = self.evaluate_round(grid, rnd, arrays)
            self.end_round(grid, rnd, train, evaluation, left_out)
            record = self.history[-1]
            result.train_metrics_clientapp[rnd] = MetricRecord(_numeric(record, "train"))
            result.evaluate_metrics_clientapp[rnd] = MetricRecord(_numeric(record, "test"))
        return result

    def begin_round(self, grid: Grid, rnd: int) -> dict[int, str]:
        """This round's clients: listed, not known dead, set up again if they failed before.

        Returns the reason each other client is left out; stops the run when fewer than
        ``min-clients`` remain.
        """
        taking_part, left_out = self.roster.for_round(set(grid.get_node_ids()))
        rejoining = [c.node_id for c in taking_part if c.node_id in self.roster.needs_setup]
        if rejoining:
            config = ConfigRecord(self.cfg.to_run_config())
            exchange = self._exchange(grid, len(rejoining))
            clients, report = lifecycle.setup_clients(exchange, rejoining, config)
            for client in clients:
                self.roster.replace(client)
            for node, why in report.failures.items():
                left_out[node] = f"set-up again failed: {why}"
            self.roster.note_failures(report.failures, report.codes)
            taking_part, _ = self.roster.for_round(set(grid.get_node_ids()))
            taking_part = [c for c in taking_part if c.node_id not in report.failures]
        if len(taking_part) < self.cfg.min_clients:
            reasons = "; ".join(f"node {n}: {why}" for n, why in left_out.items())
            raise TooFewClients(
                f"round {rnd}: {len(taking_part)} clients left, min-clients is "
                f"{self.cfg.min_clients} ({reasons})"
            )
        for node, why in left_out.items():
            log.warning("round %d: node %s left out: %s", rnd, node, why)
        self.round_clients = taking_part
        return left_out

    def end_round(
        self, grid: Grid, rnd: int, train: Phase, evaluation: Phase, left_out: dict[int, str]
    ) -> None:
        """Record the round and checkpoint it, unless the run was stopped meanwhile."""
        reports = (train.report, evaluation.report)
        failures = _first_reason(left_out, train.report.failures, evaluation.report.failures)
        every = self.cfg.checkpoint_every
        due = every > 0 and (rnd % every == 0 or rnd == self.cfg.num_rounds)
        checkpoint_bytes = 0
        if due:  # each client's momentum, which carries over rounds
            clients = [c for c in self.round_clients if c.node_id not in failures]
            optimizers, report, checkpoint_bytes = lifecycle.collect_optimizers(
                self._exchange(grid), clients, self._momentum_shapes()
            )
            self.client_optimizers |= optimizers
            failures = _first_reason(failures, report.failures)
            reports += (report,)
        for report in reports:
            self.roster.note_failures(report.failures, report.codes)
        if rnd == 1:
            failures = _first_reason(self.setup_failures, failures)
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
        record["bytes_checkpoint"] = checkpoint_bytes
        if self.should_stop():
            raise RunStopped(f"the run was stopped before round {rnd} was recorded")
        self.history.append(record)
        advice = rebuild_advice(record, self.cfg.live_clients, self.cfg.max_active_clients)
        if advice:
            log.warning(advice)
        if due and self.on_checkpoint:
            self.on_checkpoint(self._checkpoint(rnd))
        if self.on_round:
            self.on_round(record)

    # ------------------------------------------------------------------------------ rounds
    def train_round(self, grid: Grid, rnd: int, arrays: ArrayRecord) -> tuple[ArrayRecord, Phase]:
        """One epoch over every client's data; returns the FedAvg'd client weights."""
        cfg, t0, lr = self.cfg, time.perf_counter(), self.cfg.lr_at(rnd)
        self.server.set_lr(lr)
        config = ConfigRecord({"round": rnd, "lr": lr})
        ledger, fedavg, expected = Ledger(), FedAvg(arrays), self._expected(arrays)
        progress = Progress(f"round {rnd}", self._batches_per_epoch(), self.cfg.progress_seconds)
        first = self.configure_train(rnd, arrays, config, grid)
        ledger.bytes["model_sync"] += record_bytes(arrays) * len(first)

        seen: dict[int, int] = {}  # batches of each client consumed so far this round
        partition = {c.node_id: c.partition_id for c in self.round_clients}

        def request_next(node: int, reply: Message) -> Message | None:
            """Ask for the next chunk at once, so the client computes while the server trains;
            a client that waits for a gradient gets its next request with that gradient."""
            if is_done(reply) or awaits_gradient(reply):
                return None
            return _message(node, "train.forward", RecordDict({"config": config}))

        def consume(node: int, reply: Message) -> tuple[Message | None, bool]:
            parsed = parse_train(reply, expected[node])  # raises before anything is touched
            follow_up = None
            if parsed.acts is not None:
                first = seen.get(node, 0)
                flags = self._gradient_flags(first, parsed)
                ledger.add_reply(parsed)
                result, grad = self.server.train_on(
                    parsed.acts, parsed.labels, ledger.phases, flags
                )
                seen[node] = first + len(flags)
                ledger.add_server(result, parsed.examples, len(flags))
                progress.add(len(flags), parsed.examples)
                if grad is not None:  # the one message pure DSL never sends
                    rounding = seeded_generator(cfg.seed, rnd, partition[node], seen[node])
                    record = encode_gradient(grad, cfg.payload_dtype, rounding)
                    ledger.bytes["gradients"] += record_bytes(record)
                    content = RecordDict({"grad": record, "config": config})
                    follow_up = _message(node, "train.backward", content)
            elif not parsed.done:
                raise PayloadError("reply carries neither activations nor the final weights")
            else:
                ledger.add_reply(parsed)
            if parsed.done:
                fedavg.add(parsed.weights, parsed.metrics["epoch-examples"])
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
    def _checkpoint(self, rnd: int) -> Checkpoint:
        return Checkpoint(
            round=rnd,
            server_segment=self.server.state_dict(),
            server_optimizer=optimizer_to_cpu(self.server.optimizer.state_dict()),
            client_weights={k: v.numpy() for k, v in self.global_arrays.items()},
            client_optimizers=dict(self.client_optimizers),
            history=list(self.history),
        )

    def _momentum_shapes(self) -> list[tuple[int, ...]]:
        modules = client_modules(self.cfg).values()
        return [tuple(p.shape) for m in modules if m is not None for p in m.parameters()]

    def _exchange(self, grid: Grid, window: int | None = None) -> Exchange:
        c = self.cfg
        return Exchange(
            grid,
            self.timeout,
            window or c.max_active_clients,
            c.max_queued_chunks,
            max_poll_interval=c.poll_seconds,
            should_stop=self.should_stop,
        )

    def _gradient_flags(self, first: int, parsed: Reply) -> list[bool]:
        """Which batches of this payload get dL/d(acts) back: the method decides, by the
        batch's index in the epoch. A chunk must end at such a batch, where its client waits."""
        batches = math.ceil(parsed.examples / self.cfg.batch_size)
        flags = [self.method.needs_gradient(first + i) for i in range(batches)]
        if any(flags[:-1]) or flags[-1] != parsed.awaits_gradient:
            raise PayloadError(
                f"batches {first}..{first + batches - 1}: the chunk does not end where "
                f"{self.method.name} returns a gradient (awaits-gradient={parsed.awaits_gradient})"
            )
        return flags

    def _expected(self, arrays: ArrayRecord | None) -> dict[int, Expected]:
        return {
            c.node_id: Expected(
                self.shape,
                self.cfg.num_classes,
                self.server.device,
                c.train_examples,
                arrays,
                self.cfg.payload_dtype,
            )
            for c in self.roster.clients
        }

    def _batches_per_epoch(self) -> int:
        batch = self.cfg.batch_size
        return sum(math.ceil(c.train_examples / batch) for c in self.round_clients)

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


def _first_reason(*failures: dict[int, str]) -> dict[int, str]:
    """One reason per client: the first thing that went wrong with it this round."""
    merged: dict[int, str] = {}
    for failure in failures:
        for node, why in failure.items():
            merged.setdefault(node, why)
    return merged


def _message(node: int, message_type: str, content: RecordDict) -> Message:
    return Message(content=content, dst_node_id=node, message_type=message_type)


def _numeric(record: dict[str, Any], prefix: str) -> dict[str, float]:
    return {
        k: float(v)
        for k, v in record.items()
        if k.startswith(prefix) and isinstance(v, int | float)
    }
