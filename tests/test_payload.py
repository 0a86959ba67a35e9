"""Tests for split_core.payload and FedAvg: exact byte counts, exact round trips, strict checks."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord

from models import build_aux_head, cut_shape, split_resnet
from split_core.config import RunConfig
from split_core.payload import (
    PayloadError,
    array_bytes,
    check_weights,
    decode_activations,
    decode_gradient,
    encode_activations,
    encode_gradient,
    encode_modules,
    load_modules,
    record_bytes,
)
from split_core.steps import Phases
from strategies.aggregation import FedAvg

CPU = torch.device("cpu")
SHAPE = (16, 32, 32)


def _rand(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _npy(array: np.ndarray, version: tuple[int, int] | None = None) -> Array:
    """An Array whose bytes are written by numpy itself, optionally in another .npy version."""
    buf = io.BytesIO()
    np.lib.format.write_array(buf, array, version=version, allow_pickle=False)
    return Array(
        dtype=str(array.dtype),
        shape=tuple(array.shape),
        stype="numpy.ndarray",
        data=buf.getvalue(),
    )


def _record(acts: np.ndarray, labels: np.ndarray | None) -> ArrayRecord:
    content = {"acts": Array(acts)}
    if labels is not None:
        content["labels"] = Array(labels)
    return ArrayRecord(content)


# ------------------------------------------------------------------------------- byte counting
@pytest.mark.parametrize(
    ("dtype", "itemsize"), [(np.float32, 4), (np.float16, 2), (np.uint8, 1), (np.int64, 8)]
)
def test_array_bytes_counts_data_only(dtype: type, itemsize: int) -> None:
    """Reported bytes must be the payload, not the .npy header Flower adds around it."""
    n, c, h, w = 5, 16, 32, 32
    array = Array(np.ones((n, c, h, w), dtype=dtype))
    assert array_bytes(array) == n * c * h * w * itemsize
    assert len(array.data) > array_bytes(array)
    assert (len(array.data) - array_bytes(array)) % 64 == 0  # numpy pads its header to 64


def test_label_bytes_are_one_per_sample() -> None:
    labels = Array(np.arange(37, dtype=np.uint8) % 10)
    assert array_bytes(labels) == 37


def test_large_random_array_bytes() -> None:
    """A 6 MiB payload of real-looking (non-constant) activations is counted to the byte."""
    acts = np.random.default_rng(0).standard_normal((96, 16, 32, 32), dtype=np.float32)
    array = Array(acts)
    assert array_bytes(array) == 96 * 16 * 32 * 32 * 4 == 6 * 2**20
    header = len(array.data) - array_bytes(array)
    assert 0 < header <= 4096
    assert array.data[header:] == acts.tobytes()  # what is counted is exactly the values


@pytest.mark.parametrize("version", [(1, 0), (2, 0), (3, 0)])
def test_array_bytes_reads_every_npy_header_version(version: tuple[int, int]) -> None:
    """Versions 2 and 3 have a 4-byte header length; the header is still not payload."""
    array = _npy(np.zeros((3, 7), dtype=np.float32), version)
    assert array.data[6:8] == bytes(version)
    assert array_bytes(array) == 3 * 7 * 4


def test_scalar_array_bytes() -> None:
    """BatchNorm's num_batches_tracked is a 0-d int64: eight bytes."""
    assert array_bytes(Array(np.array(5, dtype=np.int64))) == 8


def test_record_bytes_sums_arrays() -> None:
    acts = np.zeros((4, *SHAPE), dtype=np.float16)
    record = encode_activations(torch.from_numpy(acts), torch.arange(4) % 10, "float16")
    assert record_bytes(record) == 4 * 16 * 32 * 32 * 2 + 4
    assert record_bytes(None) == 0
    assert record_bytes(ArrayRecord()) == 0


