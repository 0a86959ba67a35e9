"""The server's half of the network: trains on activation payloads, scores test activations.

One client can never make it non-finite: a payload on which any step's loss or gradient is not
finite is undone as a whole (weights, BatchNorm statistics, momentum) and rejected with a
``PayloadError``, so the exchange drops that client exactly as if the payload never came.
``server-grad-clip`` optionally clips each step's gradient norm.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from models import split_resnet
from split_core.compute import Compute
from split_core.config import RunConfig
from split_core.metering import (
    SavedTensorsMeter,
    cuda_peak_bytes,
    peak_rss_bytes,
    reset_cuda_peak,
    reset_peak_rss,
)
from split_core.payload import PayloadError
from split_core.steps import NonFiniteStep, Phases, StepResult, score, server_step


class ServerSegment:
    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        self.compute = Compute.create(cfg.resolve_device(), cfg.compute_dtype, cfg.channels_last)
        self.device = self.compute.device
        _, segment = split_resnet(cfg.depth, cfg.cut, cfg.num_classes, cfg.seed)
        self.segment = self.compute.module(segment)
        self.optimizer = torch.optim.SGD(
            self.segment.parameters(),
            lr=cfg.lr,
            momentum=cfg.momentum,
            weight_decay=cfg.weight_decay,
        )
        self.meter = SavedTensorsMeter()

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The segment's weights as CPU tensors (checkpoints and model.pt load anywhere)."""
        return {k: v.detach().cpu() for k, v in self.segment.state_dict().items()}

    def start_measuring(self) -> None:
        """Peaks from here on (a round)."""
        self.meter.reset_peak()
        reset_peak_rss()
        reset_cuda_peak(self.device)

    def peaks(self) -> dict[str, int]:
        """Bytes held for backward, RSS and CUDA memory, at most, since ``start_measuring``."""
        return {
            "saved": self.meter.peak,
            "rss": peak_rss_bytes(),
            "cuda": cuda_peak_bytes(self.device),
        }

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def train_on(
        self,
        acts: torch.Tensor,
        labels: torch.Tensor,
        phases: Phases,
        needs_grad: Sequence[bool] | bool,
    ) -> tuple[StepResult, torch.Tensor | None]:
        """One SGD step per client mini-batch in the payload (DSL chunks carry many).

        Returns summed loss and hits, and dL/d(acts) of the batches flagged in ``needs_grad``
        (one flag per batch, or one for all), concatenated; None if no batch needs it.
        """
        size = self.cfg.batch_size
        batches = math.ceil(len(labels) / size)
        flags = [needs_grad] * batches if isinstance(needs_grad, bool) else list(needs_grad)
        total, grads = StepResult(0.0, 0), []
        before = self._snapshot()
        try:
            for i, start in enumerate(range(0, len(labels), size)):
                x = self.compute.tensor(acts[start : start + size])
                y = labels[start : start + size]
                with self.meter.track():
                    result, grad = server_step(
                        self.segment,
                        self.optimizer,
                        x,
                        y,
                        self.compute,
                        phases,
                        input_grad=flags[i],
                        max_grad_norm=self.cfg.server_grad_clip,
                    )
                total = StepResult(
                    total.loss + result.loss * len(y), total.correct + result.correct
                )
                if grad is not None:
                    grads.append(grad)
        except NonFiniteStep as exc:
            self._restore(before)
            raise PayloadError(f"batch {i + 1} of {batches} in this payload: {exc}") from exc
        except BaseException:
            self._restore(before)
            raise
        return total, (torch.cat(grads) if grads else None)

    def _snapshot(self) -> tuple[list[torch.Tensor], dict]:
        """Weights, BatchNorm statistics and momentum as they are before a payload, so that a
        payload the server cannot step on leaves no trace (the forward pass alone moves
        BatchNorm's running statistics, and a DSL chunk steps many times)."""
        tensors = [t.detach().clone() for t in self._state_tensors()]
        momentum = {
            p: {k: v.clone() if torch.is_tensor(v) else v for k, v in state.items()}
            for p, state in self.optimizer.state.items()
        }
        return tensors, momentum

    def _restore(self, snapshot: tuple[list[torch.Tensor], dict]) -> None:
        tensors, momentum = snapshot
        with torch.no_grad():
            for live, saved in zip(self._state_tensors(), tensors, strict=True):
                live.copy_(saved)
        self.optimizer.state.clear()
        self.optimizer.state.update(momentum)
        self.optimizer.zero_grad(set_to_none=True)

    def _state_tensors(self) -> list[torch.Tensor]:
        return [*self.segment.parameters(), *self.segment.buffers()]

    @torch.no_grad()
    def evaluate_on(self, acts: torch.Tensor, labels: torch.Tensor, phases: Phases) -> StepResult:
        self.segment.eval()
        try:
            t0 = self.compute.now()
            total = StepResult(0.0, 0)
            for start in range(0, len(labels), self.cfg.batch_size):
                part = slice(start, start + self.cfg.batch_size)
                with self.compute.autocast():
                    logits = self.segment(self.compute.tensor(acts[part]))
                result = score(logits, labels[part])
                total = StepResult(total.loss + result.loss, total.correct + result.correct)
            phases.forward += self.compute.now() - t0
            return total
        finally:
            self.segment.train()
