"""Every field of a client's reply, validated before anything uses it.

A reply is untrusted input: its arrays may be garbage bytes, its metrics missing or absurd.
Validation has two layers, and ``parse_train``/``parse_eval`` run both:

  1. structure (``split_core.protocol``'s ``decode``): the records are there, each metric is a
     declared, finite, non-negative number of its kind;
  2. content (here): the arrays decode in the run's wire format to the cut's shape, labels are
     in range, counts agree with the payload and with what the client declared at set-up, and
     returned weights match the global model key for key.

Either a ``Reply`` comes back with every tensor, count and weight checked, or ``PayloadError``
names what is wrong. Only then does the server step, so a rejected reply never touches the
server segment or FedAvg. A new check on what clients send belongs in ``_check``, with its
limit in ``Expected``.

Sizes are checked before anything is decoded: each array's .npy header (shape, dtype) must
account for its bytes exactly, and its rows must fit what this client may send in one message
(a chunk of ``chunk-mib``, and no more than the examples it has left). int8's scales and zero
points are checked before the int8 array is expanded: no channel may decode beyond
``max-activation``. Once decoded, no activation may exceed ``max-activation`` in magnitude
and no returned weight ``max-weight``; a client's own figures must agree with each other
(``aux-correct`` <= ``num-examples``, one privacy probe at most).
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import ArrayRecord, Message

from models import cut_shape
from split_core.config import RunConfig
from split_core.payload import (
    WIRE_ITEMSIZE,
    PayloadError,
    check_weights,
    decode_activations,
    record_bytes,
    wire_keys,
)
from split_core.protocol import (
    ACTS_ARRAY,
    LABELS,
    EvalMetrics,
    EvaluateReply,
    StepMetrics,
    TrainMetrics,
    TrainReply,
    samples_per_message,
    train_rows_per_message,
)
from strategies.roster import ClientInfo


@dataclass(frozen=True)
class Expected:
    """What the server knows about a client from set-up, to hold its replies against."""

    shape: tuple[int, int, int]
    num_classes: int
    device: torch.device
    train_examples: int
    global_weights: ArrayRecord | None = None
    wire: str = "float32"
    test_examples: int | None = None  # None: not bounded
    train_rows: int | None = None  # rows of one training reply at most (None: not bounded)
    eval_rows: int | None = None  # rows of one evaluation reply at most
    max_activation: float = math.inf
    max_weight: float = math.inf


def expectations(
    clients: Iterable[ClientInfo],
    cfg: RunConfig,
    device: torch.device,
    global_weights: ArrayRecord | None = None,
) -> dict[int, Expected]:
    """What each client's replies are held against, by node id."""
    shape = cut_shape(cfg.depth, cfg.cut)
    itemsize = WIRE_ITEMSIZE[cfg.payload_dtype]
    train_rows = train_rows_per_message(cfg.chunk_mib, shape, itemsize, cfg.batch_size)
    eval_rows = samples_per_message(cfg.chunk_mib, shape, itemsize)
    return {
        c.node_id: Expected(
            shape,
            cfg.num_classes,
            device,
            c.train_examples,
            global_weights,
            cfg.payload_dtype,
            test_examples=c.test_examples,
            train_rows=train_rows,
            eval_rows=eval_rows,
            max_activation=cfg.max_activation,
            max_weight=cfg.max_weight,
        )
        for c in clients
    }


@dataclass
class Reply:
    metrics: TrainMetrics | EvalMetrics
    acts: torch.Tensor | None = None
    labels: torch.Tensor | None = None
    weights: dict[str, np.ndarray] | None = None
    bytes_activations: int = 0
    bytes_labels: int = 0
    bytes_weights: int = 0
    ray_node: str | None = None  # the Ray node that served it (simulation on a Ray cluster)

    @property
    def done(self) -> bool:
        return self.metrics.done

    @property
    def awaits_gradient(self) -> bool:
        return isinstance(self.metrics, TrainMetrics) and self.metrics.awaits_gradient

    @property
    def examples(self) -> int:
        return 0 if self.labels is None else len(self.labels)


