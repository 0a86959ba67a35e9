"""Flower ServerApp: check the config, meet the clients, run the split-learning strategy."""

from __future__ import annotations

import logging
import platform
from pathlib import Path

import flwr
import torch
from flwr.app import ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp

from flower_app.results import ResultsWriter, read_run_config, summary_table
from flower_app.run_control import stop_requested
from models import cut_shape
from split_core.config import RunConfig
from strategies import checkpoint as checkpoints
from strategies.exchange import RunStopped
from strategies.split_strategy import SplitLearningStrategy

app = ServerApp()
log = logging.getLogger("flwr").getChild("split")


@app.main()
def main(grid: Grid, context: Context) -> None:
    run(grid, RunConfig.from_run_config(context.run_config))


def run(
    grid: Grid, cfg: RunConfig, strategy_class: type[SplitLearningStrategy] = SplitLearningStrategy
) -> SplitLearningStrategy:
    """Everything a run does, for any Grid; the config is already valid when this starts.

    With ``resume-from``, the run recorded in that directory continues from its checkpoint,
    with its own recorded config, to its own num-rounds.
    """
    run_dir = Path(cfg.resume_from).expanduser().resolve() if cfg.resume_from else None
    if run_dir is not None:
        recorded = read_run_config(run_dir) | {"resume-from": str(run_dir)}
        cfg = RunConfig.from_run_config(recorded)
    strategy = strategy_class(cfg, should_stop=stop_requested)
    if run_dir is not None:
        checkpoint = checkpoints.load(run_dir)
        strategy.restore(checkpoint)
        log.info("resuming %s after round %d of %d", run_dir, checkpoint.round, cfg.num_rounds)
    clients = strategy.connect(grid)
    torch.set_num_threads(cfg.torch_threads(cfg.server_threads, len(clients)))
    writer = ResultsWriter(cfg, len(clients), run_dir, strategy.history)
    strategy.on_round, strategy.on_checkpoint = writer.write_round, writer.write_checkpoint
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
    try:
        result = strategy.start(grid, strategy.initial_arrays(), num_rounds=cfg.num_rounds)
    except RunStopped as stopped:
        done = len(strategy.history)
        log.warning(
            "%s: %d rounds recorded; continue with resume-from='%s'", stopped, done, writer.run_dir
        )
        return strategy
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
