"""Real `flwr run` simulations: both methods end to end, their bytes, and their exactness."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from experiments import reference
from flower_app.results import CONTRACT_KEYS, read_rounds
from models import cut_shape, resnet
from split_core.client import SplitClient
from split_core.config import RunConfig
from tests.conftest import TINY, data_dir, real_data_dir

pytestmark = pytest.mark.slow  # real Flower runs: deselect with -m 'not slow'


@pytest.fixture(scope="module")
def runs(flwr_run):
    """One DSL and one CSL run with identical settings: 2 clients, 2 rounds, real CIFAR-10."""
    out = {}
    for method in ("dsl", "csl"):
        log, run_dir = flwr_run(f"tiny-{method}", TINY | {"method": method})
        assert (run_dir / "rounds.jsonl").exists(), log[-3000:]
        out[method] = (log, run_dir, read_rounds(run_dir))
    return out


def tiny_cfg(**extra) -> RunConfig:
    return RunConfig.from_run_config(TINY | {"data-dir": data_dir()} | extra)


@pytest.mark.parametrize("method", ["dsl", "csl"])
def test_real_run_writes_contract_and_learns(runs, method):
    log, run_dir, rounds = runs[method]
    assert [r["round"] for r in rounds] == [1, 2]
    for r in rounds:
        assert set(CONTRACT_KEYS) <= set(r), set(CONTRACT_KEYS) - set(r)
        assert r["method"] == method
        assert r["num_clients"] == 2 and r["failed_clients"] == 0
        assert r["client_peak_saved_bytes"] > 0 and r["server_peak_saved_bytes"] > 0
        assert r["client_peak_rss_bytes"] > 0 and r["server_peak_rss_bytes"] > 0
        assert r["round_seconds"] > 0 and r["client_compute_seconds"] > 0
        assert 0.0 < r["probe_dcor"] <= 1.0  # the privacy lens, for both methods
    assert (rounds[-1]["aux_test_accuracy"] is None) == (method == "csl")
    config = (run_dir / "config.json").read_text()
    assert f'"method": "{method}"' in config
    assert "[round 2/2]" in log and "summary of" in log
    assert (run_dir / "model.pt").exists()


@pytest.mark.parametrize("method", ["dsl", "csl"])
def test_real_runs_learn(runs, method):
    real_data_dir()  # synthetic images have nothing to learn
    assert runs[method][2][-1]["test_accuracy"] > 0.15  # chance is 0.10 on 400 test images


def test_byte_accounting(runs):
    """Bytes read off the payloads equal samples x C*H*W x 4; CSL adds gradients of that size."""
    acts_per_sample = math.prod(cut_shape(TINY["depth"], TINY["cut"])) * 4
    samples = 2 * TINY["samples-per-client"]
    dsl, csl = runs["dsl"][2][0], runs["csl"][2][0]
    for r in (dsl, csl):
        assert r["bytes_activations"] == samples * acts_per_sample
        assert r["bytes_labels"] == samples  # uint8 labels
        assert r["train_examples"] == samples
        assert r["bytes_eval"] > TINY["test-samples"] * acts_per_sample
    assert dsl["bytes_gradients"] == 0
    assert csl["bytes_gradients"] == dsl["bytes_activations"]
    assert csl["bytes_activations"] == dsl["bytes_activations"]
    assert csl["bytes_labels"] == dsl["bytes_labels"]
    ratio = dsl["bytes_train_total"] / csl["bytes_train_total"]
    assert 0.5 <= ratio <= 0.52


def test_dsl_client_update_is_the_local_aux_update(runs):
    """The client weights after 2 DSL rounds equal plain aux-loss SGD on each client + FedAvg.

    Computed here directly in PyTorch, without the app's steps: no server signal can be in it.
    """
    _, run_dir, _ = runs["dsl"]
    cfg = tiny_cfg(method="dsl")
    clients = [SplitClient.create(cfg, pid, 2, cfg.data_dir) for pid in range(2)]
    optimizers = [
        torch.optim.SGD(
            [p for m in c.modules.values() for p in m.parameters()],
            lr=cfg.lr,
            momentum=cfg.momentum,
            weight_decay=cfg.weight_decay,
        )
        for c in clients
    ]
    global_state = _client_state(clients[0])
    for rnd in range(cfg.num_rounds):
        states = []
        for client, opt in zip(clients, optimizers, strict=True):
            _load_client_state(client, global_state)
            for b in range(client.num_batches):
                x, y = client.train_batch(rnd, b)
                loss = F.cross_entropy(client.modules["aux"](client.modules["segment"](x)), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
            states.append(_client_state(client))
        global_state = {
            k: (
                sum(0.5 * s[k].double() for s in states).to(states[0][k].dtype)
                if states[0][k].is_floating_point()
                else max(s[k] for s in states)
            )
            for k in states[0]
        }
    saved = torch.load(run_dir / "model.pt")["client"]
    assert set(saved) == set(global_state)
    for key, value in global_state.items():
        torch.testing.assert_close(saved[key], value, rtol=1e-5, atol=1e-5, msg=key)


def test_flower_runs_match_the_in_process_reference(runs):
    """The event loop visits batches in a fixed order: a Flower run equals the no-Flower run."""
    for method in ("dsl", "csl"):
        _, run_dir, rounds = runs[method]
        ref = reference.train(tiny_cfg(method=method), num_clients=2)
        saved = torch.load(run_dir / "model.pt")
        for key, value in ref.server.segment.state_dict().items():
            torch.testing.assert_close(saved["server_segment"][key], value, rtol=1e-5, atol=1e-5)
        assert ref.history[-1]["test_accuracy"] == pytest.approx(rounds[-1]["test_accuracy"])


def test_csl_through_flower_is_end_to_end_backprop(flwr_run):
    """N CSL steps over Flower == N SGD steps of the unsplit ResNet on the same batches."""
    steps, batch = 4, 16
    config = TINY | {
        "method": "csl",
        "cut": 2,
        "batch-size": batch,
        "samples-per-client": steps * batch,
        "num-rounds": 1,
        "test-samples": 32,
    }
    log, run_dir = flwr_run("csl-is-backprop", config, clients=1)
    assert (run_dir / "model.pt").exists(), log[-3000:]
    saved = torch.load(run_dir / "model.pt")

    cfg = RunConfig.from_run_config(config | {"data-dir": data_dir()})
    client = SplitClient.create(cfg, 0, 1, cfg.data_dir)
    net = resnet(cfg.depth, cfg.num_classes, cfg.seed)
    opt = torch.optim.SGD(
        net.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
    )
    for b in range(steps):
        x, y = client.train_batch(0, b)
        loss = F.cross_entropy(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    client_part, server_part = net.split(cfg.cut)
    for key, value in client_part.state_dict().items():
        torch.testing.assert_close(saved["client"][f"segment.{key}"], value, rtol=1e-5, atol=1e-5)
    for key, value in server_part.state_dict().items():
        torch.testing.assert_close(saved["server_segment"][key], value, rtol=1e-5, atol=1e-5)
    # and it did move: the weights are not the initial ones
    init_client, _ = resnet(cfg.depth, cfg.num_classes, cfg.seed).split(cfg.cut)
    first = next(iter(init_client.state_dict()))
    assert not np.allclose(saved["client"][f"segment.{first}"], init_client.state_dict()[first])


def test_bad_config_fails_before_training(flwr_run):
    log, run_dir = flwr_run("bad-cut", TINY | {"cut": 99})
    assert "ConfigError: invalid run config: cut must satisfy 1 <= cut < 3 for ResNet-8" in log
    assert not run_dir.exists()


def test_missing_data_fails_before_training(flwr_run, tmp_path):
    empty = tmp_path / "no-data-here"
    empty.mkdir()
    log, run_dir = flwr_run("no-data", TINY | {"data-dir": str(empty)})
    assert "SetupError: 2 of 2 clients failed set-up" in log
    assert "DataNotFoundError" in log and str(empty) in log
    assert not run_dir.exists()


def _client_state(client: SplitClient) -> dict[str, torch.Tensor]:
    return {
        f"{name}.{k}": v.detach().clone()
        for name, m in client.modules.items()
        for k, v in m.state_dict().items()
    }


def _load_client_state(client: SplitClient, state: dict[str, torch.Tensor]) -> None:
    for name, m in client.modules.items():
        m.load_state_dict({k[len(name) + 1 :]: v for k, v in state.items() if k.startswith(name)})
