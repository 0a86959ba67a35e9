"""What travels between client and server, how it is checked, and how its bytes are counted.

Bytes are read off the serialized arrays that Flower actually ships (the data section of each
``.npy`` blob, header excluded), never computed from a formula; so a payload in float16 counts
half, and a label in uint8 counts one byte.
"""

from __future__ import annotations

import io
from collections.abc import Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord
from torch import nn

WIRE_DTYPES = {"float32": np.float32, "float16": np.float16}


class PayloadError(ValueError):
    """A client's payload is malformed; the server rejects it before touching its model."""


def array_bytes(array: Array) -> int:
    """Bytes of array data in one serialized Array (the .npy header is not payload)."""
    buf = io.BytesIO(array.data)
    try:
        version = np.lib.format.read_magic(buf)
        if version == (1, 0):
            np.lib.format.read_array_header_1_0(buf)
        else:
            np.lib.format.read_array_header_2_0(buf)
    except Exception as exc:  # garbage or truncated bytes from a client
        raise PayloadError(f"an array is not a valid .npy blob: {exc}") from exc
    return len(array.data) - buf.tell()


def record_bytes(record: ArrayRecord | None) -> int:
    return 0 if record is None else sum(array_bytes(a) for a in record.values())


def encode_activations(acts: torch.Tensor, labels: torch.Tensor, wire_dtype: str) -> ArrayRecord:
    """Labels travel as uint8 (one byte each) whenever they fit: CIFAR-10 and CIFAR-100 do."""
    y = labels.cpu().numpy()
    return ArrayRecord(
        {
            "acts": Array(_to_numpy(acts, wire_dtype)),
            "labels": Array(
                y.astype(np.uint8 if y.size == 0 or 0 <= y.min() <= y.max() < 256 else np.int64)
            ),
        }
    )


def decode_activations(
    record: ArrayRecord | None,
    shape: tuple[int, int, int],
    num_classes: int,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Validated float32 activations and int64 labels; PayloadError names what is wrong."""
    if record is None:
        raise PayloadError("reply carries no 'acts' record")
    missing = {"acts", "labels"} - set(record.keys())
    if missing:
        raise PayloadError(f"activation payload lacks {sorted(missing)}")
    acts, labels = _load(record, "acts"), _load(record, "labels")
    if acts.dtype.kind != "f":
        raise PayloadError(f"activations must be floating point, got {acts.dtype}")
    if acts.ndim != 4 or tuple(acts.shape[1:]) != tuple(shape) or acts.shape[0] == 0:
        raise PayloadError(
            f"activations have shape {acts.shape}, expected (n>0, {', '.join(map(str, shape))})"
        )
    if labels.dtype.kind not in "iu" or labels.shape != (acts.shape[0],):
        raise PayloadError(
            f"labels must be {acts.shape[0]} integers, "
            f"got dtype {labels.dtype} shape {labels.shape}"
        )
    if labels.min() < 0 or labels.max() >= num_classes:
        raise PayloadError(
            f"labels out of range [0, {num_classes}): {labels.min()}..{labels.max()}"
        )
    acts_t = torch.from_numpy(acts).to(device=device, dtype=torch.float32)
    if not torch.isfinite(acts_t).all():
        raise PayloadError("activations contain NaN or infinite values")
    return acts_t, torch.from_numpy(labels.astype(np.int64)).to(device)


def encode_gradient(grad: torch.Tensor, wire_dtype: str) -> ArrayRecord:
    return ArrayRecord({"grad": Array(_to_numpy(grad, wire_dtype))})


def _to_numpy(t: torch.Tensor, wire_dtype: str) -> np.ndarray:
    """Cast on the device (float16 crosses the bus at half the bytes); C order on the wire."""
    return t.detach().to(getattr(torch, wire_dtype)).contiguous().cpu().numpy()


def decode_gradient(record: ArrayRecord, like: torch.Tensor) -> torch.Tensor:
    """The server's dL/d(acts); checked like activations, since it goes into the weights."""
    grad = _load(record, "grad")
    if grad.dtype.kind != "f":
        raise PayloadError(f"gradient must be floating point, got {grad.dtype}")
    if tuple(grad.shape) != tuple(like.shape):
        raise PayloadError(f"gradient has shape {grad.shape}, activations have {tuple(like.shape)}")
    grad_t = torch.from_numpy(grad).to(device=like.device, dtype=like.dtype)
    if not torch.isfinite(grad_t).all():
        raise PayloadError("gradient contains NaN or infinite values")
    return grad_t


def encode_modules(modules: Mapping[str, nn.Module | None]) -> ArrayRecord:
    """Weights and buffers of several modules in one record, keys prefixed by module name."""
    return ArrayRecord(
        {
            f"{prefix}.{key}": Array(t.detach().contiguous().cpu().numpy())
            for prefix, module in modules.items()
            if module is not None
            for key, t in module.state_dict().items()
        }
    )


def load_modules(record: ArrayRecord, modules: Mapping[str, nn.Module | None]) -> None:
    for prefix, module in modules.items():
        if module is None:
            continue
        n = len(prefix) + 1
        state = {
            k[n:]: torch.from_numpy(_load(record, k)) for k in record if k.startswith(prefix + ".")
        }
        module.load_state_dict(state, strict=True)


def check_weights(record: ArrayRecord | None, like: ArrayRecord) -> dict[str, np.ndarray]:
    """A client's returned weights, decoded; they must match the global ones key for key,
    shape and dtype, and be finite."""
    if not isinstance(record, ArrayRecord):
        raise PayloadError("final reply carries no client weights")
    if set(record.keys()) != set(like.keys()):
        diff = sorted(set(record.keys()).symmetric_difference(like.keys()))
        raise PayloadError(f"client weights disagree with the global model in keys {diff}")
    decoded = {}
    for key, ref in like.items():
        got = _load(record, key)
        if got.shape != tuple(ref.shape) or str(got.dtype) != ref.dtype:
            raise PayloadError(
                f"client weight {key!r} is {got.dtype}{list(got.shape)}, "
                f"expected {ref.dtype}{list(ref.shape)}"
            )
        if got.dtype.kind == "f" and not np.isfinite(got).all():
            raise PayloadError(f"client weight {key!r} contains NaN or infinite values")
        decoded[key] = got
    return decoded


def _load(record: ArrayRecord, key: str) -> np.ndarray:
    try:
        return record[key].numpy()
    except Exception as exc:  # corrupt bytes, wrong serialization type
        raise PayloadError(f"array {key!r} cannot be decoded: {exc}") from exc
