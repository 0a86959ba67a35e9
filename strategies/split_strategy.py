"""A Flower strategy that hosts the server segment and trains it on the clients' activations.

``start`` tells the story of a run; each round is: who takes part (``begin_round``), one epoch
of training (``TrainPhase``: train.forward with the global client weights, activations back,
the server segment steps on them in turn order, train.backward with dL/d(acts) where the method
returns a gradient, FedAvg of the weights that come with each client's last reply), evaluation
(``EvaluatePhase``), then the round's record and checkpoint (``end_round``).

Every reply is validated (``replies``) before the server uses it; the bookkeeping lives in
``ledger``, the event loop in ``exchange``, who takes part in ``roster``, the messages around
training in ``lifecycle``, the aggregation in ``aggregation``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from functools import partial
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy

from models import cut_shape
from split_core.config import RunConfig
from split_core.methods import client_modules, make_method
from split_core.payload import encode_modules
from strategies import lifecycle
from strategies.checkpoint import Checkpoint, optimizer_to_cpu
from strategies.exchange import Exchange, RunStopped
from strategies.ledger import Outcome, numeric, rebuild_advice, round_record
from strategies.phases import EvaluatePhase, TrainPhase
from strategies.replies import expectations
from strategies.roster import ClientInfo, Roster, first_reason
from strategies.server_segment import ServerSegment

log = logging.getLogger("flwr").getChild("split")
EvaluateFn = Callable[[int, ArrayRecord], MetricRecord | None] | None
STREAMED = (  # why Flower's aggregate_* hooks are not where aggregation happens
    "split learning aggregates as replies stream in, so that none outlives its turn: see "
    "TrainPhase.consume and EvaluatePhase.consume (strategies/phases.py); start() drives rounds"
)


class SplitLearningStrategy(Strategy):
    def __init__(
        self,
        cfg: RunConfig,
        on_round: Callable[[dict[str, Any]], None] | None = None,
        on_checkpoint: Callable[[Checkpoint], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> None:
        self.cfg, self.method, self.server = cfg, make_method(cfg), ServerSegment(cfg)
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
        """Meet the clients (``lifecycle.connect``); on resume, hand back their optimizers."""
        optimizers = self.resumed.client_optimizers if self.resumed is not None else None
        exchange_for = partial(self._exchange, grid)
        self.roster, self.setup_failures = lifecycle.connect(
            grid, self.cfg, exchange_for, self.timeout, settle_seconds, optimizers
        )
        return self.clients

    # ------------------------------------------------------------------------- Flower hooks
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> list[Message]:
        """The round's first training messages; round and lr come from the run config."""
        _refuse("configure_train's config", config)
        return self._train_phase(server_round, arrays).first_messages()

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        raise NotImplementedError(STREAMED)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> list[Message]:
        _refuse("configure_evaluate's config", config)
        return self._evaluate_phase(server_round, arrays).first_messages()

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        raise NotImplementedError(STREAMED)

    def summary(self) -> None:
        c, acts, head = self.cfg, "x".join(map(str, self.shape)), self.method.uses_aux_head
        log.info(
            f"{c.method.upper()}: ResNet-{c.depth} cut after block {c.cut} (acts {acts}), aux-head "
            f"{c.aux_head if head else 'none'}, {len(self.clients)} clients, {self.server.device} "
            f"{c.compute_dtype}"
        )

    def start(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord,
        num_rounds: int = 3,
        timeout: float | None = None,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: EvaluateFn = None,
    ) -> Result:
        """The run: meet the clients; then, each round, who takes part, train, evaluate, record.

        ``evaluate_fn(round, global client weights)`` is called before the first round and after
        each; what it returns goes into ``Result`` and, per round, the record's
        ``server_evaluation``. Clients take every setting from the run config at set-up, so a
        non-empty ``train_config`` or ``evaluate_config`` is refused.
        """
        _refuse("train_config", train_config)
        _refuse("evaluate_config", evaluate_config)
        self.timeout = timeout or self.timeout
        if not self.clients:
            self.connect(grid)
        self.summary()
        result, arrays = Result(arrays=initial_arrays), initial_arrays
        self.global_arrays = initial_arrays
        first = self.resumed.round + 1 if self.resumed is not None else 1
        _evaluate_centrally(evaluate_fn, first - 1, arrays, result)
        for rnd in range(first, num_rounds + 1):
            self.server.start_measuring()
            left_out = self.begin_round(grid, rnd)
            new_arrays, train = self.train_round(grid, rnd, arrays)
            if new_arrays is None:
                raise RuntimeError(f"round {rnd}: every client failed ({train.report.failures})")
            arrays = result.arrays = self.global_arrays = new_arrays
            evaluation = self.evaluate_round(grid, rnd, arrays)
            central = _evaluate_centrally(evaluate_fn, rnd, arrays, result)
            self.end_round(grid, rnd, train, evaluation, left_out, central)
            record = self.history[-1]
            result.train_metrics_clientapp[rnd] = MetricRecord(numeric(record, "train"))
            result.evaluate_metrics_clientapp[rnd] = MetricRecord(numeric(record, "test"))
        return result

    def begin_round(self, grid: Grid, rnd: int) -> dict[int, str]:
        """This round's clients (``lifecycle.take_part``); returns why each other one is left
        out, and raises ``TooFewClients`` when fewer than ``min-clients`` remain."""
        exchange_for = partial(self._exchange, grid)
        self.round_clients, left_out = lifecycle.take_part(
            grid, self.roster, exchange_for, self.cfg, rnd
        )
        return left_out

    def train_round(
        self, grid: Grid, rnd: int, arrays: ArrayRecord
    ) -> tuple[ArrayRecord | None, Outcome]:
        """One epoch over every client's data; returns the FedAvg'd client weights."""
        self.server.set_lr(self.cfg.lr_at(rnd))
        phase = self._train_phase(rnd, arrays)
        report = self._exchange(grid, phase_timeout=self.cfg.round_timeout).run(phase)
        return phase.aggregator.result(), Outcome(phase.ledger, report, phase.aggregator.clients)

    def evaluate_round(self, grid: Grid, rnd: int, arrays: ArrayRecord) -> Outcome:
        """Test activations are scored as they arrive; nothing waits for the others."""
        phase = self._evaluate_phase(rnd, arrays)
        exchange = self._exchange(grid, phase_timeout=self.cfg.round_timeout)
        return Outcome(phase.ledger, exchange.run(phase))

    def end_round(
        self,
        grid: Grid,
        rnd: int,
        train: Outcome,
        ev: Outcome,
        left_out: dict[int, str],
        central=None,
    ) -> None:
        """Record the round and checkpoint it, unless the run was stopped meanwhile."""
        reports = [train.report, ev.report]
        failures = first_reason(
            self.setup_failures if rnd == 1 else {}, left_out, *(r.failures for r in reports)
        )
        every, checkpoint_bytes = self.cfg.checkpoint_every, 0
        due = every > 0 and (rnd % every == 0 or rnd == self.cfg.num_rounds)
        if due:  # each client's momentum, which carries over rounds
            clients = [c for c in self.round_clients if c.node_id not in failures]
            optimizers, report, checkpoint_bytes = lifecycle.collect_optimizers(
                self._exchange(grid), clients, self.cfg
            )
            self.client_optimizers |= optimizers
            failures, reports = first_reason(failures, report.failures), [*reports, report]
        for report in reports:
            self.roster.note_failures(report.failures, report.codes)
        peaks, uses_aux = self.server.peaks(), self.method.uses_aux_head
        record = round_record(rnd, self.cfg, uses_aux, train, ev, peaks, failures)
        record["bytes_checkpoint"] = checkpoint_bytes
        if central is not None:
            record["server_evaluation"] = dict(central)
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

    # ------------------------------------------------------------------------------ helpers
    def _train_phase(self, rnd: int, arrays: ArrayRecord) -> TrainPhase:
        expected = expectations(self.clients, self.cfg, self.server.device, arrays)
        args = (self.method, self.server, rnd, arrays, self.round_clients, expected)
        return TrainPhase(self.cfg, *args)

    def _evaluate_phase(self, rnd: int, arrays: ArrayRecord) -> EvaluatePhase:
        expected = expectations(self.clients, self.cfg, self.server.device)
        return EvaluatePhase(self.server, rnd, arrays, self.round_clients, expected)

    def _checkpoint(self, rnd: int) -> Checkpoint:
        return Checkpoint(
            round=rnd,
            server_segment=self.server.state_dict(),
            server_optimizer=optimizer_to_cpu(self.server.optimizer.state_dict()),
            client_weights={k: v.numpy() for k, v in self.global_arrays.items()},
            client_optimizers=dict(self.client_optimizers),
            history=list(self.history),
        )

    def _exchange(self, grid: Grid, window: int | None = None, phase_timeout=0.0) -> Exchange:
        c, window = self.cfg, window or self.cfg.max_active_clients
        args = (c.max_queued_chunks, c.poll_seconds, self.should_stop)
        return Exchange(grid, self.timeout, window, *args, phase_timeout=phase_timeout)


def _refuse(name: str, config: ConfigRecord | None) -> None:
    if config:
        raise ValueError(
            f"SplitLearningStrategy does not take {name}: clients take every setting from the "
            f"run config at set-up (query.setup); pass {sorted(config)} as run-config keys"
        )


def _evaluate_centrally(evaluate_fn: EvaluateFn, rnd: int, arrays, result: Result):
    metrics = evaluate_fn(rnd, arrays) if evaluate_fn is not None else None
    if metrics is not None:
        result.evaluate_metrics_serverapp[rnd] = metrics
    return metrics
