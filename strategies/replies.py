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
server segment or FedAvg. A new check on what clients send (a bound on activation magnitudes,
say) belongs in ``_check``, with its limit in ``Expected``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import ArrayRecord, Message

from models import cut_shape
from split_core.config import RunConfig
from split_core.payload import PayloadError, check_weights, decode_activations, record_bytes
from split_core.protocol import (
    LABELS,
    EvalMetrics,
    EvaluateReply,
    StepMetrics,
    TrainMetrics,
    TrainReply,
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


def expectations(
    clients: Iterable[ClientInfo],
    cfg: RunConfig,
    device: torch.device,
    global_weights: ArrayRecord | None = None,
) -> dict[int, Expected]:
    """What each client's replies are held against, by node id."""
    shape = cut_shape(cfg.depth, cfg.cut)
    return {
        c.node_id: Expected(
            shape, cfg.num_classes, device, c.train_examples, global_weights, cfg.payload_dtype
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


def parse_train(message: Message, expected: Expected) -> Reply:
    decoded = TrainReply.decode(message.content)
    reply = _check(decoded.metrics, decoded.activations, expected)
    reply.ray_node = decoded.ray_node
    if reply.done:
        reply.weights = check_weights(decoded.weights, expected.global_weights)
        reply.bytes_weights = record_bytes(decoded.weights)
        claimed = reply.metrics.epoch_examples
        if claimed != expected.train_examples:
            raise PayloadError(
                f"epoch-examples is {claimed}, but the client declared "
                f"{expected.train_examples} training examples at set-up"
            )
    return reply


def parse_eval(message: Message, expected: Expected) -> Reply:
    decoded = EvaluateReply.decode(message.content)
    reply = _check(decoded.metrics, decoded.activations, expected)
    reply.ray_node = decoded.ray_node
    return reply


def _check(metrics: StepMetrics, acts: ArrayRecord | None, expected: Expected) -> Reply:
    reply = Reply(metrics)
    if acts is not None:
        total = record_bytes(acts)  # every array is parsed here: garbage is a PayloadError
        labels = acts.get(LABELS)
        if labels is not None:
            reply.bytes_labels = record_bytes(ArrayRecord({LABELS: labels}))
        reply.bytes_activations = total - reply.bytes_labels  # with int8's scales
        reply.acts, reply.labels = decode_activations(
            acts, expected.shape, expected.num_classes, expected.device, expected.wire
        )
    if metrics.num_examples != reply.examples:
        raise PayloadError(
            f"num-examples is {metrics.num_examples}, the payload has {reply.examples}"
        )
    return reply
