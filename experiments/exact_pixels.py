"""The 1,000 exact-pixel CIFAR-10 test images, and a trained run's accuracy on them.

The app trains and tests on a JPEG copy of CIFAR-10 (about 5.8/255 mean absolute error per
pixel). A reader who wants the number on the original pixels gets it here: the exact subset's
images are test_batch 0..999; each is matched to its JPEG copy by label and least mean absolute
error, so the same model is scored on both versions of the same images.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
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


@dataclass(frozen=True)
class ExactTest:
    """The exact images, their labels, and their JPEG copies (same order)."""

    exact: np.ndarray
    jpeg: np.ndarray
    labels: np.ndarray

    @classmethod
    def load(cls, subset: str | Path, data_dir: str = "") -> ExactTest:
        arrays = np.load(subset)
        x_exact, y_exact = arrays["x_test"], arrays["y_test"]
        return cls(x_exact, matched_jpeg_copies(x_exact, y_exact, data_dir), y_exact)

    @property
    def mae(self) -> float:
        """Mean absolute pixel error of the JPEG copies, in 0..255 units."""
        return float(np.abs(self.jpeg.astype(np.int16) - self.exact.astype(np.int16)).mean())


@torch.no_grad()
def accuracy(run_dir: Path, images: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy of the run's final model (model.pt, config.json) on ``images``."""
    config = json.loads((run_dir / "config.json").read_text())["run_config"]
    weights = torch.load(run_dir / "model.pt", map_location="cpu", weights_only=True)
    client, server = split_resnet(config["depth"], config["cut"], 10)
    prefix = "segment."  # the client's file also holds its aux head (DSL)
    client.load_state_dict(
        {k[len(prefix) :]: v for k, v in weights["client"].items() if k.startswith(prefix)}
    )
    server.load_state_dict(weights["server_segment"])
    logits = server.eval()(client.eval()(normalize(to_float(images), "cifar10")))
    return float((logits.argmax(1).numpy() == labels).mean())
