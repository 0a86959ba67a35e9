"""Tests for flower_app.config: pyproject is the one source of defaults, bad values fail early."""

from __future__ import annotations

import dataclasses
import os
import tomllib
from pathlib import Path

import pytest

from split_core.config import ConfigError, RunConfig

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def _pyproject_defaults() -> dict:
    with PYPROJECT.open("rb") as f:
        return tomllib.load(f)["tool"]["flwr"]["app"]["config"]


def _error(overrides: dict) -> str:
    with pytest.raises(ConfigError) as info:
        RunConfig.from_run_config(overrides)
    message = str(info.value)
    assert message.startswith("invalid run config: ")
    return message


def test_defaults_are_pyproject() -> None:
    """`flwr run` and in-process callers must train the same default configuration."""
    expected = _pyproject_defaults()
    got = RunConfig.from_run_config({}).to_run_config()
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert got[key] == value, key
        assert type(got[key]) is type(value), key
    assert RunConfig.from_run_config(None) == RunConfig.from_run_config({})


def test_every_field_has_a_kebab_key() -> None:
    """Each dataclass field travels under its kebab-case name, and only those keys exist."""
    names = {f.name.replace("_", "-") for f in dataclasses.fields(RunConfig)}
    assert names == set(_pyproject_defaults())


def test_overrides_are_applied() -> None:
    cfg = RunConfig.from_run_config({"depth": 110, "cut": 53, "method": "csl", "lr": 0.05})
    assert (cfg.depth, cfg.cut, cfg.method, cfg.lr) == (110, 53, "csl", 0.05)
    assert cfg.num_classes == 10
    assert RunConfig.from_run_config({"dataset": "cifar100"}).num_classes == 100


@pytest.mark.parametrize(
    ("overrides", "phrase"),
    [
        (
            {"depth": 20, "cut": 9},
            "cut must satisfy 1 <= cut < 9 for ResNet-20 (9 residual blocks), got 9",
        ),
        (
            {"depth": 20, "cut": 0},
            "cut must satisfy 1 <= cut < 9 for ResNet-20 (9 residual blocks), got 0",
        ),
        (
            {"depth": 8, "cut": 3},
            "cut must satisfy 1 <= cut < 3 for ResNet-8 (3 residual blocks), got 3",
        ),
        ({"method": "fsl"}, "method 'fsl' is not one of ['csl', 'dsl']"),
        (
            {"aux-head": "mlp"},
            "aux-head 'mlp' not in ['conv_mlp', 'fc', 'fc_unscaled', 'pool_fc']",
        ),
        ({"dataset": "mnist"}, "dataset 'mnist' is not one of ['cifar10', 'cifar100']"),
        ({"partition": "shards"}, "partition 'shards' not in ('iid', 'dirichlet')"),
        (
            {"lr-schedule": "linear"},
            "lr-schedule 'linear' not in ('constant', 'step', 'cosine')",
        ),
        (
            {"payload-dtype": "int4"},
            "payload-dtype 'int4' not in ('float32', 'float16', 'bfloat16', 'int8')",
        ),
        (
            {"feedback-every": 2, "method": "csl"},
            "feedback-every applies to method 'dsl', not 'csl'",
        ),
        ({"feedback-every": -1}, "feedback-every must be >= 0 (0 = pure DSL)"),
        ({"aux-weight": -0.5}, "aux-weight must be >= 0, got -0.5"),
        (
            {"depth": 21},
            "depth must be 6n+2 with n >= 1 (8, 20, 32, 56, 110, ...), got 21",
        ),
        ({"depth": 2}, "depth must be 6n+2 with n >= 1 (8, 20, 32, 56, 110, ...), got 2"),
        ({"num-rounds": 0}, "num-rounds must be >= 1, got 0"),
        ({"batch-size": 0}, "batch-size must be >= 1, got 0"),
        ({"lr": 0}, "lr must be > 0, got 0.0"),
        ({"lr": -0.1}, "lr must be > 0, got -0.1"),
        ({"momentum": 1.0}, "momentum must be in [0, 1), got 1.0"),
        ({"momentum": -0.5}, "momentum must be in [0, 1), got -0.5"),
        ({"weight-decay": -1e-4}, "weight-decay must be >= 0, got -0.0001"),
        ({"dirichlet-alpha": 0}, "dirichlet-alpha must be > 0, got 0.0"),
        ({"samples-per-client": -1}, "samples-per-client must be >= 0 (0 = all)"),
        ({"test-samples": -1}, "test-samples must be >= 0 (0 = all)"),
        ({"chunk-mib": 0}, "chunk-mib must be > 0, got 0.0"),
        ({"client-threads": -1}, "threads must be >= 0"),
        ({"server-threads": -1}, "threads must be >= 0"),
        ({"min-clients": 0}, "min-clients must be >= 1, got 0"),
        ({"output-dir": ""}, "output-dir must not be empty"),
        ({"foo": 1}, "unknown key 'foo'"),
        ({"num_rounds": 3}, "unknown key 'num_rounds'"),  # snake case is not the wire format
        ({"depth": "20"}, "depth: expected int, got str '20'"),
        ({"lr": "0.1"}, "lr: expected float, got str '0.1'"),
        ({"method": 1}, "method: expected str, got int 1"),
        ({"depth": True}, "depth: expected int, got bool True"),
        ({"lr": True}, "lr: expected float, got bool True"),
        ({"depth": 20.5}, "depth: expected int, got float 20.5"),
        ({"device": "gpu"}, "device 'gpu' is not 'auto', 'cpu', 'cuda' or 'cuda:N'"),
        ({"device": "cuda:x"}, "device 'cuda:x' is not 'auto', 'cpu', 'cuda' or 'cuda:N'"),
        ({"device": ""}, "device '' is not 'auto', 'cpu', 'cuda' or 'cuda:N'"),
    ],
)
def test_bad_value_is_refused(overrides: dict, phrase: str) -> None:
    """A wrong value must fail before any message is sent, naming the key and the rule."""
    assert phrase in _error(overrides)


