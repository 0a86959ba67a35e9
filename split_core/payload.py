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


def encode_activations(acts: torch.Tensor, labels: torch.Tensor, wire: str) -> ArrayRecord:
    """Activations in the wire format; labels as uint8 (one byte each) whenever they fit."""
    y = labels.cpu().numpy()
    y = y.astype(np.uint8 if y.size == 0 or 0 <= y.min() <= y.max() < 256 else np.int64)
    return ArrayRecord(encode_tensor(acts, wire, "acts") | {"labels": Array(y)})


def decode_activations(
    record: ArrayRecord | None,
    shape: tuple[int, int, int],
    num_classes: int,
    device: torch.device,
    wire: str = "float32",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Validated float32 activations and int64 labels; PayloadError names what is wrong."""
    if not isinstance(record, ArrayRecord):
        raise PayloadError("reply carries no 'acts' record")
    expected = {"labels", *wire_keys("acts", wire)}
    if set(record.keys()) != expected:
        raise PayloadError(
            f"activation payload has arrays {sorted(record.keys())}, expected {sorted(expected)}"
        )
    labels = _load(record, "labels")
    acts = decode_tensor(record, "acts", wire, device)
    if acts.ndim != 4 or tuple(acts.shape[1:]) != tuple(shape) or acts.shape[0] == 0:
        raise PayloadError(
            f"activations have shape {tuple(acts.shape)}, "
            f"expected (n>0, {', '.join(map(str, shape))})"
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
    return acts, torch.from_numpy(labels.astype(np.int64)).to(device)


def encode_gradient(
    grad: torch.Tensor, wire: str, generator: torch.Generator | None = None
) -> ArrayRecord:
    """dL/d(acts) in the wire format; int8 rounds stochastically (see ``encode_tensor``)."""
    return ArrayRecord(encode_tensor(grad, wire, "grad", symmetric=True, generator=generator))


def decode_gradient(record: ArrayRecord, like: torch.Tensor, wire: str = "float32") -> torch.Tensor:
    """The server's dL/d(acts); checked like activations, since it goes into the weights."""
    expected = set(wire_keys("grad", wire, symmetric=True))
    if set(record.keys()) != expected:
        raise PayloadError(
            f"gradient payload has arrays {sorted(record.keys())}, expected {sorted(expected)}"
        )
    grad = decode_tensor(record, "grad", wire, like.device)
    if tuple(grad.shape) != tuple(like.shape):
        raise PayloadError(
            f"gradient has shape {tuple(grad.shape)}, activations have {tuple(like.shape)}"
        )
    return grad.to(like.dtype)


# --------------------------------------------------------------------------- wire formats
# float32 and float16 travel as themselves, bfloat16 as its 16 bits in an int16 array (numpy
# has no bfloat16). int8 is per-channel affine quantisation (channel = dim 1), with each
# channel's float32 scale (and zero point) sent alongside:
#   activations: asymmetric, [min, max] of the channel onto [-128, 127], round to nearest. Cut
#     activations follow a ReLU, so a symmetric range would waste half the levels.
#   gradients: symmetric (zero point 0, so a zero gradient stays exactly zero and signs are
#     kept), max|g| onto 127, and *stochastic* rounding, which makes the quantised gradient an
#     unbiased estimate of the true one: round-to-nearest would bias every small gradient
#     component to 0, and SGD would stall on them.
WIRE_ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2, "int8": 1}
_WIRE_NUMPY = {"float32": np.float32, "float16": np.float16, "bfloat16": np.int16, "int8": np.int8}


def wire_keys(key: str, wire: str, symmetric: bool = False) -> list[str]:
    if wire != "int8":
        return [key]
    return [key, f"{key}.scale"] if symmetric else [key, f"{key}.scale", f"{key}.zero"]


def encode_tensor(
    t: torch.Tensor,
    wire: str,
    key: str,
    *,
    symmetric: bool = False,
    generator: torch.Generator | None = None,
) -> dict[str, Array]:
    """The arrays that carry ``t`` (N, C, ...) in ``wire``, computed on t's device."""
    t = t.detach()
    if wire in ("float32", "float16"):
        return {key: Array(_numpy(t.to(getattr(torch, wire))))}
    if wire == "bfloat16":
        return {key: Array(_numpy(t.to(torch.bfloat16).view(torch.int16)))}
    x = t.float().transpose(0, 1).reshape(t.shape[1], -1)  # (C, everything else)
    if symmetric:
        scale = x.abs().amax(dim=1) / 127
        noise = torch.rand(x.shape, generator=generator).to(x.device)
        q = torch.floor(x / _safe(scale)[:, None] + noise).clamp_(-127, 127)
        arrays = {f"{key}.scale": Array(_numpy(scale))}
    else:
        lo, hi = x.amin(dim=1), x.amax(dim=1)
        scale = (hi - lo) / 255
        zero = torch.round(-lo / _safe(scale)) - 128
        q = (torch.round(x / _safe(scale)[:, None]) + zero[:, None]).clamp_(-128, 127)
        arrays = {f"{key}.scale": Array(_numpy(scale)), f"{key}.zero": Array(_numpy(zero))}
    q = q.to(torch.int8).reshape(t.shape[1], t.shape[0], *t.shape[2:]).transpose(0, 1)
    return {key: Array(_numpy(q))} | arrays


def decode_tensor(record: ArrayRecord, key: str, wire: str, device: torch.device) -> torch.Tensor:
    """float32 tensor from the arrays of ``key``, every array checked before it is used."""
    raw = _load(record, key)
    if raw.dtype != _WIRE_NUMPY[wire]:
        what = "activations" if key == "acts" else "gradient"
        raise PayloadError(
            f"{what} must be {np.dtype(_WIRE_NUMPY[wire])} on the wire "
            f"(payload-dtype={wire}), got {raw.dtype}"
        )
    tensor = torch.from_numpy(raw).to(device)
    if wire == "bfloat16":
        tensor = tensor.view(torch.bfloat16)
    if wire == "int8":
        if raw.ndim < 2:
            raise PayloadError(f"{key!r} has shape {raw.shape}: expected (n, channels, ...)")
        channels = raw.shape[1]
        view = (1, channels) + (1,) * (raw.ndim - 2)
        scale = _side(record, f"{key}.scale", channels, device)
        if (scale < 0).any():
            raise PayloadError(f"{key}.scale has negative entries")
        zero = (
            _side(record, f"{key}.zero", channels, device)
            if f"{key}.zero" in record
            else torch.zeros(channels, device=device)
        )
        tensor = (tensor.float() - zero.view(view)) * scale.view(view)
    tensor = tensor.float()
    if not torch.isfinite(tensor).all():
        what = "activations" if key == "acts" else "gradient"
        raise PayloadError(f"{what} contain NaN or infinite values")
    return tensor


def _side(record: ArrayRecord, key: str, channels: int, device: torch.device) -> torch.Tensor:
    values = _load(record, key)
    if values.dtype != np.float32 or values.shape != (channels,):
        raise PayloadError(
            f"{key} must be float32 of shape ({channels},), got {values.dtype}{values.shape}"
        )
    if not np.isfinite(values).all():
        raise PayloadError(f"{key} contains NaN or infinite values")
    return torch.from_numpy(values).to(device)


def _safe(scale: torch.Tensor) -> torch.Tensor:
    """A scale to divide by: a constant channel has scale 0 and quantises to its zero point."""
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def _numpy(t: torch.Tensor) -> np.ndarray:
    """C order, on the CPU: the bytes that go on the wire."""
    return t.contiguous().cpu().numpy()


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