# ------------------------------------------------------------------------------ activations
def test_activations_round_trip_float32() -> None:
    """float32 on the wire must be bit-exact: CSL's equality with backprop depends on it."""
    acts, labels = _rand(6, *SHAPE), torch.tensor([0, 9, 3, 3, 1, 7])
    record = encode_activations(acts, labels, "float32")
    assert record["acts"].dtype == "float32"
    assert record["labels"].dtype == "uint8"
    assert array_bytes(record["acts"]) == 6 * 16 * 32 * 32 * 4
    assert array_bytes(record["labels"]) == 6
    got, got_labels = decode_activations(record, SHAPE, 10, CPU)
    assert got.dtype == torch.float32 and torch.equal(got, acts)
    assert got_labels.dtype == torch.int64 and torch.equal(got_labels, labels)


def test_activations_round_trip_float16() -> None:
    """float16 halves the bytes and rounds each value to the nearest half; nothing else."""
    acts, labels = _rand(3, *SHAPE, seed=1), torch.tensor([1, 2, 3])
    record = encode_activations(acts, labels, "float16")
    assert record["acts"].dtype == "float16"
    assert array_bytes(record["acts"]) == 3 * 16 * 32 * 32 * 2
    got, got_labels = decode_activations(record, SHAPE, 10, CPU, "float16")
    assert got.dtype == torch.float32
    assert torch.equal(got, acts.half().float())
    assert not torch.equal(got, acts)  # rounding really happened
    torch.testing.assert_close(got, acts, rtol=2**-11, atol=2**-24)
    assert torch.equal(got_labels, labels)


def test_labels_above_uint8_travel_as_int64() -> None:
    """A label that does not fit a byte must not wrap around."""
    acts, labels = _rand(2, *SHAPE), torch.tensor([255, 300])
    record = encode_activations(acts, labels, "float32")
    assert record["labels"].dtype == "int64"
    assert array_bytes(record["labels"]) == 16
    _, got = decode_activations(record, SHAPE, 1000, CPU)
    assert got.tolist() == [255, 300]
    assert encode_activations(acts, torch.tensor([0, 255]), "float32")["labels"].dtype == "uint8"


def test_negative_labels_are_not_wrapped() -> None:
    """'uint8 whenever they fit': -1 does not fit a uint8 and must keep its value."""
    record = encode_activations(_rand(2, *SHAPE), torch.tensor([-1, 3]), "float32")
    assert record["labels"].numpy().astype(np.int64).tolist() == [-1, 3]


def test_encoded_record_is_a_copy() -> None:
    """Later in-place training must not rewrite activations already handed to Flower."""
    acts = _rand(2, *SHAPE)
    record = encode_activations(acts, torch.tensor([0, 1]), "float32")
    expected = acts.clone()
    acts.add_(1.0)
    assert torch.equal(torch.from_numpy(record["acts"].numpy()), expected)


def _decode_error(record: ArrayRecord | None, num_classes: int = 10) -> str:
    with pytest.raises(PayloadError) as info:
        decode_activations(record, SHAPE, num_classes, CPU)
    return str(info.value)


def _good_acts(n: int = 2) -> np.ndarray:
    return np.random.default_rng(n).standard_normal((n, *SHAPE), dtype=np.float32)


def test_missing_record() -> None:
    assert _decode_error(None) == "reply carries no 'acts' record"


def test_missing_labels() -> None:
    message = _decode_error(_record(_good_acts(), None))
    assert message == "activation payload has arrays ['acts'], expected ['acts', 'labels']"


def test_missing_acts() -> None:
    record = ArrayRecord({"labels": Array(np.zeros(2, np.uint8))})
    message = _decode_error(record)
    assert message == "activation payload has arrays ['labels'], expected ['acts', 'labels']"


def test_integer_activations() -> None:
    acts = np.ones((2, *SHAPE), dtype=np.int32)
    message = _decode_error(_record(acts, np.zeros(2, np.uint8)))
    assert message == "activations must be float32 on the wire (payload-dtype=float32), got int32"


@pytest.mark.parametrize(
    "shape",
    [(2, 16, 33, 32), (2, 32, 16, 16), (2, 16, 32), (16 * 32 * 32 * 2,), (2, 1, 16, 32, 32)],
)
def test_wrong_shape(shape: tuple[int, ...]) -> None:
    acts = np.zeros(shape, dtype=np.float32)
    message = _decode_error(_record(acts, np.zeros(2, np.uint8)))
    assert message == f"activations have shape {shape}, expected (n>0, 16, 32, 32)"


