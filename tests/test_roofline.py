"""The roofline benchmark counts a training step's FLOPs right: checked against a hand count."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from benchmarks.roofline import counted_flops, matmul_flops_per_second
from split_core.compute import Compute
from split_core.steps import Phases, server_step

N, CIN, COUT, SIDE, CLASSES, K = 2, 3, 4, 4, 5, 3


def _tiny() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(CIN, COUT, K, padding=1, bias=False),
        nn.Flatten(),
        nn.Linear(COUT * SIDE * SIDE, CLASSES),
    )


def _step(input_grad: bool) -> int:
    model = _tiny()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(N, CIN, SIDE, SIDE), torch.tensor([1, 3])
    cpu = Compute.create(torch.device("cpu"))
    return counted_flops(
        lambda: server_step(model, optimizer, x, y, cpu, Phases(), input_grad=input_grad)
    )


# 2 FLOPs per multiply-add. Conv: every output element sums CIN * K * K products.
CONV = 2 * N * COUT * SIDE * SIDE * CIN * K * K  # 6,912
LINEAR = 2 * N * (COUT * SIDE * SIDE) * CLASSES  # 1,280


@pytest.mark.parametrize(
    ("input_grad", "expected"),
    [
        # forward conv + linear; backward: linear's input and weight gradients, conv's weight
        # gradient; the conv's input gradient only when the step returns dL/d(input) (CSL)
        (False, CONV + LINEAR + 2 * LINEAR + CONV),
        (True, CONV + LINEAR + 2 * LINEAR + 2 * CONV),
    ],
)
def test_step_flops_match_a_hand_count(input_grad, expected):
    assert _step(input_grad) == expected


def test_matmul_ceiling_is_positive_and_finite():
    rate = matmul_flops_per_second(torch.float32, n=128, seconds=0.05)
    assert 0 < rate < float("inf")
