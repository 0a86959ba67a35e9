"""``resume-from``: continue a recorded run under its own config, changed only where it may be.

A run is resumed in one of two ways: with ``resume-from`` alone (every other key then comes
from the recorded run), or with the config it was started with plus ``resume-from`` (as a
sweep does). A key this run gives with another value than the recorded one is

- used when it may change on resume (``MAY_CHANGE_ON_RESUME``: ``num-rounds`` 3 -> 5 extends
  a finished run; timeouts, polling, threads, where the data lies);
- ignored when it only names where results go (``output-dir``, ``run-name``): a resumed run
  writes into its own directory;
- refused otherwise, with every differing key named: a checkpoint of one experiment continued
  as another would give results that belong to neither.

"Gives" means: Flower lists the key among the run's overrides, or its value is not the
default. A key left out, or set to its default where Flower cannot say, takes the recorded
value. The checkpoint's config hash must match the recorded config, so a ``checkpoint.pt``
copied in from another run, or a ``config.json`` edited afterwards, is refused too.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flower_app.results import read_run_config
from split_core.config import ConfigError, RunConfig, default_run_config
from strategies import checkpoint as checkpoints
from strategies.checkpoint import IGNORED_ON_RESUME, MAY_CHANGE_ON_RESUME, Checkpoint

log = logging.getLogger("flwr").getChild("split")


class ResumeMismatch(ConfigError):
    """resume-from was given a config that is another experiment than the recorded run."""


@dataclass(frozen=True)
class Resume:
    cfg: RunConfig  # the recorded config, with this run's accepted changes
    checkpoint: Checkpoint
    run_dir: Path
    accepted: dict[str, list[Any]]  # key -> [recorded value, value now]
    ignored: dict[str, Any]  # key -> the value given, not used

    def note(self) -> dict[str, Any]:
        """What config.json records about this resumption."""
        return {
            "from_round": self.checkpoint.round,
            "accepted": self.accepted,
            "ignored": self.ignored,
        }


def given_keys(cfg: RunConfig, overridden: Iterable[str] = ()) -> set[str]:
    """The keys this run set: those Flower lists as overridden, and any not at its default."""
    defaults = RunConfig.from_run_config(default_run_config()).to_run_config()
    current = cfg.to_run_config()
    return set(overridden) | {k for k, v in current.items() if v != defaults.get(k)}


def prepare_resume(cfg: RunConfig, given: Iterable[str]) -> Resume:
    """The config and checkpoint to continue ``cfg.resume_from`` with, or a clear refusal."""
    run_dir = Path(cfg.resume_from).expanduser().resolve()
    recorded = RunConfig.from_run_config(read_run_config(run_dir)).to_run_config()
    current = cfg.to_run_config()
    differing = {
        k for k in set(given) - {"resume-from"} if k in current and current[k] != recorded[k]
    }
    refused = sorted(differing - MAY_CHANGE_ON_RESUME - IGNORED_ON_RESUME)
    if refused:
        diffs = ", ".join(f"{k} (recorded {recorded[k]!r}, given {current[k]!r})" for k in refused)
        raise ResumeMismatch(
            f"resume-from '{run_dir}' refused: this run is another experiment than the recorded "
            f"one; differing keys: {diffs}. Leave these keys out (or give the recorded values) "
            f"to resume, or start a new run. Keys that may change on resume: "
            f"{', '.join(sorted(MAY_CHANGE_ON_RESUME))}"
        )
    accepted = {k: [recorded[k], current[k]] for k in sorted(differing & MAY_CHANGE_ON_RESUME)}
    ignored = {k: current[k] for k in sorted(differing & IGNORED_ON_RESUME)}
    changes = {k: now for k, (_, now) in accepted.items()}
    resolved = RunConfig.from_run_config(recorded | changes | {"resume-from": str(run_dir)})
    checkpoint = checkpoints.load(run_dir)
    expected = checkpoints.config_hash(resolved.to_run_config())
    if checkpoint.config_hash != expected:
        raise checkpoints.CheckpointError(
            f"{run_dir / checkpoints.CHECKPOINT} was not written by the run that "
            f"{run_dir / 'config.json'} records (config hash {checkpoint.config_hash[:12]!r}, "
            f"expected {expected[:12]!r}): it was copied from another run, or config.json "
            "was edited. Refusing to resume"
        )
    if checkpoint.round > resolved.num_rounds:
        raise ResumeMismatch(
            f"resume-from '{run_dir}': num-rounds {resolved.num_rounds} is fewer than the "
            f"{checkpoint.round} rounds its checkpoint holds"
        )
    resume = Resume(resolved, checkpoint, run_dir, accepted, ignored)
    for key, (was, now) in accepted.items():
        log.info("resume: %s changed from %r to %r", key, was, now)
    for key, value in ignored.items():
        log.info("resume: %s=%r ignored; results stay in %s", key, value, run_dir)
    return resume
