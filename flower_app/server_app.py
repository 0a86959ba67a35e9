"""Flower ServerApp: check the config, meet the clients, run the split-learning strategy."""

from __future__ import annotations

import logging
import platform

import flwr
import torch
from flwr.app import ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp

from flower_app.results import ResultsWriter, summary_table
from models import cut_shape
from split_core.config import RunConfig
from strategies.split_strategy import SplitLearningStrategy

app = ServerApp()
log = logging.getLogger("flwr").getChild("split")


@app.main()
def main(grid: Grid, context: Context) -> None:
    run(grid, RunConfig.from_run_config(context.run_config))


def run(
    grid: Grid, cfg: RunConfig, strategy_class: type[SplitLearningStrategy] = SplitLearningStrategy
) -> SplitLearningStrategy:
    """Everything a run does, for any Grid; the config is already valid when this starts."""
    strategy = strategy_class(cfg)
    clients = strategy.connect(grid)
    torch.set_num_threads(cfg.torch_threads(cfg.server_threads, len(clients)))
    writer = ResultsWriter(cfg, len(clients))
    strategy.on_round = writer.write_round
    writer.write_config(
        {
            "clients": [vars(c) for c in clients],
            "cut_shape": list(cut_shape(cfg.depth, cfg.cut)),
            "device": str(strategy.server.device),
            "setup_failures": {str(k): v for k, v in strategy.setup_failures.items()},
            "versions": {
                "flwr": flwr.__version__,
                "torch": torch.__version__,
                "python": platform.python_version(),
            },
        }
    )
    log.info("results: %s", writer.run_dir)
    result = strategy.start(grid, strategy.initial_arrays(), num_rounds=cfg.num_rounds)
    writer.write_model(
        {
            "client": _state_dict(result.arrays),
            "server_segment": strategy.server.state_dict(),
        }
    )
    log.info("summary of %s\n%s", writer.run_dir, summary_table(strategy.history))
    return strategy


def _state_dict(arrays: ArrayRecord) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(v.numpy()) for k, v in arrays.items()}
