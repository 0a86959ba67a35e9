"""Sweeps in which every job is a real `flwr run` simulation, and that survive being killed.

    python -m experiments.sweep +experiment=grid                     # a preset's list of jobs
    python -m experiments.sweep -m +experiment=cpu_compare hydra.sweep.dir=multirun/cpu
    python -m experiments.sweep -m method=dsl,csl split=cut3,cut6 num_clients=1,2 \
        run_config.num-rounds=10 hydra.sweep.dir=multirun/mine

Two kinds of sweep: Hydra's ``-m`` makes the cartesian product of comma lists (and of a
preset's ``hydra.sweeper.params``); a preset with ``jobs:`` (a list of override lists, see
conf/experiment/grid.yaml) runs exactly those jobs, in that order, without ``-m``.

Each job lives in ``<sweep dir>/<name>/``, where the name is made of the overrides that set the
job apart (its ``jobs:`` entry, or the values ``-m`` varies), never of a job number, so editing
a grid never renames a job. Its run goes to ``<name>/run/``, `flwr run`'s output to
``<name>/flwr.log``. Running the same command again therefore finds every job where it was:

- ``done``: the run has all its rounds and model.pt: skipped;
- ``resumed``: the run has a checkpoint: continued from it (``resume-from``) with the same config;
- ``fresh``: nothing to continue: started from round 1 (a partial run without a checkpoint is
  moved aside to ``run.partial-<time>/``, never deleted);
- ``failed``: and why (a run of another config in the directory, a crash, a timeout).

While a job runs, one line per round; a job past ``job_timeout_s`` is stopped with `flwr stop`
(its checkpoint stays: the next invocation resumes it). The sweep ends with a status table,
also written to ``<sweep dir>/status.md``; ``<sweep dir>/jobs.jsonl`` gets a line per job per
invocation. Safe to run as ``nohup nice -n 19 python -m experiments.sweep ... &`` and to kill
at any time: see experiments/sweep_session.py. `python -m experiments.report <sweep dir>` turns
the directory into the paper's figures and a table.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from experiments.sweep_session import SweepSession, complete_rounds, follow_run
from flower_app.results import read_run_config
from split_core.config import ConfigError, RunConfig
from strategies.checkpoint import IGNORED_ON_RESUME, MAY_CHANGE_ON_RESUME

log = logging.getLogger(__name__)

# Hydra's configs: conf/ in a checkout; an installed wheel carries them as experiments/conf.
_HERE = Path(__file__).resolve().parent
CONF_DIR = _HERE / "conf" if (_HERE / "conf").is_dir() else _HERE.parent / "conf"


# --- naming: a job is what sets it apart from the other jobs of its sweep ------------------


def command_line_overrides() -> set[str]:
    """``key=value`` arguments of this process: given once, so shared by every job."""
    return {a for a in sys.argv[1:] if "=" in a and not a.startswith(("-", "hydra."))}


def varied(task_overrides: list[str]) -> list[str]:
    """A ``-m`` job's overrides less those typed once on the command line."""
    shared = command_line_overrides()
    return [o for o in task_overrides if o not in shared]


def job_name(overrides: list[str]) -> str:
    """A directory name made of the overrides, stable across invocations; long or unsafe
    ones (paths) are cut and made unique by a hash of the full text."""
    text = ",".join(o.lstrip("+~").removeprefix("run_config.") for o in overrides) or "defaults"
    safe = re.sub(r"[^A-Za-z0-9._,=+-]", "_", text)
    if safe != text or len(safe) > 100:
        safe = f"{safe[:80]}-{hashlib.sha1(text.encode()).hexdigest()[:10]}"
    return safe


def job_label(overrides: list[str]) -> str:
    """Short words for log lines: ``csl cut6 k1 seed1 aux-head=conv_mlp``."""
    words = []
    for override in overrides:
        key, _, value = override.lstrip("+~").partition("=")
        key = key.removeprefix("run_config.")
        value = value if len(value) <= 30 else "..." + value[-27:]
        if key in ("method", "split", "model", "dataset", "partition", "experiment"):
            words.append(value)
        elif key in ("num_clients", "seed"):
            words.append(("k" if key == "num_clients" else "seed") + value)
        else:
            words.append(f"{key}={value}")
    return " ".join(words) or "defaults"


