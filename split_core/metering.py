"""Measured (never estimated) memory: bytes held for backward, peak RSS, peak CUDA memory."""

from __future__ import annotations

import re
import resource
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn


class _Saved:
    """A tensor saved for backward; when autograd drops the graph, its bytes are released."""

    __slots__ = ("tensor", "key", "meter")

    def __init__(self, tensor: torch.Tensor, key: tuple, meter: SavedTensorsMeter) -> None:
        self.tensor, self.key, self.meter = tensor, key, meter

    def __del__(self) -> None:
        self.meter._release(self.key)


class SavedTensorsMeter:
    """Peak bytes that autograd holds for backward, through ``saved_tensors_hooks``.

    A tensor is counted once however many graph nodes save it (by address and size, so a
    mini-batch sliced out of a larger payload counts as the slice), and parameters are left out:
    they are resident anyway, so what remains is the activation memory that a split-learning
    method decides to keep (CSL keeps the client graph until the gradient returns).
    """

    def __init__(self) -> None:
        self.current = 0
        self.peak = 0
        self._live: dict[tuple, list[int]] = {}

    def reset_peak(self) -> None:
        self.peak = self.current

    @contextmanager
    def track(self) -> Iterator[None]:
        with torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack):
            yield

    def _pack(self, t: torch.Tensor) -> object:
        if isinstance(t, nn.Parameter) or isinstance(t._base, nn.Parameter):  # weight or weight.t()
            return t
        key = (t.device, t.data_ptr(), t.numel())
        entry = self._live.get(key)
        if entry is None:
            nbytes = t.numel() * t.element_size()
            self._live[key] = [1, nbytes]
            self.current += nbytes
            self.peak = max(self.peak, self.current)
        else:
            entry[0] += 1
        # Detached: a saved output (ReLU's) would otherwise point back, through its grad_fn, to
        # the node that holds this object, a cycle that leaks when a graph is dropped unused.
        return _Saved(t.detach(), key, self)

    @staticmethod
    def _unpack(packed: object) -> torch.Tensor:
        return packed.tensor if isinstance(packed, _Saved) else packed

    def _release(self, key: tuple) -> None:
        entry = self._live[key]
        entry[0] -= 1
        if entry[0] == 0:
            self.current -= entry[1]
            del self._live[key]


_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def reset_peak_rss() -> bool:
    """Reset the kernel's high-water mark so the next reading is the peak of this phase only."""
    try:
        _CLEAR_REFS.write_text("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """VmHWM (resettable on Linux); falls back to the process-lifetime ru_maxrss elsewhere."""
    try:
        match = re.search(r"VmHWM:\s+(\d+) kB", _STATUS.read_text())
        if match:
            return int(match.group(1)) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_cuda_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def cuda_peak_bytes(device: torch.device) -> int:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
