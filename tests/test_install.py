"""A non-editable install works: the wheel, installed alone into a fresh venv, runs the
notebook's code path and a sweep job, importing the project from the wheel, never the checkout.

What can break only outside a checkout is what is read from the source tree at run time: the
run-config defaults (pyproject.toml), Hydra's conf/, and the Flower app directory `flwr run`
builds its FAB from. The temporary venv sees the project venv's packages through a .pth line
(torch and flwr are not installed again). `--system-site-packages` would not do: from a venv's
python it exposes the base interpreter's site-packages, not the venv's. A plain .pth line adds
that directory without running its own .pth files, so an editable install of the checkout
there stays out of the way.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import nbformat
import pytest

from deploy.local_superlink import APP_PACKAGES
from tests.conftest import ROOT, TINY, data_dir
from tests.test_grid_table import write_run

pytestmark = pytest.mark.slow  # builds a wheel and runs Flower once: about a minute

NOTEBOOK = ROOT / "notebooks" / "compare_strategies.ipynb"
SETTINGS = TINY | {"num-rounds": 1, "samples-per-client": 64, "test-samples": 64}


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv holding only the project's wheel (and flwr's commands), on top of the
    project venv's third-party packages."""
    tmp = tmp_path_factory.mktemp("install")
    wheels = tmp / "wheels"
    build = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation"]
    subprocess.run([*build, "-w", str(wheels), str(ROOT)], check=True, capture_output=True)
    (wheel,) = wheels.glob("split_learning-*.whl")

    env = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env)], check=True)
    python = env / "bin" / "python"
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    Path(purelib, "project_venv.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    install = [sys.executable, "-m", "pip", "--python", str(python), "install"]
    subprocess.run([*install, "--no-deps", "--no-index", str(wheel)], check=True)
    # flwr's commands (flwr, flower-superlink, flwr-simulation, ...) as this venv's own, so the
    # SuperLink and the apps it starts run on the venv's python and import the wheel.
    for entry in importlib.metadata.distribution("flwr").entry_points:
        if entry.group == "console_scripts":
            script = env / "bin" / entry.name
            script.write_text(
                f"#!{python}\nimport sys\nfrom {entry.module} import {entry.attr}\n"
                f"sys.exit({entry.attr}())\n"
            )
            script.chmod(0o755)
    return env


def run_in(venv: Path, cwd: Path, *args: str, extra_env: dict[str, str] | None = None) -> str:
    """A command on the venv's python, from a directory outside the checkout."""
    cwd.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env |= (extra_env or {}) | {
        "PATH": f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}",
        "MPLBACKEND": "Agg",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_HOME": str(cwd / "flwr-home"),
    }
    env.pop("FLOWER_BIN", None)
    done = subprocess.run(
        [str(venv / "bin" / "python"), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


WHERE_FROM = """
import importlib, json, split_core.config
print(json.dumps({
    "files": {p: importlib.import_module(p).__file__ for p in APP_PACKAGES},
    "defaults": split_core.config.default_run_config(),
    "packaged": str(split_core.config.PACKAGED_PYPROJECT),
}))
"""

# Appended to the notebook's cells: where its modules came from, and what it drew.
NOTEBOOK_CHECKS = """
import experiments.report, flower_app.simulation
from matplotlib.figure import Figure
for module in (experiments.report, flower_app.simulation):
    assert module.__file__.startswith(os.environ["EXPECTED_PREFIX"]), module.__file__
assert sorted(run.method for run in runs) == ["csl", "dsl"]
for draw in (fig_accuracy, fig_communication, fig_memory, fig_time, fig_probe):
    assert isinstance(draw(runs), Figure)
print(comparison_table(runs))
"""


def test_wheel_is_imported_from_the_venv_with_the_checkouts_defaults(venv, tmp_path):
    from split_core.config import default_run_config

    script = f"APP_PACKAGES = {APP_PACKAGES!r}\n{WHERE_FROM}"
    found = json.loads(run_in(venv, tmp_path, "-c", script))
    for package, file in found["files"].items():
        assert Path(file).is_relative_to(venv), f"{package} imported from {file}"
    assert Path(found["packaged"]).is_relative_to(venv)
    assert found["defaults"] == default_run_config()


def test_wheel_runs_the_notebooks_code(venv, tmp_path):
    """Every code cell of the notebook (its `%` magics left out), pointed at a results directory,
    then checks of where its modules came from and what it drew. Its own runs (`simulate`, two
    Flower simulations) are tests/test_notebook.py's; here the sweep job below is the wheel's
    Flower run."""
    cells = nbformat.read(NOTEBOOK, as_version=4).cells
    lines = [
        line
        for cell in cells
        if cell.cell_type == "code"
        for line in cell.source.splitlines()
        if not line.startswith("%")
    ]
    (tmp_path / "notebook.py").write_text("\n".join(lines) + NOTEBOOK_CHECKS)
    grid = tmp_path / "grid"
    write_run(grid, "csl0", [0.5, 0.8, 0.90], method="csl", seed=0)
    write_run(grid, "dsl0", [0.5, 0.8, 0.87], method="dsl", seed=0)
    settings = {"SWEEP_DIR": str(grid), "EXPECTED_PREFIX": str(venv)}
    out = run_in(venv, tmp_path, "notebook.py", extra_env=settings)
    assert "2 runs under" in out and "bytes DSL/CSL" in out and "ResNet-8 cut 1 K=1" in out
    assert not (tmp_path / "outputs").exists()  # no run of its own


def test_wheel_runs_a_sweep_job(venv, tmp_path):
    """One Hydra job through `flwr run` on a private SuperLink: conf/ and the Flower app come
    from the installed wheel."""
    run_config = SETTINGS | {"data-dir": data_dir(), "probe-samples": 0}
    overrides = [f"run_config.{k}={json.dumps(v)}" for k, v in run_config.items()]
    run_in(
        venv,
        tmp_path,
        "-m",
        "experiments.sweep",
        "num_clients=1",
        "cpus_per_client=1",
        "job_timeout_s=300",
        f"hydra.run.dir={tmp_path / 'job'}",
        *overrides,
    )
    (status,) = [json.loads(line) for line in (tmp_path / "job" / "jobs.jsonl").open()]
    assert status["status"] != "failed", status["reason"]
    run_dir = Path(status["run_dir"])
    rounds = (run_dir / "rounds.jsonl").read_text().splitlines()
    assert len(rounds) == 1 and json.loads(rounds[0])["num_clients"] == 1
    assert (run_dir / "model.pt").is_file()
