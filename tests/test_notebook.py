"""The comparison notebook executes, top to bottom, with tiny settings, and draws its figures."""

from __future__ import annotations

import json

import nbformat
import pytest
from nbclient import NotebookClient

from tests.conftest import ROOT, TINY, data_dir

pytestmark = pytest.mark.slow  # real Flower runs: deselect with -m 'not slow'

NOTEBOOK = ROOT / "notebooks" / "compare_strategies.ipynb"


def test_notebook_runs_and_plots(tmp_path, monkeypatch):
    settings = TINY | {"num-rounds": 1, "data-dir": data_dir()}
    monkeypatch.setenv("NOTEBOOK_SETTINGS", json.dumps(settings))
    monkeypatch.setenv("NOTEBOOK_OUT", str(tmp_path / "runs"))
    monkeypatch.delenv("SWEEP_DIR", raising=False)
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()

    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) == 5  # Figs. 4-7 and the dCor probe, each shown once
    markdown = [o["data"]["text/markdown"] for o in outputs if "text/markdown" in o.get("data", {})]
    assert (
        len(markdown) == 1
        and "bytes DSL/CSL" in markdown[0]
        and "ResNet-8 cut 1 K=2" in markdown[0]
    )
    assert (tmp_path / "runs" / "dsl" / "rounds.jsonl").exists()
    assert (tmp_path / "runs" / "csl" / "rounds.jsonl").exists()
