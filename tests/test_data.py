"""Tests for split_core.data: real files written to tmp_path, no mocks."""

import io
import os
import pickle
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from split_core import data
from split_core.data import (
    CIFAR10_CLASSES,
    DataNotFoundError,
    augment,
    load_cifar,
    normalize,
    partition_indices,
    search_roots,
    to_float,
)
from tests.conftest import REAL_CIFAR10, write_cifar10_pickles
from tests.conftest import chw_rows as _chw_rows


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    """Never touch the user's ~/.cache, and start every test with an empty in-process cache."""
    monkeypatch.setenv("SPLIT_LEARNING_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("SPLIT_LEARNING_DATA_DIR", raising=False)
    data._LOADED.clear()
    yield
    data._LOADED.clear()


def _dump(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(obj))


def _png(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def write_zip(path: Path, split: str, entries: list[tuple[str, str, np.ndarray]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as zf:
        for cls, name, img in entries:
            zf.writestr(f"{split}/{cls}/{name}", _png(img))


def write_cifar10_zips(base: Path, seed: int = 0) -> tuple[np.ndarray, ...]:
    """Two train images and one test image per class, written to the zips in scrambled order
    (classes reversed, files within a class out of order) to check the loader's ordering."""
    rng = np.random.default_rng(seed)
    train = {
        c: [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(2)]
        for c in CIFAR10_CLASSES
    }
    test = {c: rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for c in CIFAR10_CLASSES}
    classes = list(reversed(CIFAR10_CLASSES))
    write_zip(
        base / "train.zip",
        "train",
        [(c, n, train[c][i]) for c in classes for i, n in ((1, "0001.png"), (0, "0000.png"))],
    )
    write_zip(base / "test.zip", "test", [(c, "0000.png", test[c]) for c in classes])
    x_train = np.stack([img for c in CIFAR10_CLASSES for img in train[c]])
    x_test = np.stack([test[c] for c in CIFAR10_CLASSES])
    return x_train, np.repeat(np.arange(10), 2), x_test, np.arange(10)


def _assert_arrays(arrays, expected) -> None:
    for got, want in zip(
        (arrays.x_train, arrays.y_train, arrays.x_test, arrays.y_test), expected, strict=True
    ):
        assert got.shape == want.shape
        np.testing.assert_array_equal(got, want)
    assert arrays.x_train.dtype == np.uint8 and arrays.y_train.dtype == np.int64
    assert arrays.y_test.dtype == np.int64


# ---------------------------------------------------------------- sources


def test_cifar10_pickles_exact_pixels_and_order(tmp_path):
    expected = write_cifar10_pickles(tmp_path / "d")
    arrays = load_cifar("cifar10", str(tmp_path / "d"), download=False)
    _assert_arrays(arrays, expected)
    assert arrays.dataset == "cifar10" and arrays.num_classes == 10
    assert "cifar-10-batches-py" in arrays.source and "python pickle" in arrays.source


def test_cifar100_pickles(tmp_path):
    rng = np.random.default_rng(1)
    x_train = rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    y_train = np.array([0, 99, 50, 7, 99, 1])
    x_test = rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    y_test = np.array([98, 0, 99])
    d = tmp_path / "cifar-100-python"
    _dump(
        d / "train",
        {b"data": _chw_rows(x_train), b"fine_labels": y_train.tolist(), b"coarse_labels": [0] * 6},
    )
    _dump(
        d / "test",
        {b"data": _chw_rows(x_test), b"fine_labels": y_test.tolist(), b"coarse_labels": [0] * 3},
    )
    _dump(d / "meta", {b"fine_label_names": [f"c{i:02d}".encode() for i in range(100)]})
    arrays = load_cifar("cifar100", str(tmp_path), download=False)
    _assert_arrays(arrays, (x_train, y_train, x_test, y_test))
    assert arrays.num_classes == 100
    # A CIFAR-10 copy is not a CIFAR-100 copy.
    with pytest.raises(DataNotFoundError, match="cifar-10-batches-py"):
        load_cifar("cifar10", str(tmp_path), download=False)


def test_pickle_labels_out_of_range_rejected(tmp_path):
    write_cifar10_pickles(tmp_path)
    batch = tmp_path / "cifar-10-batches-py" / "test_batch"
    obj = pickle.loads(batch.read_bytes())
    obj[b"labels"][1] = 10
    _dump(batch, obj)
    with pytest.raises(ValueError, match=r"test labels span \[4, 10\], outside \[0, 9\]"):
        load_cifar("cifar10", str(tmp_path), download=False)


def test_zip_layout_canonical_labels_and_file_order(tmp_path):
    expected = write_cifar10_zips(tmp_path / "flat")
    arrays = load_cifar("cifar10", str(tmp_path / "flat"), download=False)
    _assert_arrays(arrays, expected)
    assert "train,test}.zip" in arrays.source


def test_zip_layout_nested_under_dataset_name(tmp_path):
    expected = write_cifar10_zips(tmp_path / "root" / "cifar10", seed=3)
    arrays = load_cifar("cifar10", str(tmp_path / "root"), download=False)
    _assert_arrays(arrays, expected)
    assert str(tmp_path / "root" / "cifar10") in arrays.source


def test_zip_cifar100_uses_sorted_folder_names(tmp_path):
    rng = np.random.default_rng(2)
    names = [f"class{i:03d}" for i in range(100)]
    imgs = rng.integers(0, 256, (100, 32, 32, 3), dtype=np.uint8)
    write_zip(
        tmp_path / "train.zip", "train", [(names[i], "a.png", imgs[i]) for i in range(99, -1, -1)]
    )
    write_zip(
        tmp_path / "test.zip", "test", [(names[5], "b.png", imgs[0]), (names[2], "a.png", imgs[1])]
    )
    arrays = load_cifar("cifar100", str(tmp_path), download=False)
    _assert_arrays(arrays, (imgs, np.arange(100), imgs[[1, 0]], np.array([2, 5])))


def test_zip_wrong_image_size_names_entry(tmp_path):
    write_cifar10_zips(tmp_path)
    with zipfile.ZipFile(tmp_path / "test.zip", "a") as zf:
        zf.writestr("test/cat/0001.png", _png(np.zeros((28, 28, 3), np.uint8)))
    with pytest.raises(
        ValueError, match=r"test/cat/0001\.png: expected a 32x32 RGB image, got \(28, 28, 3\)"
    ):
        load_cifar("cifar10", str(tmp_path), download=False)


def test_zip_wrong_class_folders(tmp_path):
    img = np.zeros((32, 32, 3), np.uint8)
    write_zip(
        tmp_path / "train.zip",
        "train",
        [(c, "0.png", img) for c in CIFAR10_CLASSES[:9] + ("kitten",)],
    )
    write_zip(tmp_path / "test.zip", "test", [("cat", "0.png", img)])
    with pytest.raises(
        ValueError, match="class folders .*'kitten'.* do not match the 10 classes of cifar10"
    ):
        load_cifar("cifar10", str(tmp_path), download=False)


# ---------------------------------------------------------------- errors and search


def test_unknown_dataset():
    with pytest.raises(
        ValueError, match=r"unknown dataset 'mnist'; expected one of \['cifar10', 'cifar100'\]"
    ):
        load_cifar("mnist")
    with pytest.raises(ValueError, match="unknown dataset 'cifar1000'"):
        normalize(torch.zeros(1, 3, 32, 32), "cifar1000")


def test_missing_explicit_dir_message(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataNotFoundError) as info:
        load_cifar("cifar10", str(empty), download=False)
    msg = str(info.value)
    assert isinstance(info.value, FileNotFoundError)
    assert msg.startswith("cifar10 data not found.")
    for part in (
        f"  - {empty}\n",
        f"{empty}/cifar-10-batches-py/{{data_batch_1,",
        f"{empty}/{{train,test}}.zip",
        f"{empty}/cifar10/{{train,test}}.zip",
        "Download: skipped (download=False)",
        "--run-config \"data-dir='/path/to/data'\"",
        "SPLIT_LEARNING_DATA_DIR",
        "train.zip + test.zip",
    ):
        assert part in msg


def test_explicit_dir_is_the_only_root(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("SPLIT_LEARNING_DATA_DIR", "/elsewhere")
    assert search_roots("~/mydata") == [tmp_path / "mydata"]


def test_default_roots_order_dedup_and_message(tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setattr(
        data, "REPO_ROOT", tmp_path / "repo"
    )  # so the real shared/data is not found
    monkeypatch.setenv("SPLIT_LEARNING_DATA_DIR", str(tmp_path / "env"))
    roots = search_roots()
    # ../shared/data from cwd and <repo>/../shared/data are the same directory here: listed once.
    assert roots == [
        tmp_path / "env",
        work / "data",
        tmp_path / "shared" / "data",
        tmp_path / "cache" / "data",
    ]
    with pytest.raises(DataNotFoundError) as info:
        load_cifar("cifar100", download=False)
    msg = str(info.value)
    for root in roots:
        assert f"  - {root}\n" in msg
        assert f"{root}/cifar-100-python/{{train,test,meta}} (python pickle)" in msg
        assert f"{root}/cifar100/{{train,test}}.zip" in msg
    # Data in a later root is found once it exists.
    expected = write_cifar10_pickles(tmp_path / "shared" / "data")
    _assert_arrays(load_cifar("cifar10", download=False), expected)


def test_download_failure_is_reported_not_raised(tmp_path):
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    with pytest.raises(DataNotFoundError) as info:
        load_cifar("cifar10", str(not_a_dir), download=True)
    assert f"Download: failed into {not_a_dir}: " in str(info.value)
    assert "data-dir" in str(info.value)


# ---------------------------------------------------------------- cache


def test_cache_files_mmap_and_reuse(tmp_path, monkeypatch):
    cache = tmp_path / "mycache"
    monkeypatch.setenv("SPLIT_LEARNING_CACHE", str(cache))
    expected = write_cifar10_pickles(tmp_path / "d")
    first = load_cifar("cifar10", str(tmp_path / "d"), download=False)
    assert load_cifar("cifar10", str(tmp_path / "d")) is first  # in-process cache
    (cache_dir,) = list((cache / "arrays").iterdir())  # no temp dirs left behind
    assert cache_dir.name.startswith("cifar10-")
    assert sorted(p.name for p in cache_dir.iterdir()) == [
        "x_test.npy",
        "x_train.npy",
        "y_test.npy",
        "y_train.npy",
    ]
    assert str(cache_dir) in first.source

    # A fresh process reads the .npy cache, not the source: prove it by altering the cache.
    np.save(cache_dir / "x_test.npy", np.zeros((3, 32, 32, 3), np.uint8))
    data._LOADED.clear()
    second = load_cifar("cifar10", str(tmp_path / "d"), download=False)
    assert second is not first
    assert isinstance(second.x_train, np.memmap) and isinstance(second.y_test, np.memmap)
    assert not second.x_train.flags.writeable
    np.testing.assert_array_equal(second.x_train, expected[0])
    assert second.x_test.sum() == 0

    # Touching the source changes its fingerprint -> decoded again into a new cache dir.
    batch = tmp_path / "d" / "cifar-10-batches-py" / "test_batch"
    os.utime(batch, ns=(0, batch.stat().st_mtime_ns + 10**9))
    data._LOADED.clear()
    third = load_cifar("cifar10", str(tmp_path / "d"), download=False)
    np.testing.assert_array_equal(third.x_test, expected[2])
    assert len(list((cache / "arrays").iterdir())) == 2


def test_cache_race_loser_uses_existing(tmp_path):
    arrays = tuple(np.full((2,), i) for i in range(4))
    target = tmp_path / "c" / "cifar10-x"
    data._write_cache(target, arrays)
    data._write_cache(target, tuple(a + 10 for a in arrays))  # rename fails: dir already exists
    assert np.load(target / "y_test.npy").tolist() == [3, 3]
    assert [p.name for p in (tmp_path / "c").iterdir()] == ["cifar10-x"]


# ---------------------------------------------------------------- partitions


def _class_sorted_labels(per_class: int = 100, classes: int = 10) -> np.ndarray:
    return np.repeat(np.arange(classes), per_class)  # like the zip layout: sorted by class


def _all_parts(labels, k, **kw) -> list[np.ndarray]:
    return [partition_indices(labels, k, i, **kw) for i in range(k)]


@pytest.mark.parametrize("scheme", ["iid", "dirichlet"])
@pytest.mark.parametrize("k", [2, 10])
def test_partitions_disjoint_cover_deterministic(scheme, k):
    labels = _class_sorted_labels()
    parts = _all_parts(labels, k, scheme=scheme, seed=1)
    assert all(p.dtype == np.int64 for p in parts)
    joined = np.concatenate(parts)
    assert len(joined) == 1000 and np.array_equal(np.sort(joined), np.arange(1000))
    again = _all_parts(labels, k, scheme=scheme, seed=1)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
    other = _all_parts(labels, k, scheme=scheme, seed=2)
    assert not all(np.array_equal(a, b) for a, b in zip(parts, other, strict=True))
    if scheme == "iid":
        assert [len(p) for p in parts] == [1000 // k] * k


def test_iid_is_shuffled_and_dirichlet_is_skewed():
    labels = _class_sorted_labels()

    def mean_top_class_share(parts):
        return np.mean([np.bincount(labels[p], minlength=10).max() / max(len(p), 1) for p in parts])

    iid = _all_parts(labels, 10, scheme="iid", seed=0)
    skewed = _all_parts(labels, 10, scheme="dirichlet", alpha=0.1, seed=0)
    # Without the shuffle each iid shard would be a single class (share 1.0).
    assert all(len(np.unique(labels[p])) == 10 for p in iid)
    assert mean_top_class_share(iid) < 0.25
    assert mean_top_class_share(skewed) > 0.5


def test_dirichlet_tiny_dataset():
    labels = np.array([0, 1, 1, 2, 0])
    parts = _all_parts(labels, 3, scheme="dirichlet", alpha=0.05, seed=0)
    assert sorted(np.concatenate(parts).tolist()) == [0, 1, 2, 3, 4]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"scheme": "pathological"}, "unknown partition scheme 'pathological'"),
        ({"partition_id": 4}, r"partition_id must be in \[0, 3\], got 4"),
        ({"partition_id": -1}, r"partition_id must be in \[0, 3\], got -1"),
        ({"num_partitions": 0, "partition_id": 0}, r"num_partitions must be in \[1, 20\].*got 0"),
        ({"num_partitions": 21, "partition_id": 0}, r"num_partitions must be in \[1, 20\].*got 21"),
        ({"scheme": "dirichlet", "alpha": 0.0}, "dirichlet alpha must be > 0, got 0.0"),
        ({"scheme": "dirichlet", "alpha": -1}, "dirichlet alpha must be > 0, got -1"),
    ],
)
def test_partition_bad_inputs(kwargs, message):
    args = {"num_partitions": 4, "partition_id": 0} | kwargs
    with pytest.raises(ValueError, match=message):
        partition_indices(
            np.zeros(20, np.int64), args.pop("num_partitions"), args.pop("partition_id"), **args
        )


# ---------------------------------------------------------------- transforms


def test_to_float_layout_and_range():
    x = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    x[0, 0, 0] = [0, 128, 255]
    out = to_float(x)
    assert out.shape == (4, 3, 32, 32) and out.dtype == torch.float32 and out.is_contiguous()
    assert torch.equal(out[0, :, 0, 0], torch.tensor([0.0, 128.0, 255.0]) / 255)
    torch.testing.assert_close(out, torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255)
    torch.testing.assert_close(to_float(torch.from_numpy(x)), out)
    with pytest.raises(
        ValueError, match=r"expected uint8 \(B,H,W,3\), got torch.float32 \(4, 32, 32, 3\)"
    ):
        to_float(x.astype(np.float32))


def test_to_float_read_only_memmap_slice_no_warning(tmp_path):
    x = np.arange(2 * 32 * 32 * 3, dtype=np.uint8).reshape(2, 32, 32, 3)
    np.save(tmp_path / "x.npy", x)
    mm = np.load(tmp_path / "x.npy", mmap_mode="r")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = to_float(mm[:2])
    torch.testing.assert_close(out, to_float(x))


def _candidates(img: torch.Tensor) -> torch.Tensor:
    """All 9*9*2 crop/flip variants of one CHW image, indexed [row, col, flip]."""
    padded = F.pad(img, (4, 4, 4, 4))
    crops = torch.stack(
        [torch.stack([padded[:, r : r + 32, c : c + 32] for c in range(9)]) for r in range(9)]
    )
    return torch.stack([crops, crops.flip(-1)], dim=2)


def test_augment_outputs_are_crops_and_flips_from_generator():
    x = (
        torch.rand(64, 3, 32, 32, generator=torch.Generator().manual_seed(7)) + 0.01
    )  # never 0 = pad
    out = augment(x, torch.Generator().manual_seed(3))
    assert out.shape == x.shape and out.dtype == x.dtype
    found = []
    for img, aug in zip(x, out, strict=True):
        match = (_candidates(img) == aug).flatten(3).all(-1).nonzero().tolist()
        assert len(match) == 1
        found.append(match[0])
    # The documented draw order (rows, cols, flips) reproduces every image's parameters.
    g = torch.Generator().manual_seed(3)
    rows, cols = torch.randint(0, 9, (64,), generator=g), torch.randint(0, 9, (64,), generator=g)
    flips = torch.rand(64, generator=g) < 0.5
    assert found == [[int(r), int(c), int(f)] for r, c, f in zip(rows, cols, flips, strict=True)]
    assert {r for r, _, _ in found} == set(range(9)) and {f for _, _, f in found} == {0, 1}


def test_augment_same_seed_same_batch():
    x = torch.rand(16, 3, 32, 32)
    a = augment(x, torch.Generator().manual_seed(0))
    assert torch.equal(a, augment(x, torch.Generator().manual_seed(0)))
    assert not torch.equal(a, augment(x, torch.Generator().manual_seed(1)))


def test_normalize_constant_image():
    x = torch.full((2, 3, 32, 32), 0.5)
    out = normalize(x, "cifar10")
    want = [(0.5 - 0.4914) / 0.2470, (0.5 - 0.4822) / 0.2435, (0.5 - 0.4465) / 0.2616]
    torch.testing.assert_close(out[1, :, 7, 9], torch.tensor(want))
    assert torch.equal(out[:, 0], out[0, 0, 0, 0].expand(2, 32, 32))  # same value everywhere
    out100 = normalize(torch.ones(1, 3, 2, 2), "cifar100")
    torch.testing.assert_close(
        out100[0, :, 0, 0], torch.tensor([0.4929 / 0.2673, 0.5135 / 0.2564, 0.5591 / 0.2762])
    )


def test_training_pipeline_shapes(tmp_path):
    write_cifar10_pickles(tmp_path)
    arrays = load_cifar("cifar10", str(tmp_path), download=False)
    idx = partition_indices(arrays.y_train, 2, 1, seed=0)
    batch = normalize(
        augment(to_float(arrays.x_train[idx]), torch.Generator().manual_seed(0)), "cifar10"
    )
    assert batch.shape == (10, 3, 32, 32) and batch.dtype == torch.float32


# ---------------------------------------------------------------- real data


@pytest.mark.skipif(
    REAL_CIFAR10 is None or not (REAL_CIFAR10 / "test.zip").is_file(),
    reason="real CIFAR-10 zips not found: set SPLIT_LEARNING_DATA_DIR",
)
def test_real_cifar10_zips():
    arrays = load_cifar("cifar10", str(REAL_CIFAR10), download=False)
    assert arrays.x_train.shape == (50000, 32, 32, 3) and arrays.x_test.shape == (10000, 32, 32, 3)
    assert np.bincount(arrays.y_train).tolist() == [5000] * 10
    assert np.bincount(arrays.y_test).tolist() == [1000] * 10
    assert isinstance(arrays.x_train, np.memmap)
    assert 100 < arrays.x_test.mean() < 140  # real photos, not blank
