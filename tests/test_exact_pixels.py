"""experiments/exact_pixels.py finds each exact image's JPEG copy, and refuses a double match."""

from __future__ import annotations

import numpy as np
import pytest

from experiments.exact_pixels import matched_jpeg_copies
from tests.conftest import write_cifar10_pickles


def test_each_exact_image_is_matched_to_its_noisy_copy(tmp_path):
    _, _, x_test, y_test = write_cifar10_pickles(tmp_path, n_train=20, n_test=40)
    order = np.random.default_rng(1).permutation(40)[:15]
    noise = np.random.default_rng(2).integers(-6, 7, x_test[order].shape)
    exact = np.clip(x_test[order].astype(np.int16) + noise, 0, 255).astype(np.uint8)
    copies = matched_jpeg_copies(exact, y_test[order], str(tmp_path))
    assert np.array_equal(copies, x_test[order])


def test_two_exact_images_on_one_copy_is_an_error(tmp_path):
    _, _, x_test, y_test = write_cifar10_pickles(tmp_path, n_train=20, n_test=40)
    twice = np.stack([x_test[3], x_test[3]])
    with pytest.raises(ValueError, match="matched the same JPEG image"):
        matched_jpeg_copies(twice, np.array([y_test[3]] * 2), str(tmp_path))
