"""Ray actors and client state: how often CSL recomputes a graph, and what a node's state weighs.

    python benchmarks/actors.py

1. One CSL round of ResNet-20 cut 3 with 4 clients (4 batches each) through `flwr run`, on 1,
   2 and 4 Ray actors (2 CPUs per client; 1; 1 of 4 CPUs Ray is told it has): Ray hands each
   message to whichever actor
   is idle, so a client's gradient may reach a process that does not hold its graph, which then
   rebuilds the client from ``context.state`` and recomputes the batch's forward. Printed: how
   many of the batches took that path, the seconds it cost, the rebuilds, the round time.
2. The bytes of one node's ``context.state`` (weights, momentum, partition indices), which
   travel with every simulated message, for ResNet-20 and ResNet-110 at a middle cut, both
   methods, after one training step (so the momentum exists).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from flwr.app import RecordDict

from deploy.local_superlink import LocalSuperLink
from flower_app.results import human_bytes, read_rounds
from split_core.client import SplitClient
from split_core.config import RunConfig
from split_core.payload import encode_modules, record_bytes
from split_core.protocol import TrainRequest

CONFIG = {"method": "csl", "num-rounds": 1, "samples-per-client": 512, "test-samples": 256}


def actors() -> None:
    out = Path(tempfile.mkdtemp(prefix="actors-"))
    print(f"{'actors':>6} {'recomputed':>12} {'recompute s':>12} {'rebuilds':>9} {'round s':>8}")
    with LocalSuperLink(out / "home") as link:
        for n_actors, cpus, ray_cpus in ((1, 2, None), (2, 1, None), (4, 1, 4)):
            name = f"actors-{n_actors}"
            result = link.run(
                CONFIG | {"output-dir": str(out), "run-name": name},
                clients=4,
                cpus_per_client=cpus,
                ray_cpus=ray_cpus,  # 4 actors on 2 cores: Ray is told it has 4 CPUs
            )
            (r,) = read_rounds(result.run_dir)
            batches = r["train_examples"] // 128
            print(
                f"{n_actors:>6} {r['client_recomputes']:>5} of {batches:<4} "
                f"{r['client_recompute_seconds']:>12.2f} {r['client_rebuilds']:>9} "
                f"{r['round_seconds']:>8.1f}"
            )


def state_sizes() -> None:
    print(f"\n{'model':12} {'cut':>4} {'method':6} {'context.state':>14}")
    for depth, cut in ((20, 4), (110, 27)):
        for method in ("dsl", "csl"):
            cfg = RunConfig.from_run_config(
                {"depth": depth, "cut": cut, "method": method, "samples-per-client": 128}
            )
            client = SplitClient.create(cfg, 0, 1, cfg.data_dir)
            client.train(TrainRequest(1, 0.1, weights=encode_modules(client.modules)))
            state = RecordDict()
            client.save(state)
            size = sum(record_bytes(r) for r in state.array_records.values())
            print(f"ResNet-{depth:<5} {cut:>4} {method:6} {human_bytes(size):>14}")


if __name__ == "__main__":
    actors()
    state_sizes()
