"""Fixtures that run the app for real: a private SuperLink for `flwr run`, tiny configs, data.

The SuperLink is started here (not by `flwr run`) so that its PID is known and it is stopped at
the end of the session; it gets its own FLWR_HOME and ports, so it never touches a developer's.
"""

from __future__ import annotations

import functools
import os
import pickle
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.supercore.task_identity import TaskIdentity

from deploy.local_superlink import LocalSuperLink
from flower_app import client_app as real

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")

# ResNet-8 cut after its first block, a few hundred real CIFAR-10 images per client: seconds per
# run, yet enough to learn well above chance in two rounds.
TINY = {
    "depth": 8,
    "cut": 1,
    "batch-size": 32,
    "lr": 0.05,
    "samples-per-client": 600,
    "test-samples": 400,
    "num-rounds": 2,
    "chunk-mib": 4.0,
    "client-threads": 1,  # pinned: float sums depend on the thread count, and tests compare
    "server-threads": 1,  # Flower runs with in-process computations bit for bit
}


def real_cifar10_from_env() -> Path | None:
    """The real CIFAR-10 (`train.zip` + `test.zip`) named by SPLIT_LEARNING_DATA_DIR: the folder
    itself or its `cifar10/` subfolder, so CI can pass the data root (`../shared/data`) and a
    developer the dataset folder. Resolved, because `flwr run` apps start in another directory."""
    value = os.environ.get("SPLIT_LEARNING_DATA_DIR", "")
    if not value or os.environ.get("SPLIT_LEARNING_TESTS_SYNTHETIC"):
        return None  # SPLIT_LEARNING_TESTS_SYNTHETIC: run as on a machine without CIFAR-10
    root = Path(value).expanduser().resolve()
    return next((p for p in (root, root / "cifar10") if (p / "train.zip").is_file()), None)


REAL_CIFAR10 = real_cifar10_from_env()


# The files whose tests start real Flower and Ray processes, longest first (their share of a
# 4-worker run on a 2-core CPU, from `--durations`: test_resume about 540 s ... test_hostile 80).
# xdist's `--dist loadfile` hands files to workers in collection order: started last, a long
# file would run alone at the end while the other workers idle. Only the order depends on this.
LONGEST_FIRST = (
    "test_resume.py",
    "test_poisoned.py",
    "test_sweep.py",
    "test_scale.py",
    "test_deployment.py",
    "test_deploy_script.py",
    "test_flower_runs.py",
    "test_gpu_check.py",
    "test_faults.py",
    "test_feedback.py",
    "test_notebook.py",
    "test_install.py",
    "test_ray_cluster.py",
    "test_hostile.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Long files first (a stable sort: each file's tests keep their order)."""
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread in the test process. The apps in TINY runs are pinned to one thread too,
    and float sums depend on how work is split across threads, so computations that are compared
    with a Flower run bit for bit must use one; it also keeps the suite off the second core."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def task_identity():
    """Flower 1.42 builds a Message only inside a task: give this process one (run 1, node 0),
    for tests that build messages without a Flower run; the previous identity comes back after."""
    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


def real_data_dir() -> str:
    """The real CIFAR-10 (JPEG zip layout), for tests that assert learning; they skip without."""
    if REAL_CIFAR10 is None:
        pytest.skip("real CIFAR-10 not found: set SPLIT_LEARNING_DATA_DIR to its folder")
    return str(REAL_CIFAR10)


def data_dir() -> str:
    """Real CIFAR-10 where it exists, else a synthetic copy in its python format.

    Tests of exactness (state round trips, equal weights, byte counts, faults) need images, not
    these images, so they run everywhere; only tests that assert learning need the real ones.
    """
    try:
        return real_data_dir()
    except pytest.skip.Exception:
        return synthetic_cifar10()


@functools.cache
def synthetic_cifar10() -> str:
    root = Path(tempfile.mkdtemp(prefix="synthetic-cifar10-"))
    write_cifar10_pickles(root, n_train=2500, n_test=500)
    return str(root)


def write_cifar10_pickles(
    root: Path, seed: int = 0, n_train: int = 20, n_test: int = 3
) -> tuple[np.ndarray, ...]:
    """Random images in torchvision's CIFAR-10 python layout (five train batches, one test)."""
    rng = np.random.default_rng(seed)
    x_train = rng.integers(0, 256, (n_train, 32, 32, 3), dtype=np.uint8)
    y_train = rng.integers(0, 10, n_train)
    x_test = rng.integers(0, 256, (n_test, 32, 32, 3), dtype=np.uint8)
    y_test = np.array([9, 0, 4]) if n_test == 3 else rng.integers(0, 10, n_test)
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True, exist_ok=True)
    per_batch = n_train // 5
    for i in range(5):
        part = slice(per_batch * i, per_batch * (i + 1))
        batch = {b"data": chw_rows(x_train[part]), b"labels": y_train[part].tolist()}
        (d / f"data_batch_{i + 1}").write_bytes(pickle.dumps(batch))
    test = {b"data": chw_rows(x_test), b"labels": y_test.tolist()}
    (d / "test_batch").write_bytes(pickle.dumps(test))
    return x_train, y_train, x_test, y_test


def chw_rows(x_hwc: np.ndarray) -> np.ndarray:
    return x_hwc.transpose(0, 3, 1, 2).reshape(len(x_hwc), 3072)


def client_app_with(**replaced: Callable[[Message, Context], Message]) -> ClientApp:
    """The real ClientApp with some handlers replaced, by name: setup, checkpoint, restore,
    forward, backward, evaluate. The app is pickled with every simulated message, so what a
    replacement must remember between messages belongs in ``context.state``."""
    handlers = {
        "setup": real.setup,
        "checkpoint": real.checkpoint,
        "restore": real.restore,
        "forward": real.train,
        "backward": real.train,
        "evaluate": real.evaluate,
    } | replaced
    app = ClientApp()
    for name in ("setup", "checkpoint", "restore"):
        app.query(name)(handlers[name])
    app.train("forward")(handlers["forward"])
    app.train("backward")(handlers["backward"])
    app.evaluate()(handlers["evaluate"])
    return app


class FlowerRunner:
    """`flwr run .` against the session's SuperLink; returns the log and the run directory."""

    def __init__(self, link: LocalSuperLink, out: Path) -> None:
        self.link, self.out = link, out

    def __call__(
        self,
        name: str,
        config: dict,
        clients: int = 2,
        timeout: float = 600,
        cpus_per_client: float | None = None,
    ) -> tuple[str, Path]:
        overrides = {"output-dir": str(self.out), "run-name": name} | config
        overrides.setdefault("data-dir", data_dir())
        result = self.link.run(
            overrides, clients=clients, timeout=timeout, cpus_per_client=cpus_per_client
        )
        return result.log, result.run_dir


@pytest.fixture(scope="session")
def flwr_run(tmp_path_factory: pytest.TempPathFactory) -> FlowerRunner:
    with LocalSuperLink(tmp_path_factory.mktemp("flwr-home")) as link:
        yield FlowerRunner(link, tmp_path_factory.mktemp("runs"))
