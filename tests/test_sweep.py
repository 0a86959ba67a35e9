"""Sweeps: real `flwr run` jobs, a sweep killed with SIGKILL and resumed, the grid preset.

The slow tests run real Flower simulations in a sweep subprocess; the others check the parts
that decide what a re-run does (job names, what a job directory holds), the grid preset and
the tagged-process cleanup, in seconds.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from deploy.local_superlink import process_alive
from experiments.report import COLUMNS, load_runs, make_report
from experiments.sweep import explicit_jobs, inspect_run_dir, job_label, job_name, status_table
from experiments.sweep_session import TOKEN_VAR, cmdline, kill_tagged, tagged_pids
from split_core.config import RunConfig
from tests.conftest import ROOT, TINY, data_dir

TINY_OVERRIDES = [f"run_config.{k}={v}" for k, v in (TINY | {"num-rounds": 1}).items()]
METRICS = ("test_accuracy", "test_loss", "train_loss", "bytes_train_total")


# --- naming and what a job directory holds -------------------------------------------------


def test_job_names_are_the_overrides_and_stay_short_and_safe():
    assert job_name(["method=csl", "split=cut6", "run_config.seed=1"]) == (
        "method=csl,split=cut6,seed=1"
    )
    assert job_name([]) == "defaults"
    long = job_name(["run_config.data-dir=/a/b", "method=dsl"])
    assert long.startswith("data-dir=_a_b,method=dsl-") and len(long) == 35
    assert long != job_name(["run_config.data-dir=/a_b", "method=dsl"])  # "_" vs "/": a hash
    assert job_label(["method=csl", "split=cut6", "num_clients=1", "run_config.seed=1"]) == (
        "csl cut6 k1 seed1"
    )
    assert job_label(["method=dsl", "run_config.aux-head=conv_mlp"]) == "dsl aux-head=conv_mlp"


def _write_run(run_dir: Path, rounds: int, config: dict, checkpoint: bool, model: bool) -> None:
    run_dir.mkdir(parents=True)
    cfg = RunConfig.from_run_config(config).to_run_config()
    (run_dir / "config.json").write_text(json.dumps({"run_config": cfg}))
    lines = [json.dumps({"round": r, "test_accuracy": r / 10}) + "\n" for r in range(1, rounds + 1)]
    (run_dir / "rounds.jsonl").write_text("".join(lines))
    if checkpoint:
        (run_dir / "checkpoint.pt").write_bytes(b"a checkpoint")
    if model:
        torch.save({"client": {}, "server_segment": {}}, run_dir / "model.pt")


def test_a_job_directory_says_done_resume_fresh_or_another_config(tmp_path):
    config = {"num-rounds": 3, "method": "csl"}
    _write_run(tmp_path / "done", 3, config, checkpoint=True, model=True)
    assert inspect_run_dir(tmp_path / "done", config).state == "done"
    # more rounds wanted than recorded: continue the run from its checkpoint
    assert inspect_run_dir(tmp_path / "done", config | {"num-rounds": 5}).state == "resume"
    _write_run(tmp_path / "cut", 3, config, checkpoint=True, model=False)
    (tmp_path / "cut" / "model.pt").write_bytes(b"PK\x03\x04 cut off while written")
    assert inspect_run_dir(tmp_path / "cut", config).state == "resume"
    _write_run(tmp_path / "partial", 1, config, checkpoint=False, model=False)
    found = inspect_run_dir(tmp_path / "partial", config)
    assert (found.state, found.detail) == ("fresh", "no checkpoint to continue")
    assert inspect_run_dir(tmp_path / "nothing", config).state == "fresh"
    other = inspect_run_dir(tmp_path / "done", config | {"lr": 0.05, "client-threads": 2})
    assert other.state == "mismatch"
    assert other.detail == (
        f"{tmp_path / 'done'} holds a run of another config: lr (recorded 0.1, now 0.05)"
    )


def test_status_table_lists_every_job_and_counts_them():
    statuses = [
        {"job": 1, "label": "csl cut3", "status": "done", "rounds": 40, "num_rounds": 40,
         "test_accuracy": 0.9012, "reason": ""},
        {"job": 2, "label": "dsl cut3", "status": "failed", "rounds": 7, "num_rounds": 40,
         "test_accuracy": 0.5, "reason": "timed out"},
    ]  # fmt: skip
    assert status_table(statuses, 14).splitlines() == [
        "job            status  rounds  test acc  reason",
        "1/14 csl cut3  done    40/40   90.1 %",
        "2/14 dsl cut3  failed  7/40    50.0 %    timed out",
        "2 jobs: 1 done, 0 resumed, 0 fresh, 1 failed",
    ]


def test_an_interrupted_job_is_listed_and_counted():
    statuses = [
        {"job": 1, "label": "csl cut3", "status": "interrupted", "rounds": 3, "num_rounds": 40,
         "test_accuracy": 0.61, "reason": "the sweep was stopped; the same command resumes it"},
    ]  # fmt: skip
    assert status_table(statuses, 14).splitlines()[1:] == [
        "1/14 csl cut3  interrupted  3/40    61.0 %    the sweep was stopped; the same command "
        "resumes it",
        "1 jobs: 0 done, 0 resumed, 0 fresh, 0 failed, 1 interrupted",
    ]


# A tagged process with an untagged child, as Ray's raylet and its agents are: prints both PIDs.
TAGGED_WITH_CHILD = f"env -u {TOKEN_VAR} sleep 60 & echo $$ $!; exec sleep 60"


def _tagged_with_child(token: str) -> tuple[subprocess.Popen, int, int]:
    proc = subprocess.Popen(
        ["sh", "-c", TAGGED_WITH_CHILD],
        env=os.environ | {TOKEN_VAR: token},
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    tagged, child = map(int, proc.stdout.readline().split())
    _wait_for_sleep(tagged, child)
    assert tagged_pids(token) == [tagged] and process_alive(child)
    return proc, tagged, child


def _wait_for_sleep(*pids: int) -> None:
    """Until each runs ``sleep 60`` with its environment laid out. Popen returns once the
    child's exec has closed its close-on-exec pipe, which the kernel does before it lays out the
    new environment, so /proc/<pid>/environ can read empty for a moment (CI once found no
    tagged process right after Popen). And the shell prints both PIDs before its own last exec
    and before the child's two (env, then sleep): until then the child still has the shell's
    tagged environment (CI once found it tagged)."""

    def sleeping(pid: int) -> bool:
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:
            return False
        return cmdline(pid).split() == ["sleep", "60"] and bool(environ)

    _wait_for(lambda: all(sleeping(p) for p in pids), 10, f"{pids} to run sleep")


def test_kill_tagged_kills_only_processes_with_its_token_and_their_descendants():
    token_a, token_b = f"test-token-a-{os.getpid()}", f"test-token-b-{os.getpid()}"
    proc, tagged, child = _tagged_with_child(token_a)
    other = subprocess.Popen(
        ["sleep", "60"], env=os.environ | {TOKEN_VAR: token_b}, start_new_session=True
    )
    try:
        _wait_for_sleep(other.pid)
        assert tagged_pids(token_a) == [tagged]
        assert sorted(kill_tagged(token_a)) == sorted([tagged, child])
        assert proc.wait(timeout=10) == -signal.SIGKILL
        _wait_for(lambda: not process_alive(child), 10, "the untagged child to die")
        assert other.poll() is None and tagged_pids(token_b) == [other.pid]
    finally:
        for p in (proc, other):
            p.kill()
            p.wait()


REAPED_PARENT = """
import os, subprocess, sys, time
from experiments.sweep_session import REAPER, TOKEN_VAR
from tests.test_sweep import TAGGED_WITH_CHILD
token = sys.argv[1]
subprocess.Popen([sys.executable, "-c", REAPER, str(os.getpid()), f"{TOKEN_VAR}={token}"],
                 start_new_session=True)
