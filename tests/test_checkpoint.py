"""checkpoint.pt loads without unpickling code, and belongs to exactly one experiment.

Unit tests on small hand-made checkpoints written through the real results writer; the Flower
runs that resume from them are in test_resume.py.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from flower_app.results import ResultsWriter
from flower_app.resume import ResumeMismatch, given_keys, prepare_resume
from split_core.config import RunConfig
from strategies import checkpoint as checkpoints
from strategies.checkpoint import Checkpoint, CheckpointError

RECORDED = {"method": "csl", "depth": 8, "cut": 1, "num-rounds": 3, "client-threads": 1}


def small_checkpoint(rnd: int = 2) -> Checkpoint:
    torch.manual_seed(0)
    segment = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(segment.parameters(), lr=0.1, momentum=0.9)
    segment(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    return Checkpoint(
        round=rnd,
        server_segment=segment.state_dict(),
        server_optimizer=checkpoints.optimizer_to_cpu(optimizer.state_dict()),
        client_weights={
            "conv.weight": np.arange(12, dtype=np.float32).reshape(3, 4),
            "bn.num_batches_tracked": np.array(7, dtype=np.int64),
        },
        client_optimizers={0: {"m0": np.full(4, 0.5, np.float32)}, 3: {"m0": np.zeros(4)}},
        history=[
            {"round": 1, "test_loss": np.float64(1.25), "failures": {"5": "timeout"}},
            {"round": 2, "test_loss": float("nan"), "lr": 0.05},
        ],
    )


def recorded_run(tmp_path: Path, overrides: dict | None = None) -> tuple[RunConfig, Path]:
    """A run directory as a run leaves it: config.json and checkpoint.pt."""
    config = RECORDED | {"output-dir": str(tmp_path), "run-name": "run"} | (overrides or {})
    cfg = RunConfig.from_run_config(config)
    writer = ResultsWriter(cfg, num_clients=2)
    writer.write_config({"clients": []})
    writer.write_checkpoint(small_checkpoint())
    return cfg, writer.run_dir


def resume_config(run_dir: Path, **given) -> RunConfig:
    """This run's config as `flwr run --run-config` would make it: defaults plus ``given``."""
    return RunConfig.from_run_config({"resume-from": str(run_dir)} | given)


def test_checkpoint_loads_with_weights_only_and_round_trips(tmp_path):
    _, run_dir = recorded_run(tmp_path)
    raw = torch.load(run_dir / "checkpoint.pt", weights_only=True)  # no code runs
    assert raw["format"] == checkpoints.FORMAT and raw["round"] == 2
    assert isinstance(raw["client_weights"]["conv.weight"], torch.Tensor)
    assert raw["history"][0]["test_loss"] == 1.25 and type(raw["history"][0]["test_loss"]) is float

    loaded, original = checkpoints.load(run_dir), small_checkpoint()
    for key, value in original.client_weights.items():
        assert loaded.client_weights[key].dtype == value.dtype
        assert np.array_equal(loaded.client_weights[key], value)
    assert sorted(loaded.client_optimizers) == [0, 3]
    assert np.array_equal(loaded.client_optimizers[0]["m0"], np.full(4, 0.5, np.float32))
    for key, value in original.server_segment.items():
        assert torch.equal(loaded.server_segment[key], value)
    state, want = loaded.server_optimizer["state"], original.server_optimizer["state"]
    assert torch.equal(state[0]["momentum_buffer"], want[0]["momentum_buffer"])
    assert loaded.server_optimizer["param_groups"] == original.server_optimizer["param_groups"]
    assert loaded.history[1]["lr"] == 0.05 and np.isnan(loaded.history[1]["test_loss"])
    assert loaded.config_hash == checkpoints.config_hash(
        RunConfig.from_run_config(RECORDED).to_run_config()
    )
    assert not (run_dir / "checkpoint.pt.tmp").exists()


def test_a_checkpoint_without_its_config_hash_is_not_written(tmp_path):
    with pytest.raises(CheckpointError, match="needs the hash of its run config"):
        checkpoints.save(small_checkpoint(), tmp_path)


def test_a_pickled_checkpoint_is_refused_unopened(tmp_path):
    """The old format pickled numpy arrays; weights_only refuses anything but plain data."""
    ckpt = small_checkpoint()
    torch.save(ckpt.__dict__, tmp_path / "checkpoint.pt")
    with pytest.raises(CheckpointError, match="cannot be loaded safely"):
        checkpoints.load(tmp_path)

    class Evil:
        def __reduce__(self):
            return (Path.touch, (tmp_path / "pwned",))

    (tmp_path / "checkpoint.pt").write_bytes(pickle.dumps({"format": 2, "x": Evil()}, protocol=2))
    with pytest.raises(CheckpointError, match="weights_only=True"):
        checkpoints.load(tmp_path)
    assert not (tmp_path / "pwned").exists()


def test_the_config_hash_covers_the_experiment_not_what_may_change():
    base = RunConfig.from_run_config(RECORDED).to_run_config()
    h = checkpoints.config_hash(base)
    for key, value in {"num-rounds": 9, "reply-timeout": 5.0, "run-name": "x"}.items():
        assert checkpoints.config_hash(base | {key: value}) == h, key
    for key, value in {"lr": 0.2, "seed": 1, "method": "dsl", "payload-dtype": "int8"}.items():
        assert checkpoints.config_hash(base | {key: value}) != h, key