def train_status(message: Message) -> TrainMetrics:
    """A training reply's metrics, checked: enough to decide whether to ask for more."""
    return TrainReply.decode(message.content).metrics


def eval_status(message: Message) -> EvalMetrics:
    return EvaluateReply.decode(message.content).metrics


def parse_train(message: Message, expected: Expected, received: int = 0) -> Reply:
    """A training reply, checked; ``received``: rows the server took from this client so far
    this round (what it may still send is its set-up count less those)."""
    decoded = TrainReply.decode(message.content)
    rows = _budget(expected.train_rows, expected.train_examples, received)
    reply = _check(decoded.metrics, decoded.activations, expected, rows)
    reply.ray_node = decoded.ray_node
    if reply.done:
        reply.weights = _weights(decoded.weights, expected)
        reply.bytes_weights = record_bytes(decoded.weights)
        claimed = reply.metrics.epoch_examples
        if claimed != expected.train_examples:
            raise PayloadError(
                f"epoch-examples is {claimed}, but the client declared "
                f"{expected.train_examples} training examples at set-up"
            )
    return reply


def parse_eval(message: Message, expected: Expected, received: int = 0) -> Reply:
    decoded = EvaluateReply.decode(message.content)
    rows = _budget(expected.eval_rows, expected.test_examples, received)
    reply = _check(decoded.metrics, decoded.activations, expected, rows)
    reply.ray_node = decoded.ray_node
    return reply


def _budget(per_message: int | None, examples: int | None, received: int) -> int | None:
    """Rows the next reply may carry: one message's worth, and no more than are left."""
    left = None if examples is None else examples - received
    known = [n for n in (per_message, left) if n is not None]
    return max(0, min(known)) if known else None


def _check(
    metrics: StepMetrics, acts: ArrayRecord | None, expected: Expected, max_rows: int | None
) -> Reply:
    reply = Reply(metrics)
    if acts is not None:
        _check_sizes(acts, expected, max_rows)  # before any array is decoded
        total = record_bytes(acts)
        labels = acts.get(LABELS)
        if labels is not None:
            reply.bytes_labels = record_bytes(ArrayRecord({LABELS: labels}))
        reply.bytes_activations = total - reply.bytes_labels  # with int8's scales
        reply.acts, reply.labels = decode_activations(
            acts, expected.shape, expected.num_classes, expected.device, expected.wire
        )
        peak = float(reply.acts.abs().max())
        if not peak <= expected.max_activation:
            raise PayloadError(
                f"activations reach {peak:.3g} in magnitude, beyond "
                f"max-activation={expected.max_activation:g}"
            )
    if metrics.num_examples != reply.examples:
        raise PayloadError(
            f"num-examples is {metrics.num_examples}, the payload has {reply.examples}"
        )
    _check_metrics(metrics)
    return reply


def _check_metrics(metrics: StepMetrics) -> None:
    """A client's figures that must agree with each other (decode has made them finite and
    non-negative: times, peaks, counts)."""
    if metrics.aux_correct > metrics.num_examples:
        raise PayloadError(
            f"aux-correct is {metrics.aux_correct}, more than num-examples {metrics.num_examples}"
        )
    if metrics.rebuilt > 1:
        raise PayloadError(f"rebuilt is {metrics.rebuilt}: one message rebuilds at most once")
    if isinstance(metrics, TrainMetrics) and metrics.recomputes > 1:
        raise PayloadError(f"recomputes is {metrics.recomputes}: one message recomputes once")
    if isinstance(metrics, EvalMetrics) and (
        metrics.probe_count > 1 or metrics.probe_dcor > metrics.probe_count
    ):
        raise PayloadError(
            f"probe-dcor {metrics.probe_dcor} over probe-count {metrics.probe_count}: one "
            f"probe per reply at most, a distance correlation in [0, 1]"
        )


# ------------------------------------------------------------------- sizes before decoding
HEADER_BYTES = 4096  # a .npy header, generously (numpy writes 128 bytes for these arrays)


