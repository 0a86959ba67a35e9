"""The results directory survives crashes and mistakes: strict JSON, fsynced rounds, torn
lines skipped, and no run ever written over another."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from flower_app import results
from flower_app.results import ResultsWriter, RunDirExists, read_rounds, strict_json
from split_core.config import RunConfig

RECORD = {
    "round": 1,
    "method": "dsl",
    "test_accuracy": 0.5,
    "aux_test_accuracy": None,
    "train_loss": float("nan"),
    "bytes_train_total": 10,
    "bytes_activations": 8,
    "bytes_gradients": 0,
    "round_seconds": 1.5,
}


def config(tmp_path: Path, **extra) -> RunConfig:
    return RunConfig.from_run_config({"output-dir": str(tmp_path)} | extra)


def test_non_finite_numbers_are_written_as_null(tmp_path):
    record = RECORD | {"aux_train_loss": float("inf"), "nested": {"x": [float("-inf"), 2.0]}}
    line = strict_json(record)
    assert json.loads(line) == RECORD | {
        "train_loss": None,
        "aux_train_loss": None,
        "nested": {"x": [None, 2.0]},
    }
    assert "NaN" not in line and "Infinity" not in line

    writer = ResultsWriter(config(tmp_path, **{"run-name": "nan"}), 2)
    writer.write_round(record)
    text = (writer.run_dir / "rounds.jsonl").read_text()
    json.loads(text, parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))
    assert read_rounds(writer.run_dir)[0]["train_loss"] is None


def test_every_round_is_fsynced_as_it_is_written(tmp_path, monkeypatch):
    writer = ResultsWriter(config(tmp_path, **{"run-name": "sync"}), 2)
    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(results.os, "fsync", fsync)
    writer.write_round(RECORD)
    writer.write_round(RECORD | {"round": 2})
    assert synced == [str(writer.rounds_path)] * 2
    assert [r["round"] for r in read_rounds(writer.run_dir)] == [1, 2]


def test_a_torn_last_line_is_skipped_with_a_warning(tmp_path):
    path = tmp_path / "rounds.jsonl"
    whole = strict_json(RECORD) + "\n" + strict_json(RECORD | {"round": 2}) + "\n"
    path.write_bytes(whole.encode() + strict_json(RECORD | {"round": 3}).encode()[:25])
    with pytest.warns(RuntimeWarning, match=r"rounds.jsonl: skipped line 3, cut off mid-write"):
        rounds = read_rounds(tmp_path)
    assert [r["round"] for r in rounds] == [1, 2]


def test_a_broken_line_before_the_last_is_an_error(tmp_path):
    path = tmp_path / "rounds.jsonl"
    path.write_text('{"round": 1}\n{"round": \n{"round": 3}\n')
    with pytest.raises(ValueError, match=r"rounds.jsonl: line 2 is not JSON"):
        read_rounds(tmp_path)


def test_a_new_run_never_writes_into_another_runs_directory(tmp_path):
    cfg = config(tmp_path, **{"run-name": "taken"})
    first = ResultsWriter(cfg, 2)
    first.write_round(RECORD)
    with pytest.raises(RunDirExists) as refused:
        ResultsWriter(cfg, 2)
    assert str(refused.value) == (
        f"{first.run_dir} already holds a run (rounds.jsonl); a new run never overwrites one. "
        f"Choose another run-name, remove that directory, or continue its run with "
        f"resume-from='{first.run_dir}'"
    )
    assert [r["round"] for r in read_rounds(first.run_dir)] == [1]  # untouched


def test_an_empty_directory_may_be_used(tmp_path):
    (tmp_path / "empty").mkdir()
    writer = ResultsWriter(config(tmp_path, **{"run-name": "empty"}), 2)
    assert writer.run_dir == (tmp_path / "empty").resolve()


def test_a_default_name_that_collides_gets_a_fresh_one(tmp_path, monkeypatch):
    monkeypatch.setattr(time, "strftime", lambda fmt, *a: "20250101-120000")
    cfg = config(tmp_path)
    dirs = [ResultsWriter(cfg, 2).run_dir for _ in range(3)]
    base = tmp_path.resolve() / "dsl-resnet20-cut3-k2-20250101-120000"
    assert dirs == [base, Path(f"{base}-2"), Path(f"{base}-3")]


def test_a_resumed_run_rewrites_its_rounds_and_records_the_resumption(tmp_path):
    cfg = config(tmp_path, **{"run-name": "resumed", "num-rounds": 3})
    writer = ResultsWriter(cfg, 2)
    writer.write_config({"clients": []})
    for rnd in (1, 2, 3):
        writer.write_round(RECORD | {"round": rnd})
    # round 3 was written after the last checkpoint (round 2): the resumed run drops it
    resumed = RunConfig.from_run_config(
        cfg.to_run_config() | {"num-rounds": 5, "resume-from": str(writer.run_dir)}
    )
    again = ResultsWriter(resumed, 2, writer.run_dir, [RECORD, RECORD | {"round": 2}])
    again.write_config({"clients": [], "from_round": 2})
    assert [r["round"] for r in read_rounds(writer.run_dir)] == [1, 2]
    recorded = json.loads((writer.run_dir / "config.json").read_text())
    assert recorded["run_config"]["num-rounds"] == 5
    assert recorded["run_config"]["resume-from"] == str(writer.run_dir)
    assert [r["from_round"] for r in recorded["resumed"]] == [2]
