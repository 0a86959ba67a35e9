"""What each wire format and feedback period costs in bytes and in accuracy, side by side.

    python benchmarks/wire_formats.py bytes                     # real `flwr run`s, one round each
    python benchmarks/wire_formats.py accuracy --epochs 10      # in process, equal epochs
    python benchmarks/wire_formats.py accuracy --rows "DSL int8"  # one row (runs are independent)

``bytes``: one round of ResNet-20 cut 3, 2 clients, through Flower, for DSL in every
``payload-dtype``, DSL with feedback every 2nd batch, and CSL in float32 and int8; each row's
training bytes are read off its payloads and divided by CSL float32's.
``accuracy``: the in-process reference trainer (the Flower apps' own steps and codec) on real
CIFAR-10, one client, same epochs and seed for every row; the test accuracy after the last epoch
and its difference to the float32 run of the same method.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from deploy.local_superlink import LocalSuperLink
from experiments import reference
from flower_app.results import human_bytes, read_rounds
from split_core.config import RunConfig, parse_overrides

ROWS = [
    ("CSL", {"method": "csl", "payload-dtype": "float32"}),
    ("CSL int8", {"method": "csl", "payload-dtype": "int8"}),
    ("DSL", {"method": "dsl", "payload-dtype": "float32"}),
    ("DSL float16", {"method": "dsl", "payload-dtype": "float16"}),
    ("DSL bfloat16", {"method": "dsl", "payload-dtype": "bfloat16"}),
    ("DSL int8", {"method": "dsl", "payload-dtype": "int8"}),
    ("DSL feedback k=2", {"method": "dsl", "payload-dtype": "float32", "feedback-every": 2}),
]


def measure_bytes(overrides: dict) -> None:
    base = {"num-rounds": 1, "samples-per-client": 2000, "test-samples": 500} | overrides
    out = Path(tempfile.mkdtemp(prefix="wire-"))
    rows = []
    with LocalSuperLink(out / "home") as link:
        for i, (name, extra) in enumerate(ROWS):
            config = base | extra | {"output-dir": str(out), "run-name": f"row{i}"}
            result = link.run(config, clients=2)
            (r,) = read_rounds(result.run_dir)
            rows.append((name, r))
    reference_bytes = rows[0][1]["bytes_train_total"]
    print(
        f"{'':18} {'activations':>12} {'gradients':>12} {'training total':>15} {'/ CSL fp32':>10}"
    )
    for name, r in rows:
        print(
            f"{name:18} {human_bytes(r['bytes_activations']):>12} "
            f"{human_bytes(r['bytes_gradients']):>12} {human_bytes(r['bytes_train_total']):>15} "
            f"{r['bytes_train_total'] / reference_bytes:>10.3f}"
        )
    print(f"\nruns in {out}")


def measure_accuracy(overrides: dict, epochs: int, rows: list[str]) -> None:
    """Each row's test accuracy; the difference is to its method's float32 row, when run."""
    base = {"num-rounds": epochs, "lr-schedule": "step", "samples-per-client": 10000}
    base |= {"test-samples": 10000} | overrides
    results = {}
    for name, extra in ROWS:
        if rows and name not in rows:
            continue
        run = reference.train(RunConfig.from_run_config(base | extra), num_clients=1)
        results[name] = run.history[-1]["test_accuracy"]
        same = "CSL" if name.startswith("CSL") else "DSL"
        delta = ""
        if same in results:
            delta = f"{100 * (results[name] - results[same]):+.2f} pt vs {same}"
        print(f"{name:18} {100 * results[name]:6.2f} %   {delta}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["bytes", "accuracy"])
    parser.add_argument("--epochs", type=int, default=10)
    names = [name for name, _ in ROWS]
    parser.add_argument("--rows", nargs="+", default=[], choices=names, help="accuracy: only these")
    parser.add_argument("overrides", nargs="*", help="run-config key=value (TOML values)")
    args = parser.parse_args()
    overrides = parse_overrides(args.overrides)
    if args.what == "bytes":
        measure_bytes(overrides)
    else:
        measure_accuracy(overrides, args.epochs, args.rows)


if __name__ == "__main__":
    main()