def _sweep_job_subdir(*, _root_: DictConfig) -> str:
    """``hydra.sweep.subdir`` of a ``-m`` job (conf/config.yaml): its name, not its number."""
    return job_name(varied(list(OmegaConf.select(_root_, "hydra.overrides.task") or [])))


OmegaConf.register_new_resolver("sweep_job", _sweep_job_subdir, replace=True)


@dataclass
class Job:
    number: int
    total: int
    overrides: list[str]  # what sets it apart; names its directory
    cfg: DictConfig
    job_dir: Path

    @property
    def tag(self) -> str:
        return f"[job {self.number}/{self.total} {job_label(self.overrides)}]"


def explicit_jobs(cfg: DictConfig, shared: list[str], sweep_dir: Path) -> list[Job]:
    """A ``jobs:`` preset's jobs: each composed from the command line's overrides, then its own
    (which win where both set a key)."""
    entries = [[str(o) for o in entry] for entry in cfg.jobs]
    names = [job_name(e) for e in entries]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ConfigError(f"jobs: listed more than once: {', '.join(twice)}")
    jobs = []
    for number, (entry, name) in enumerate(zip(entries, names, strict=True), 1):
        keys = {_override_key(o) for o in entry}
        overrides = [o for o in shared if _override_key(o) not in keys] + entry
        composed = hydra.compose(config_name="config", overrides=overrides)
        jobs.append(Job(number, len(entries), entry, composed, sweep_dir / name))
    return jobs


def _override_key(override: str) -> str:
    return override.lstrip("+~").partition("=")[0]


def total_jobs(hydra_cfg: DictConfig) -> int:
    """Size of a ``-m`` grid: preset sweeper params, overridden by comma lists."""
    params = {k: str(v) for k, v in (OmegaConf.select(hydra_cfg, "sweeper.params") or {}).items()}
    for arg in sys.argv[1:]:
        key, sep, value = arg.partition("=")
        if sep and not key.startswith(("hydra.", "-")):
            params[key.lstrip("+~")] = value
    return math.prod(len(v.split(",")) for v in params.values()) if params else 1


# --- one job ---------------------------------------------------------------------------------


@dataclass
class Found:
    """What a job's directory holds: ``done``, ``resume``, ``fresh`` or ``mismatch``."""

    state: str
    rounds: list[dict[str, Any]] = field(default_factory=list)
    detail: str = ""


def inspect_run_dir(run_dir: Path, run_config: dict[str, Any]) -> Found:
    """Whether the job's run is done, can be resumed, or must start (again) from round 1."""
    if not run_dir.exists():
        return Found("fresh")
    if not (run_dir / "config.json").is_file():
        return Found("fresh", detail="no config.json: stopped before its set-up ended")
    try:
        recorded = RunConfig.from_run_config(read_run_config(run_dir)).to_run_config()
    except (ConfigError, ValueError, KeyError) as exc:
        return Found("mismatch", detail=f"its config.json cannot be read ({exc})")
    wanted = RunConfig.from_run_config(run_config).to_run_config()
    free = MAY_CHANGE_ON_RESUME | IGNORED_ON_RESUME
    differ = [k for k in sorted(wanted) if k not in free and recorded.get(k) != wanted[k]]
    if differ:
        diffs = ", ".join(f"{k} (recorded {recorded.get(k)!r}, now {wanted[k]!r})" for k in differ)
        return Found("mismatch", detail=f"{run_dir} holds a run of another config: {diffs}")
    rounds = complete_rounds(run_dir)
    if len(rounds) == wanted["num-rounds"] == recorded["num-rounds"] and _model_ok(run_dir):
        return Found("done", rounds)
    if (run_dir / "checkpoint.pt").is_file():
        return Found("resume", rounds)
    return Found("fresh", rounds, detail="no checkpoint to continue")


def _model_ok(run_dir: Path) -> bool:
    """model.pt is written last and not atomically: a run killed while writing it is not done."""
    try:
        torch.load(run_dir / "model.pt", weights_only=True)
    except Exception:  # noqa: BLE001 - missing, cut off or unreadable: not done
        return False
    return True


def move_aside(run_dir: Path) -> Path:
    aside = run_dir.with_name(f"run.partial-{time.strftime('%Y%m%d-%H%M%S')}")
    run_dir.rename(aside)
    return aside


