"""The privacy lens: bias-corrected distance correlation between inputs and cut activations."""

from __future__ import annotations

import pytest
import torch

from split_core.client import SplitClient
from split_core.config import RunConfig
from split_core.payload import encode_modules
from split_core.privacy import distance_correlation
from split_core.protocol import EvaluateRequest
from tests.conftest import TINY, data_dir

G = torch.Generator().manual_seed(0)
X = torch.randn(64, 3, 8, 8, generator=G)


def test_a_batch_with_itself_or_a_similarity_transform_is_one():
    assert distance_correlation(X, X) == pytest.approx(1.0)
    assert distance_correlation(X, -2.5 * X + 7) == pytest.approx(1.0)


def test_independent_batches_are_near_zero_despite_high_dimension():
    """The plain (V-statistic) estimator gives about 0.76 here; the corrected one about 0."""
    z = torch.randn(64, 16, 32, 32, generator=G)
    assert distance_correlation(X, z) < 0.1


def test_it_falls_as_noise_drowns_the_signal():
    values = [
        distance_correlation(X, X + s * torch.randn(X.shape, generator=G)) for s in (0.1, 1, 10)
    ]
    assert values[0] > values[1] > values[2]


def test_bad_batches_are_refused():
    with pytest.raises(ValueError, match="need two batches of the same n >= 4, got 64 and 3"):
        distance_correlation(X, X[:3])


def test_the_client_reports_the_probe_with_the_first_evaluation_of_a_round():
    cfg = RunConfig.from_run_config(TINY | {"data-dir": data_dir(), "probe-samples": 32})
    client = SplitClient.create(cfg, 0, 1, cfg.data_dir)
    first = client.evaluate(EvaluateRequest(1, encode_modules(client.modules))).metrics
    assert 0.0 < first.probe_dcor <= 1.0 and first.probe_count == 1
    assert all(m.training for m in client.modules["segment"].modules())
    if not first.done:
        later = client.evaluate(EvaluateRequest(1)).metrics
        assert (later.probe_dcor, later.probe_count) == (0.0, 0)
    off = RunConfig.from_run_config(TINY | {"data-dir": data_dir(), "probe-samples": 0})
    silent = SplitClient.create(off, 0, 1, off.data_dir)
    metrics = silent.evaluate(EvaluateRequest(1, encode_modules(silent.modules))).metrics
    assert (metrics.probe_dcor, metrics.probe_count) == (0.0, 0)
