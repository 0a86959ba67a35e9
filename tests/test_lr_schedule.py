"""The per-round learning rate: cosine annealing and the linear warm-up, against hand-computed
values (one round is one epoch, rounds are 1-based)."""

from __future__ import annotations

import pytest

from split_core.config import ConfigError, RunConfig


def lrs(**config) -> list[float]:
    cfg = RunConfig.from_run_config(config)
    return [cfg.lr_at(r) for r in range(1, cfg.num_rounds + 1)]


def test_cosine_anneals_from_lr_towards_zero() -> None:
    # 0.5 * 0.1 * (1 + cos(pi * k / 4)) for k = 0..3: cos = 1, 1/sqrt(2), 0, -1/sqrt(2)
    got = lrs(**{"lr-schedule": "cosine", "lr": 0.1, "num-rounds": 4})
    assert got == pytest.approx([0.1, 0.0853553390593, 0.05, 0.0146446609407], abs=1e-12)


def test_cosine_over_40_rounds_ends_near_zero_and_is_halved_at_the_middle() -> None:
    got = lrs(**{"lr-schedule": "cosine", "lr": 0.1, "num-rounds": 40})
    assert got[0] == 0.1 and got[20] == pytest.approx(0.05, abs=1e-15)  # round 21: cos(pi/2)
    assert got[39] == pytest.approx(0.05 * (1 - 0.996917333733128), rel=1e-9)  # cos(39 pi/40)
    assert all(a > b for a, b in zip(got, got[1:], strict=False))


def test_one_round_of_cosine_uses_the_full_lr() -> None:
    assert lrs(**{"lr-schedule": "cosine", "lr": 0.2, "num-rounds": 1}) == [0.2]


def test_warmup_scales_the_first_rounds_linearly() -> None:
    # W = 2 of R = 4: factors 1/2 and 1 on top of the cosine values above
    got = lrs(**{"lr-schedule": "cosine", "lr": 0.1, "num-rounds": 4, "lr-warmup-rounds": 2})
    assert got == pytest.approx([0.05, 0.0853553390593, 0.05, 0.0146446609407], abs=1e-12)
    flat = lrs(**{"lr": 0.3, "num-rounds": 5, "lr-warmup-rounds": 3})
    assert flat == pytest.approx([0.1, 0.2, 0.3, 0.3, 0.3], rel=1e-12)


def test_warmup_longer_than_the_run_is_refused() -> None:
    with pytest.raises(ConfigError) as err:
        RunConfig.from_run_config({"num-rounds": 3, "lr-warmup-rounds": 4})
    assert str(err.value) == (
        "invalid run config: lr-warmup-rounds must be in [0, num-rounds], got 4"
    )