def test_zero_samples() -> None:
    acts = np.zeros((0, *SHAPE), dtype=np.float32)
    message = _decode_error(_record(acts, np.zeros(0, np.uint8)))
    assert message == "activations have shape (0, 16, 32, 32), expected (n>0, 16, 32, 32)"


def test_label_count_mismatch() -> None:
    message = _decode_error(_record(_good_acts(2), np.zeros(3, np.uint8)))
    assert message == "labels must be 2 integers, got dtype uint8 shape (3,)"


def test_float_labels() -> None:
    message = _decode_error(_record(_good_acts(2), np.zeros(2, np.float32)))
    assert message == "labels must be 2 integers, got dtype float32 shape (2,)"


def test_label_out_of_range() -> None:
    """num_classes itself is one past the last class."""
    message = _decode_error(_record(_good_acts(2), np.array([0, 10], np.uint8)))
    assert message == "labels out of range [0, 10): 0..10"


def test_negative_label() -> None:
    message = _decode_error(_record(_good_acts(2), np.array([-1, 3], np.int64)))
    assert message == "labels out of range [0, 10): -1..3"


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_activations(bad: float) -> None:
    acts = _good_acts(2)
    acts[1, 3, 4, 5] = bad
    message = _decode_error(_record(acts, np.array([1, 2], np.uint8)))
    assert message == "activations contain NaN or infinite values"


def test_float64_is_not_the_wire_format() -> None:
    """A client may not send more bytes than payload-dtype says (nor 1e300, infinite in float32)."""
    acts = _good_acts(2).astype(np.float64)
    acts[0, 0, 0, 0] = 1e300
    message = _decode_error(_record(acts, np.array([1, 2], np.uint8)))
    assert message == "activations must be float32 on the wire (payload-dtype=float32), got float64"


def test_corrupt_bytes() -> None:
    garbage = Array(dtype="float32", shape=(2,), stype="numpy.ndarray", data=b"garbage")
    record = ArrayRecord({"acts": garbage, "labels": Array(np.zeros(2, np.uint8))})
    assert _decode_error(record).startswith("array 'acts' cannot be decoded: ")
    record = ArrayRecord({"acts": Array(_good_acts(2)), "labels": garbage})
    assert _decode_error(record).startswith("array 'labels' cannot be decoded: ")


def test_malformed_payload_leaves_server_model_untouched() -> None:
    """The server must reject a bad payload before its weights or optimizer see it."""
    from strategies.server_segment import ServerSegment

    cfg = RunConfig.from_run_config({"depth": 8, "cut": 1, "batch-size": 4})
    server = ServerSegment(cfg)
    shape = cut_shape(cfg.depth, cfg.cut)
    before = {k: v.clone() for k, v in server.segment.state_dict().items()}

    def step(record: ArrayRecord) -> None:  # the strategy's path: decode, then train_on
        acts, labels = decode_activations(record, shape, cfg.num_classes, server.device)
        server.train_on(acts, labels, Phases(), needs_grad=False)

    acts = _good_acts(4)
    acts[2, 0, 0, 0] = np.nan
    for bad in (
        _record(acts, np.array([0, 1, 2, 3], np.uint8)),
        _record(_good_acts(4), np.array([0, 1, 2, 10], np.uint8)),
        _record(_good_acts(4)[:, :, :-1], np.array([0, 1, 2, 3], np.uint8)),
    ):
        with pytest.raises(PayloadError):
            step(bad)
    after = server.segment.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert len(server.optimizer.state) == 0

    step(_record(_good_acts(4), np.array([0, 1, 2, 3], np.uint8)))
    after = server.segment.state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert "2.2.weight" in changed  # the head's Linear layer learned
    assert len(server.optimizer.state) > 0


# -------------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("wire", ["float32", "float16"])
def test_gradient_round_trip(wire: str) -> None:
    grad = _rand(3, *SHAPE, seed=4) * 1e-3
    like = torch.zeros(3, *SHAPE)
    record = encode_gradient(grad, wire)
    assert array_bytes(record["grad"]) == 3 * 16 * 32 * 32 * (4 if wire == "float32" else 2)
    got = decode_gradient(record, like, wire)
    assert got.dtype == like.dtype and got.shape == like.shape
    expected = grad if wire == "float32" else grad.half().float()
    assert torch.equal(got, expected)


