"""A sweep directory's records, made portable and listed for git, so a grid can change machine.

    python -m experiments.sweep_records results/grid | xargs -d '\\n' git add -f --

Lists, for every job, what a report and a resume need: ``run/config.json``, ``run/rounds.jsonl``
and whichever of ``run/model.pt`` (a finished job) and ``run/checkpoint.pt`` (the last finished
epoch, which a resume continues bit for bit) exist; never `flwr run`'s log, Hydra's files or the
lock. Before listing, ``config.json`` loses the paths of the machine that wrote it, in the two
places they appear (the run's ``output-dir``, the clients' data sources): the sweep directory
becomes its path as given (``results/grid``), the data folder named by
``SPLIT_LEARNING_DATA_DIR`` becomes ``$SPLIT_LEARNING_DATA_DIR``, the home folder ``~``.
Nothing reads those paths back: a resume takes ``output-dir`` from its own command line and
leaves it out of the config hash, and the clients' data sources are only told to the reader.
A run writes its config.json once, when it starts or resumes, and the file is replaced
atomically, so this may run while the sweep runs (``rounds.jsonl``, appended every epoch, holds
no paths and is left as it is).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from strategies.checkpoint import write_atomically

PORTABLE, RECORDS = "config.json", ("config.json", "rounds.jsonl")
MODELS = ("model.pt", "checkpoint.pt")


def machine_paths(sweep_dir: Path) -> list[tuple[str, str]]:
    """(absolute path, its portable name), longest first so that nested paths go first."""
    pairs = [(str(sweep_dir.resolve()), str(sweep_dir)), (str(Path.home()), "~")]
    if data := os.environ.get("SPLIT_LEARNING_DATA_DIR"):
        pairs.append((str(Path(data).expanduser().resolve()), "$SPLIT_LEARNING_DATA_DIR"))
    pairs = [(old, new) for old, new in pairs if old not in ("/", new)]
    return sorted(pairs, key=lambda pair: len(pair[0]), reverse=True)


def _portable(text: str, pairs: list[tuple[str, str]]) -> str:
    for old, new in pairs:
        text = text.replace(old, new)
    return text


def make_portable(config_json: Path, pairs: list[tuple[str, str]]) -> bool:
    """Replace the machine's paths in a run's ``output-dir`` and its clients' data sources,
    nothing else (``data-dir`` is part of the experiment's config hash); True if changed."""
    config = json.loads(config_json.read_text())
    before = json.dumps(config)
    run_config = config.get("run_config", {})
    if isinstance(run_config.get("output-dir"), str):
        run_config["output-dir"] = _portable(run_config["output-dir"], pairs)
    for client in config.get("clients", []):
        if isinstance(client.get("data_source"), str):
            client["data_source"] = _portable(client["data_source"], pairs)
    if json.dumps(config) == before:
        return False
    text = json.dumps(config, indent=2) + "\n"
    write_atomically(config_json, lambda f: f.write(text.encode()))
    return True


def sweep_records(sweep_dir: Path) -> list[Path]:
    """Make every job's config.json portable; return the files to commit, in job order."""
    pairs = machine_paths(sweep_dir)
    files: list[Path] = []
    for run_dir in sorted(sweep_dir.glob("*/run")):
        if (run_dir / PORTABLE).is_file():
            make_portable(run_dir / PORTABLE, pairs)
        files += [run_dir / name for name in RECORDS if (run_dir / name).is_file()]
        files += [run_dir / name for name in MODELS if (run_dir / name).is_file()]
    return files


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", type=Path, help="a sweep directory, e.g. results/grid")
    args = parser.parse_args()
    for path in sweep_records(args.sweep_dir):
        print(path)


if __name__ == "__main__":
    main()