def test_several_problems_in_one_error() -> None:
    """All range problems are reported together, so one edit fixes a config."""
    message = _error({"num-rounds": 0, "lr": 0, "momentum": 1.0, "method": "x", "cut": 99})
    for phrase in (
        "num-rounds must be >= 1, got 0",
        "lr must be > 0, got 0.0",
        "momentum must be in [0, 1), got 1.0",
        "method 'x' is not one of ['csl', 'dsl']",
        "cut must satisfy 1 <= cut < 9 for ResNet-20 (9 residual blocks), got 99",
    ):
        assert phrase in message
    assert message.count("; ") == 4


def test_key_and_type_problems_in_one_error() -> None:
    message = _error({"foo": 1, "bar": 2, "depth": "20", "lr": "x"})
    assert message == (
        "invalid run config: unknown key 'foo'; unknown key 'bar'; "
        "depth: expected int, got str '20'; lr: expected float, got str 'x'"
    )


def test_config_error_is_a_value_error() -> None:
    """Callers that catch ValueError (flwr's run-config parsing style) still catch it."""
    assert issubclass(ConfigError, ValueError)


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:0", "cuda:3"])
def test_good_devices_are_accepted(device: str) -> None:
    """A GPU device may be named on a machine without one: the config is checked anywhere."""
    assert RunConfig.from_run_config({"device": device}).device == device


def test_int_is_accepted_for_float() -> None:
    """TOML and the command line write `lr=1` for 1.0."""
    cfg = RunConfig.from_run_config({"lr": 1, "chunk-mib": 8, "weight-decay": 0})
    assert cfg.lr == 1.0 and type(cfg.lr) is float
    assert cfg.chunk_mib == 8.0 and type(cfg.chunk_mib) is float
    assert cfg.weight_decay == 0.0 and type(cfg.weight_decay) is float