def test_gradient_shape_mismatch() -> None:
    record = encode_gradient(torch.zeros(2, *SHAPE), "float32")
    with pytest.raises(PayloadError) as info:
        decode_gradient(record, torch.zeros(3, *SHAPE))
    assert str(info.value) == (
        "gradient has shape (2, 16, 32, 32), activations have (3, 16, 32, 32)"
    )


def test_gradient_missing() -> None:
    with pytest.raises(PayloadError) as info:
        decode_gradient(ArrayRecord(), torch.zeros(2, *SHAPE))
    assert str(info.value) == "gradient payload has arrays [], expected ['grad']"


# ---------------------------------------------------------------------------------- modules
def _segment_and_aux(seed: int) -> dict[str, torch.nn.Module | None]:
    segment, _ = split_resnet(8, 1, 10, seed=seed)
    aux = build_aux_head("conv_mlp", cut_shape(8, 1), 10, seed=seed + 1)
    return {"segment": segment, "aux": aux, "unused": None}


def _state_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_modules_round_trip() -> None:
    """Model sync must carry every weight and buffer, BatchNorm statistics included."""
    source = _segment_and_aux(0)
    with torch.no_grad():  # make the buffers non-default so they are really carried
        source["segment"][0][1].running_mean.uniform_()
        source["segment"][0][1].num_batches_tracked.fill_(17)
    record = encode_modules(source)
    seg_keys = {f"segment.{k}" for k in source["segment"].state_dict()}
    aux_keys = {f"aux.{k}" for k in source["aux"].state_dict()}
    assert set(record.keys()) == seg_keys | aux_keys
    assert not any(k.startswith("unused") for k in record)

    target = _segment_and_aux(10)
    assert not _state_equal(source["segment"], target["segment"])
    load_modules(record, target)
    assert _state_equal(source["segment"], target["segment"])
    assert _state_equal(source["aux"], target["aux"])
    assert int(target["segment"][0][1].num_batches_tracked) == 17
    n_bytes = sum(
        t.numel() * t.element_size()
        for m in (source["segment"], source["aux"])
        for t in m.state_dict().values()
    )
    assert record_bytes(record) == n_bytes


def test_load_modules_is_strict_about_missing_keys() -> None:
    """A half-synchronised model must fail loudly, not train with stale weights."""
    record = encode_modules(_segment_and_aux(0))
    partial = ArrayRecord({k: v for k, v in record.items() if k != "segment.1.bn1.weight"})
    with pytest.raises(RuntimeError) as info:
        load_modules(partial, _segment_and_aux(1))
    assert 'Missing key(s) in state_dict: "1.bn1.weight"' in str(info.value)


def test_load_modules_is_strict_about_unexpected_keys() -> None:
    record = encode_modules(_segment_and_aux(0))
    extra = ArrayRecord(dict(record.items()) | {"aux.extra": Array(np.zeros(1, np.float32))})
    with pytest.raises(RuntimeError) as info:
        load_modules(extra, _segment_and_aux(1))
    assert 'Unexpected key(s) in state_dict: "extra"' in str(info.value)


def test_load_modules_needs_the_aux_head_for_dsl() -> None:
    """A record without the aux head cannot initialise a DSL client's head."""
    source = _segment_and_aux(0)
    record = encode_modules({"segment": source["segment"]})
    with pytest.raises(RuntimeError, match="Missing key"):
        load_modules(record, _segment_and_aux(1))


# ----------------------------------------------------------------------------------- fedavg
def _arrays(w: np.ndarray, steps: int) -> dict[str, np.ndarray]:
    return {"w": w, "num_batches_tracked": np.array(steps, np.int64)}


def _global(**arrays: np.ndarray) -> ArrayRecord:
    return ArrayRecord({k: Array(v) for k, v in arrays.items()})


