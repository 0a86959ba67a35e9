"""The client's half of split learning: private data, the bottom segment and (DSL) its aux head.

A ``SplitClient`` turns one typed request (``split_core.protocol``) into one typed reply, as
``strategies.server_segment.ServerSegment`` does for the server: the ClientApp's handlers and
the in-process reference trainer both call it. Its whole state round-trips through Flower's
``context.state`` (``save``/``from_state``, codec in ``split_core.client_state``).

(Longer than our other modules: one class, whose training, CSL graph recompute and evaluation
share the data stream and the cursor; splitting them would spread one state over files.)
"""

from __future__ import annotations

import math
import time
from functools import lru_cache

import numpy as np
import torch
from flwr.app import ArrayRecord, RecordDict

from models import cut_shape
from split_core import client_state
from split_core.client_state import Cursor, Setup
from split_core.compute import Compute, seeded_generator
from split_core.config import RunConfig
from split_core.data import ClientImages, load_cifar, partition_indices
from split_core.metering import (
    SavedTensorsMeter,
    cuda_peak_bytes,
    peak_rss_bytes,
    reset_cuda_peak,
    reset_peak_rss,
)
from split_core.methods import ClientParts, Pending, client_modules, make_method
from split_core.payload import (
    WIRE_ITEMSIZE,
    PayloadError,
    decode_gradient,
    encode_activations,
    encode_modules,
    load_modules,
)
from split_core.privacy import distance_correlation
from split_core.protocol import (
    EvalMetrics,
    EvaluateReply,
    EvaluateRequest,
    TrainMetrics,
    TrainReply,
    TrainRequest,
    samples_per_message,
)
from split_core.steps import Phases, score


@lru_cache(maxsize=8)
def epoch_order(n: int, seed: int, partition_id: int, epoch: int) -> np.ndarray:
    """The order a client visits its samples in one epoch, reproducible from the cursor alone."""
    return np.random.default_rng([seed, partition_id, epoch]).permutation(n)


def batch_generator(seed: int, partition_id: int, epoch: int, batch: int) -> torch.Generator:
    """Augmentation randomness of one batch, so the batch can be rebuilt bit for bit later."""
    return seeded_generator(seed, partition_id, epoch, batch)


def split_test_set(
    num_test: int, cfg: RunConfig, num_partitions: int, partition_id: int
) -> np.ndarray:
    order = np.random.default_rng(cfg.seed).permutation(num_test)
    if cfg.test_samples:
        order = order[: cfg.test_samples]
    return np.array_split(order, num_partitions)[partition_id]


