"""A sweep directory's records, made portable and listed for git, so a grid can change machine.

    python -m experiments.sweep_records results/grid | xargs -d '\\n' git add -f --

Lists, for every job, what a report and a resume need: ``run/config.json``, ``run/rounds.jsonl``
and whichever of ``run/model.pt`` (a finished job) and ``run/checkpoint.pt`` (the last finished
epoch, which a resume continues bit for bit) exist; never `flwr run`'s log, Hydra's files or the
lock. Before listing, ``config.json`` loses the paths of the machine that wrote it (the run's
``output-dir`` and ``resume-from``, the clients' data sources, what each resume recorded): the
sweep directory becomes its path as given (``results/grid``), the data folder named by
``SPLIT_LEARNING_DATA_DIR`` becomes ``$SPLIT_LEARNING_DATA_DIR``, the data folders the loader
searches relative to the current one and to the checkout (``data``, ``../shared/data``) their
relative names, the home folder ``~``.
Nothing reads those paths back: a resume takes ``output-dir`` and ``resume-from`` from its own
command line and leaves them out of the config hash, and the rest is only told to the reader.
The run-config keys that define the experiment (``data-dir`` among them) are never touched.
A run writes its config.json once, when it starts or resumes, and the file is replaced
atomically, so this may run while the sweep runs (``rounds.jsonl``, appended every epoch, holds
no paths and is left as it is).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from split_core import data as loader
from strategies.checkpoint import IGNORED_ON_RESUME, write_atomically

PORTABLE, RECORDS = "config.json", ("config.json", "rounds.jsonl")
MODELS = ("model.pt", "checkpoint.pt")


def machine_paths(sweep_dir: Path) -> list[tuple[str, str]]:
    """(absolute path, its portable name), longest first so that nested paths go first. The
    sweep directory is named relative to the current one when it lies below it; the data folder
    is named whether the run found it through ``SPLIT_LEARNING_DATA_DIR`` or beside the current
    folder, since the variable may be unset when the records are committed. The copy beside the
    checkout, which the loader also searches, is named as seen from the checkout's root, so the
    records read the same whichever folder they were committed from. Where two names fit one
    folder (the variable names the copy beside the checkout, as CI sets it), the variable wins:
    it is what the run was told."""
    absolute = sweep_dir.resolve()
    relative = os.path.relpath(absolute)
    shown = str(sweep_dir) if relative.startswith("..") else relative
    pairs = [(str(absolute), shown), (str(Path.home()), "~")]
    if data := os.environ.get(loader.DATA_DIR_ENV):
        pairs.append((str(Path(data).expanduser().resolve()), f"${loader.DATA_DIR_ENV}"))
    pairs += [(str(root.resolve()), str(root)) for root in loader.RELATIVE_ROOTS]
    beside = loader.beside_checkout()
    pairs.append((str(beside.resolve()), os.path.relpath(beside, loader.REPO_ROOT)))
    named: dict[str, str] = {}
    for old, new in pairs:
        if old not in ("/", new):
            named.setdefault(old, new)  # the first name given to a folder wins
    return sorted(named.items(), key=lambda pair: len(pair[0]), reverse=True)


def _portable(value: Any, pairs: list[tuple[str, str]]) -> Any:
    """``value`` with the machine's paths replaced in every string it holds."""
    if isinstance(value, str):
        for old, new in pairs:
            value = value.replace(old, new)
        return value
    if isinstance(value, list):
        return [_portable(v, pairs) for v in value]
    if isinstance(value, dict):
        return {k: _portable(v, pairs) for k, v in value.items()}
    return value


def make_portable(config_json: Path, pairs: list[tuple[str, str]]) -> bool:
    """Replace the machine's paths everywhere in a run's config.json except in the keys of its
    run config that define the experiment (``data-dir`` is in the config hash); True if the
    file changed."""
    config = json.loads(config_json.read_text())
    portable = {
        key: {k: _portable(v, pairs) if k in IGNORED_ON_RESUME else v for k, v in value.items()}
        if key == "run_config"
        else _portable(value, pairs)
        for key, value in config.items()
    }
    if portable == config:
        return False
    text = json.dumps(portable, indent=2) + "\n"
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
