"""Flower ServerApp: check the config, meet the clients, run the split-learning strategy."""

from __future__ import annotations

import logging
import platform
from collections.abc import Iterable

import flwr
import torch
from flwr.app import ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp

from flower_app.results import ResultsWriter, check_new_run_dir, named_run_dir, summary_table
from flower_app.resume import given_keys, prepare_resume
from flower_app.run_control import StopCheck
from models import cut_shape
from split_core.config import RunConfig
from strategies.exchange import RunStopped
from strategies.nodes import TooFewClients
from strategies.split_strategy import SplitLearningStrategy

app = ServerApp()
log = logging.getLogger("flwr").getChild("split")


@app.main()
def main(grid: Grid, context: Context) -> None:
    run(grid, RunConfig.from_run_config(context.run_config), given=grid.run.override_config)


def run(
    grid: Grid,
    cfg: RunConfig,
    strategy_class: type[SplitLearningStrategy] = SplitLearningStrategy,
    given: Iterable[str] = (),
) -> SplitLearningStrategy:
    """Everything a run does, for any Grid; the config is already valid when this starts.

    With ``resume-from``, the run recorded in that directory continues from its checkpoint
    under its recorded config, changed only in the keys that may change on resume
    (``flower_app.resume``); ``given`` names the keys this run's caller set (Flower's
    overrides). A run that runs out of clients ends cleanly, resumable.
    """
    resume = prepare_resume(cfg, given_keys(cfg, given)) if cfg.resume_from else None
    if resume is not None:
        cfg = resume.cfg
    elif (named := named_run_dir(cfg)) is not None:
        check_new_run_dir(named)  # before set-up: a mistake costs nothing
    strategy = strategy_class(cfg, should_stop=StopCheck())
    if resume is not None:
        strategy.restore(resume.checkpoint)
        log.info(
            "resuming %s after round %d of %d",
            resume.run_dir,
            resume.checkpoint.round,
            cfg.num_rounds,
        )
    clients = strategy.connect(grid)
    torch.set_num_threads(cfg.torch_threads(cfg.server_threads, len(clients)))
    run_dir = resume.run_dir if resume is not None else None
    writer = ResultsWriter(cfg, len(clients), run_dir, strategy.history)
    writer.checkpoint_round = resume.checkpoint.round if resume is not None else None
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
        | (resume.note() if resume is not None else {})
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
    except TooFewClients as too_few:
        end_early(strategy, writer, too_few)
        return strategy
    write_model(writer, strategy, result.arrays)
    log.info("summary of %s\n%s", writer.run_dir, summary_table(strategy.history))
    return strategy


def end_early(strategy: SplitLearningStrategy, writer: ResultsWriter, reason: Exception) -> None:
    """Fewer than min-clients are left: keep what the finished rounds made, and say, in one
    line, why the run ended and how to continue it. Raised before a round trains, so the
    global weights and the server segment are those of the last recorded round."""
    done = len(strategy.history)
    if done and strategy.global_arrays is not None:
        write_model(writer, strategy, strategy.global_arrays)
    if writer.checkpoint_round is None:
        how = "no checkpoint was written to resume from"
    else:
        how = (
            f"continue from round {writer.checkpoint_round} with "
            f"resume-from='{writer.run_dir}' once enough clients are back (or with a lower "
            "min-clients)"
        )
    why = " ".join(str(reason).split())  # one line, whatever the reasons held
    log.warning("run ended early, %s; %d rounds recorded in %s; %s", why, done, writer.run_dir, how)


def write_model(
    writer: ResultsWriter, strategy: SplitLearningStrategy, arrays: ArrayRecord
) -> None:
    writer.write_model(
        {"client": _state_dict(arrays), "server_segment": strategy.server.state_dict()}
    )


def _state_dict(arrays: ArrayRecord) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(v.numpy()) for k, v in arrays.items()}
