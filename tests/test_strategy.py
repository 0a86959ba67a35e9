"""The strategy's contract with Flower's ``Strategy``, and a whole run through an in-memory grid.

``app_grid`` (tests/memory_grid.py) is our own Grid: it hands each message to the real
ClientApp in this process, one ``Context`` per node, as a SuperNode would, with no Flower engine
in between. Real Flower runs are in test_flower_runs.py; this one is fast enough for the quick
tier.
"""

from __future__ import annotations

import pytest
import torch
from flwr.app import ConfigRecord, MetricRecord

from experiments import reference
from flower_app import client_app
from split_core.config import RunConfig
from strategies.split_strategy import SplitLearningStrategy
from tests.conftest import TINY, data_dir
from tests.memory_grid import app_grid

pytestmark = pytest.mark.usefixtures("task_identity")  # messages are built outside a run
SMALL = TINY | {"samples-per-client": 64, "test-samples": 32, "probe-samples": 0}


def _cfg(**extra) -> RunConfig:
    return RunConfig.from_run_config(SMALL | {"data-dir": data_dir()} | extra)


@pytest.mark.parametrize(
    "method", [{"method": "csl"}, {"method": "dsl", "feedback-every": 2, "num-rounds": 1}]
)
def test_a_run_through_the_real_client_app_equals_the_reference(method):
    """Same turn order, same steps, same wire: the server segment ends bit for bit equal to
    the in-process reference's; and ``evaluate_fn`` is called before round 1 and after each."""
    cfg = _cfg(**method)
    grid, strategy, calls = app_grid(client_app.app, 2), SplitLearningStrategy(cfg), []

    def evaluate_fn(rnd: int, arrays) -> MetricRecord:
        calls.append(rnd)
        return MetricRecord({"tensors": len(arrays)})

    strategy.connect(grid, settle_seconds=0.0)
    arrays = strategy.initial_arrays()
    result = strategy.start(grid, arrays, cfg.num_rounds, evaluate_fn=evaluate_fn)
    ref = reference.train(cfg, num_clients=2)
    for key, value in ref.server.segment.state_dict().items():
        assert torch.equal(strategy.server.segment.state_dict()[key], value), key
    assert [r["test_accuracy"] for r in strategy.history] == [
        r["test_accuracy"] for r in ref.history
    ]
    rounds = cfg.num_rounds
    assert [r["failed_clients"] for r in strategy.history] == [0] * rounds
    assert [r["bytes_gradients"] > 0 for r in strategy.history] == [True] * rounds
    assert calls == list(range(rounds + 1))
    assert dict(result.evaluate_metrics_serverapp[rounds]) == {"tensors": len(arrays)}
    expected = [{"tensors": len(arrays)}] * rounds
    assert [r["server_evaluation"] for r in strategy.history] == expected


def test_aggregate_hooks_point_to_where_aggregation_happens():
    strategy = SplitLearningStrategy(_cfg())
    for hook in (strategy.aggregate_train, strategy.aggregate_evaluate):
        with pytest.raises(NotImplementedError, match=r"TrainPhase\.consume"):
            hook(1, [])


@pytest.mark.parametrize("argument", ["train_config", "evaluate_config"])
def test_start_refuses_client_configs_naming_them(argument):
    strategy = SplitLearningStrategy(_cfg())
    with pytest.raises(ValueError) as info:
        strategy.start(None, None, **{argument: ConfigRecord({"lr": 0.01})})
    assert str(info.value) == (
        f"SplitLearningStrategy does not take {argument}: clients take every setting from the "
        "run config at set-up (query.setup); pass ['lr'] as run-config keys"
    )
