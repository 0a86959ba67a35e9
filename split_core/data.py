"""CIFAR-10/100 loading, on-disk caching, federated partitioning and batch tensor transforms.

Every client process needs the same uint8 arrays, and the deployment engine may start a fresh
process per message, so the source (pickle batches or image zips) is decoded once into `.npy`
files that later processes memory-map in milliseconds.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import shutil
import tempfile
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from split_core.compute import Compute

DATASETS: dict[str, int] = {"cifar10": 10, "cifar100": 100}

CIFAR10_CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)

# Module-level so tests (and unusual layouts) can point the repo-relative search root elsewhere.
REPO_ROOT = Path(__file__).resolve().parents[1]
DATA_DIR_ENV = "SPLIT_LEARNING_DATA_DIR"
# Searched relative to the current directory; a record names a copy found there by this spelling.
RELATIVE_ROOTS = (Path("data"), Path("..") / "shared" / "data")
CACHE_ENV = "SPLIT_LEARNING_CACHE"
# Bump when the decoding changes so stale caches are not reused.
_CACHE_VERSION = 1

_MEAN_STD = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}
_PICKLE_DIRS = {
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"]),
    "cifar100": ("cifar-100-python", ["train"], ["test"]),
}
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


class DataNotFoundError(FileNotFoundError):
    """Raised when no copy of the dataset is found; the message names every place searched and
    how to provide data, because a bare "file not found" on a remote SuperNode is undebuggable."""


@dataclass(frozen=True)
class CifarArrays:
    """Whole train/test split as uint8 HWC images and int64 labels (possibly read-only mmaps)."""

    dataset: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    source: str

    @property
    def num_classes(self) -> int:
        return DATASETS[self.dataset]


# One object per dataset + source per process, so repeated calls share the mmap'd arrays.
_LOADED: dict[tuple[str, str], CifarArrays] = {}


def _check_dataset(dataset: str) -> None:
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; expected one of {sorted(DATASETS)}")


def cache_root() -> Path:
    """Root for decoded arrays and downloads; overridable so tests and clusters can relocate it."""
    return Path(os.environ.get(CACHE_ENV) or "~/.cache/split-learning").expanduser()


def beside_checkout() -> Path:
    """The data folder beside the checkout, searched whatever the current folder is; read from
    ``REPO_ROOT`` when called, so that tests pointing it elsewhere move this too."""
    return REPO_ROOT.parent / "shared" / "data"


def search_roots(data_dir: str = "") -> list[Path]:
    """Directories to look in, in order. An explicit `data_dir` is the only root, so a typo
    fails loudly instead of silently training on some other copy."""
    if data_dir:
        return [Path(data_dir).expanduser()]
    env = os.environ.get(DATA_DIR_ENV, "")
    candidates = [Path(env)] if env else []
    candidates += [
        *RELATIVE_ROOTS,
        beside_checkout(),
        cache_root() / "data",
    ]
    roots: list[Path] = []
    for path in candidates:
        resolved = path.expanduser().resolve()
        if resolved not in roots:
            roots.append(resolved)
    return roots


@dataclass(frozen=True)
class _Source:
    kind: str  # "pickle" | "zip"
    files: tuple[Path, ...]
    description: str


def _layouts(dataset: str, root: Path) -> list[_Source]:
    """All concrete layouts for `dataset` under `root` (existing or not), in preference order."""
    dirname, train, test = _PICKLE_DIRS[dataset]
    extra = ["meta"] if dataset == "cifar100" else []
    names = train + test + extra
    pickles = tuple(root / dirname / n for n in names)
    layouts = [
        _Source("pickle", pickles, f"{root / dirname}/{{{','.join(names)}}} (python pickle)")
    ]
    for base in (root, root / dataset):
        files = (base / "train.zip", base / "test.zip")
        layouts.append(_Source("zip", files, f"{base}/{{train,test}}.zip (image-folder zips)"))
    return layouts


def _find(dataset: str, root: Path) -> _Source | None:
    return next((s for s in _layouts(dataset, root) if all(f.is_file() for f in s.files)), None)


def _download(dataset: str, root: Path) -> None:
    import torchvision  # slow import, only needed here

    cls = torchvision.datasets.CIFAR10 if dataset == "cifar10" else torchvision.datasets.CIFAR100
    cls(root=str(root), train=True, download=True)


def _not_found_message(dataset: str, roots: list[Path], download_note: str) -> str:
    lines = [f"{dataset} data not found. Searched these directories and layouts:"]
    for root in roots:
        lines.append(f"  - {root}")
        lines += [f"      {layout.description}" for layout in _layouts(dataset, root)]
    dirname = _PICKLE_DIRS[dataset][0]
    lines += [
        f"Download: {download_note}",
        "To provide the data, do one of:",
        "  - pass data-dir in the run config: flwr run . --run-config \"data-dir='/path/to/data'\"",
        f"  - set the environment variable {DATA_DIR_ENV}=/path/to/data",
        f"  - put {dirname}/ (torchvision's python format) or train.zip + test.zip "
        "(train/<class>/*.jpg, test/<class>/*.jpg) in one of the directories above",
    ]
    return "\n".join(lines)


def _unpickle(path: Path) -> dict:
    with open(path, "rb") as f:
        return pickle.load(f, encoding="bytes")


def _decode_pickles(dataset: str, src: _Source) -> tuple[np.ndarray, ...]:
    _, train_names, test_names = _PICKLE_DIRS[dataset]
    label_key = b"labels" if dataset == "cifar10" else b"fine_labels"
    by_name = {p.name: p for p in src.files}

    def read(names: list[str]) -> tuple[np.ndarray, np.ndarray]:
        batches = [_unpickle(by_name[n]) for n in names]
        x = np.concatenate([np.asarray(b[b"data"], dtype=np.uint8) for b in batches])
        y = np.concatenate([np.asarray(b[label_key], dtype=np.int64) for b in batches])
        # Rows are stored channel-planar (3x32x32); models and transforms expect HWC uint8.
        return np.ascontiguousarray(x.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)), y

    if dataset == "cifar100":
        names = _unpickle(by_name["meta"])[b"fine_label_names"]
        if len(names) != 100:
            raise ValueError(f"{by_name['meta']}: expected 100 fine_label_names, got {len(names)}")
    return (*read(train_names), *read(test_names))


def _class_names(dataset: str, found: set[str], path: Path) -> list[str]:
    """Label order for folder names: canonical for CIFAR-10, sorted otherwise (CIFAR-100's
    official fine label names are alphabetical, so sorted order is the official order)."""
    expected = list(CIFAR10_CLASSES) if dataset == "cifar10" else sorted(found)
    if set(expected) != found or len(found) != DATASETS[dataset]:
        raise ValueError(
            f"{path}: class folders {sorted(found)} do not match the {DATASETS[dataset]} "
            f"classes of {dataset}" + (f" {expected}" if dataset == "cifar10" else "")
        )
    return expected


def _read_zip(path: Path, split: str, classes: list[str] | None, dataset: str):
    with zipfile.ZipFile(path) as zf:
        entries = [
            (parts[1], parts[2], name)
            for name in zf.namelist()
            if len(parts := name.split("/")) == 3
            and parts[0] == split
            and parts[2].lower().endswith(_IMAGE_SUFFIXES)
        ]
        found = {c for c, _, _ in entries}
        if classes is None:
            classes = _class_names(dataset, found, path)
        elif not found <= set(classes):
            raise ValueError(f"{path}: unknown class folders {sorted(found - set(classes))}")
        label_of = {c: i for i, c in enumerate(classes)}
        entries.sort(key=lambda e: (label_of[e[0]], e[1]))
        from PIL import Image  # only decoding the zip layout needs it (not every ClientApp)

        x = np.empty((len(entries), 32, 32, 3), dtype=np.uint8)
        for i, (_, _, name) in enumerate(entries):
            img = np.asarray(Image.open(io.BytesIO(zf.read(name))).convert("RGB"))
            if img.shape != (32, 32, 3):
                raise ValueError(f"{path}:{name}: expected a 32x32 RGB image, got {img.shape}")
            x[i] = img
    y = np.array([label_of[c] for c, _, _ in entries], dtype=np.int64)
    return x, y, classes


def _decode_zips(dataset: str, src: _Source) -> tuple[np.ndarray, ...]:
    x_train, y_train, classes = _read_zip(src.files[0], "train", None, dataset)
    x_test, y_test, _ = _read_zip(src.files[1], "test", classes, dataset)
    return x_train, y_train, x_test, y_test


def _validate(dataset: str, arrays: tuple[np.ndarray, ...], where: str) -> None:
    for split, x, y in (("train", *arrays[:2]), ("test", *arrays[2:])):
        if x.dtype != np.uint8 or x.ndim != 4 or x.shape[1:] != (32, 32, 3) or len(x) == 0:
            raise ValueError(f"{where}: bad {split} images: {x.dtype} {x.shape}")
        if y.shape != (len(x),):
            raise ValueError(f"{where}: {len(x)} {split} images but labels of shape {y.shape}")
        if y.min() < 0 or y.max() >= DATASETS[dataset]:
            raise ValueError(
                f"{where}: {split} labels span [{y.min()}, {y.max()}], "
                f"outside [0, {DATASETS[dataset] - 1}]"
            )


def _fingerprint(dataset: str, src: _Source) -> str:
    h = hashlib.sha256(f"v{_CACHE_VERSION} {dataset} {src.kind}".encode())
    for f in src.files:
        st = f.stat()
        h.update(f"|{f.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


_CACHE_FILES = ("x_train", "y_train", "x_test", "y_test")


def _write_cache(cache_dir: Path, arrays: tuple[np.ndarray, ...]) -> None:
    """Write into a temp dir and rename it into place: concurrent clients may decode at once, and
    readers must never see a half-written cache. Losing the rename race is fine."""
    cache_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{cache_dir.name}-", dir=cache_dir.parent))
    try:
        for name, arr in zip(_CACHE_FILES, arrays, strict=True):
            np.save(tmp / f"{name}.npy", arr)
        os.rename(tmp, cache_dir)
    except OSError:
        if not cache_dir.is_dir():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_cifar(dataset: str, data_dir: str = "", *, download: bool = True) -> CifarArrays:
    """Find the dataset (see `search_roots`), decode it once into an on-disk `.npy` cache and
    return memory-mapped arrays. Without `data_dir` and with `download`, torchvision downloads
    into `<cache root>/data` (the last default search root); with `data_dir`, into `data_dir`."""
    _check_dataset(dataset)
    roots = search_roots(data_dir)
    src = next((s for root in roots if (s := _find(dataset, root))), None)
    download_note = "skipped (download=False)"
    if src is None and download:
        target = roots[0] if data_dir else (cache_root() / "data").resolve()
        try:
            _download(dataset, target)
            src = _find(dataset, target)
            download_note = f"finished in {target}, but no known layout was found there"
        except Exception as e:  # offline, read-only dir, checksum mismatch, ...
            download_note = f"failed into {target}: {type(e).__name__}: {e}"
        if target not in roots:
            roots.append(target)
    if src is None:
        raise DataNotFoundError(_not_found_message(dataset, roots, download_note))

    key = (dataset, _fingerprint(dataset, src))
    if key in _LOADED:
        return _LOADED[key]
    cache_dir = cache_root() / "arrays" / f"{dataset}-{key[1]}"
    if not cache_dir.is_dir():
        decode = _decode_pickles if src.kind == "pickle" else _decode_zips
        decoded = decode(dataset, src)
        _validate(dataset, decoded, src.description)
        try:
            _write_cache(cache_dir, decoded)
        except OSError as e:  # read-only home etc.: still usable, just slower next time
            warnings.warn(f"could not cache decoded {dataset} in {cache_dir}: {e}", stacklevel=2)
            arrays = CifarArrays(dataset, *decoded, source=f"{src.description}, not cached")
            return _LOADED.setdefault(key, arrays)
    loaded = tuple(np.load(cache_dir / f"{n}.npy", mmap_mode="r") for n in _CACHE_FILES)
    _validate(dataset, loaded, str(cache_dir))
    arrays = CifarArrays(dataset, *loaded, source=f"{src.description}, cached in {cache_dir}")
    return _LOADED.setdefault(key, arrays)


def partition_indices(
    labels: np.ndarray,
    num_partitions: int,
    partition_id: int,
    *,
    scheme: str = "iid",
    alpha: float = 0.5,
    seed: int = 0,
) -> np.ndarray:
    """Indices (into the train set) of one client's partition, via flwr-datasets partitioners.

    The rows are shuffled with `seed` first because the zip layout is sorted by class and
    `IidPartitioner` takes contiguous shards. Dirichlet uses `min_partition_size=0` so tiny
    datasets never hit flwr-datasets' 10-resampling limit; a partition may then be empty.
    """
    labels = np.asarray(labels)
    n = len(labels)
    if scheme not in ("iid", "dirichlet"):
        raise ValueError(f"unknown partition scheme {scheme!r}; expected 'iid' or 'dirichlet'")
    if not 1 <= num_partitions <= n:
        raise ValueError(
            f"num_partitions must be in [1, {n}] (number of samples), got {num_partitions}"
        )
    if not 0 <= partition_id < num_partitions:
        raise ValueError(f"partition_id must be in [0, {num_partitions - 1}], got {partition_id}")
    if scheme == "dirichlet" and not alpha > 0:
        raise ValueError(f"dirichlet alpha must be > 0, got {alpha}")

    from datasets import Dataset  # slow imports, only needed here
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner

    perm = np.random.default_rng(seed).permutation(n)
    # Arrow format: the partitioners' column reads and ours are then vectorised, not per-row.
    ds = Dataset.from_dict({"label": labels[perm].astype(np.int64), "index": perm})
    ds = ds.with_format("arrow")
    if scheme == "iid":
        partitioner = IidPartitioner(num_partitions)
    else:
        partitioner = DirichletPartitioner(
            num_partitions,
            partition_by="label",
            alpha=float(alpha),
            seed=seed,
            min_partition_size=0,
            self_balancing=False,
        )
    partitioner.dataset = ds
    part = partitioner.load_partition(partition_id)
    return part[:]["index"].to_numpy().astype(np.int64, copy=False)


def to_float(x_uint8: np.ndarray | torch.Tensor) -> torch.Tensor:
    """(B,32,32,3) uint8 -> contiguous (B,3,32,32) float32 in [0, 1]; whole batch at once."""
    if isinstance(x_uint8, np.ndarray):
        x = np.asarray(x_uint8)  # drop the memmap subclass
        # torch warns on (and could write through) read-only mmap slices, so copy those.
        x_uint8 = torch.from_numpy(x if x.flags.writeable else x.copy())
    if x_uint8.dtype != torch.uint8 or x_uint8.ndim != 4 or x_uint8.shape[-1] != 3:
        raise ValueError(f"expected uint8 (B,H,W,3), got {x_uint8.dtype} {tuple(x_uint8.shape)}")
    return x_uint8.permute(0, 3, 1, 2).contiguous().to(torch.float32).div_(255.0)


def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Standard CIFAR augmentation (4-pixel zero pad, random 32x32 crop, horizontal flip p=0.5)
    per image, vectorised. All randomness comes from `generator`, drawn in the fixed order
    (row offsets, column offsets, flips), so re-seeding reproduces a batch exactly."""
    b, _, h, w = x.shape
    dev = generator.device
    rows = torch.randint(0, 9, (b,), generator=generator, device=dev).to(x.device)
    cols = torch.randint(0, 9, (b,), generator=generator, device=dev).to(x.device)
    flip = (torch.rand(b, generator=generator, device=dev) < 0.5).to(x.device)
    padded = F.pad(x, (4, 4, 4, 4))
    r = rows[:, None] + torch.arange(h, device=x.device)  # (B, H)
    c = cols[:, None] + torch.arange(w, device=x.device)  # (B, W)
    c = torch.where(flip[:, None], c.flip(1), c)
    bi = torch.arange(b, device=x.device)[:, None, None, None]
    ci = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
    return padded[bi, ci, r[:, None, :, None], c[:, None, None, :]]


