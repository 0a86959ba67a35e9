"""Every field of a client's reply, validated before anything uses it.

A reply is untrusted input: its arrays may be garbage bytes, its metrics may be missing or absurd.
``parse_train`` and ``parse_eval`` either return a reply whose tensors, counts and weights are
all checked, or raise ``PayloadError`` naming what is wrong. Only then does the server step,
so a rejected reply never touches the server segment or FedAvg.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import ArrayRecord, Message, MetricRecord

from split_core.payload import PayloadError, check_weights, decode_activations, record_bytes


@dataclass(frozen=True)
class Expected:
    """What the server knows about a client from set-up, to hold its replies against."""

    shape: tuple[int, int, int]
    num_classes: int
    device: torch.device
    train_examples: int
    global_weights: ArrayRecord | None = None
    wire: str = "float32"


@dataclass
class Reply:
    metrics: dict[str, float]
    done: bool
    awaits_gradient: bool = False
    acts: torch.Tensor | None = None
    labels: torch.Tensor | None = None
    weights: dict[str, np.ndarray] | None = None
    bytes_activations: int = 0
    bytes_labels: int = 0
    bytes_weights: int = 0

    @property
    def examples(self) -> int:
        return 0 if self.labels is None else len(self.labels)


def is_done(reply: Message) -> bool:
    """The client's own claim that it is finished, read safely (it decides whether to ask on)."""
    return bool(_metrics(reply).get("done", 0))


def awaits_gradient(reply: Message) -> bool:
    """The client's claim that its last batch waits for the server's gradient."""
    return bool(_metrics(reply).get("awaits-gradient", 0))


def parse_train(reply: Message, expected: Expected) -> Reply:
    parsed = _parse(reply, expected)
    if parsed.done:
        parsed.weights = check_weights(_record(reply, "arrays"), expected.global_weights)
        parsed.bytes_weights = record_bytes(reply.content["arrays"])
        claimed = parsed.metrics.get("epoch-examples")
        if claimed != expected.train_examples:
            raise PayloadError(
                f"epoch-examples is {claimed}, but the client declared "
                f"{expected.train_examples} training examples at set-up"
            )
    return parsed


def parse_eval(reply: Message, expected: Expected) -> Reply:
    return _parse(reply, expected)


def _parse(reply: Message, expected: Expected) -> Reply:
    metrics = _metrics(reply)
    for key in ("num-examples", "done"):
        if key not in metrics:
            raise PayloadError(f"reply metrics lack {key!r}")
    parsed = Reply(metrics, bool(metrics["done"]), bool(metrics.get("awaits-gradient", 0)))
    acts = _record(reply, "acts", required=False)
    if acts is not None:
        total = record_bytes(acts)  # every array is parsed here: garbage is a PayloadError
        if "labels" in acts:
            parsed.bytes_labels = record_bytes(ArrayRecord({"labels": acts["labels"]}))
        parsed.bytes_activations = total - parsed.bytes_labels  # with int8's scales
        parsed.acts, parsed.labels = decode_activations(
            acts, expected.shape, expected.num_classes, expected.device, expected.wire
        )
    if metrics["num-examples"] != parsed.examples:
        raise PayloadError(
            f"num-examples is {metrics['num-examples']}, the payload has {parsed.examples}"
        )
    return parsed


def _metrics(reply: Message) -> dict[str, float]:
    record = reply.content.get("metrics")
    if not isinstance(record, MetricRecord):
        raise PayloadError("reply carries no 'metrics' record")
    metrics = dict(record)
    for key, value in metrics.items():
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise PayloadError(f"metric {key!r} is not a number: {value!r}")
        if not math.isfinite(value) or value < 0:
            raise PayloadError(f"metric {key!r} must be finite and >= 0, got {value}")
    return metrics


def _record(reply: Message, key: str, required: bool = True) -> ArrayRecord | None:
    record = reply.content.get(key)
    if record is None and not required:
        return None
    if not isinstance(record, ArrayRecord):
        raise PayloadError(f"reply carries no {key!r} arrays")
    return record