def npy_header(array) -> tuple[tuple[int, ...], np.dtype, int]:
    """Shape, dtype and data bytes of a serialized Array, from its .npy header alone; the
    header must account for the data exactly, so decoding allocates only what was sent."""
    buf = io.BytesIO(array.data)
    try:
        version = np.lib.format.read_magic(buf)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(buf)
        else:
            shape, _, dtype = np.lib.format.read_array_header_2_0(buf)
    except Exception as exc:  # noqa: BLE001 - garbage or truncated bytes from a client
        raise PayloadError(f"an array is not a valid .npy blob: {exc}") from exc
    return tuple(shape), dtype, len(array.data) - buf.tell()


def _check_sizes(record: ArrayRecord, expected: Expected, max_rows: int | None) -> None:
    """Rows and bytes of every array of an activation payload, from the headers."""
    c, h, w = expected.shape
    per_row = {ACTS_ARRAY: c * h * w, LABELS: 1}  # elements per row
    sides = set(wire_keys(ACTS_ARRAY, expected.wire)) - {ACTS_ARRAY}
    for key in record:
        shape, dtype, data = npy_header(record[key])
        elements = math.prod(shape)
        if elements * dtype.itemsize != data:
            raise PayloadError(
                f"array {key!r} cannot be decoded: its header declares {elements} x "
                f"{dtype.itemsize} bytes, it carries {data}"
            )
        if key in per_row and max_rows is not None:
            rows = shape[0] if shape else 1
            if rows > max_rows or elements > max_rows * per_row[key]:
                raise PayloadError(
                    f"{key!r} has {rows} rows ({elements} values); this client may send at "
                    f"most {max_rows} rows in this message"
                )
        elif key in sides and elements > c:
            raise PayloadError(f"{key!r} has {elements} values for {c} channels")
    if expected.wire == "int8" and sides <= set(record):
        _check_int8_range(record, expected)


def _check_int8_range(record: ArrayRecord, expected: Expected) -> None:
    """Per channel, int8 decodes to (q - zero) x scale for q in [-128, 127]: both ends must lie
    within max-activation (plus one step, the rounding of an honest zero point), so a huge
    scale or zero point is refused before the int8 array is expanded."""
    _, scale_key, zero_key = wire_keys(ACTS_ARRAY, "int8")
    try:
        scale = record[scale_key].numpy().astype(np.float64)
        zero = record[zero_key].numpy().astype(np.float64)
    except Exception:  # noqa: BLE001 - decode_activations names the problem
        return
    if scale.shape != zero.shape or not (np.isfinite(scale).all() and np.isfinite(zero).all()):
        return  # decode_activations names the problem
    with np.errstate(over="ignore", invalid="ignore"):
        reach = np.maximum(np.abs((-128 - zero) * scale), np.abs((127 - zero) * scale))
        over = ~(reach <= expected.max_activation + np.abs(scale))
    if over.any():
        channel = int(np.argmax(over))
        raise PayloadError(
            f"int8 channel {channel} (scale {scale[channel]:.3g}, zero point "
            f"{zero[channel]:.3g}) decodes to {reach[channel]:.3g} in magnitude, beyond "
            f"max-activation={expected.max_activation:g}"
        )


def _weights(record: ArrayRecord | None, expected: Expected) -> dict[str, np.ndarray]:
    """The final reply's client weights: no larger on the wire than the global model's, then
    key for key, shape, dtype and finiteness (``check_weights``), then within max-weight."""
    like = expected.global_weights
    if isinstance(record, ArrayRecord):
        for key in set(record) & set(like):
            if len(record[key].data) > len(like[key].data) + HEADER_BYTES:
                raise PayloadError(
                    f"client weight {key!r} carries {len(record[key].data)} bytes, the "
                    f"global model's {len(like[key].data)}"
                )
    weights = check_weights(record, like)
    for key, array in weights.items():
        if array.dtype.kind == "f" and array.size:
            peak = float(np.abs(array).max())
            if not peak <= expected.max_weight:
                raise PayloadError(
                    f"client weight {key!r} reaches {peak:.3g} in magnitude, beyond "
                    f"max-weight={expected.max_weight:g}"
                )
    return weights