def test_integral_float_is_accepted_for_int() -> None:
    cfg = RunConfig.from_run_config({"depth": 20.0, "batch-size": 64.0})
    assert cfg.depth == 20 and type(cfg.depth) is int
    assert cfg.batch_size == 64 and type(cfg.batch_size) is int


def test_non_integral_float_is_refused_for_int() -> None:
    assert "batch-size: expected int, got float 64.5" in _error({"batch-size": 64.5})


def test_constant_lr() -> None:
    cfg = RunConfig.from_run_config({"lr": 0.05, "num-rounds": 4})
    assert [cfg.lr_at(r) for r in range(1, 5)] == [0.05] * 4


def test_step_lr_schedule() -> None:
    """He et al.: divide by 10 at 50 % and at 75 % of training."""
    cfg = RunConfig.from_run_config({"lr-schedule": "step", "num-rounds": 8, "lr": 0.1})
    got = [cfg.lr_at(r) for r in range(1, 9)]
    assert got == pytest.approx([0.1] * 4 + [0.01] * 2 + [0.001] * 2, rel=1e-12)


def test_step_lr_schedule_few_rounds() -> None:
    cfg = RunConfig.from_run_config({"lr-schedule": "step", "num-rounds": 2, "lr": 0.1})
    assert [cfg.lr_at(r) for r in (1, 2)] == pytest.approx([0.1, 0.01], rel=1e-12)
    one = RunConfig.from_run_config({"lr-schedule": "step", "num-rounds": 1, "lr": 0.1})
    assert one.lr_at(1) == 0.1


def test_to_run_config_round_trips() -> None:
    """The config travels to clients as a flat record and must arrive unchanged."""
    cfg = RunConfig.from_run_config(
        {"method": "csl", "depth": 32, "cut": 14, "lr": 0.02, "seed": 9, "device": "cpu"}
    )
    flat = cfg.to_run_config()
    assert all("_" not in k for k in flat)
    assert RunConfig.from_run_config(flat) == cfg


def test_default_run_config_is_not_mutated_by_overrides() -> None:
    """Overrides of one call must not leak into the defaults of the next."""
    RunConfig.from_run_config({"depth": 110, "cut": 5})
    assert RunConfig.from_run_config({}).depth == _pyproject_defaults()["depth"]


@pytest.mark.parametrize("key", ["lr", "chunk-mib"])
def test_infinite_float_is_refused(key: str) -> None:
    """'All checked up front': an infinite value must not reach the first training message."""
    assert f"{key} must be" in _error({key: float("inf")})


# cut 3 carries 16x32x32 float32 = 64 KiB per image: a 32 MiB chunk holds 4 batches of 128;
# cut 6 (32x16x16) holds 8.
@pytest.mark.parametrize(
    ("overrides", "clients", "turns"),
    [
        ({"method": "csl"}, 1, True),
        ({"method": "csl"}, 2, False),
        ({"method": "dsl"}, 1, False),
        ({"method": "dsl", "feedback-every": 4}, 1, True),
        ({"method": "dsl", "feedback-every": 5}, 1, False),  # one chunk in two never waits
        ({"method": "dsl", "feedback-every": 8, "cut": 6}, 1, True),
        ({"method": "dsl", "feedback-every": 4}, 2, False),
    ],
)
def test_auto_threads_give_each_party_every_core_only_when_they_take_turns(
    overrides, clients, turns
):
    base = {"depth": 20, "cut": 3, "batch-size": 128, "chunk-mib": 32.0}
    cfg = RunConfig.from_run_config(base | {"payload-dtype": "float32"} | overrides)
    assert cfg.parties_take_turns(clients) is turns
    cores = os.cpu_count() or 1
    assert cfg.torch_threads(0, clients) == (cores if turns else max(1, cores // 2))
    assert cfg.torch_threads(0, clients, cpus=1.0) == 1  # never more than the party was given
    assert cfg.torch_threads(3, clients) == 3  # asked for: as asked
