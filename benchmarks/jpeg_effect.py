"""Does the JPEG copy of CIFAR-10 cost test accuracy? A trained model on the same 1,000 test
images, once as JPEG (the CIFAR-10 copy the app finds) and once with exact pixels.

    python benchmarks/jpeg_effect.py outputs/<run> [more run dirs] [--exact <subset.npz>]

The exact images default to `cifar10-exact-subset/subset.npz` in or beside the data folder
named by SPLIT_LEARNING_DATA_DIR (the folder holding `cifar10/`, or `cifar10/` itself).

Each run directory's config.json gives the model; its model.pt gives the weights. The exact
images are test_batch 0..999; each is matched to its JPEG copy by label and least mean absolute
error (the printed MAE should be about 5.8/255, the README's figure for the whole copy).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
import torch

from models.resnet import split_resnet
from split_core.data import load_cifar, normalize, to_float

EXACT_NAME = Path("cifar10-exact-subset") / "subset.npz"


def default_exact() -> Path | None:
    """The exact-pixel subset in or beside the SPLIT_LEARNING_DATA_DIR folder, if there."""
    value = os.environ.get("SPLIT_LEARNING_DATA_DIR", "")
    if not value:
        return None
    root = Path(value).expanduser().resolve()
    return next((p / EXACT_NAME for p in (root, root.parent) if (p / EXACT_NAME).is_file()), None)


def matched_jpeg_copies(x_exact: np.ndarray, y_exact: np.ndarray, data_dir: str) -> np.ndarray:
    """The JPEG test images that are copies of ``x_exact``, in the same order."""
    arrays = load_cifar("cifar10", data_dir, download=False)
    x_jpeg, y_jpeg = np.asarray(arrays.x_test), np.asarray(arrays.y_test)
    picked = []
    for image, label in zip(x_exact, y_exact, strict=True):
        same_label = np.flatnonzero(y_jpeg == label)
        error = np.abs(x_jpeg[same_label].astype(np.int16) - image.astype(np.int16))
        picked.append(same_label[error.mean(axis=(1, 2, 3)).argmin()])
    if len(set(picked)) != len(picked):
        raise ValueError("two exact images matched the same JPEG image: is this CIFAR-10?")
    return x_jpeg[picked]


@torch.no_grad()
def accuracy(run_dir: Path, images: np.ndarray, labels: np.ndarray) -> float:
    config = json.loads((run_dir / "config.json").read_text())["run_config"]
    weights = torch.load(run_dir / "model.pt", map_location="cpu")
    client, server = split_resnet(config["depth"], config["cut"], 10)
    prefix = "segment."  # the client's file also holds its aux head (DSL)
    client.load_state_dict(
        {k[len(prefix) :]: v for k, v in weights["client"].items() if k.startswith(prefix)}
    )
    server.load_state_dict(weights["server_segment"])
    logits = server.eval()(client.eval()(normalize(to_float(images), "cifar10")))
    return float((logits.argmax(1).numpy() == labels).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--exact", type=Path, default=default_exact())
    parser.add_argument("--data-dir", default="", help="CIFAR-10 folder ('' = the app's search)")
    args = parser.parse_args()
    if args.exact is None:
        parser.error(f"pass --exact, or set SPLIT_LEARNING_DATA_DIR to a folder with {EXACT_NAME}")
    exact = np.load(args.exact)
    x_exact, y_exact = exact["x_test"], exact["y_test"]
    x_jpeg = matched_jpeg_copies(x_exact, y_exact, args.data_dir)
    mae = np.abs(x_jpeg.astype(np.int16) - x_exact.astype(np.int16)).mean()
    print(f"{len(y_exact)} test images, JPEG vs exact pixels: MAE {mae:.2f}/255")
    for run in args.runs:
        jpeg, pixels = accuracy(run, x_jpeg, y_exact), accuracy(run, x_exact, y_exact)
        print(f"{str(run):50} JPEG {100 * jpeg:5.1f} %   exact {100 * pixels:5.1f} %")


if __name__ == "__main__":
    main()
