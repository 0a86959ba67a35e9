"""The aggregators of the client segments and the update-norm bound, against hand-computed
results on small arrays."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord

from split_core.config import RunConfig
from split_core.payload import PayloadError
from strategies.aggregation import (
    FedAvg,
    Median,
    TrimmedMean,
    make_aggregator,
    update_norm,
)

GLOBAL = ArrayRecord(
    {
        "w": Array(np.zeros(3, dtype=np.float32)),
        "n": Array(np.array(5, dtype=np.int64)),  # BatchNorm's num_batches_tracked
    }
)


def client(values, count) -> dict[str, np.ndarray]:
    return {"w": np.array(values, dtype=np.float32), "n": np.array(count, dtype=np.int64)}


def result(aggregator) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in aggregator.result().items()}


def test_fedavg_weights_each_client_by_the_examples_counted():
    agg = FedAvg(GLOBAL)
    agg.add(client([1.0, 2.0, 3.0], 7), 1)
    agg.add(client([4.0, 8.0, -3.0], 9), 3)
    out = result(agg)
    # (1 x [1, 2, 3] + 3 x [4, 8, -3]) / 4 = [13/4, 26/4, -6/4]
    np.testing.assert_array_equal(out["w"], np.array([3.25, 6.5, -1.5], dtype=np.float32))
    assert out["w"].dtype == np.float32
    assert int(out["n"]) == 9  # a counter: the largest, not an average
    assert (agg.clients, agg.total) == (2, 4)


def test_fedavg_without_examples_keeps_the_global_model_and_without_clients_gives_none():
    assert FedAvg(GLOBAL).result() is None
    agg = FedAvg(GLOBAL)
    agg.add(client([1.0, 1.0, 1.0], 6), 0)
    assert agg.result() is GLOBAL


def test_median_of_an_odd_number_of_clients_is_the_middle_value_per_coordinate():
    agg = Median(GLOBAL)
    agg.add(client([1.0, 10.0, -1.0], 4), 100)  # weights play no part in the median
    agg.add(client([2.0, -5.0, 1e30], 9), 1)
    agg.add(client([3.0, 0.0, 0.5], 6), 1)
    out = result(agg)
    np.testing.assert_array_equal(out["w"], np.array([2.0, 0.0, 0.5], dtype=np.float32))
    assert int(out["n"]) == 6  # the lower median of 4, 6, 9


def test_median_of_an_even_number_is_the_mean_of_the_two_middle_values():
    agg = Median(GLOBAL)
    for values, n in (([1.0, 4.0, 0.0], 3), ([3.0, 2.0, 8.0], 8), ([7.0, 0.0, 2.0], 5)):
        agg.add(client(values, n), 1)
    agg.add(client([5.0, 100.0, 4.0], 1), 1)
    out = result(agg)
    # per coordinate: sorted [1,3,5,7] -> 4; [0,2,4,100] -> 3; [0,2,4,8] -> 3
    np.testing.assert_array_equal(out["w"], np.array([4.0, 3.0, 3.0], dtype=np.float32))
    assert int(out["n"]) == 3  # lower median of 1, 3, 5, 8


def test_trimmed_mean_cuts_floor_of_fraction_times_k_from_each_end():
    agg = TrimmedMean(GLOBAL, trim_fraction=0.2)  # K = 5: one value cut from each end
    rows = [
        [1.0, -100.0, 2.0],
        [2.0, 1.0, 2.0],
        [3.0, 2.0, 2.0],
        [4.0, 3.0, 2.0],
        [1e30, 4.0, -1e30],
    ]
    for i, values in enumerate(rows):
        agg.add(client(values, i), 1)
    out = result(agg)
    # sorted columns, middle three averaged: [2,3,4] -> 3; [1,2,3] -> 2; [2,2,2] -> 2
    np.testing.assert_array_equal(out["w"], np.array([3.0, 2.0, 2.0], dtype=np.float32))
    assert agg.trimmed(5) == 1 and agg.trimmed(4) == 0 and agg.trimmed(10) == 2


def test_trimmed_mean_with_nothing_to_cut_is_the_unweighted_mean():
    agg = TrimmedMean(GLOBAL, trim_fraction=0.1)  # K = 3: floor(0.3) = 0
    for values in ([0.0, 3.0, 6.0], [3.0, 3.0, 0.0], [6.0, 0.0, 0.0]):
        agg.add(client(values, 1), 50)
    np.testing.assert_array_equal(result(agg)["w"], np.array([3.0, 2.0, 2.0], dtype=np.float32))


def test_update_norm_is_the_l2_distance_over_the_float_arrays():
    # [3, 4, 12] from zeros: sqrt(9 + 16 + 144) = 13; the counter does not count
    assert update_norm(client([3.0, 4.0, 12.0], 10**6), GLOBAL) == 13.0


@pytest.mark.parametrize("kind", [FedAvg, Median])
def test_an_update_beyond_max_update_norm_is_refused_naming_its_norm(kind):
    agg = kind(GLOBAL, max_update_norm=13.0)
    agg.check(client([3.0, 4.0, 12.0], 1))  # exactly at the bound: accepted
    with pytest.raises(PayloadError) as info:
        agg.check(client([3.0, 4.0, 13.0], 1))
    assert str(info.value) == (
        "its update has L2 norm 13.93 from the round's global weights, beyond max-update-norm=13"
    )
    kind(GLOBAL).check(client([1e30, 0.0, 0.0], 1))  # 0: no bound


def test_the_run_config_picks_the_aggregator():
    base = {"data-dir": "unused"}
    assert type(make_aggregator(RunConfig.from_run_config(base), GLOBAL)) is FedAvg
    median = RunConfig.from_run_config(base | {"aggregation": "median", "max-update-norm": 2.0})
    agg = make_aggregator(median, GLOBAL)
    assert type(agg) is Median and agg.max_update_norm == 2.0
    cfg = RunConfig.from_run_config(base | {"aggregation": "trimmed-mean", "trim-fraction": 0.3})
    agg = make_aggregator(cfg, GLOBAL)
    assert type(agg) is TrimmedMean and agg.trim_fraction == 0.3


@pytest.mark.parametrize(
    ("key", "value", "problem"),
    [
        ("aggregation", "mean", "aggregation 'mean' not in ('fedavg', 'median', 'trimmed-mean')"),
        ("trim-fraction", 0.5, "trim-fraction must be in [0, 0.5), got 0.5"),
        ("max-update-norm", -1.0, "max-update-norm must be >= 0 (0 = no bound)"),
        ("max-activation", 0.0, "max-activation must be > 0, got 0.0"),
        ("max-weight", -2.0, "max-weight must be > 0, got -2.0"),
        ("server-grad-clip", -1.0, "server-grad-clip must be >= 0 (0 = no clipping)"),
        ("round-timeout", -5.0, "round-timeout must be >= 0 s (0 = none)"),
    ],
)
def test_bad_trust_settings_are_refused(key, value, problem):
    with pytest.raises(ValueError) as info:
        RunConfig.from_run_config({key: value})
    assert problem in str(info.value)