def run_job(session: SweepSession, job: Job) -> dict[str, Any]:
    """Run, resume or skip one job; never raises, so one bad job cannot stop the sweep."""
    cfg, run_dir = job.cfg, job.job_dir / "run"
    run_config = OmegaConf.to_container(cfg.run_config, resolve=True)
    run_config |= {"output-dir": str(job.job_dir.resolve()), "run-name": "run"}
    num_rounds = int(run_config["num-rounds"])
    status: dict[str, Any] = {
        "job": job.number,
        "name": job.job_dir.name,
        "overrides": job.overrides,
        "label": job_label(job.overrides),
        "method": run_config.get("method"),
        "cut": run_config.get("cut"),
        "num_clients": int(cfg.num_clients),
        "num_rounds": num_rounds,
        "run_dir": str(run_dir),
        "reason": "",
    }
    t0 = time.monotonic()
    try:
        RunConfig.from_run_config(run_config)  # a bad value fails here, before Flower starts
        found = inspect_run_dir(run_dir, run_config)
        if found.state == "mismatch":
            return status | _result(
                "failed",
                found.rounds,
                f"{found.detail}; use another hydra.sweep.dir, or move that directory aside",
                t0,
            )
        if found.state == "done":
            log.info("%s done before: %d rounds, skipped", job.tag, len(found.rounds))
            return status | _result("done", found.rounds, "", t0)
        if found.state == "resume":
            log.info("%s resuming after round %d of %d", job.tag, len(found.rounds), num_rounds)
            run_config["resume-from"] = str(run_dir.resolve())
        elif run_dir.exists():
            aside = move_aside(run_dir)
            log.warning("%s %s: moved %s aside to %s", job.tag, found.detail, run_dir, aside.name)
        if found.state != "resume":
            log.info("%s starting", job.tag)
        job.job_dir.mkdir(parents=True, exist_ok=True)
        log_path = job.job_dir / "flwr.log"
        with log_path.open("a") as f:
            f.write(f"\n===== {time.strftime('%Y-%m-%d %H:%M:%S')} {found.state} =====\n")
        outcome = follow_run(
            session,
            run_config,
            run_dir,
            log_path,
            clients=int(cfg.num_clients),
            cpus_per_client=float(cfg.cpus_per_client),
            gpus_per_client=float(cfg.gpus_per_client),
            timeout=float(cfg.job_timeout_s),
            on_round=lambda r: log.info(round_line(job, r, num_rounds)),
        )
        rounds = complete_rounds(run_dir)
        if len(rounds) == num_rounds and _model_ok(run_dir):
            return status | _result(
                "resumed" if found.state == "resume" else "fresh", rounds, "", t0
            )
        if outcome.timed_out:
            again = "resumes it" if (run_dir / "checkpoint.pt").is_file() else "starts it again"
            reason = (
                f"timed out after {cfg.job_timeout_s} s (job_timeout_s), {len(rounds)} of "
                f"{num_rounds} rounds; {outcome.stop_note}; the next run {again}"
            )
        else:
            reason = failure_reason(outcome.log, len(rounds))
            if outcome.stop_note:
                reason += f"; {outcome.stop_note}"
        return status | _result("failed", rounds, reason, t0)
    except Exception as exc:  # noqa: BLE001 - reported, and the sweep continues
        return status | _result("failed", [], f"{type(exc).__name__}: {exc}", t0)
    except (KeyboardInterrupt, SystemExit):  # the sweep was stopped: list the job, then stop
        reason = "the sweep was stopped; the same command resumes it"
        Sweep.statuses.append(status | _result("interrupted", complete_rounds(run_dir), reason, t0))
        raise


def _result(state: str, rounds: list[dict[str, Any]], reason: str, t0: float) -> dict[str, Any]:
    return {
        "status": state,
        "rounds": len(rounds),
        "test_accuracy": rounds[-1]["test_accuracy"] if rounds else None,
        "reason": reason,
        "seconds": round(time.monotonic() - t0, 1),
    }


def round_line(job: Job, record: dict[str, Any], num_rounds: int) -> str:
    acc = record.get("test_accuracy")
    acc_text = "n/a" if acc is None else f"{100 * acc:.1f} %"
    return (
        f"{job.tag} round {record['round']}/{num_rounds}: test {acc_text}, "
        f"{record.get('round_seconds', float('nan')):.0f} s"
    )


