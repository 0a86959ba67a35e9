"""Periodic feedback (DSL's alpha): every k-th batch gets the server's gradient back.

In process (the reference trainer: the very steps of the Flower apps) and through real Flower
runs: k=1, alpha=1, aux-weight=0 is CSL; k=0 is DSL whatever alpha says; k=2 sends half of
CSL's gradient bytes.
"""

from __future__ import annotations

import math

import pytest
import torch

from experiments import reference
from flower_app.results import read_rounds
from models import cut_shape
from split_core.config import RunConfig
from tests.conftest import TINY, data_dir

FEEDBACK_AS_CSL = {"method": "dsl", "feedback-every": 1, "feedback-alpha": 1.0, "aux-weight": 0.0}


def _train(**extra) -> reference.ReferenceRun:
    config = TINY | {"data-dir": data_dir(), "samples-per-client": 128, "num-rounds": 2} | extra
    return reference.train(RunConfig.from_run_config(config), num_clients=2)


def _segments_equal(a: reference.ReferenceRun, b: reference.ReferenceRun) -> None:
    wa, wb = reference.client_weights(a), reference.client_weights(b)
    segment = [k for k in wb if k.startswith("segment.")]
    assert segment and all(
        torch.equal(torch.from_numpy(wa[k]), torch.from_numpy(wb[k])) for k in segment
    )
    for key, value in b.server.segment.state_dict().items():
        assert torch.equal(a.server.segment.state_dict()[key], value), key


def test_feedback_every_batch_without_aux_loss_is_csl():
    _segments_equal(_train(**FEEDBACK_AS_CSL), _train(method="csl"))


def test_feedback_every_zero_is_dsl_whatever_alpha():
    run, dsl = _train(method="dsl", **{"feedback-alpha": 0.3}), _train(method="dsl")
    _segments_equal(run, dsl)
    got, want = reference.client_weights(run), reference.client_weights(dsl)
    assert got.keys() == want.keys()
    assert all(torch.equal(torch.from_numpy(got[k]), torch.from_numpy(want[k])) for k in want)


def test_feedback_changes_the_client_update():
    """k=2 with alpha=1: the client learns from the server on every second batch."""
    plain, fed = _train(method="dsl"), _train(method="dsl", **{"feedback-every": 2})
    wp, wf = reference.client_weights(plain), reference.client_weights(fed)
    assert any(not torch.equal(torch.from_numpy(wp[k]), torch.from_numpy(wf[k])) for k in wp)


@pytest.mark.slow
def test_feedback_through_flower(flwr_run):
    """Real runs: k=1/alpha=1/beta=0 reproduces CSL (in process: bit for bit, above); k=2 halves
    the gradient bytes; both match the in-process reference."""
    base = TINY | {"samples-per-client": 128, "num-rounds": 1, "test-samples": 64}
    runs = {}
    for name, extra in (
        ("as-csl", FEEDBACK_AS_CSL),
        ("every-2", {"method": "dsl", "feedback-every": 2}),
    ):
        log, run_dir = flwr_run(f"feedback-{name}", base | extra)
        assert (run_dir / "model.pt").exists(), log[-3000:]
        runs[name] = (read_rounds(run_dir)[0], torch.load(run_dir / "model.pt"))

    per_sample = math.prod(cut_shape(base["depth"], base["cut"])) * 4
    as_csl, every2 = runs["as-csl"][0], runs["every-2"][0]
    assert as_csl["bytes_gradients"] == as_csl["bytes_activations"] == 2 * 128 * per_sample
    assert every2["bytes_gradients"] == 2 * 64 * per_sample  # batches 1 and 3 of 4, 2 clients
    assert every2["bytes_activations"] == as_csl["bytes_activations"]

    for name, extra in (("as-csl", {"method": "csl"}), ("every-2", {"feedback-every": 2})):
        cfg = RunConfig.from_run_config(base | {"data-dir": data_dir(), "method": "dsl"} | extra)
        ref = reference.train(cfg, num_clients=2)
        for key, value in ref.server.segment.state_dict().items():
            torch.testing.assert_close(
                runs[name][1]["server_segment"][key], value, rtol=1e-5, atol=1e-5
            )
