"""The client side of split learning: private data, the bottom segment and (DSL) its aux head.

A ``SplitClient`` turns one request into one reply: it is what a ClientApp message handler
and the in-process reference trainer both call. Its whole state round-trips through a
``RecordDict`` (``save``/``from_state``), because Flower's ``context.state`` is the source of
truth: simulation may route a node's messages to any actor, deployment starts a fresh process
for every message.
"""

from __future__ import annotations

import math
import time
from functools import lru_cache

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from flower_app.config import RunConfig
from flower_app.data import augment, load_cifar, normalize, partition_indices, to_float
from flower_app.metering import (
    Clock,
    SavedTensorsMeter,
    cuda_peak_bytes,
    peak_rss_bytes,
    reset_cuda_peak,
    reset_peak_rss,
)
from flower_app.payload import (
    PayloadError,
    decode_gradient,
    encode_activations,
    encode_modules,
    load_modules,
)
from models import build_aux_head, cut_shape, split_resnet
from strategies.methods import METHODS, ClientParts
from strategies.steps import Phases, score

AUX_SEED_OFFSET = 1  # the aux head gets its own seed so the ResNet init matches the unsplit one


@lru_cache(maxsize=8)
def epoch_order(n: int, seed: int, partition_id: int, epoch: int) -> np.ndarray:
    """The order a client visits its samples in one epoch, reproducible from the cursor alone."""
    return np.random.default_rng([seed, partition_id, epoch]).permutation(n)


def batch_generator(seed: int, partition_id: int, epoch: int, batch: int) -> torch.Generator:
    """Augmentation randomness of one batch, so the batch can be rebuilt bit for bit later."""
    key = np.random.SeedSequence([seed, partition_id, epoch, batch]).generate_state(1)[0]
    return torch.Generator().manual_seed(int(key))


def split_test_set(
    num_test: int, cfg: RunConfig, num_partitions: int, partition_id: int
) -> np.ndarray:
    order = np.random.default_rng(cfg.seed).permutation(num_test)
    if cfg.test_samples:
        order = order[: cfg.test_samples]
    return np.array_split(order, num_partitions)[partition_id]


