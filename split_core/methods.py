"""Split-learning methods, one class each (as in FSL-SAGE): a new method is a new subclass.

The methods differ only on the client and in one question: for which batches does the server
send the gradient of the loss with respect to the activations back (``needs_gradient``)?
Everything else (the data stream, payloads, the server step, aggregation and the Flower event
loop) is shared.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar, Protocol

import torch
from torch import nn

from models import build_aux_head, cut_shape, split_resnet
from split_core.compute import Compute
from split_core.steps import Phases, StepResult, client_aux_step, client_backward, client_forward


class MethodConfig(Protocol):
    """The run-config fields a method and the client model are built from.

    ``split_core.config.RunConfig`` has them; naming them here keeps this module free of the
    config, which imports it to check ``method`` and to ask a method how it schedules.
    """

    @property
    def method(self) -> str: ...
    @property
    def feedback_every(self) -> int: ...
    @property
    def feedback_alpha(self) -> float: ...
    @property
    def aux_weight(self) -> float: ...
    @property
    def depth(self) -> int: ...
    @property
    def cut(self) -> int: ...
    @property
    def aux_head(self) -> str: ...
    @property
    def seed(self) -> int: ...
    @property
    def num_classes(self) -> int: ...


AUX_SEED_OFFSET = 1  # the aux head gets its own seed so the ResNet init matches the unsplit one


@dataclass
class ClientParts:
    segment: nn.Module
    aux_head: nn.Module | None
    optimizer: torch.optim.Optimizer
    compute: Compute


@dataclass
class Pending:
    """A batch whose client step waits for the server's gradient: its graph, kept alive."""

    acts: torch.Tensor
    aux_loss: torch.Tensor | None = None


class SplitMethod(ABC):
    name: ClassVar[str]
    uses_aux_head: ClassVar[bool]

    @classmethod
    def from_config(cls, cfg: MethodConfig) -> SplitMethod:
        return cls()

    def needs_gradient(self, batch: int) -> bool:
        """Does the server send dL/d(acts) of this batch (index within the epoch) back?"""
        return False

    @property
    def waits_every_batch(self) -> bool:
        """Client and server alternate strictly (no pipelining): every batch needs a gradient."""
        return False

    @abstractmethod
    def client_batch(
        self, parts: ClientParts, x: torch.Tensor, y: torch.Tensor, phases: Phases, batch: int
    ) -> tuple[torch.Tensor, StepResult | None, Pending | None]:
        """Train on one batch as far as the client can alone.

        Returns the (detached) activations to send, the aux loss if any, and what must wait
        for the server's gradient (None when the batch needs none).
        """

    def client_gradient(
        self, parts: ClientParts, pending: Pending, grad: torch.Tensor, phases: Phases
    ) -> None:
        raise TypeError(f"{self.name} does not take a gradient from the server")


class DSL(SplitMethod):
    """Decoupled split learning: the aux head's local loss trains the client; acts go one way.

    With ``feedback_every`` = k > 0 (the paper's alpha, discussed there, never run), every k-th
    batch also gets the server's gradient back, and its update is ``aux_weight`` * grad(aux
    loss) + ``alpha`` * the returned-gradient term; the other batches use ``aux_weight`` * grad
    (aux loss). k=0 is pure DSL; k=1, alpha=1, aux_weight=0 is CSL.
    """

    name = "dsl"
    uses_aux_head = True

    def __init__(self, feedback_every: int = 0, alpha: float = 1.0, aux_weight: float = 1.0):
        self.feedback_every, self.alpha, self.aux_weight = feedback_every, alpha, aux_weight

    @classmethod
    def from_config(cls, cfg: MethodConfig) -> DSL:
        return cls(cfg.feedback_every, cfg.feedback_alpha, cfg.aux_weight)

    def needs_gradient(self, batch: int) -> bool:
        return self.feedback_every > 0 and (batch + 1) % self.feedback_every == 0

    @property
    def waits_every_batch(self) -> bool:
        return self.feedback_every == 1

    def client_batch(self, parts, x, y, phases, batch):
        assert parts.aux_head is not None
        if self.needs_gradient(batch):
            acts, aux_loss, result = client_forward(
                parts.segment, x, parts.compute, phases, parts.aux_head, y
            )
            return acts.detach(), result, Pending(acts, aux_loss)
        acts, result = client_aux_step(
            parts.segment,
            parts.aux_head,
            parts.optimizer,
            x,
            y,
            parts.compute,
            phases,
            self.aux_weight,
        )
        return acts, result, None

    def client_gradient(self, parts, pending, grad, phases):
        client_backward(
            pending.acts,
            grad,
            parts.optimizer,
            parts.compute,
            phases,
            pending.aux_loss,
            self.alpha,
            self.aux_weight,
        )


class CSL(SplitMethod):
    """Conventional split learning: end-to-end backprop, one gradient round trip per batch."""

    name = "csl"
    uses_aux_head = False

    def needs_gradient(self, batch: int) -> bool:
        return True

    @property
    def waits_every_batch(self) -> bool:
        return True

    def client_batch(self, parts, x, y, phases, batch):
        acts, _, _ = client_forward(parts.segment, x, parts.compute, phases)
        return acts.detach(), None, Pending(acts)

    def client_gradient(self, parts, pending, grad, phases):
        client_backward(pending.acts, grad, parts.optimizer, parts.compute, phases)


METHODS: dict[str, type[SplitMethod]] = {m.name: m for m in (DSL, CSL)}


def make_method(cfg: MethodConfig) -> SplitMethod:
    return METHODS[cfg.method].from_config(cfg)


def client_modules(cfg: MethodConfig) -> dict[str, nn.Module | None]:
    """The client's trainable parts as every party builds them from the seed (on the CPU)."""
    segment, _ = split_resnet(cfg.depth, cfg.cut, cfg.num_classes, cfg.seed)
    aux = None
    if METHODS[cfg.method].uses_aux_head:
        shape = cut_shape(cfg.depth, cfg.cut)
        aux = build_aux_head(cfg.aux_head, shape, cfg.num_classes, cfg.seed + AUX_SEED_OFFSET)
    return {"segment": segment, "aux": aux}
