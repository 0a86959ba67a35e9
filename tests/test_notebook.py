"""The comparison notebook executes, top to bottom, with tiny settings, and draws its figures."""

from __future__ import annotations

import json

import nbformat
import pytest
from nbclient import NotebookClient

from tests.conftest import ROOT, TINY, data_dir
from tests.test_grid_table import write_run

NOTEBOOK = ROOT / "notebooks" / "compare_strategies.ipynb"


def execute(tmp_path) -> list:
    """Run the notebook top to bottom; its code cells' outputs."""
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    return outputs


def markdown_of(outputs: list) -> list[str]:
    return [o["data"]["text/markdown"] for o in outputs if "text/markdown" in o.get("data", {})]


@pytest.mark.slow  # real Flower runs
def test_notebook_runs_and_plots(tmp_path, monkeypatch):
    settings = TINY | {"num-rounds": 1, "data-dir": data_dir()}
    monkeypatch.setenv("NOTEBOOK_SETTINGS", json.dumps(settings))
    monkeypatch.setenv("NOTEBOOK_OUT", str(tmp_path / "runs"))
    monkeypatch.delenv("SWEEP_DIR", raising=False)
    outputs = execute(tmp_path)
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) == 5  # Figs. 4-7 and the dCor probe, each shown once
    table, grid = markdown_of(outputs)
    assert "bytes DSL/CSL" in table and "ResNet-8 cut 1 K=2" in table
    assert "| ResNet-8 cut 1, K=2 | CSL | 1/1 |" in grid
    assert "- ResNet-8 cut 1, K=2: **" in grid  # a verdict: both methods finished
    assert (tmp_path / "runs" / "dsl" / "rounds.jsonl").exists()
    assert (tmp_path / "runs" / "csl" / "rounds.jsonl").exists()


def test_notebook_reads_a_results_directory(tmp_path, monkeypatch):
    """Pointed at a grid's directory (SWEEP_DIR), it draws that grid: no run of its own."""
    grid = tmp_path / "grid"
    write_run(grid, "csl0", [0.5, 0.8, 0.90], method="csl", seed=0)
    write_run(grid, "dsl0", [0.5, 0.8, 0.87], method="dsl", seed=0)
    write_run(grid, "conv0", [0.5, 0.8, 0.885], method="dsl", seed=0, **{"aux-head": "conv_mlp"})
    monkeypatch.setenv("SWEEP_DIR", str(grid))
    monkeypatch.setenv("NOTEBOOK_OUT", str(tmp_path / "runs"))
    outputs = execute(tmp_path)
    assert len([o for o in outputs if "image/png" in o.get("data", {})]) == 5
    _, table = markdown_of(outputs)
    assert "**DSL behind**, DSL − CSL = -3.0 pt over 1 seed" in table
    assert "DSL aux-head=conv_mlp: closes 50 % of the gap" in table
    assert not (tmp_path / "runs").exists()