child = subprocess.Popen(["sh", "-c", TAGGED_WITH_CHILD], env=os.environ | {TOKEN_VAR: token},
                         stdout=subprocess.PIPE, text=True, start_new_session=True)
print(child.stdout.readline(), end="", flush=True)
time.sleep(60)
"""


def test_the_reaper_kills_a_sigkilled_parents_tagged_processes_and_their_descendants():
    """What a sweep killed with SIGKILL leaves (here: one process in its own session, as
    Flower's SuperExec, simulation and Ray are, with an untagged child, as Ray's agents are) is
    killed as soon as the sweep is gone."""
    token = f"test-reaper-{os.getpid()}"
    parent = subprocess.Popen(
        [sys.executable, "-c", REAPED_PARENT, token], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    try:
        tagged, child = map(int, parent.stdout.readline().split())
        _wait_for_sleep(tagged, child)
        assert tagged_pids(token) == [tagged] and process_alive(child)
        parent.kill()
        parent.wait()
        _wait_for(lambda: not tagged_pids(token), 15, "the reaper to kill the tagged process")
        _wait_for(lambda: not process_alive(child), 15, "the reaper to kill its untagged child")
    finally:
        parent.kill()
        parent.wait()
        kill_tagged(token)
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signal.SIGKILL)


# --- the grid preset -------------------------------------------------------------------------


def test_every_job_of_the_grid_preset_is_a_valid_run_config():
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        cfg = compose("config", overrides=["+experiment=grid"], return_hydra_config=True)
        assert cfg.hydra.sweep.dir == "results/grid"
        jobs = explicit_jobs(cfg, ["+experiment=grid"], Path("results/grid"))
    settings = []
    for job in jobs:
        rc = RunConfig.from_run_config(dict(job.cfg.run_config))
        assert (rc.dataset, rc.depth, rc.samples_per_client, rc.test_samples) == (
            "cifar10", 20, 0, 0,
        )  # fmt: skip
        assert (rc.num_rounds, rc.batch_size, rc.lr, rc.lr_schedule) == (40, 128, 0.1, "cosine")
        assert (rc.momentum, rc.weight_decay, rc.lr_warmup_rounds) == (0.9, 5e-4, 0)
        assert (rc.compute_dtype, rc.channels_last, job.cfg.cpus_per_client) == (
            "float32", True, 2,
        )  # fmt: skip
        assert rc.live_clients >= job.cfg.num_clients
        extra = rc.aux_head if rc.aux_head != "fc" else f"fb{rc.feedback_every}"
        settings.append((job.cfg.num_clients, rc.cut, rc.method, rc.seed, extra))
    assert settings == [
        (1, 3, "csl", 0, "fb0"),
        (1, 3, "dsl", 0, "fb0"),
        (1, 3, "dsl", 0, "fb4"),
        (1, 3, "csl", 1, "fb0"),
        (1, 3, "dsl", 1, "fb0"),
        (1, 6, "csl", 1, "fb0"),
        (1, 6, "dsl", 1, "fb0"),
        (1, 6, "dsl", 0, "fb0"),
        (1, 6, "csl", 0, "fb0"),
        (5, 6, "csl", 0, "fb0"),
        (5, 6, "dsl", 0, "fb0"),
        (5, 3, "csl", 0, "fb0"),
        (5, 3, "dsl", 0, "fb0"),
        (1, 3, "dsl", 0, "conv_mlp"),
        (1, 3, "dsl", 1, "conv_mlp"),
        (1, 3, "dsl", 1, "fb4"),
        (5, 6, "csl", 1, "fb0"),
        (5, 6, "dsl", 1, "fb0"),
        (5, 3, "csl", 1, "fb0"),
        (5, 3, "dsl", 1, "fb0"),
    ]
    assert jobs[0].job_dir == Path("results/grid/method=csl,split=cut3,num_clients=1,seed=0")
    assert len({j.job_dir for j in jobs}) == 20


# --- real sweeps ------------------------------------------------------------------------------


def _sweep(*args: str) -> list[str]:
    return [sys.executable, "-m", "experiments.sweep", *args]


def _latest_statuses(sweep_dir: Path) -> dict[int, dict]:
    lines = (sweep_dir / "jobs.jsonl").read_text().splitlines()
    return {s["job"]: s for s in map(json.loads, lines)}


def _wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout:.0f} s for {what}")
        time.sleep(0.2)


TINY_GRID = """# @package _global_
defaults:
  - override /model: resnet8
