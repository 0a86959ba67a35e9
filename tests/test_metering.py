"""Tests for flower_app.metering: the saved-tensor meter and peak RSS measure real bytes."""

from __future__ import annotations

import gc
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from split_core.metering import SavedTensorsMeter, peak_rss_bytes, reset_peak_rss


def _net() -> nn.Module:
    """Conv, BatchNorm and ReLU: the layers of a client segment."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1),
        nn.ReLU(),
    )


def _input(batch: int = 4) -> torch.Tensor:
    return torch.randn(batch, 3, 16, 16, generator=torch.Generator().manual_seed(1))


def _expected_saved_bytes(fn: Callable[[], torch.Tensor], params: list[torch.Tensor]) -> int:
    """Independent count: record every saved tensor, drop parameters, count each memory once."""
    param_ptrs = {p.data_ptr() for p in params}
    seen: dict[tuple[int, int], int] = {}
    keep: list[torch.Tensor] = []  # hold the tensors so no address is reused meanwhile

    def pack(t: torch.Tensor) -> torch.Tensor:
        keep.append(t)
        if t.data_ptr() not in param_ptrs:
            seen[(t.data_ptr(), t.numel())] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    total = sum(seen.values())
    keep.clear()
    out.sum().backward()  # frees the graph
    return total


def test_peak_equals_distinct_saved_activation_bytes() -> None:
    """The memory CSL keeps is the autograd-saved activations: counted once, parameters not."""
    net, x = _net(), _input()
    params = list(net.parameters())
    expected = _expected_saved_bytes(lambda: net(x).sum(), params)
    assert expected > 0

    meter = SavedTensorsMeter()
    with meter.track():
        loss = net(x).sum()
    assert meter.peak == expected
    assert meter.current == expected

    loss.backward()
    assert meter.current == 0
    assert meter.peak == expected
    meter.reset_peak()
    assert meter.peak == 0


def test_conv_weight_is_not_counted() -> None:
    """A conv saves its weight for the input gradient; the weight is resident anyway."""
    conv = nn.Conv2d(64, 64, 3, bias=False)  # 147 KB of weight
    x = torch.randn(1, 64, 4, 4, requires_grad=True)  # 4 KB of input
    meter = SavedTensorsMeter()
    with meter.track():
        out = conv(x).sum()
    assert meter.peak == 64 * 4 * 4 * 4
    out.backward()
    assert meter.current == 0


def test_linear_weight_is_not_counted() -> None:
    """Aux heads and the server head end in Linear layers; their weights are not activations."""
    layer = nn.Linear(1000, 1000, bias=False)
    x = torch.randn(2, 1000, requires_grad=True)
    assert _expected_saved_bytes(lambda: layer(x).sum(), list(layer.parameters())) == 8000
    meter = SavedTensorsMeter()
    with meter.track():
        out = layer(x).sum()
    out.backward()
    assert meter.peak == 2 * 1000 * 4  # x only; the 4 MB weight must be left out


def test_tensor_saved_twice_is_counted_once() -> None:
    """x * x saves x for both operands: its bytes are held once."""
    w = torch.randn(256, requires_grad=True)
    meter = SavedTensorsMeter()
    with meter.track():
        y = w.exp()  # exp saves its output
        out = (y * y).sum()  # mul saves y twice
    assert meter.peak == 256 * 4
    out.backward()
    assert meter.current == 0


def test_kept_graph_holds_bytes() -> None:
    """CSL keeps the client graph while the gradient travels: its bytes stay held."""
    net, x = _net(), _input()
    expected = _expected_saved_bytes(lambda: net(x), list(net.parameters()))
    meter = SavedTensorsMeter()
    with meter.track():
        acts = net(x)
    assert meter.current == meter.peak == expected
    gc.collect()
    assert meter.current == expected  # nothing is released while the graph is alive
    acts.sum().backward()
    assert meter.current == 0


def test_dropped_graph_without_saved_outputs_is_released() -> None:
    """Layers that save only their inputs (conv, BatchNorm) are freed when the graph goes."""
    net = nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8), nn.Conv2d(8, 4, 3))
    meter = SavedTensorsMeter()
    with meter.track():
        acts = net(_input())
    assert meter.current > 0
    del acts
    gc.collect()
    assert meter.current == 0


def test_dropped_graph_is_released() -> None:
    """A CSL graph whose gradient never comes (a new round) must free its activations."""
    net, x = _net(), _input()
    meter = SavedTensorsMeter()
    with meter.track():
        acts = net(x)
    held = meter.current
    assert held > 0
    del acts
    gc.collect()
    assert meter.current == 0
    assert meter.peak == held


def test_peak_spans_two_graphs() -> None:
    """Two graphs alive at once add up, memory they share (the BatchNorm buffers) once."""
    net, x, x2 = _net(), _input(), _input(batch=2)
    params = list(net.parameters())
    one = _expected_saved_bytes(lambda: net(x), params)
    both = _expected_saved_bytes(lambda: net(x) + net(x2).sum(), params)
    running_stats = 2 * 8 * 4  # running_mean and running_var, saved by both graphs
    assert both == one + _expected_saved_bytes(lambda: net(x2), params) - running_stats

    meter = SavedTensorsMeter()
    with meter.track():
        first = net(x).sum()
    assert meter.current == one
    with meter.track():
        second = net(x2).sum()
    assert meter.current == meter.peak == both
    first.backward()
    assert meter.current == both - one + running_stats
    second.backward()
    assert meter.current == 0
    assert meter.peak == both


def test_same_input_twice_is_counted_once() -> None:
    """Two forwards of one payload tensor hold its bytes once, not twice."""
    net, x = _net(), _input()
    x_bytes = x.numel() * x.element_size()
    meter = SavedTensorsMeter()
    with meter.track():
        first = net(x).sum()
    one = meter.current
    with meter.track():
        second = net(x).sum()
    assert meter.current == 2 * one - x_bytes - 2 * 8 * 4
    first.backward()
    second.backward()
    assert meter.current == 0


def test_slice_counts_only_the_slice() -> None:
    """A mini-batch sliced out of a large DSL payload holds the slice, not the payload."""
    payload = torch.randn(1000, 100)
    w = nn.Parameter(torch.randn(100))
    for start in (0, 500):
        part = payload[start : start + 10]
        expected = _expected_saved_bytes(lambda p=part: (p * w).sum(), [w])
        assert expected == 10 * 100 * 4
        meter = SavedTensorsMeter()
        with meter.track():
            out = (part * w).sum()
        assert meter.peak == 10 * 100 * 4
        out.backward()
        assert meter.current == 0


def test_outside_track_nothing_is_counted() -> None:
    net, x = _net(), _input()
    meter = SavedTensorsMeter()
    net(x).sum().backward()
    assert meter.peak == meter.current == 0


def _clear_refs_writable() -> bool:
    path = Path("/proc/self/clear_refs")
    return path.exists() and os.access(path, os.W_OK)


@pytest.mark.skipif(not _clear_refs_writable(), reason="needs Linux /proc/self/clear_refs")
def test_peak_rss_rises_and_resets() -> None:
    """The per-phase memory numbers rely on resetting the kernel's high-water mark."""
    size = 200 * 2**20
    assert reset_peak_rss() is True
    base = peak_rss_bytes()
    block = np.ones(size, dtype=np.uint8)  # ones, not empty: every page is touched
    block[::4096] = 2
    high = peak_rss_bytes()
    assert high - base >= 0.9 * size
    del block
    gc.collect()
    assert peak_rss_bytes() > base + 0.9 * size  # the high-water mark outlives the memory
    assert reset_peak_rss() is True
    low = peak_rss_bytes()
    assert low < high - 0.9 * size