def client_modules(cfg: RunConfig) -> dict[str, torch.nn.Module | None]:
    """The client's trainable parts as every party builds them from the seed."""
    segment, _ = split_resnet(cfg.depth, cfg.cut, cfg.num_classes, cfg.seed)
    aux = None
    if METHODS[cfg.method].uses_aux_head:
        shape = cut_shape(cfg.depth, cfg.cut)
        aux = build_aux_head(cfg.aux_head, shape, cfg.num_classes, cfg.seed + AUX_SEED_OFFSET)
    return {"segment": segment, "aux": aux}


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
        self.method = METHODS[cfg.method]()
        self.device = cfg.resolve_device()
        self.shape = cut_shape(cfg.depth, cfg.cut)
        self.modules = {
            k: m.to(self.device) if m is not None else None for k, m in client_modules(cfg).items()
        }
        params = [p for m in self.modules.values() if m is not None for p in m.parameters()]
        optimizer = torch.optim.SGD(
            params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
        )
        self.parts = ClientParts(
            self.modules["segment"], self.modules["aux"], optimizer, Clock(self.device)
        )
        self.meter = SavedTensorsMeter()
        self.version = 0
        self.epoch = self.cursor = self.eval_cursor = 0
        self.pending = -1  # CSL: batch whose activations await their gradient
        self._graph: torch.Tensor | None = None
        self._checkpoint: tuple[ArrayRecord, ArrayRecord] | None = None

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

    def save(self, state: RecordDict) -> None:
        """Write everything needed to continue into ``state``; bumps the version a cache checks."""
        self.version += 1
        weights, optim = self._checkpoint if self.pending >= 0 else self._snapshot()
        state["split.weights"], state["split.optim"] = weights, optim
        state["split.meta"] = ConfigRecord(
            {
                "version": self.version,
                "epoch": self.epoch,
                "cursor": self.cursor,
                "pending": self.pending,
                "eval-cursor": self.eval_cursor,
            }
        )
        if "split.config" not in state:
            state["split.config"] = ConfigRecord(
                self.cfg.to_run_config()
                | {
                    "partition-id": self.partition_id,
                    "num-partitions": self.num_partitions,
                    "node-data-dir": self.data_dir,
                }
            )
            state["split.partition"] = ArrayRecord(
                {
                    "train": Array(self.train_idx.astype(np.int64)),
                    "test": Array(self.test_idx.astype(np.int64)),
                }
            )

    @classmethod
    def from_state(cls, state: RecordDict) -> SplitClient:
        if "split.config" not in state:
            raise RuntimeError(
                "this node has no split-learning state: the set-up message never reached it"
            )
        conf = dict(state["split.config"])
        ids = (conf.pop("partition-id"), conf.pop("num-partitions"), conf.pop("node-data-dir"))
        cfg = RunConfig.from_run_config(conf)
        part = state["split.partition"]
        client = cls(cfg, ids[0], ids[1], part["train"].numpy(), part["test"].numpy(), ids[2])
        load_modules(state["split.weights"], client.modules)
        optimizer, params = client.parts.optimizer, client._params()
        for key, array in state["split.optim"].items():
            optimizer.state[params[int(key)]]["momentum_buffer"] = torch.from_numpy(
                array.numpy()
            ).to(client.device)
        meta = state["split.meta"]
        client.version, client.epoch, client.cursor = meta["version"], meta["epoch"], meta["cursor"]
        client.pending, client.eval_cursor = meta["pending"], meta["eval-cursor"]
        if client.pending >= 0:
            client._checkpoint = (state["split.weights"], state["split.optim"])
        return client

    def _params(self) -> list[torch.nn.Parameter]:
        return [p for g in self.parts.optimizer.param_groups for p in g["params"]]

    def _snapshot(self) -> tuple[ArrayRecord, ArrayRecord]:
        state = self.parts.optimizer.state
        momentum = {
            str(i): Array(state[p]["momentum_buffer"].detach().cpu().numpy())
            for i, p in enumerate(self._params())
            if state.get(p, {}).get("momentum_buffer") is not None
        }
        return encode_modules(self.modules), ArrayRecord(momentum)

    # ----------------------------------------------------------------------------------- data
    @property
    def num_batches(self) -> int:
        return math.ceil(len(self.train_idx) / self.cfg.batch_size)

    def train_batch(self, epoch: int, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.cfg
        order = epoch_order(len(self.train_idx), cfg.seed, self.partition_id, epoch)
        idx = self.train_idx[order[batch * cfg.batch_size : (batch + 1) * cfg.batch_size]]
        gen = batch_generator(cfg.seed, self.partition_id, epoch, batch)
        x = normalize(augment(to_float(self.data.x_train[idx]), gen), cfg.dataset)
        y = torch.from_numpy(np.asarray(self.data.y_train[idx], dtype=np.int64))
        return x.to(self.device), y.to(self.device)

    def test_batch(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx = self.test_idx[start:stop]
        x = normalize(to_float(self.data.x_test[idx]), self.cfg.dataset)
        y = torch.from_numpy(np.asarray(self.data.y_test[idx], dtype=np.int64))
        return x.to(self.device), y.to(self.device)

    def _samples_per_message(self) -> int:
        itemsize = np.dtype(self.cfg.payload_dtype).itemsize
        return max(1, int(self.cfg.chunk_mib * 2**20) // (math.prod(self.shape) * itemsize))

    def batches_per_message(self) -> int:
        """CSL: one (the gradient must return first). DSL: as many as fit in chunk-mib."""
        if self.method.returns_gradient:
            return 1
        return max(1, self._samples_per_message() // self.cfg.batch_size)

    # ------------------------------------------------------------------------------- handlers
    def train(self, request: RecordDict) -> RecordDict:
        """One training message: maybe a returned gradient, then the next batch or chunk."""
        conf, phases, t0 = request["config"], Phases(), time.perf_counter()
        self._start_measuring()
        if "arrays" in request:  # first message of a round: adopt the global model
            load_modules(request["arrays"], self.modules)
            self.epoch, self.cursor = int(conf["round"]) - 1, 0
            self.pending, self._graph, self._checkpoint = -1, None, None
        for group in self.parts.optimizer.param_groups:
            group["lr"] = float(conf["lr"])
        if "grad" in request:
            self._apply_gradient(request["grad"], phases)
        elif self.pending >= 0:
            raise PayloadError(f"batch {self.pending} still waits for its gradient")

        budget = self.batches_per_message()
        acts, labels, aux_loss, aux_correct, data_s = [], [], 0.0, 0, 0.0
        while self.cursor < self.num_batches and len(acts) < budget:
            td = time.perf_counter()
            x, y = self.train_batch(self.epoch, self.cursor)
            data_s += time.perf_counter() - td
            if self.method.returns_gradient:  # state must describe the model before this forward
                self._checkpoint, self.pending = self._snapshot(), self.cursor
            with self.meter.track():
                out, result = self.method.client_batch(self.parts, x, y, phases)
            if self.method.returns_gradient:
                self._graph = out
            if result is not None:
                aux_loss += result.loss * len(y)
                aux_correct += result.correct
            acts.append(out.detach())
            labels.append(y)
            self.cursor += 1

        done = self.cursor >= self.num_batches and self.pending < 0
        metrics = {
            "num-examples": sum(len(y) for y in labels),
            "aux-loss-sum": aux_loss,
            "aux-correct": aux_correct,
            "data-seconds": data_s,
            "seconds": time.perf_counter() - t0,
            "done": int(done),
        }
        reply = RecordDict({"metrics": MetricRecord(metrics | self._measurements(phases))})
        if acts:
            reply["acts"] = encode_activations(
                torch.cat(acts), torch.cat(labels), self.cfg.payload_dtype
            )
        if done:
            reply["arrays"] = encode_modules(self.modules)
            reply["metrics"]["epoch-examples"] = len(self.train_idx)
        return reply

    def _apply_gradient(self, record: ArrayRecord, phases: Phases) -> None:
        if self.pending < 0:
            raise PayloadError("received a gradient but no batch is waiting for one")
        if self._graph is None:  # another process ran the forward: rebuild the same graph
            x, y = self.train_batch(self.epoch, self.pending)
            with self.meter.track():
                self._graph, _ = self.method.client_batch(self.parts, x, y, phases)
        grad = decode_gradient(record, self._graph)
        with self.meter.track():
            self.method.client_gradient(self.parts, self._graph, grad, phases)
        self.pending, self._graph, self._checkpoint = -1, None, None

    @torch.no_grad()
    def evaluate(self, request: RecordDict) -> RecordDict:
        """Test-set activations for the server, plus the aux head's own test accuracy."""
        phases, t0 = Phases(), time.perf_counter()
        if "arrays" in request:
            load_modules(request["arrays"], self.modules)
            self.eval_cursor = 0
        stop = min(len(self.test_idx), self.eval_cursor + self._samples_per_message())
        acts, labels, aux_loss, aux_correct = [], [], 0.0, 0
        for m in self.modules.values():
            if m is not None:
                m.eval()
        try:
            for start in range(self.eval_cursor, stop, self.cfg.batch_size):
                x, y = self.test_batch(start, min(stop, start + self.cfg.batch_size))
                t1 = self.parts.clock.now()
                out = self.parts.segment(x)
                if self.parts.aux_head is not None:
                    result = score(self.parts.aux_head(out), y)
                    aux_loss, aux_correct = aux_loss + result.loss, aux_correct + result.correct
                phases.forward += self.parts.clock.now() - t1
                acts.append(out)
                labels.append(y)
        finally:
            for m in self.modules.values():
                if m is not None:
                    m.train()
        self.eval_cursor = stop
        metrics = {
            "num-examples": sum(len(y) for y in labels),
            "aux-loss-sum": aux_loss,
            "aux-correct": aux_correct,
            "seconds": time.perf_counter() - t0,
            "forward-seconds": phases.forward,
            "done": int(stop >= len(self.test_idx)),
        }
        reply = RecordDict({"metrics": MetricRecord(metrics)})
        if acts:
            reply["acts"] = encode_activations(
                torch.cat(acts), torch.cat(labels), self.cfg.payload_dtype
            )
        return reply

    # ---------------------------------------------------------------------------- measurement
    def _start_measuring(self) -> None:
        self.meter.reset_peak()
        reset_peak_rss()
        reset_cuda_peak(self.device)

    def _measurements(self, phases: Phases) -> dict[str, float | int]:
        return {
            "forward-seconds": phases.forward,
            "backward-seconds": phases.backward,
            "peak-saved-bytes": self.meter.peak,
            "held-saved-bytes": self.meter.current,  # still held while the reply travels
            "peak-rss-bytes": peak_rss_bytes(),
            "peak-cuda-bytes": cuda_peak_bytes(self.device),
        }
