"""Hydra presets compose, and conf/ never drifts from pyproject's run-config defaults."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from split_core.config import RunConfig

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))


def compose_config(*overrides: str, hydra: bool = False):
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        return compose("config", overrides=list(overrides), return_hydra_config=hydra)


def test_defaults_equal_pyproject():
    """The drift test: composed conf/ defaults == [tool.flwr.app.config], key for key."""
    with (ROOT / "pyproject.toml").open("rb") as f:
        pyproject = tomllib.load(f)["tool"]["flwr"]["app"]["config"]
    composed = OmegaConf.to_container(compose_config().run_config)
    assert composed == pyproject


def test_every_group_option_composes_into_a_valid_run_config():
    for group in ("dataset", "model", "method", "partition"):
        for option in sorted(p.stem for p in (CONF / group).glob("*.yaml")):
            cfg = compose_config(f"{group}={option}", "split=cut1")
            RunConfig.from_run_config(OmegaConf.to_container(cfg.run_config))
    for option in sorted(p.stem for p in (CONF / "split").glob("*.yaml")):
        cfg = compose_config(f"split={option}", "model=resnet110")
        assert cfg.run_config.cut == int(option.removeprefix("cut"))
        RunConfig.from_run_config(OmegaConf.to_container(cfg.run_config))


def test_experiment_presets_exist():
    assert EXPERIMENTS == ["cpu_compare", "full_data", "grid", "paper_cifar10", "paper_cifar100"]


# grid lists its jobs instead (tests/test_sweep.py composes each of them)
@pytest.mark.parametrize("experiment", [e for e in EXPERIMENTS if e != "grid"])
def test_every_job_of_every_preset_is_a_valid_run_config(experiment):
    cfg = compose_config(f"+experiment={experiment}", hydra=True)
    params = {k: str(v).split(",") for k, v in cfg.hydra.sweeper.params.items()}
    assert set(params) == {"method", "split", "num_clients"}
    assert params["method"] == ["dsl", "csl"]
    for split in params["split"]:
        for method in params["method"]:
            job = compose_config(f"+experiment={experiment}", f"split={split}", f"method={method}")
            RunConfig.from_run_config(OmegaConf.to_container(job.run_config))


def test_paper_presets_follow_the_paper_and_he_et_al():
    for dataset in ("cifar10", "cifar100"):
        cfg = compose_config(f"+experiment=paper_{dataset}", hydra=True)
        rc = RunConfig.from_run_config(OmegaConf.to_container(cfg.run_config))
        assert (rc.dataset, rc.depth, rc.batch_size, rc.momentum) == (dataset, 110, 128, 0.9)
        assert (rc.lr, rc.lr_schedule, rc.weight_decay) == (0.1, "step", 1e-4)
        assert rc.lr_at(1) == 0.1 and rc.lr_at(83) == pytest.approx(0.01)
        assert rc.lr_at(124) == pytest.approx(0.001)
        assert str(cfg.hydra.sweeper.params.num_clients) == "1,5,10"
        assert len(str(cfg.hydra.sweeper.params.split).split(",")) == 3


def test_cpu_compare_is_resnet20_two_cuts_k_1_2():
    cfg = compose_config("+experiment=cpu_compare", hydra=True)
    assert cfg.run_config.depth == 20 and cfg.run_config.dataset == "cifar10"
    assert str(cfg.hydra.sweeper.params.split) == "cut3,cut6"
    assert str(cfg.hydra.sweeper.params.num_clients) == "1,2"


def test_full_data_is_resnet20_all_images_30_epochs_with_the_issue_schedule():
    cfg = compose_config("+experiment=full_data", hydra=True)
    rc = RunConfig.from_run_config(OmegaConf.to_container(cfg.run_config))
    assert (rc.depth, rc.cut, rc.samples_per_client, rc.test_samples) == (20, 3, 0, 0)
    assert (rc.num_rounds, rc.batch_size, rc.weight_decay) == (30, 128, 1e-4)
    # lr 0.1, divided by 10 at epochs 15 and 23 (0-based), i.e. from rounds 16 and 24
    lrs = [rc.lr_at(r) for r in range(1, 31)]
    assert (
        lrs[:15] == [0.1] * 15 and lrs[15] == pytest.approx(0.01) and lrs[22] == pytest.approx(0.01)
    )
    assert lrs[23] == pytest.approx(0.001) and lrs[29] == pytest.approx(0.001)
    assert str(cfg.hydra.sweeper.params.num_clients) == "1,5"
