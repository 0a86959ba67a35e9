"""Where and how a party computes: device, precision, memory layout, and a clock for the device.

Client and server each hold one ``Compute``. Training steps run their forward passes under
``compute.autocast()`` (bfloat16 when ``compute-dtype='bfloat16'``; weights, optimizer state and
the loss stay float32) and time themselves with ``compute.now()``, which waits for the GPU so its
work is booked to the phase that queued it.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

COMPUTE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class Compute:
    device: torch.device
    dtype: torch.dtype = torch.float32
    channels_last: bool = False

    @classmethod
    def create(cls, device: torch.device, dtype: str = "float32", channels_last: bool = False):
        if device.type == "cuda":
            # Fixed input shapes (the last batch of an epoch aside): let cuDNN pick its kernels.
            torch.backends.cudnn.benchmark = True
        return cls(device, COMPUTE_DTYPES[dtype], channels_last)

    def now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def module(self, module: nn.Module) -> nn.Module:
        module = module.to(self.device)
        return module.to(memory_format=torch.channels_last) if self.channels_last else module

    def tensor(self, x: torch.Tensor) -> torch.Tensor:
        """An input batch (images or activations) on this device, in this memory layout."""
        x = x.to(self.device, non_blocking=True)
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return x


def seeded_generator(*key: int) -> torch.Generator:
    """A CPU generator seeded from a place in the run (seed, partition, epoch, batch, ...), so
    the randomness drawn there (augmentation, stochastic rounding) can be drawn again exactly."""
    seed = np.random.SeedSequence([int(k) for k in key]).generate_state(1)[0]
    return torch.Generator().manual_seed(int(seed))
