"""Hydra sweeps in which every job is a real `flwr run` simulation.

    python -m flower_app.sweep -m +experiment=cpu_compare
    python -m flower_app.sweep -m method=dsl,csl split=cut3,cut6 num_clients=1,2 \
        run_config.num-rounds=10

Each job validates its run config, runs `flwr run` against a private SuperLink that the sweep
starts once and stops at exit, and leaves the results contract in its Hydra job directory
(``<sweep dir>/<job>/run/``). A job that fails is reported in one line and in
``<sweep dir>/jobs.jsonl``; the sweep goes on. `python -m flower_app.report <sweep dir>` turns
the directory into the paper's figures and a table.
"""

from __future__ import annotations

import atexit
import json
import logging
import math
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from flower_app.local_superlink import LocalSuperLink
from flower_app.results import read_rounds
from split_core.config import RunConfig

log = logging.getLogger(__name__)
_LINK: LocalSuperLink | None = None


def superlink() -> LocalSuperLink:
    """One SuperLink for the whole sweep, stopped by PID when the process exits."""
    global _LINK
    if _LINK is None:
        _LINK = LocalSuperLink(Path(tempfile.mkdtemp(prefix="sweep-flwr-home-"))).start()
        atexit.register(_LINK.stop)
    return _LINK


def run_job(cfg: DictConfig, job_dir: Path) -> dict[str, Any]:
    """Run one configuration; never raises, so that one bad job cannot stop the sweep."""
    run_config = OmegaConf.to_container(cfg.run_config, resolve=True)
    run_config |= {"output-dir": str(job_dir), "run-name": "run"}
    status: dict[str, Any] = {
        "method": run_config.get("method"),
        "cut": run_config.get("cut"),
        "num_clients": int(cfg.num_clients),
        "run_dir": str(job_dir / "run"),
    }
    t0 = time.perf_counter()
    try:
        RunConfig.from_run_config(run_config)  # a bad value fails here, before Flower starts
        result = superlink().run(
            run_config,
            clients=int(cfg.num_clients),
            cpus_per_client=float(cfg.cpus_per_client),
            gpus_per_client=float(cfg.gpus_per_client),
            timeout=float(cfg.job_timeout_s),
        )
        (job_dir / "flwr.log").write_text(result.log)
        rounds = read_rounds(result.run_dir) if (result.run_dir / "rounds.jsonl").exists() else []
        if len(rounds) == run_config["num-rounds"]:
            status |= {"status": "ok", "test_accuracy": rounds[-1]["test_accuracy"]}
        else:
            status |= {"status": "failed", "reason": failure_reason(result.log, len(rounds))}
    except Exception as exc:  # noqa: BLE001 - reported, and the sweep continues
        status |= {"status": "failed", "reason": f"{type(exc).__name__}: {exc}"}
    status["seconds"] = round(time.perf_counter() - t0, 1)
    return status


def failure_reason(flwr_log: str, rounds_done: int) -> str:
    """The run's last exception, unqualified, with the first line of its detail."""
    lines = flwr_log.splitlines()
    found = [i for i, line in enumerate(lines) if EXCEPTION_LINE.match(line)]
    if not found:
        return f"no error in the log (after {rounds_done} rounds)"
    i = found[-1]
    detail = [line.strip() for line in lines[i + 1 : i + 2] if line.startswith("  ")]
    text = " ".join([EXCEPTION_LINE.match(lines[i]).group(1), *detail])
    return f"{text} (after {rounds_done} rounds)"


EXCEPTION_LINE = re.compile(r"^(?:[a-z_][\w]*\.)*(\w*(?:Error|Exception)\b.*)$")


def total_jobs(hydra_cfg: DictConfig) -> int:
    """Size of the grid: preset sweeper params, overridden by comma lists on the command line."""
    params = {k: str(v) for k, v in (OmegaConf.select(hydra_cfg, "sweeper.params") or {}).items()}
    for arg in sys.argv[1:]:
        key, sep, value = arg.partition("=")
        if sep and not key.startswith(("hydra.", "-")):
            params[key.lstrip("+~")] = value
    return math.prod(len(v.split(",")) for v in params.values()) if params else 1


@hydra.main(version_base=None, config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    hc = HydraConfig.get()
    job_dir = Path(hc.runtime.output_dir)
    multirun = hc.mode == RunMode.MULTIRUN
    sweep_dir = Path(hc.sweep.dir) if multirun else job_dir
    number = hc.job.num + 1 if multirun else 1
    of = total_jobs(hc) if multirun else 1
    label = " ".join(hc.overrides.task) or "defaults"
    log.info("[job %s/%s] %s: running", number, of, label)
    status = {"job": number, "overrides": list(hc.overrides.task)} | run_job(cfg, job_dir)
    with (sweep_dir / "jobs.jsonl").open("a") as f:
        f.write(json.dumps(status) + "\n")
    if status["status"] == "ok":
        log.info(
            "[job %s/%s] %s: ok in %.0f s, test accuracy %.1f%%",
            number,
            of,
            label,
            status["seconds"],
            100 * status["test_accuracy"],
        )
    else:
        log.error("[job %s/%s] %s: FAILED: %s", number, of, label, status["reason"])


if __name__ == "__main__":
    main()
