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
    aux_weight: float = 1.0,
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
    (loss if aux_weight == 1 else aux_weight * loss).backward()
    optimizer.step()
    t2 = compute.now()
    phases.forward += t1 - t0
    phases.backward += t2 - t1
    return acts.detach(), _result(loss, logits, y)


def client_forward(
    segment: nn.Module,
    x: torch.Tensor,
    compute: Compute,
    phases: Phases,
    aux_head: nn.Module | None = None,
    y: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, StepResult | None]:
    """Forward only; the activations (and the aux loss, with an aux head) keep their graph
    for when the server's gradient arrives."""
    t0 = compute.now()
    aux_loss = result = None
    with compute.autocast():
        acts = segment(x)
        if aux_head is not None:
            logits = aux_head(acts)
            aux_loss = F.cross_entropy(logits, y)
    if aux_loss is not None:
        result = _result(aux_loss, logits, y)
    phases.forward += compute.now() - t0
    return acts, aux_loss, result


def client_backward(
    acts: torch.Tensor,
    grad: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    compute: Compute,
    phases: Phases,
    aux_loss: torch.Tensor | None = None,
    alpha: float = 1.0,
    aux_weight: float = 0.0,
) -> None:
    """Chain rule from the server's dL/d(acts) through the kept graph, then one step.

    CSL: the gradient alone. DSL with feedback: ``aux_weight`` * grad(aux loss) + ``alpha`` *
    the returned gradient's term, in one backward pass through the shared graph.
    """
    t0 = compute.now()
    optimizer.zero_grad(set_to_none=True)
    tensors, grads = [acts], [grad if alpha == 1 else alpha * grad]
    if aux_loss is not None and aux_weight:
        tensors.append(aux_loss)
        grads.append(torch.tensor(aux_weight, dtype=aux_loss.dtype, device=aux_loss.device))
    torch.autograd.backward(tensors, grads)
    optimizer.step()
    phases.backward += compute.now() - t0


class NonFiniteStep(ArithmeticError):
    """A server step's loss or gradients are not finite: the step was not taken."""


def server_step(
    segment: nn.Module,
    optimizer: torch.optim.Optimizer,
    acts: torch.Tensor,
    y: torch.Tensor,
    compute: Compute,
    phases: Phases,
    *,
    input_grad: bool,
    max_grad_norm: float = 0.0,
) -> tuple[StepResult, torch.Tensor | None]:
    """Server: one SGD step on the true loss; dL/d(acts) only when the method sends it back.

    Without ``input_grad`` autograd never builds the gradient of the activations, which is the
    server-side saving of DSL. Before the optimizer moves, the loss, the parameters' gradient
    and dL/d(acts) must be finite, else ``NonFiniteStep`` (weights and momentum untouched; the
    forward pass has already updated BatchNorm's running statistics, which the caller
    restores). ``max_grad_norm`` > 0 clips the parameters' gradient to that L2 norm.
    """
    t0 = compute.now()
    acts = acts.detach().requires_grad_(input_grad)
    with compute.autocast():
        logits = segment(acts)
        loss = F.cross_entropy(logits, y)
    t1 = compute.now()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    finite = torch.isfinite(loss.detach()) & torch.isfinite(norm)
    if input_grad:
        finite &= torch.isfinite(acts.grad).all()
    if not bool(finite):
        raise NonFiniteStep(
            f"the server step is not finite (loss {float(loss.detach()):.3g}, gradient norm "
            f"{float(norm):.3g}): skipped"
        )
    if max_grad_norm:
        torch.nn.utils.clip_grads_with_norm_(params, max_grad_norm, norm)
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