class SplitClient:
    def __init__(
        self,
        cfg: RunConfig,
        partition_id: int,
        num_partitions: int,
        train_idx: np.ndarray,
        test_idx: np.ndarray,
        data_dir: str,
    ) -> None:
        self.cfg, self.partition_id, self.num_partitions = cfg, partition_id, num_partitions
        self.train_idx, self.test_idx, self.data_dir = train_idx, test_idx, data_dir
        self.data = load_cifar(cfg.dataset, data_dir)
        self.method = make_method(cfg)
        self.compute = Compute.create(cfg.resolve_device(), cfg.compute_dtype, cfg.channels_last)
        self.train_images = ClientImages(
            self.data.x_train, self.data.y_train, train_idx, cfg.dataset, self.compute
        )
        self.test_images = ClientImages(
            self.data.x_test, self.data.y_test, test_idx, cfg.dataset, self.compute
        )
        self.shape = cut_shape(cfg.depth, cfg.cut)
        self.modules = {
            k: self.compute.module(m) if m is not None else None
            for k, m in client_modules(cfg).items()
        }
        params = [p for m in self.modules.values() if m is not None for p in m.parameters()]
        optimizer = torch.optim.SGD(
            params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
        )
        self.parts = ClientParts(
            self.modules["segment"], self.modules["aux"], optimizer, self.compute
        )
        self.meter = SavedTensorsMeter()
        self.version = 0
        self.epoch = self.cursor = self.eval_cursor = 0
        self.pending = -1  # batch whose activations await the server's gradient (CSL, feedback)
        self._graph: Pending | None = None

    # ----------------------------------------------------------------------------- set-up / state
    @classmethod
    def create(
        cls, cfg: RunConfig, partition_id: int, num_partitions: int, data_dir: str
    ) -> SplitClient:
        """First contact: find the data, cut this node's partition with flwr-datasets."""
        data = load_cifar(cfg.dataset, data_dir)
        train_idx = partition_indices(
            data.y_train,
            num_partitions,
            partition_id,
            scheme=cfg.partition,
            alpha=cfg.dirichlet_alpha,
            seed=cfg.seed,
        )
        if cfg.samples_per_client:
            train_idx = train_idx[: cfg.samples_per_client]
        test_idx = split_test_set(len(data.y_test), cfg, num_partitions, partition_id)
        return cls(cfg, partition_id, num_partitions, train_idx, test_idx, data_dir)

    @property
    def setup(self) -> Setup:
        return Setup(
            self.cfg,
            self.partition_id,
            self.num_partitions,
            self.data_dir,
            self.train_idx,
            self.test_idx,
        )

    def save(self, state: RecordDict) -> None:
        """Write everything needed to continue into ``state``; bumps the version a cache checks.

        While a CSL batch awaits its gradient the weights saved are those after its forward: the
        forward changed only BatchNorm's running statistics, which a rebuilt client keeps as
        they are when it recomputes the graph (see ``_recompute``).
        """
        self.version += 1
        cursor = Cursor(self.version, self.epoch, self.cursor, self.pending, self.eval_cursor)
        client_state.write(state, self.setup, encode_modules(self.modules), self.momentum(), cursor)

    @classmethod
    def from_state(cls, state: RecordDict) -> SplitClient:
        s = client_state.read_setup(state)
        client = cls(s.cfg, s.partition_id, s.num_partitions, s.train_idx, s.test_idx, s.data_dir)
        weights, momentum, cursor = client_state.read_progress(state)
        load_modules(weights, client.modules)
        client.load_momentum(momentum)
        client.version, client.epoch, client.cursor = cursor.version, cursor.epoch, cursor.cursor
        client.pending, client.eval_cursor = cursor.pending, cursor.eval_cursor
        return client

    def release(self) -> None:
        """Drop what only this process holds (CSL's graph); ``context.state`` keeps the rest."""
        self._graph = None

    def _params(self) -> list[torch.nn.Parameter]:
        return [p for g in self.parts.optimizer.param_groups for p in g["params"]]

    def load_momentum(self, record: ArrayRecord) -> None:
        client_state.load_momentum(self.parts.optimizer, record, self.compute.device)

    def momentum(self) -> ArrayRecord:
        return client_state.momentum_record(self.parts.optimizer)

    # ----------------------------------------------------------------------------------- data
    @property
    def num_batches(self) -> int:
        return math.ceil(len(self.train_idx) / self.cfg.batch_size)

    def train_batch(self, epoch: int, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.cfg
        order = epoch_order(len(self.train_idx), cfg.seed, self.partition_id, epoch)
        positions = order[batch * cfg.batch_size : (batch + 1) * cfg.batch_size]
        gen = batch_generator(cfg.seed, self.partition_id, epoch, batch)
        return self.train_images.batch(positions, gen)

    def test_batch(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.test_images.batch(np.arange(start, stop))

    def _samples_per_message(self) -> int:
        """The protocol's bound, which the server holds replies to."""
        itemsize = WIRE_ITEMSIZE[self.cfg.payload_dtype]
        return samples_per_message(self.cfg.chunk_mib, self.shape, itemsize)

    def batches_per_message(self) -> int:
        """As many batches as fit in chunk-mib; a chunk also ends at a batch that needs the
        server's gradient (every batch in CSL), since the client must wait for it."""
        return self.cfg.batches_per_chunk()

    def chunk_budget(self, cursor: int) -> int:
        """Batches the message that starts at ``cursor`` may carry.

        With ``chunk-taper`` the last chunks of an epoch halve (at most half of what remains),
        down to one batch: client and server then work side by side until the end, and the
        server's last chunk, which nothing overlaps, is a single batch.
        """
        budget = self.batches_per_message()
        if self.cfg.chunk_taper:
            budget = min(budget, max(1, math.ceil((self.num_batches - cursor) / 2)))
        return budget

    # ------------------------------------------------------------------------------- training
    def train(self, request: TrainRequest) -> TrainReply:
        """One training message: maybe a returned gradient, then the next batch or chunk."""
        phases, t0 = Phases(), time.perf_counter()
        if request.weights is not None:  # first message of a round: adopt the global model
            load_modules(request.weights, self.modules)
            self.epoch, self.cursor = request.round - 1, 0
            self.pending, self._graph = -1, None
        for group in self.parts.optimizer.param_groups:
            group["lr"] = request.lr
        recompute_s = -1.0
        if request.gradient is not None:
            recompute_s = self.apply_gradient(request.gradient, phases)
        elif self.pending >= 0:
            raise PayloadError(f"batch {self.pending} still waits for its gradient")

        budget = self.chunk_budget(self.cursor)
        acts, labels, aux_loss, aux_correct, data_s = [], [], 0.0, 0, 0.0
        while self.cursor < self.num_batches and len(acts) < budget:
            td = time.perf_counter()
            x, y = self.train_batch(self.epoch, self.cursor)
            data_s += time.perf_counter() - td
            with self.meter.track():
                out, result, pending = self.method.client_batch(
                    self.parts, x, y, phases, self.cursor
                )
            if result is not None:
                aux_loss += result.loss * len(y)
                aux_correct += result.correct
            acts.append(out)
            labels.append(y)
            self.cursor += 1
            if pending is not None:  # the chunk ends here: this batch waits for its gradient
                self._graph, self.pending = pending, self.cursor - 1
                break

        done = self.cursor >= self.num_batches and self.pending < 0
        metrics = TrainMetrics(
            num_examples=sum(len(y) for y in labels),
            aux_loss_sum=aux_loss,
            aux_correct=aux_correct,
            data_seconds=data_s,
            seconds=time.perf_counter() - t0,
            recomputes=int(recompute_s >= 0),
            recompute_seconds=max(recompute_s, 0.0),
            awaits_gradient=self.pending >= 0,
            done=done,
            epoch_examples=len(self.train_idx) if done else None,
            forward_seconds=phases.forward,
            backward_seconds=phases.backward,
            peak_saved_bytes=self.meter.peak,
            held_saved_bytes=self.meter.current,  # still held while the reply travels
            peak_rss_bytes=peak_rss_bytes(),
            peak_cuda_bytes=cuda_peak_bytes(self.compute.device),
        )
        reply = TrainReply(metrics)
        if acts:
            wire = self.cfg.payload_dtype
            reply.activations = encode_activations(torch.cat(acts), torch.cat(labels), wire)
        if done:
            reply.weights = encode_modules(self.modules)
        return reply

    def apply_gradient(self, gradient: ArrayRecord, phases: Phases) -> float:
        """Back-propagate the server's gradient; returns the seconds spent recomputing (or -1)."""
        if self.pending < 0:
            raise PayloadError("received a gradient but no batch is waiting for one")
        recompute_s = -1.0
        if self._graph is None:  # another process ran the forward: rebuild the same graph
            t0 = time.perf_counter()
            self._graph = self._recompute(self.pending, phases)
            recompute_s = time.perf_counter() - t0
        grad = decode_gradient(gradient, self._graph.acts, self.cfg.payload_dtype)
        with self.meter.track():
            self.method.client_gradient(self.parts, self._graph, grad, phases)
        self.pending, self._graph = -1, None
        return recompute_s

    def _recompute(self, batch: int, phases: Phases) -> Pending:
        """The forward graph of ``batch`` again, bit for bit, without a second BatchNorm update.

        In training mode BatchNorm normalises with the batch's own statistics, so the output
        does not depend on the running statistics; the saved state already holds the running
        statistics after this batch's first forward, and they are put back afterwards.
        """
        x, y = self.train_batch(self.epoch, batch)
        buffers = [b for m in self.modules.values() if m is not None for b in m.buffers()]
        saved = [b.detach().clone() for b in buffers]
        with self.meter.track():
            _, _, pending = self.method.client_batch(self.parts, x, y, phases, batch)
        with torch.no_grad():
            for before, live in zip(saved, buffers, strict=True):
                live.copy_(before)
        if pending is None:
            raise PayloadError(f"batch {batch} does not take a gradient in {self.method.name}")
        return pending

    # ----------------------------------------------------------------------------- evaluation
    @torch.no_grad()
    def evaluate(self, request: EvaluateRequest) -> EvaluateReply:
        """Test-set activations for the server, plus the aux head's own test accuracy."""
        phases, t0 = Phases(), time.perf_counter()
        metrics = EvalMetrics()
        if request.weights is not None:
            load_modules(request.weights, self.modules)
            self.eval_cursor = 0
            metrics.probe_dcor, metrics.probe_count = self._privacy_probe()
        stop = min(len(self.test_idx), self.eval_cursor + self._samples_per_message())
        acts, labels, aux_loss, aux_correct = [], [], 0.0, 0
        for m in self.modules.values():
            if m is not None:
                m.eval()
        try:
            for start in range(self.eval_cursor, stop, self.cfg.batch_size):
                x, y = self.test_batch(start, min(stop, start + self.cfg.batch_size))
                t1 = self.compute.now()
                with self.compute.autocast():
                    out = self.parts.segment(x)
                    logits = None if self.parts.aux_head is None else self.parts.aux_head(out)
                if logits is not None:
                    result = score(logits, y)
                    aux_loss, aux_correct = aux_loss + result.loss, aux_correct + result.correct
                phases.forward += self.compute.now() - t1
                acts.append(out)
                labels.append(y)
        finally:
            for m in self.modules.values():
                if m is not None:
                    m.train()
        self.eval_cursor = stop
        metrics.num_examples = sum(len(y) for y in labels)
        metrics.aux_loss_sum, metrics.aux_correct = aux_loss, aux_correct
        metrics.seconds, metrics.forward_seconds = time.perf_counter() - t0, phases.forward
        metrics.done = stop >= len(self.test_idx)
        reply = EvaluateReply(metrics)
        if acts:
            wire = self.cfg.payload_dtype
            reply.activations = encode_activations(torch.cat(acts), torch.cat(labels), wire)
        return reply

    def _privacy_probe(self) -> tuple[float, int]:
        """dCor(images, activations) of the round's model on this client's first test images:
        the value and how many probes it counts (0 when there are too few test images)."""
        n = min(self.cfg.probe_samples, len(self.test_idx))
        if n < 2:
            return 0.0, 0
        segment = self.modules["segment"]
        segment.eval()
        try:
            x, _ = self.test_batch(0, n)
            with self.compute.autocast():
                acts = segment(x)
        finally:
            segment.train()
        return distance_correlation(x, acts), 1

    # ---------------------------------------------------------------------------- measurement
    def start_measuring(self) -> None:
        """Peaks from here on: the ClientApp calls it per message, the reference per round."""
        self.meter.reset_peak()
        reset_peak_rss()
        reset_cuda_peak(self.compute.device)