def test_resume_with_only_resume_from_takes_the_recorded_config(tmp_path):
    recorded, run_dir = recorded_run(tmp_path)
    cfg = resume_config(run_dir, **{"run-name": "again"})
    resume = prepare_resume(cfg, given_keys(cfg, {"resume-from", "run-name"}))
    assert resume.cfg == RunConfig.from_run_config(
        recorded.to_run_config() | {"resume-from": str(run_dir)}
    )
    assert resume.accepted == {} and resume.ignored == {"run-name": "again"}
    assert resume.checkpoint.round == 2


def test_resume_with_the_identical_config_plus_resume_from(tmp_path):
    """As a sweep resumes a job: every key given, all equal to the recorded ones."""
    recorded, run_dir = recorded_run(tmp_path)
    config = recorded.to_run_config() | {"resume-from": str(run_dir)}
    resume = prepare_resume(RunConfig.from_run_config(config), set(config))
    assert resume.cfg == RunConfig.from_run_config(config)
    assert resume.accepted == {} and resume.ignored == {}


def test_resume_accepts_more_rounds_and_other_timeouts_and_threads(tmp_path):
    _, run_dir = recorded_run(tmp_path)
    given = {"num-rounds": 5, "reply-timeout": 30.0, "server-threads": 2, "poll-seconds": 0.5}
    cfg = resume_config(run_dir, **given)
    resume = prepare_resume(cfg, given_keys(cfg, {"resume-from", *given}))
    assert resume.cfg.num_rounds == 5 and resume.cfg.reply_timeout == 30.0
    assert resume.cfg.server_threads == 2 and resume.cfg.poll_seconds == 0.5
    assert resume.cfg.method == "csl" and resume.cfg.depth == 8 and resume.cfg.client_threads == 1
    assert resume.accepted == {
        "num-rounds": [3, 5],
        "poll-seconds": [0.02, 0.5],
        "reply-timeout": [600.0, 30.0],
        "server-threads": [0, 2],
    }
    assert resume.note() == {"from_round": 2, "accepted": resume.accepted, "ignored": {}}


def test_resume_from_another_experiment_is_refused_with_the_keys_named(tmp_path):
    _, run_dir = recorded_run(tmp_path)
    given = {"method": "dsl", "depth": 20, "lr": 0.01, "num-rounds": 5}
    cfg = resume_config(run_dir, **given)
    with pytest.raises(ResumeMismatch) as refused:
        prepare_resume(cfg, given_keys(cfg, {"resume-from", *given}))
    message = str(refused.value)
    assert message.startswith(f"resume-from '{run_dir}' refused: this run is another experiment")
    assert (
        "differing keys: depth (recorded 8, given 20), lr (recorded 0.1, given 0.01), "
        "method (recorded 'csl', given 'dsl')."
    ) in message
    assert "num-rounds (" not in message  # may change: not a difference that refuses


def test_a_key_given_at_its_default_is_a_difference_when_flower_says_it_was_given(tmp_path):
    """depth=20 is the default: only Flower's list of overrides shows the user set it."""
    _, run_dir = recorded_run(tmp_path)
    cfg = resume_config(run_dir, depth=20)
    assert prepare_resume(cfg, given_keys(cfg, {"resume-from"})).cfg.depth == 8
    with pytest.raises(ResumeMismatch, match=r"differing keys: depth \(recorded 8, given 20\)\."):
        prepare_resume(cfg, given_keys(cfg, {"resume-from", "depth"}))


def test_a_checkpoint_of_another_config_is_refused(tmp_path):
    _, run_dir = recorded_run(tmp_path)
    _, other = recorded_run(tmp_path / "other", {"lr": 0.2})
    (run_dir / "checkpoint.pt").write_bytes((other / "checkpoint.pt").read_bytes())
    cfg = resume_config(run_dir)
    with pytest.raises(CheckpointError, match="was not written by the run that .* records"):
        prepare_resume(cfg, {"resume-from"})


def test_a_tampered_config_hash_is_refused(tmp_path):
    _, run_dir = recorded_run(tmp_path)
    raw = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    raw["config_hash"] = "0" * 64
    torch.save(raw, run_dir / "checkpoint.pt")
    with pytest.raises(CheckpointError, match=r"config hash '000000000000', expected"):
        prepare_resume(resume_config(run_dir), {"resume-from"})


def test_an_edited_config_json_is_refused(tmp_path):
    _, run_dir = recorded_run(tmp_path)
    path = run_dir / "config.json"
    payload = json.loads(path.read_text())
    payload["run_config"]["seed"] = 7
    path.write_text(json.dumps(payload))
    with pytest.raises(CheckpointError, match="config.json was edited"):
        prepare_resume(resume_config(run_dir), {"resume-from"})


def test_fewer_rounds_than_the_checkpoint_holds_is_refused(tmp_path):
    _, run_dir = recorded_run(tmp_path)
    cfg = resume_config(run_dir, **{"num-rounds": 1})
    with pytest.raises(ResumeMismatch, match="num-rounds 1 is fewer than the 2 rounds"):
        prepare_resume(cfg, {"resume-from", "num-rounds"})