run_config: {run_config}
cpus_per_client: 1
jobs:
  - [method=csl]                                   # the uninterrupted reference
  - [method=csl, run_config.progress-seconds=29]   # job 1's computation; killed, then resumed
  - [method=dsl, run_config.num-rounds=1000, job_timeout_s=30]   # stopped at its timeout
hydra:
  sweep:
    dir: {sweep_dir}
  run:
    dir: ${{hydra.sweep.dir}}
"""


@pytest.mark.slow
def test_a_killed_sweep_resumes_skips_what_is_done_and_stops_a_job_at_its_timeout(tmp_path):
    """Job 2 is job 1's computation (progress-seconds only changes what is logged), so job 1 is
    the uninterrupted run that job 2, SIGKILLed with the whole sweep after its first
    checkpoint and resumed by the same command, must equal bit for bit."""
    sweep_dir = tmp_path / "sweep"
    run_config = TINY | {
        "num-rounds": 3,
        "samples-per-client": 192,  # rounds of a second or more: the kill lands mid-run
        "test-samples": 64,
        "data-dir": data_dir(),
    }
    conf = tmp_path / "conf" / "experiment"
    conf.mkdir(parents=True)
    text = TINY_GRID.format(run_config=json.dumps(run_config), sweep_dir=sweep_dir)
    (conf / "tiny_grid.yaml").write_text(text)
    cmd = _sweep("-cd", str(tmp_path / "conf"), "+experiment=tiny_grid")
    job2 = sweep_dir / "method=csl,progress-seconds=29" / "run"
    tokens, procs = [], []
    try:
        first = subprocess.Popen(
            cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        procs.append(first)
        _wait_for(lambda: (sweep_dir / ".sweep.json").exists(), 120, "the sweep to start")
        tokens.append(json.loads((sweep_dir / ".sweep.json").read_text())["token"])
        _wait_for(
            lambda: (job2 / "checkpoint.pt").exists() or first.poll() is not None,
            900,
            "job 2's first checkpoint",
        )
        first.kill()  # SIGKILL: no handler, no atexit; its SuperLink, simulation and Ray remain
        out1 = first.communicate()[0]
        assert (job2 / "checkpoint.pt").exists(), out1[-3000:]
        assert not (job2 / "model.pt").exists()
        assert "[job 1/3 csl] round 3/3: test" in out1
        # the reaper kills the dead sweep's processes, found by its token
        _wait_for(lambda: not tagged_pids(tokens[0]), 30, "the killed sweep's processes to end")

        second = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1200)
        out2 = second.stdout + second.stderr
        tokens.append(json.loads((sweep_dir / ".sweep.json").read_text())["token"])
        assert second.returncode == 0, out2[-3000:]
        statuses = _latest_statuses(sweep_dir)
        assert [statuses[n]["status"] for n in (1, 2, 3)] == ["done", "resumed", "failed"]
        assert "[job 1/3 csl] done before: 3 rounds, skipped" in out2
        assert "[job 1/3 csl] round" not in out2  # not run again
        assert "[job 2/3 csl progress-seconds=29] round 3/3: test" in out2
        assert "timed out after 30 s (job_timeout_s)" in statuses[3]["reason"]
        assert "flwr stop" in statuses[3]["reason"], statuses[3]["reason"]
        assert "[job 3/3 dsl num-rounds=1000 job_timeout_s=30] failed: " in out2, out2[-3000:]
        table = out2[out2.index(f"sweep {sweep_dir}") :]
        assert "3 jobs: 1 done, 1 resumed, 0 fresh, 1 failed" in table
        assert (sweep_dir / "status.md").read_text().count("\n") == 7

        reference = sweep_dir / "method=csl" / "run"
        got, want = [_rounds(job2), _rounds(reference)]
        assert [r["round"] for r in got] == [1, 2, 3]
        assert [[r[k] for k in METRICS] for r in got] == [[r[k] for k in METRICS] for r in want]
        model, expected = torch.load(job2 / "model.pt"), torch.load(reference / "model.pt")
        for part in ("client", "server_segment"):
            for key, value in expected[part].items():
                assert torch.equal(model[part][key], value), f"{part}.{key}"
        assert not tagged_pids(tokens[1])  # the sweep stopped everything it started
        # the report lists the failed job and why, beside the finished ones
        table = make_report(sweep_dir, tmp_path / "report")["table.md"].read_text()
        failed = table[table.index("Failed jobs:") :]
        assert "dsl" in failed and "timed out after 30 s (job_timeout_s)" in failed, failed
        grid = (tmp_path / "report" / "grid.md").read_text()  # the failed job adds no row
        assert "| CSL |" in grid and "| DSL |" not in grid, grid
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for token in tokens:
            kill_tagged(token)


def _rounds(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "rounds.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_a_multirun_sweep_runs_every_job_and_feeds_the_report(tmp_path):
    """Hydra's `-m` path: the jobs are the product of the comma lists. A failing job is the
    killed-sweep test's (its timeout); a failing set-up is test_flower_runs'. Both are left out
    here because every job costs a whole Flower run."""
    sweep_dir = tmp_path / "sweep"
    cmd = _sweep(
        "-m",
        "model=resnet8",
        "method=dsl,csl",
        f"run_config.data-dir={data_dir()}",
        *[o for o in TINY_OVERRIDES if not o.startswith("run_config.depth")],
        f"hydra.sweep.dir={sweep_dir}",
    )
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=ROOT)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    for n in (1, 2):
        assert f"[job {n}/2 " in out
    jobs = [json.loads(line) for line in (sweep_dir / "jobs.jsonl").read_text().splitlines()]
    assert [(j["method"], j["status"]) for j in jobs] == [("dsl", "fresh"), ("csl", "fresh")]
    # a job's directory is named by what the sweep varies (the method), not the rest
    assert [Path(j["run_dir"]).parent.name for j in jobs] == ["method=dsl", "method=csl"]

    runs = load_runs(sweep_dir)
    assert sorted(r.method for r in runs) == ["csl", "dsl"]
    written = make_report(sweep_dir, tmp_path / "report")
    figures = ("fig4_accuracy", "fig5_communication", "fig6_memory", "fig7_time", "fig8_probe_dcor")
    for name in (f"{f}.png" for f in figures):
        assert written[name].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = written["table.md"].read_text()
    row = next(line for line in table.splitlines() if "ResNet-8 cut 1 K=2" in line)
    cells = dict(zip(COLUMNS, (c.strip() for c in row.strip("|").split("|")), strict=True))
    assert cells["dataset"] == "cifar10" and cells["epochs"] == "1"
    assert 0.50 <= float(cells["bytes DSL/CSL"]) <= 0.52
    assert cells["bwd MB/epoch CSL"] == cells["fwd MB/epoch"]  # gradients as big as activations
    assert "Failed jobs:" not in table
    grid = written["grid.md"].read_text()
    assert "| ResNet-8 cut 1, K=2 | CSL | 1/1 |" in grid
    assert "| ResNet-8 cut 1, K=2 | DSL | 1/1 |" in grid