def test_fedavg_weighted_mean() -> None:
    """SplitFed weights each client by the examples it trained on."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((5, 7), dtype=np.float32)
    b = rng.standard_normal((5, 7), dtype=np.float32)
    acc = FedAvg(_global(w=a, num_batches_tracked=np.array(0, np.int64)))
    acc.add(_arrays(a, 3), 1.0)
    acc.add(_arrays(b, 9), 3.0)
    out = acc.result()
    expected = (0.25 * a.astype(np.float64) + 0.75 * b.astype(np.float64)).astype(np.float32)
    got = out["w"].numpy()
    assert got.dtype == np.float32
    assert np.array_equal(got, expected)
    assert out["num_batches_tracked"].numpy() == 9  # a counter takes the max, not the mean
    assert out["num_batches_tracked"].numpy().dtype == np.int64
    assert (acc.clients, acc.total) == (2, 4.0)


def test_fedavg_keeps_float16() -> None:
    a, b = np.full(3, 1.0, np.float16), np.full(3, 2.0, np.float16)
    acc = FedAvg(_global(w=a))
    acc.add({"w": a}, 1.0)
    acc.add({"w": b}, 1.0)
    assert acc.result()["w"].numpy().dtype == np.float16
    assert acc.result()["w"].numpy().tolist() == [1.5, 1.5, 1.5]


def test_fedavg_integer_takes_max() -> None:
    acc = FedAvg(_global(n=np.array(0, np.int64)))
    for n, weight in ((4, 100.0), (11, 1.0), (7, 50.0)):
        acc.add({"n": np.array(n, np.int64)}, weight)
    assert acc.result()["n"].numpy() == 11


def test_fedavg_zero_weights_keep_the_global_model() -> None:
    """Clients that saw no example did not train: the global model stays as it was."""
    start = np.array([5.0, 7.0], np.float32)
    acc = FedAvg(_global(w=start))
    acc.add({"w": np.array([1.0, 2.0], np.float32)}, 0.0)
    acc.add({"w": np.array([3.0, 6.0], np.float32)}, 0.0)
    assert acc.result()["w"].numpy().tolist() == [5.0, 7.0]


def test_fedavg_without_clients_is_none() -> None:
    assert FedAvg(_global(w=np.zeros(2, np.float32))).result() is None


def test_fedavg_single_client_is_identity() -> None:
    a = np.random.default_rng(1).standard_normal(10, dtype=np.float32)
    acc = FedAvg(_global(w=np.zeros(10, np.float32)))
    acc.add({"w": a}, 37.0)
    assert np.array_equal(acc.result()["w"].numpy(), a)


def test_client_weights_of_the_wrong_shape_are_rejected() -> None:
    like = _global(w=np.zeros((2, 3), np.float32))
    with pytest.raises(PayloadError) as info:
        check_weights(_global(w=np.zeros((3, 2), np.float32)), like)
    assert str(info.value) == "client weight 'w' is float32[3, 2], expected float32[2, 3]"


@pytest.mark.parametrize("extra_in", [0, 1])
def test_client_weights_with_other_keys_are_rejected(extra_in: int) -> None:
    """Clients that disagree on which weights exist are rejected, whichever side has more."""
    records = [_global(w=np.zeros(2, np.float32)) for _ in range(2)]
    records[extra_in]["v"] = Array(np.ones(2, np.float32))
    with pytest.raises(PayloadError) as info:
        check_weights(records[0], records[1])
    assert str(info.value) == "client weights disagree with the global model in keys ['v']"


# ---------------------------------------------------------------------------- wire formats
def _relu_acts(n: int = 4, seed: int = 5) -> torch.Tensor:
    """Cut activations follow a ReLU: non-negative, most channels with a different range."""
    x = torch.randn(n, *SHAPE, generator=torch.Generator().manual_seed(seed))
    return torch.relu(x * torch.linspace(0.1, 4.0, SHAPE[0])[None, :, None, None])


def test_bfloat16_wire_is_two_bytes_and_exact_bfloat16():
    acts = _relu_acts()
    record = encode_activations(acts, torch.arange(4), "bfloat16")
    assert record["acts"].dtype == "int16"  # bfloat16's bits; numpy has no bfloat16
    assert array_bytes(record["acts"]) == 4 * 16 * 32 * 32 * 2
    got, _ = decode_activations(record, SHAPE, 10, CPU, "bfloat16")
    assert torch.equal(got, acts.bfloat16().float())


def test_int8_activations_are_one_byte_per_value_plus_per_channel_scales():
    acts = _relu_acts()
    record = encode_activations(acts, torch.arange(4), "int8")
    assert sorted(record.keys()) == ["acts", "acts.scale", "acts.zero", "labels"]
    assert array_bytes(record["acts"]) == 4 * 16 * 32 * 32
    assert array_bytes(record["acts.scale"]) == array_bytes(record["acts.zero"]) == 16 * 4
    got, _ = decode_activations(record, SHAPE, 10, CPU, "int8")
    # per channel, the error is at most half a step of that channel's range / 255
    step = (acts.amax(dim=(0, 2, 3)) - acts.amin(dim=(0, 2, 3))) / 255
    error = (got - acts).abs().amax(dim=(0, 2, 3))
    assert torch.all(error <= step / 2 + 1e-6)
    assert torch.all(error > 0)  # really quantised


def test_int8_constant_channel_decodes_to_its_value():
    acts = _relu_acts()
    acts[:, 3] = 0.0
    got, _ = decode_activations(
        encode_activations(acts, torch.arange(4), "int8"), SHAPE, 10, CPU, "int8"
    )
    assert torch.equal(got[:, 3], torch.zeros_like(got[:, 3]))


def test_int8_gradient_is_symmetric_and_unbiased():
    """Stochastic rounding: each value rounds up with the probability of its fraction, so the
    mean of many quantisations converges to the gradient; zero stays exactly zero."""
    grad = torch.randn(2, *SHAPE, generator=torch.Generator().manual_seed(7)) * 1e-3
    grad[0, 0, 0, :4] = 0.0
    record = encode_gradient(grad, "int8", torch.Generator().manual_seed(0))
    assert sorted(record.keys()) == ["grad", "grad.scale"]
    assert record["grad"].numpy().min() >= -127
    one = decode_gradient(record, grad, "int8")
    assert torch.equal(one[0, 0, 0, :4], torch.zeros(4))
    mean = torch.stack(
        [
            decode_gradient(
                encode_gradient(grad, "int8", torch.Generator().manual_seed(s)), grad, "int8"
            )
            for s in range(200)
        ]
    ).mean(0)
    step = grad.abs().amax(dim=(0, 2, 3)).max() / 127
    assert (mean - grad).abs().max() < step * 0.35  # one draw errs by up to a whole step
    assert (one - grad).abs().max() > step * 0.5


def test_int8_gradient_rounding_is_reproducible():
    grad = torch.randn(2, *SHAPE, generator=torch.Generator().manual_seed(8))
    a = encode_gradient(grad, "int8", torch.Generator().manual_seed(3))
    b = encode_gradient(grad, "int8", torch.Generator().manual_seed(3))
    assert np.array_equal(a["grad"].numpy(), b["grad"].numpy())


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            lambda r: r.__setitem__("acts.scale", Array(-np.ones(16, np.float32))),
            "acts.scale has negative entries",
        ),
        (
            lambda r: r.__setitem__("acts.scale", Array(np.ones(15, np.float32))),
            "acts.scale must be float32 of shape (16,), got float32(15,)",
        ),
        (
            lambda r: r.__setitem__("acts.zero", Array(np.full(16, np.nan, np.float32))),
            "acts.zero contains NaN or infinite values",
        ),
        (
            lambda r: r.__delitem__("acts.zero"),
            "activation payload has arrays ['acts', 'acts.scale', 'labels'], "
            "expected ['acts', 'acts.scale', 'acts.zero', 'labels']",
        ),
    ],
)
def test_int8_side_arrays_are_checked(change, message):
    record = encode_activations(_relu_acts(2), torch.arange(2), "int8")
    change(record)
    with pytest.raises(PayloadError) as info:
        decode_activations(record, SHAPE, 10, CPU, "int8")
    assert str(info.value) == message
