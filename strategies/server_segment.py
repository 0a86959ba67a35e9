"""The server's half of the network: trains on activation payloads, scores test activations."""

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
from split_core.steps import Phases, StepResult, score, server_step


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
        for i, start in enumerate(range(0, len(labels), size)):
            x = self.compute.tensor(acts[start : start + size])
            y = labels[start : start + size]
            with self.meter.track():
                result, grad = server_step(
                    self.segment, self.optimizer, x, y, self.compute, phases, input_grad=flags[i]
                )
            total = StepResult(total.loss + result.loss * len(y), total.correct + result.correct)
            if grad is not None:
                grads.append(grad)
        return total, (torch.cat(grads) if grads else None)

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
