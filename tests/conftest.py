"""Fixtures that run the app for real: a private SuperLink for `flwr run`, tiny configs, data.

The SuperLink is started here (not by `flwr run`) so that its PID is known and it is stopped at
the end of the session; it gets its own FLWR_HOME and ports, so it never touches a developer's.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from flower_app.local_superlink import LocalSuperLink

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


CIFAR10_CANDIDATES = [Path(p) for p in (os.environ.get("SPLIT_LEARNING_DATA_DIR", ""),) if p] + [
    ROOT.parent / "shared" / "data" / "cifar10",
    Path("/work/shared/data/cifar10"),
]


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread in the test process. The apps in TINY runs are pinned to one thread too,
    and float sums depend on how work is split across threads, so computations that are compared
    with a Flower run bit for bit must use one; it also keeps the suite off the second core."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def data_dir() -> str:
    """The real CIFAR-10 (JPEG zip layout); tests that train on it skip where it is absent."""
    for path in CIFAR10_CANDIDATES:
        if (path / "train.zip").exists():
            return str(path)
    pytest.skip(f"real CIFAR-10 not found in {[str(p) for p in CIFAR10_CANDIDATES]}")


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
        overrides = {"output-dir": str(self.out), "run-name": name, "data-dir": data_dir()} | config
        result = self.link.run(
            overrides, clients=clients, timeout=timeout, cpus_per_client=cpus_per_client
        )
        return result.log, result.run_dir


@pytest.fixture(scope="session")
def flwr_run(tmp_path_factory: pytest.TempPathFactory) -> FlowerRunner:
    with LocalSuperLink(tmp_path_factory.mktemp("flwr-home")) as link:
        yield FlowerRunner(link, tmp_path_factory.mktemp("runs"))
