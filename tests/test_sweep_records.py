"""experiments/sweep_records.py: a sweep directory committed on one machine resumes on another.

Real in-process runs (flower_app.server_app.run over a grid that hands each message to the real
ClientApp): a one-round run is made portable, moved to another folder as a fresh checkout
elsewhere would hold it, and extended to two rounds; it must end bit for bit where an
uninterrupted two-round run ends.
"""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path

import pytest
import torch

from experiments.sweep_records import sweep_records
from flower_app import client_app as real
from flower_app.server_app import run
from split_core.config import RunConfig
from tests.conftest import TINY, data_dir
from tests.memory_grid import app_grid

JOB = "method=dsl,seed=0"
pytestmark = pytest.mark.usefixtures("task_identity")  # messages are built outside a run


def run_here(config: dict, given: tuple[str, ...] = ()) -> None:
    grid = app_grid(real.app, 1, run_id=uuid.uuid4().int % 2**62)  # no other run's warm clients
    run(grid, RunConfig.from_run_config(config), given=given)


def tiny(out: Path, rounds: int) -> dict:
    return TINY | {"num-rounds": rounds, "data-dir": data_dir(), "output-dir": str(out)}


def test_a_portable_sweep_directory_resumes_elsewhere_to_the_uninterrupted_result(
    tmp_path, monkeypatch
):
    run_here(tiny(tmp_path / "reference", 2) | {"run-name": "run"})
    job = tmp_path / "machine-a" / "results" / "grid" / JOB
    run_here(tiny(job, 1) | {"run-name": "run"})
    (job / "flwr.log").write_text("a log that stays behind\n")

    monkeypatch.chdir(tmp_path / "machine-a")
    monkeypatch.setenv("SPLIT_LEARNING_DATA_DIR", str(Path(data_dir()).parent))
    files = sweep_records(Path("results/grid"))
    run_dir = Path("results/grid") / JOB / "run"
    names = ("config.json", "rounds.jsonl", "model.pt", "checkpoint.pt")  # not flwr.log
    assert files == [run_dir / n for n in names]
    config = json.loads((run_dir / "config.json").read_text())
    assert config["run_config"]["output-dir"] == f"results/grid/{JOB}"
    assert config["run_config"]["data-dir"] == data_dir()  # in the config hash: never touched
    [client] = config["clients"]
    assert client["data_source"].startswith("$SPLIT_LEARNING_DATA_DIR/"), client["data_source"]
    assert str(tmp_path) not in (run_dir / "config.json").read_text()
    assert sweep_records(Path("results/grid")) == files  # again: nothing left to change

    # another machine: only the listed files, in another folder
    elsewhere = tmp_path / "machine-b"
    for path in files:
        (elsewhere / path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, elsewhere / path)
    moved = elsewhere / "results" / "grid" / JOB
    resume = tiny(moved, 2) | {"run-name": "run", "resume-from": str(moved / "run")}
    run_here(resume, given=("num-rounds", "resume-from", "output-dir", "data-dir"))

    assert [json.loads(line)["round"] for line in open(moved / "run" / "rounds.jsonl")] == [1, 2]
    # the resume recorded machine-b's paths (resume-from, the output-dir it ignored): made
    # portable in turn, and the experiment's keys left as they were
    monkeypatch.chdir(elsewhere)
    assert str(elsewhere) in (run_dir / "config.json").read_text()
    sweep_records(elsewhere / "results" / "grid")  # given absolute: named relative to the cwd
    config = json.loads((run_dir / "config.json").read_text())
    assert str(elsewhere) not in json.dumps(config), json.dumps(config, indent=1)
    assert config["run_config"]["resume-from"] == f"results/grid/{JOB}/run"
    assert config["run_config"]["data-dir"] == data_dir()
    assert config["resumed"][0]["from_round"] == 1
    expected = torch.load(tmp_path / "reference" / "run" / "model.pt")
    resumed = torch.load(moved / "run" / "model.pt")
    for part in ("client", "server_segment"):
        assert resumed[part].keys() == expected[part].keys()
        for key, value in expected[part].items():
            assert torch.equal(resumed[part][key], value), f"{part}.{key}"


BESIDE = "../shared/data/cifar10/{train,test}.zip (image-folder zips)"
TOLD = "$SPLIT_LEARNING_DATA_DIR/cifar10/{train,test}.zip (image-folder zips)"


@pytest.mark.parametrize(
    ("current", "told", "expected"),
    [
        pytest.param(("main",), False, BESIDE, id="from-the-checkout"),
        pytest.param(("elsewhere", "deeper"), False, BESIDE, id="from-elsewhere"),
        pytest.param(("main",), True, TOLD, id="told-the-same-folder"),  # as CI runs
    ],
)
def test_a_data_folder_beside_the_checkout_is_named_by_what_the_run_was_told(
    tmp_path, monkeypatch, current, told, expected
):
    """Records committed without SPLIT_LEARNING_DATA_DIR set still lose the data folder's path:
    a copy the loader finds at ../shared/data is written that way. The loader searches
    ``<checkout>/../shared/data`` whatever the current folder is, so records committed from
    elsewhere (whose own ../shared/data is not it) lose that path too, named as seen from the
    checkout. When the variable names that same folder, the variable's name wins."""
    checkout, data = tmp_path / "main", tmp_path / "shared" / "data" / "cifar10"
    data.mkdir(parents=True)
    here = tmp_path.joinpath(*current)
    run_dir = here / "results" / "grid" / JOB / "run"
    run_dir.mkdir(parents=True)
    source = f"{data}/{{train,test}}.zip (image-folder zips)"
    (run_dir / "config.json").write_text(json.dumps({"clients": [{"data_source": source}]}))
    if told:
        monkeypatch.setenv("SPLIT_LEARNING_DATA_DIR", str(data.parent))
    else:
        monkeypatch.delenv("SPLIT_LEARNING_DATA_DIR", raising=False)
    monkeypatch.setattr("split_core.data.REPO_ROOT", checkout)
    monkeypatch.chdir(here)

    sweep_records(Path("results/grid"))

    client = json.loads((run_dir / "config.json").read_text())["clients"][0]
    assert client["data_source"] == expected
