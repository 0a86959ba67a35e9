"""The server's half of the network: trains on activation payloads, scores test activations."""

from __future__ import annotations

import torch

from flower_app.config import RunConfig
from flower_app.metering import Clock, SavedTensorsMeter
from models import split_resnet
from strategies.steps import Phases, StepResult, score, server_step


class ServerSegment:
    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        self.device = cfg.resolve_device()
        _, segment = split_resnet(cfg.depth, cfg.cut, cfg.num_classes, cfg.seed)
        self.segment = segment.to(self.device)
        self.optimizer = torch.optim.SGD(
            self.segment.parameters(),
            lr=cfg.lr,
            momentum=cfg.momentum,
            weight_decay=cfg.weight_decay,
        )
        self.clock = Clock(self.device)
        self.meter = SavedTensorsMeter()

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def train_on(
        self, acts: torch.Tensor, labels: torch.Tensor, phases: Phases, *, input_grad: bool
    ) -> tuple[StepResult, torch.Tensor | None]:
        """One SGD step per client mini-batch in the payload (DSL chunks carry many).

        Returns summed loss and hits, and for methods that return it, dL/d(acts) of the batch.
        """
        total, grads = StepResult(0.0, 0), []
        for start in range(0, len(labels), self.cfg.batch_size):
            x, y = (
                acts[start : start + self.cfg.batch_size],
                labels[start : start + self.cfg.batch_size],
            )
            with self.meter.track():
                result, grad = server_step(
                    self.segment, self.optimizer, x, y, self.clock, phases, input_grad=input_grad
                )
            total = StepResult(total.loss + result.loss * len(y), total.correct + result.correct)
            if grad is not None:
                grads.append(grad)
        return total, (torch.cat(grads) if grads else None)

    @torch.no_grad()
    def evaluate_on(self, acts: torch.Tensor, labels: torch.Tensor, phases: Phases) -> StepResult:
        self.segment.eval()
        try:
            t0 = self.clock.now()
            total = StepResult(0.0, 0)
            for start in range(0, len(labels), self.cfg.batch_size):
                part = slice(start, start + self.cfg.batch_size)
                result = score(self.segment(acts[part]), labels[part])
                total = StepResult(total.loss + result.loss, total.correct + result.correct)
            phases.forward += self.clock.now() - t0
            return total
        finally:
            self.segment.train()
