"""The messages between the server's strategy and the ClientApp: types, keys and contents.

This is the one place where a message type, a record key or a metric name is spelt. Each
request and reply is a dataclass with ``content()`` (the RecordDict that travels) and
``decode(content)`` (the dataclass back). ``decode`` checks structure only: the records a
message must carry are there and of the right record type, every metric is a finite number
>= 0 of its declared kind, and no undeclared metric rides along; a violation is a
``PayloadError`` naming it. Arrays stay encoded (``split_core.payload`` is their codec): what
they must hold depends on the run and on the client, so the server checks them against what it
expects in ``strategies.replies``.

Every metric declares how the server folds it over a phase's replies (``Fold``), so a new
metric is never summed unless someone says so.

  query.setup       run config ->                    partition size, resources, data source
  train.forward     (global client weights, first of a round) -> acts + labels of the next
                    batch (CSL) or chunk of batches (DSL); the client's weights with its last
  train.backward    dL/d(acts) of the batch the client waits on (CSL, and DSL with feedback
                    every k-th batch) -> as train.forward: the gradient is applied first
  evaluate          (global client weights, first of a round) -> test activations, aux scores
  query.checkpoint  -> the client's optimizer state (momentum)
  query.restore     optimizer state from a checkpoint -> how many buffers were restored

(Longer than our other modules on purpose: the whole protocol is read in one place.)
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, ClassVar, TypeVar

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from split_core.payload import PayloadError

# Message types: Flower's "<train|evaluate|query>[.<action>]".
SETUP = "query.setup"
TRAIN_FORWARD = "train.forward"
TRAIN_BACKWARD = "train.backward"
EVALUATE = "evaluate"
CHECKPOINT = "query.checkpoint"
RESTORE = "query.restore"
MESSAGE_TYPES = (SETUP, TRAIN_FORWARD, TRAIN_BACKWARD, EVALUATE, CHECKPOINT, RESTORE)

# Records of a message's RecordDict.
CONFIG = "config"
METRICS = "metrics"
INFO = "info"
WEIGHTS = "arrays"  # client weights: the global ones in a request, the client's own in a reply
ACTIVATIONS = "acts"  # activations + labels, as split_core.payload encodes them
GRADIENT = "grad"  # dL/d(acts), as split_core.payload encodes it
OPTIMIZER = "optim"  # momentum buffers by parameter index
# Arrays inside ACTIVATIONS and GRADIENT are split_core.payload's (the wire codec); the labels'
# key is named here because the server counts their bytes apart.
LABELS = "labels"
ACTS_ARRAY = "acts"  # the activations' own array in that record (int8 adds ".scale", ".zero")

# Keys inside the info record of training and evaluation replies.
RAY_NODE = "ray-node"  # the Ray node whose actor served the message (simulation only)

# Keys inside the config records of requests.
ROUND = "round"
LR = "lr"

# Node config a SuperNode is started with (--node-config "partition-id=0 num-partitions=2").
PARTITION_ID = "partition-id"
NUM_PARTITIONS = "num-partitions"
DATA_DIR = "data-dir"


def split_type(message_type: str) -> tuple[str, str | None]:
    """``"train.forward"`` -> ``("train", "forward")``; ``"evaluate"`` -> ``("evaluate", None)``."""
    category, _, action = message_type.partition(".")
    return category, action or None


# ------------------------------------------------------------------------------- metrics
class Fold(Enum):
    """How the server combines one metric over the replies of a phase."""

    SUM = "sum"  # counts and seconds
    FSUM = "fsum"  # float sums that reach the results: math.fsum, whatever the arrival order
    MAX = "max"  # peaks
    NONE = "none"  # control fields (done, awaits-gradient): read, never combined


def _metric(key: str, kind: type, fold: Fold, default: Any = 0, required: bool = False) -> Any:
    meta = {"key": key, "kind": kind, "fold": fold, "required": required}
    return field(default=default, metadata=meta)


def fold_of(f: dataclasses.Field) -> Fold:
    return f.metadata["fold"]


@dataclass
class ProcessMetrics:
    """What serving one message cost the ClientApp process (set by the ClientApp)."""

    handler_seconds: float = _metric("handler-seconds", float, Fold.SUM)  # restore, step, save
    rebuilt: int = _metric("rebuilt", int, Fold.SUM)  # the client came back from context.state
    live_clients: int = _metric("live-clients", int, Fold.MAX)  # warm clients in the process
    state_bytes: int = _metric("state-bytes", int, Fold.MAX)  # array bytes of context.state


@dataclass
class StepMetrics(ProcessMetrics):
    """Common to training and evaluation replies."""

    num_examples: int = _metric("num-examples", int, Fold.SUM, required=True)
    done: bool = _metric("done", bool, Fold.NONE, default=False, required=True)
    aux_loss_sum: float = _metric("aux-loss-sum", float, Fold.FSUM)  # DSL's aux head
    aux_correct: int = _metric("aux-correct", int, Fold.SUM)
    seconds: float = _metric("seconds", float, Fold.SUM)  # the client's whole step
    forward_seconds: float = _metric("forward-seconds", float, Fold.SUM)


@dataclass
class TrainMetrics(StepMetrics):
    awaits_gradient: bool = _metric("awaits-gradient", bool, Fold.NONE, default=False)
    epoch_examples: int | None = _metric("epoch-examples", int, Fold.NONE, default=None)
    backward_seconds: float = _metric("backward-seconds", float, Fold.SUM)
    data_seconds: float = _metric("data-seconds", float, Fold.SUM)
    recomputes: int = _metric("recomputes", int, Fold.SUM)  # CSL graphs rebuilt (see client)
    recompute_seconds: float = _metric("recompute-seconds", float, Fold.SUM)
    peak_saved_bytes: int = _metric("peak-saved-bytes", int, Fold.MAX)
    held_saved_bytes: int = _metric("held-saved-bytes", int, Fold.MAX)  # while the reply travels
    peak_rss_bytes: int = _metric("peak-rss-bytes", int, Fold.MAX)
    peak_cuda_bytes: int = _metric("peak-cuda-bytes", int, Fold.MAX)


@dataclass
class EvalMetrics(StepMetrics):
    probe_dcor: float = _metric("probe-dcor", float, Fold.FSUM)  # with the first reply of a round
    probe_count: int = _metric("probe-count", int, Fold.SUM)


M = TypeVar("M", bound=ProcessMetrics)


def encode_metrics(metrics: ProcessMetrics) -> MetricRecord:
    values = {}
    for f in dataclasses.fields(metrics):
        value = getattr(metrics, f.name)
        if value is not None:
            values[f.metadata["key"]] = int(value) if f.metadata["kind"] is bool else value
    return MetricRecord(values)


def decode_metrics(kind: type[M], record: MetricRecord) -> M:
    """Typed metrics from an untrusted record; PayloadError names the first bad field."""
    values = dict(record)
    declared = {f.metadata["key"]: f for f in dataclasses.fields(kind)}
    unknown = sorted(set(values) - set(declared))
    if unknown:
        raise PayloadError(f"reply metrics carry undeclared {unknown}")
    kwargs = {}
    for key, f in declared.items():
        if key not in values:
            if f.metadata["required"]:
                raise PayloadError(f"reply metrics lack {key!r}")
            continue
        kwargs[f.name] = _number(key, values[key], f.metadata["kind"])
    return kind(**kwargs)


def _number(key: str, value: Any, kind: type) -> int | float | bool:
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise PayloadError(f"metric {key!r} is not a number: {value!r}")
    if not math.isfinite(value) or value < 0:
        raise PayloadError(f"metric {key!r} must be finite and >= 0, got {value}")
    if kind is bool:
        if value not in (0, 1):
            raise PayloadError(f"metric {key!r} must be 0 or 1, got {value}")
        return bool(value)
    if kind is int:
        if value != int(value):
            raise PayloadError(f"metric {key!r} must be a whole number, got {value}")
        return int(value)
    return float(value)


# ------------------------------------------------------------------------------ records
def _get(content: RecordDict, key: str, kind: type, what: str, required: bool = True) -> Any:
    record = content.get(key)
    if record is None and not required:
        return None
    if not isinstance(record, kind):
        raise PayloadError(f"{what} carries no {key!r} {kind.__name__}")
    return record


def _content(**records: Any) -> RecordDict:
    """A RecordDict of the records that are not None, in the order given."""
    return RecordDict({k: v for k, v in records.items() if v is not None})


class _Request:
    message_type: ClassVar[str]

    def content(self) -> RecordDict:
        raise NotImplementedError

    def message(self, node: int) -> Message:
        return Message(content=self.content(), dst_node_id=node, message_type=self.message_type)


# ------------------------------------------------------------------------------ set-up
@dataclass(frozen=True)
class SetupRequest(_Request):
    run_config: dict[str, Any]
    message_type: ClassVar[str] = SETUP

    def content(self) -> RecordDict:
        return _content(**{CONFIG: ConfigRecord(dict(self.run_config))})

    @classmethod
    def decode(cls, content: RecordDict) -> SetupRequest:
        return cls(dict(_get(content, CONFIG, ConfigRecord, "set-up request")))


@dataclass(frozen=True)
class SetupReply:
    """What a client tells the server at set-up; the server holds its replies against it."""

    partition_id: int
    num_partitions: int
    train_examples: int
    test_examples: int
    cpus: float
    gpus: float
    torch_threads: int
    state_bytes: int
    data_source: str
    device: str

    # field -> (record, key, type): counts travel in the metrics, words in the info record
    _FIELDS: ClassVar[dict[str, tuple[str, str, type]]] = {
        "partition_id": (METRICS, PARTITION_ID, int),
        "num_partitions": (METRICS, NUM_PARTITIONS, int),
        "train_examples": (METRICS, "train-examples", int),
        "test_examples": (METRICS, "test-examples", int),
        "cpus": (METRICS, "cpus", float),
        "gpus": (METRICS, "gpus", float),
        "torch_threads": (METRICS, "torch-threads", int),
        "state_bytes": (METRICS, "state-bytes", int),
        "data_source": (INFO, "data-source", str),
        "device": (INFO, "device", str),
    }

    def content(self) -> RecordDict:
        records: dict[str, dict[str, Any]] = {METRICS: {}, INFO: {}}
        for name, (record, key, _) in self._FIELDS.items():
            records[record][key] = getattr(self, name)
        metrics, info = MetricRecord(records[METRICS]), ConfigRecord(records[INFO])
        return _content(**{METRICS: metrics, INFO: info})

    @classmethod
    def decode(cls, content: RecordDict) -> SetupReply:
        try:
            values = {n: t(content[r][k]) for n, (r, k, t) in cls._FIELDS.items()}
            reply = cls(**values)
        except (KeyError, TypeError, ValueError, OverflowError) as exc:  # int(inf): Overflow
            raise PayloadError(f"set-up reply is malformed: {type(exc).__name__}: {exc}") from exc
        if min(reply.partition_id, reply.train_examples, reply.test_examples) < 0:
            raise PayloadError(f"set-up reply has negative counts: {reply}")
        for name in ("cpus", "gpus", "torch_threads", "state_bytes"):
            value = getattr(reply, name)
            if not math.isfinite(value) or value < 0:
                raise PayloadError(f"set-up reply: {name} must be finite and >= 0, got {value}")
        return reply


# ------------------------------------------------------------------------------ training
def samples_per_message(chunk_mib: float, shape: tuple[int, ...], itemsize: int) -> int:
    """Activation rows that fit in ``chunk-mib`` on the wire (at least one): how many test
    images an evaluation reply carries at most; a training reply carries whole mini-batches
    of them (``train_rows_per_message``). The server bounds replies by these numbers."""
    return max(1, int(chunk_mib * 2**20) // (math.prod(shape) * itemsize))


def train_rows_per_message(
    chunk_mib: float, shape: tuple[int, ...], itemsize: int, batch_size: int
) -> int:
    """Rows of a training reply at most: as many mini-batches as fit in chunk-mib, at least one
    (CSL and feedback end a chunk earlier, at the batch that waits for its gradient)."""
    return batch_size * max(1, samples_per_message(chunk_mib, shape, itemsize) // batch_size)


@dataclass(frozen=True)
class TrainRequest(_Request):
    round: int
    lr: float
    weights: ArrayRecord | None = None  # the first message of a round: the global weights
    gradient: ArrayRecord | None = None  # dL/d(acts) of the batch the client waits on

    @property
    def message_type(self) -> str:  # type: ignore[override]
        return TRAIN_BACKWARD if self.gradient is not None else TRAIN_FORWARD

    def content(self) -> RecordDict:
        config = ConfigRecord({ROUND: self.round, LR: self.lr})
        return _content(**{WEIGHTS: self.weights, GRADIENT: self.gradient, CONFIG: config})

    @classmethod
    def decode(cls, content: RecordDict) -> TrainRequest:
        config = _get(content, CONFIG, ConfigRecord, "training request")
        return cls(
            int(config[ROUND]),
            float(config[LR]),
            _get(content, WEIGHTS, ArrayRecord, "training request", required=False),
            _get(content, GRADIENT, ArrayRecord, "training request", required=False),
        )


@dataclass
class TrainReply:
    metrics: TrainMetrics
    activations: ArrayRecord | None = None  # acts + labels of the batches of this message
    weights: ArrayRecord | None = None  # the client's weights, with its last reply of a round
    ray_node: str | None = None  # set by the ClientApp when a Ray actor served the message

    def content(self) -> RecordDict:
        metrics = encode_metrics(self.metrics)
        return _content(
            **{
                METRICS: metrics,
                ACTIVATIONS: self.activations,
                WEIGHTS: self.weights,
                INFO: _worker_info(self.ray_node),
            }
        )

    @classmethod
    def decode(cls, content: RecordDict) -> TrainReply:
        return cls(
            decode_metrics(TrainMetrics, _get(content, METRICS, MetricRecord, "reply")),
            _get(content, ACTIVATIONS, ArrayRecord, "reply", required=False),
            _get(content, WEIGHTS, ArrayRecord, "reply", required=False),
            _decode_ray_node(content),
        )


# ---------------------------------------------------------------------------- evaluation
@dataclass(frozen=True)
class EvaluateRequest(_Request):
    round: int
    weights: ArrayRecord | None = None  # the first message of a round: the global weights
    message_type: ClassVar[str] = EVALUATE

    def content(self) -> RecordDict:
        return _content(**{WEIGHTS: self.weights, CONFIG: ConfigRecord({ROUND: self.round})})

    @classmethod
    def decode(cls, content: RecordDict) -> EvaluateRequest:
        config = _get(content, CONFIG, ConfigRecord, "evaluation request")
        weights = _get(content, WEIGHTS, ArrayRecord, "evaluation request", required=False)
        return cls(int(config[ROUND]), weights)


@dataclass
class EvaluateReply:
    metrics: EvalMetrics
    activations: ArrayRecord | None = None
    ray_node: str | None = None  # as in TrainReply

    def content(self) -> RecordDict:
        metrics = encode_metrics(self.metrics)
        info = _worker_info(self.ray_node)
        return _content(**{METRICS: metrics, ACTIVATIONS: self.activations, INFO: info})

    @classmethod
    def decode(cls, content: RecordDict) -> EvaluateReply:
        return cls(
            decode_metrics(EvalMetrics, _get(content, METRICS, MetricRecord, "reply")),
            _get(content, ACTIVATIONS, ArrayRecord, "reply", required=False),
            _decode_ray_node(content),
        )


def _worker_info(ray_node: str | None) -> ConfigRecord | None:
    return ConfigRecord({RAY_NODE: ray_node}) if ray_node is not None else None


def _decode_ray_node(content: RecordDict) -> str | None:
    """The Ray node id a reply names, if any: a short hex string and nothing else in its info
    record (it lands in rounds.jsonl, so an unbounded or odd value is refused)."""
    info = _get(content, INFO, ConfigRecord, "reply", required=False)
    if info is None:
        return None
    extra = sorted(set(info) - {RAY_NODE})
    if extra:
        raise PayloadError(f"reply info carries undeclared {extra}")
    value = info.get(RAY_NODE)
    if not isinstance(value, str) or not 0 < len(value) <= 64 or not _is_hex(value):
        raise PayloadError(f"{RAY_NODE!r} must be a Ray node id (hex), got {str(value)[:80]!r}")
    return value


def _is_hex(text: str) -> bool:
    return all(c in "0123456789abcdef" for c in text)


# ------------------------------------------------------------------ checkpoint, restore
@dataclass(frozen=True)
class CheckpointRequest(_Request):
    message_type: ClassVar[str] = CHECKPOINT

    def content(self) -> RecordDict:
        return RecordDict()


@dataclass(frozen=True)
class CheckpointReply:
    optimizer: ArrayRecord

    def content(self) -> RecordDict:
        return _content(**{OPTIMIZER: self.optimizer})

    @classmethod
    def decode(cls, content: RecordDict) -> CheckpointReply:
        return cls(_get(content, OPTIMIZER, ArrayRecord, "checkpoint reply"))


@dataclass(frozen=True)
class RestoreRequest(_Request):
    optimizer: ArrayRecord
    message_type: ClassVar[str] = RESTORE

    def content(self) -> RecordDict:
        return _content(**{OPTIMIZER: self.optimizer})

    @classmethod
    def decode(cls, content: RecordDict) -> RestoreRequest:
        return cls(_get(content, OPTIMIZER, ArrayRecord, "restore request"))


@dataclass(frozen=True)
class RestoreReply:
    restored: int  # momentum buffers loaded

    def content(self) -> RecordDict:
        return _content(**{METRICS: MetricRecord({"restored": self.restored})})
