"""Split-learning methods, one class each (as in FSL-SAGE): a new method is a new subclass.

The methods differ only on the client and in one flag: whether the server sends the gradient
of the loss with respect to the activations back (``returns_gradient``). Everything else (the
data stream, payloads, the server step, aggregation and the Flower event loop) is shared.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn

from models import build_aux_head, cut_shape, split_resnet
from split_core.compute import Compute
from split_core.steps import Phases, StepResult, client_aux_step, client_backward, client_forward

if TYPE_CHECKING:
    from split_core.config import RunConfig

AUX_SEED_OFFSET = 1  # the aux head gets its own seed so the ResNet init matches the unsplit one


@dataclass
class ClientParts:
    segment: nn.Module
    aux_head: nn.Module | None
    optimizer: torch.optim.Optimizer
    compute: Compute


class SplitMethod(ABC):
    name: ClassVar[str]
    returns_gradient: ClassVar[bool]
    uses_aux_head: ClassVar[bool]

    @abstractmethod
    def client_batch(
        self, parts: ClientParts, x: torch.Tensor, y: torch.Tensor, phases: Phases
    ) -> tuple[torch.Tensor, StepResult | None]:
        """Train on one batch as far as the client can alone; return the activations to send."""

    def client_gradient(
        self, parts: ClientParts, acts: torch.Tensor, grad: torch.Tensor, phases: Phases
    ) -> None:
        raise TypeError(f"{self.name} does not take a gradient from the server")


class DSL(SplitMethod):
    """Decoupled split learning: the aux head's local loss trains the client; acts go one way."""

    name = "dsl"
    returns_gradient = False
    uses_aux_head = True

    def client_batch(self, parts, x, y, phases):
        assert parts.aux_head is not None
        return client_aux_step(
            parts.segment, parts.aux_head, parts.optimizer, x, y, parts.compute, phases
        )


class CSL(SplitMethod):
    """Conventional split learning: end-to-end backprop, one gradient round trip per batch."""

    name = "csl"
    returns_gradient = True
    uses_aux_head = False

    def client_batch(self, parts, x, y, phases):
        return client_forward(parts.segment, x, parts.compute, phases), None

    def client_gradient(self, parts, acts, grad, phases):
        client_backward(acts, grad, parts.optimizer, parts.compute, phases)


METHODS: dict[str, type[SplitMethod]] = {m.name: m for m in (DSL, CSL)}


def client_modules(cfg: RunConfig) -> dict[str, nn.Module | None]:
    """The client's trainable parts as every party builds them from the seed (on the CPU)."""
    segment, _ = split_resnet(cfg.depth, cfg.cut, cfg.num_classes, cfg.seed)
    aux = None
    if METHODS[cfg.method].uses_aux_head:
        shape = cut_shape(cfg.depth, cfg.cut)
        aux = build_aux_head(cfg.aux_head, shape, cfg.num_classes, cfg.seed + AUX_SEED_OFFSET)
    return {"segment": segment, "aux": aux}
