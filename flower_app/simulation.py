"""Run the app in this Python process (notebooks, tests): Flower's Simulation Engine, no CLI.

``flwr run .`` is the way to run experiments; this is for a notebook kernel or a test that needs
a ClientApp of its own. Flower hands apps started this way an empty run config, so the config
is baked into the ServerApp here, on top of the pyproject defaults.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.simulation import run_simulation

from flower_app import client_app as split_client_app
from flower_app.results import default_run_name
from flower_app.server_app import run
from split_core.config import RunConfig
from strategies.split_strategy import SplitLearningStrategy


def server_app_for(
    overrides: Mapping[str, Any], strategy: type[SplitLearningStrategy] = SplitLearningStrategy
) -> ServerApp:
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        cfg = RunConfig.from_run_config(dict(context.run_config) | dict(overrides))
        run(grid, cfg, strategy)

    return app


def simulate(
    overrides: Mapping[str, Any] | None = None,
    num_clients: int = 2,
    *,
    client_app: ClientApp | None = None,
    strategy: type[SplitLearningStrategy] = SplitLearningStrategy,
    cpus_per_client: float = 2.0,
    gpus_per_client: float = 0.0,
    ray_cpus: int | None = None,
) -> Path:
    """Run one simulation to the end and return its results directory.

    ``cpus_per_client`` and ``gpus_per_client`` are Ray's resources per ClientApp actor, as
    ``--federation-config "client-resources-num-cpus=.. client-resources-num-gpus=.."`` gives
    them to `flwr run`: the number of actors is what the machine holds of them, or what
    ``ray_cpus`` CPUs hold (Ray's ``num_cpus``: the same number of actors on any machine).
    """
    cfg = RunConfig.from_run_config(overrides)  # fail here, before Ray starts
    name = cfg.run_name or default_run_name(cfg, num_clients)
    backend: dict[str, Any] = {
        "client_resources": {"num_cpus": cpus_per_client, "num_gpus": gpus_per_client}
    }
    if ray_cpus is not None:
        backend["init_args"] = {"num_cpus": ray_cpus}
    run_simulation(
        server_app=server_app_for(dict(overrides or {}) | {"run-name": name}, strategy),
        client_app=client_app or split_client_app.app,
        num_supernodes=num_clients,
        backend_config=backend,
    )
    logging.getLogger("flwr").setLevel(logging.INFO)
    return (Path(cfg.output_dir).expanduser() / name).resolve()