def failure_reason(flwr_log: str, rounds_done: int) -> str:
    """The run's last exception, unqualified, with the first line of its detail."""
    lines = flwr_log.splitlines()
    found = [i for i, line in enumerate(lines) if EXCEPTION_LINE.match(line)]
    if not found:
        last = next((line.strip() for line in reversed(lines) if line.strip()), "")
        return f"no error in the log (after {rounds_done} rounds); its last line: {last[:200]}"
    i = found[-1]
    detail = [line.strip() for line in lines[i + 1 : i + 2] if line.startswith("  ")]
    text = " ".join([EXCEPTION_LINE.match(lines[i]).group(1), *detail])
    return f"{text} (after {rounds_done} rounds)"


EXCEPTION_LINE = re.compile(r"^(?:[a-z_][\w]*\.)*(\w*(?:Error|Exception)\b.*)$")


# --- the table -------------------------------------------------------------------------------


def status_table(statuses: list[dict[str, Any]], total: int) -> str:
    rows = [("job", "status", "rounds", "test acc", "reason")]
    for s in statuses:
        acc = s.get("test_accuracy")
        rows.append(
            (
                f"{s['job']}/{total} {s['label']}",
                s["status"],
                f"{s['rounds']}/{s['num_rounds']}",
                "" if acc is None else f"{100 * acc:.1f} %",
                s["reason"],
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(r[:4], widths, strict=True)) + "  " + r[4]
        for r in rows
    ]
    kinds = ["done", "resumed", "fresh", "failed"]
    kinds += ["interrupted"] if any(s["status"] == "interrupted" for s in statuses) else []
    counts = {k: sum(s["status"] == k for s in statuses) for k in kinds}
    summary = ", ".join(f"{v} {k}" for k, v in counts.items())
    return "\n".join([*(line.rstrip() for line in lines), f"{len(statuses)} jobs: {summary}"])


# --- Hydra entry point -----------------------------------------------------------------------


class Sweep:
    """The state of this invocation: its session (opened at the first job) and the statuses."""

    session: SweepSession | None = None
    statuses: list[dict[str, Any]] = []
    total = 0

    @classmethod
    def record(cls, sweep_dir: Path, status: dict[str, Any]) -> None:
        cls.statuses.append(status)
        with (sweep_dir / "jobs.jsonl").open("a") as f:
            f.write(json.dumps(status | {"time": time.strftime("%Y-%m-%d %H:%M:%S")}) + "\n")
        line = f"[job {status['job']}/{cls.total} {status['label']}] {status['status']}"
        if status["status"] == "failed":
            log.error("%s: %s", line, status["reason"])
        elif status["test_accuracy"] is not None:
            log.info("%s: test accuracy %.1f %%", line, 100 * status["test_accuracy"])

    @classmethod
    def finish(cls) -> None:
        if cls.session is None:
            return
        sweep_dir = cls.session.sweep_dir
        cls.session.close()
        cls.session = None
        if cls.statuses:
            table = status_table(cls.statuses, cls.total)
            (sweep_dir / "status.md").write_text(f"```\n{table}\n```\n")
            print(f"\nsweep {sweep_dir}\n{table}", flush=True)


@hydra.main(version_base=None, config_path=str(CONF_DIR), config_name="config")
def main(cfg: DictConfig) -> None:
    hc = HydraConfig.get()
    multirun = hc.mode == RunMode.MULTIRUN
    task = list(hc.overrides.task)
    if "jobs" in cfg and multirun and total_jobs(hc) > 1:
        raise ConfigError("a preset with jobs: runs its own list of jobs: leave out -m and lists")
    # a list of jobs, or -m: the sweep dir; one plain job: its Hydra run dir
    sweep_dir = Path(hc.sweep.dir if multirun or "jobs" in cfg else hc.runtime.output_dir)
    if Sweep.session is None:
        Sweep.session = SweepSession(sweep_dir).open()
    if "jobs" in cfg:
        jobs = explicit_jobs(cfg, task, sweep_dir)
    elif multirun:
        job_dir = Path(hc.runtime.output_dir)
        jobs = [Job(hc.job.num + 1, total_jobs(hc), varied(task), cfg, job_dir)]
    else:
        jobs = [Job(1, 1, task, cfg, sweep_dir)]
    for job in jobs:
        Sweep.total = job.total
        Sweep.record(sweep_dir, run_job(Sweep.session, job))


def _exit_on_signal(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _exit_on_signal)
    if signal.getsignal(signal.SIGHUP) is not signal.SIG_IGN:  # nohup ignores it: keep that
        signal.signal(signal.SIGHUP, _exit_on_signal)
    try:
        main()
    finally:
        Sweep.finish()
