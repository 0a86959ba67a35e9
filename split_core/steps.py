"""The four training steps of split learning, in plain PyTorch.

Every caller (the ClientApp, the server strategy, the in-process reference trainer, the
benchmarks and the tests) trains through these functions, so a number measured anywhere is a
number about the same code. Each step books its forward and backward seconds into ``phases``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from split_core.compute import Compute


@dataclass
class Phases:
    forward: float = 0.0
    backward: float = 0.0

    @property
    def total(self) -> float:
        return self.forward + self.backward


@dataclass
class StepResult:
    loss: float
    correct: int


def client_aux_step(
    segment: nn.Module,
    aux_head: nn.Module,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    compute: Compute,
    phases: Phases,
) -> tuple[torch.Tensor, StepResult]:
    """DSL client: learn from the auxiliary loss at the cut, then free the graph at once.

    Returns the detached activations to send; nothing the server computes can reach this step.
    """
    t0 = compute.now()
    with compute.autocast():
        acts = segment(x)
        logits = aux_head(acts)
        loss = F.cross_entropy(logits, y)
    t1 = compute.now()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    t2 = compute.now()
    phases.forward += t1 - t0
    phases.backward += t2 - t1
    return acts.detach(), _result(loss, logits, y)


def client_forward(
    segment: nn.Module, x: torch.Tensor, compute: Compute, phases: Phases
) -> torch.Tensor:
    """CSL client: forward only; the returned activations keep their graph for the gradient."""
    t0 = compute.now()
    with compute.autocast():
        acts = segment(x)
    phases.forward += compute.now() - t0
    return acts


def client_backward(
    acts: torch.Tensor,
    grad: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    compute: Compute,
    phases: Phases,
) -> None:
    """CSL client: chain rule from the server's dL/d(activations) through the kept graph."""
    t0 = compute.now()
    optimizer.zero_grad(set_to_none=True)
    acts.backward(grad)
    optimizer.step()
    phases.backward += compute.now() - t0


def server_step(
    segment: nn.Module,
    optimizer: torch.optim.Optimizer,
    acts: torch.Tensor,
    y: torch.Tensor,
    compute: Compute,
    phases: Phases,
    *,
    input_grad: bool,
) -> tuple[StepResult, torch.Tensor | None]:
    """Server: one SGD step on the true loss; dL/d(acts) only when the method sends it back.

    Without ``input_grad`` autograd never builds the gradient of the activations, which is the
    server-side saving of DSL.
    """
    t0 = compute.now()
    acts = acts.detach().requires_grad_(input_grad)
    with compute.autocast():
        logits = segment(acts)
        loss = F.cross_entropy(logits, y)
    t1 = compute.now()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    t2 = compute.now()
    phases.forward += t1 - t0
    phases.backward += t2 - t1
    return _result(loss, logits, y), (acts.grad if input_grad else None)


def score(logits: torch.Tensor, y: torch.Tensor) -> StepResult:
    """Summed loss and hits, for evaluation where batches are added up, not averaged."""
    loss = F.cross_entropy(logits.detach().float(), y, reduction="sum")
    return StepResult(float(loss), int((logits.detach().argmax(1) == y).sum()))


def _result(loss: torch.Tensor, logits: torch.Tensor, y: torch.Tensor) -> StepResult:
    return StepResult(float(loss.detach()), int((logits.detach().argmax(1) == y).sum()))
