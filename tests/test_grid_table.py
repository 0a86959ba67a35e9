"""The grid's table: arms over seeds, paired DSL − CSL verdicts, the share of the gap a variant
closes, runs still going left out of the means, and the exact-pixel column from model.pt."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from experiments.exact_pixels import ExactTest
from experiments.grid_table import Spread, grid_table, paired_gap, verdicts
from experiments.report import README_BEGIN, README_END, put_in_readme
from experiments.runs import arms, load_runs, pair
from models.resnet import split_resnet
from split_core.data import normalize, to_float


def write_run(
    root: Path,
    name: str,
    acc: list[float],
    epochs: int = 3,
    *,
    method: str,
    seed: int,
    clients: int = 1,
    **config: object,
) -> Path:
    """A results directory as the app writes it: config.json, rounds.jsonl, model.pt if done."""
    run_dir = root / name / "run"
    run_dir.mkdir(parents=True)
    rc = {
        "method": method, "dataset": "cifar10", "depth": 8, "cut": 1, "seed": seed,
        "num-rounds": epochs, "aux-head": "fc", "feedback-every": 0, "lr": 0.1,
        "output-dir": str(root / name), "live-clients": 5,
    } | config  # fmt: skip
    (run_dir / "config.json").write_text(
        json.dumps({"run_config": rc, "clients": list(range(clients))})
    )
    lines = [
        {
            "round": i + 1,
            "test_accuracy": a,
            "aux_test_accuracy": a - 0.1 if method == "dsl" else None,
            "bytes_train_total": 3e6 * clients,
            "bytes_gradients": (1e6 if method == "csl" else 0.0) * clients,
            "client_peak_saved_bytes": 2e6,
            "server_peak_saved_bytes": 1e6,
            "train_seconds": 10.0,
        }
        for i, a in enumerate(acc)
    ]
    (run_dir / "rounds.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    if len(acc) == epochs:
        (run_dir / "model.pt").write_bytes(b"")
    return run_dir


@pytest.fixture
def grid(tmp_path: Path) -> Path:
    """Cut 1, K=1: CSL and DSL over seeds 0 and 1, two DSL variants on seed 0, a CSL seed 2
    still going; results of another lr (a different experiment) beside them."""
    write_run(tmp_path, "csl0", [0.5, 0.8, 0.90], method="csl", seed=0, **{"live-clients": 1})
    write_run(tmp_path, "csl1", [0.5, 0.8, 0.88], method="csl", seed=1)
    write_run(tmp_path, "dsl0", [0.5, 0.8, 0.87], method="dsl", seed=0)
    write_run(tmp_path, "dsl1", [0.5, 0.8, 0.87], method="dsl", seed=1)
    write_run(
        tmp_path, "conv0", [0.5, 0.8, 0.885], method="dsl", seed=0, **{"aux-head": "conv_mlp"}
    )
    write_run(tmp_path, "fb0", [0.5, 0.8, 0.86], method="dsl", seed=0, **{"feedback-every": 4})
    write_run(tmp_path, "csl2", [0.3], method="csl", seed=2)
    return tmp_path


def test_runs_group_into_arms_named_by_what_departs_from_the_setting(grid):
    labels = {a.label: sorted(r.seed for r in a.runs) for a in arms(load_runs(grid))}
    assert labels == {
        "CSL": [0, 1, 2],  # live-clients and output-dir do not make another experiment
        "DSL": [0, 1],
        "DSL aux-head=conv_mlp": [0],
        "DSL feedback-every=4": [0],
    }
    plain = pair(load_runs(grid))
    assert [(m, r.seed, r.config["aux-head"]) for m, r in next(iter(plain.values())).items()] == [
        ("csl", 0, "fc"),
        ("dsl", 0, "fc"),
    ]


def test_figures_pair_csl_and_dsl_of_a_seed_both_finished(tmp_path):
    """Not each method's lowest seed: DSL's seed 0 still running beside CSL's finished seed 1
    would set two different runs, one of them half done, side by side."""
    write_run(tmp_path, "csl1", [0.5, 0.8, 0.88], method="csl", seed=1)
    write_run(tmp_path, "dsl0", [0.5], method="dsl", seed=0)
    write_run(tmp_path, "dsl1", [0.5, 0.8, 0.87], method="dsl", seed=1)
    plain = pair(load_runs(tmp_path))
    assert {m: r.seed for m, r in next(iter(plain.values())).items()} == {"csl": 1, "dsl": 1}
    write_run(tmp_path, "csl0", [0.4], method="csl", seed=0)  # no seed finished by both: started
    write_run(tmp_path, "csl2", [0.4], method="csl", seed=2)
    for finished in ("csl1", "dsl1"):
        shutil.rmtree(tmp_path / finished)
    plain = pair(load_runs(tmp_path))
    assert {m: r.seed for m, r in next(iter(plain.values())).items()} == {"csl": 0, "dsl": 0}


def test_a_different_recipe_is_another_arm(grid):
    write_run(grid, "csl-lr", [0.5, 0.6, 0.7], method="csl", seed=0, lr=0.05)
    labels = sorted(a.label for a in arms(load_runs(grid)))
    assert labels == [
        "CSL",
        "CSL lr=0.05",
        "DSL",
        "DSL aux-head=conv_mlp",
        "DSL feedback-every=4",
    ]


def test_the_gap_is_paired_by_seed_and_finished_runs_only(grid):
    by = {a.label: a for a in arms(load_runs(grid))}
    gap = paired_gap(by["DSL"], by["CSL"])  # seed 0: 87 - 90, seed 1: 87 - 88; seed 2 running
    assert (gap.n, gap.mean, gap.half_range) == (2, pytest.approx(-2.0), pytest.approx(1.0))
    assert verdicts(list(by.values())) == [
        "- ResNet-8 cut 1, K=1: **DSL behind**, DSL − CSL = -2.0 ± 1.0 pt over 2 seeds, "
        "beyond the seed spread",
        "  - DSL aux-head=conv_mlp: closes 50 % of the gap (+1.5 of 3.0 pt): 88.5 % vs DSL "
        "87.0 % and CSL 90.0 % (seeds [0])",
        "  - DSL feedback-every=4: closes -33 % of the gap (-1.0 of 3.0 pt): 86.0 % vs DSL "
        "87.0 % and CSL 90.0 % (seeds [0])",
    ]


def test_on_par_within_one_point_and_pending_without_a_finished_pair(tmp_path):
    write_run(tmp_path, "c", [0.5, 0.7, 0.80], method="csl", seed=0)
    write_run(tmp_path, "d", [0.5, 0.7, 0.795], method="dsl", seed=0)
    write_run(tmp_path, "c5", [0.5, 0.7, 0.80], method="csl", seed=0, clients=5)
    write_run(tmp_path, "d5", [0.5], method="dsl", seed=0, clients=5)
    assert verdicts(arms(load_runs(tmp_path))) == [
        "- ResNet-8 cut 1, K=1: **on par**, DSL − CSL = -0.5 pt over 1 seed",
        "- ResNet-8 cut 1, K=5: pending (no seed has both methods finished)",
    ]


def test_table_rows_mean_and_half_range_over_seeds_and_a_running_seed(grid):
    rows = {line.split(" | ")[1]: line for line in grid_table(load_runs(grid)).splitlines()[2:6]}
    assert rows["CSL"] == (
        "| ResNet-8 cut 1, K=1 | CSL | 2/3 | 89.0 ± 1.0 (running: seed 2: 30.0 at epoch 1/3) "
        "| - | - | 3 (1) | 2 | 1 | 10 |"
    )
    assert (
        rows["DSL"]
        == "| ResNet-8 cut 1, K=1 | DSL | 2/2 | 87.0 ± 0.0 | 77.0 ± 0.0 | - | 3 (0) | 2 | 1 | 10 |"
    )


def test_spread_of_one_value_has_no_plus_minus():
    assert Spread.of([84.0]).text() == "84.0"
    assert Spread.of([]) is None


def test_exact_pixel_column_scores_the_saved_model(tmp_path):
    """Labels chosen so that the saved model gets exactly 3 of 8 right: a model not loaded
    from model.pt (fresh weights) would score something else."""
    run_dir = write_run(tmp_path, "c", [0.5], epochs=1, method="csl", seed=0)
    client, server = split_resnet(8, 1, 10, seed=7)
    torch.save(
        {
            "client": {f"segment.{k}": v for k, v in client.state_dict().items()},
            "server_segment": server.state_dict(),
        },
        run_dir / "model.pt",
    )
    images = np.random.default_rng(0).integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
    with torch.no_grad():
        predicted = server.eval()(client.eval()(normalize(to_float(images), "cifar10"))).argmax(1)
    labels = np.where(np.arange(8) < 3, predicted.numpy(), (predicted.numpy() + 1) % 10)
    table = grid_table(load_runs(tmp_path), ExactTest(images, images, labels))
    assert "| ResNet-8 cut 1, K=1 | CSL | 1/1 | 50.0 | - | 37.5 |" in table
    assert "8 test images with their original pixels" in table


def test_epoch_time_is_the_median_over_rounds(tmp_path):
    """A round that shared the cores (here 500 s) does not move the epoch time."""
    run_dir = write_run(tmp_path, "c", [0.5, 0.6, 0.7], method="csl", seed=0)
    lines = [json.loads(line) for line in (run_dir / "rounds.jsonl").read_text().splitlines()]
    for record, seconds in zip(lines, (10.0, 500.0, 12.0), strict=True):
        record["train_seconds"] = seconds
    (run_dir / "rounds.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    (run,) = load_runs(tmp_path)
    assert run.median("train_seconds") == 12.0
    assert grid_table([run]).splitlines()[2].endswith("| 12 |")
    assert run.time_split()["wall"] == 12.0  # Fig. 7 and the paper-style table say the same


def test_the_readme_gets_the_table_between_its_markers(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n{README_BEGIN}\nold table\n{README_END}\n\nafter\n")
    put_in_readme(readme, "| new | table |\n")
    assert readme.read_text() == f"# x\n\n{README_BEGIN}\n| new | table |\n{README_END}\n\nafter\n"
    readme.write_text("# no markers\n")
    with pytest.raises(ValueError, match="needs one"):
        put_in_readme(readme, "| t |")