def normalize(x: torch.Tensor, dataset: str) -> torch.Tensor:
    """Per-channel standardisation with the usual CIFAR train-set statistics."""
    _check_dataset(dataset)
    mean, std = (
        torch.tensor(v, dtype=x.dtype, device=x.device)[:, None, None] for v in _MEAN_STD[dataset]
    )
    return (x - mean) / std


class ClientImages:
    """One client's images as batches of normalised float tensors on its compute device.

    On a GPU the partition's uint8 images are uploaded once and whole batches are cropped,
    flipped and normalised there, so nothing per batch crosses the bus but a few random numbers.
    On the CPU the rows are gathered from the memory-mapped cache per batch instead: a client
    that is rebuilt for one message (every message, in deployment) copies only what it uses.
    """

    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray,
        idx: np.ndarray,
        dataset: str,
        compute: Compute,
        resident: bool | None = None,
    ) -> None:
        self.images, self.labels, self.idx = images, labels, idx
        self.dataset, self.compute = dataset, compute
        self.resident = compute.device.type != "cpu" if resident is None else resident
        self._on_device: torch.Tensor | None = None
        self._labels_on_device: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.idx)

    def batch(
        self, positions: np.ndarray, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Images ``idx[positions]``, augmented with ``generator``'s draws when one is given."""
        if not self.resident:
            rows = self.idx[positions]
            x = to_float(self.images[rows])
            y = torch.from_numpy(np.asarray(self.labels[rows], dtype=np.int64))
        else:
            if self._on_device is None:
                device = self.compute.device
                self._on_device = torch.from_numpy(np.ascontiguousarray(self.images[self.idx]))
                self._on_device = self._on_device.to(device)
                labels = np.asarray(self.labels[self.idx], dtype=np.int64)
                self._labels_on_device = torch.from_numpy(labels).to(device)
            where = torch.from_numpy(np.asarray(positions, dtype=np.int64)).to(self.compute.device)
            x, y = to_float(self._on_device[where]), self._labels_on_device[where]
        if generator is not None:
            x = augment(x, generator)
        return self.compute.tensor(normalize(x, self.dataset)), y
