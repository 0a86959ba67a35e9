"""Split-learning methods, one class each (as in FSL-SAGE): a new method is a new subclass.

The methods differ only on the client and in one flag: whether the server sends the gradient
of the loss with respect to the activations back (``returns_gradient``). Everything else (the
data stream, payloads, the server step, aggregation and the Flower event loop) is shared.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from flower_app.metering import Clock
from strategies.steps import Phases, StepResult, client_aux_step, client_backward, client_forward


@dataclass
class ClientParts:
    segment: nn.Module
    aux_head: nn.Module | None
    optimizer: torch.optim.Optimizer
    clock: Clock


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
            parts.segment, parts.aux_head, parts.optimizer, x, y, parts.clock, phases
        )


class CSL(SplitMethod):
    """Conventional split learning: end-to-end backprop, one gradient round trip per batch."""

    name = "csl"
    returns_gradient = True
    uses_aux_head = False

    def client_batch(self, parts, x, y, phases):
        return client_forward(parts.segment, x, parts.clock, phases), None

    def client_gradient(self, parts, acts, grad, phases):
        client_backward(acts, grad, parts.optimizer, parts.clock, phases)


METHODS: dict[str, type[SplitMethod]] = {m.name: m for m in (DSL, CSL)}
