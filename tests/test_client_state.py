"""Tests for split_core.client.SplitClient on real CIFAR-10: replies, state round trips, chunks.

Flower's ``context.state`` is the client's only memory between messages (deployment may start a
fresh process per message), so a client rebuilt from its saved state must answer exactly as the
live one would, bit for bit.
"""

from __future__ import annotations

import copy
from collections import Counter

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flwr.app import RecordDict

from models import cut_shape
from split_core.client import SplitClient
from split_core.config import RunConfig
from split_core.payload import (
    PayloadError,
    decode_activations,
    encode_gradient,
    encode_modules,
)
from split_core.protocol import EvaluateReply, EvaluateRequest, TrainReply, TrainRequest
from split_core.steps import Phases
from strategies.server_segment import ServerSegment
from tests.conftest import TINY, data_dir

BATCH = 32
SAMPLES = 96  # three batches per epoch
BYTES_PER_SAMPLE = int(np.prod(cut_shape(TINY["depth"], TINY["cut"]))) * 4  # float32 on the wire


def _cfg(method: str, **extra) -> RunConfig:
    return RunConfig.from_run_config(
        TINY
        | {
            "data-dir": data_dir(),
            "method": method,
            "samples-per-client": SAMPLES,
            "batch-size": BATCH,
            "test-samples": 64,
        }
        | extra
    )


def _first(client: SplitClient, rnd: int = 1) -> TrainRequest:
    """The first message of a round carries the global client weights."""
    return TrainRequest(rnd, 0.05, weights=encode_modules(client.modules))


def _next(rnd: int = 1) -> TrainRequest:
    return TrainRequest(rnd, 0.05)


def _grad_request(grad_record) -> TrainRequest:
    return TrainRequest(1, 0.05, gradient=copy.deepcopy(grad_record))


def _rebuild(state: RecordDict) -> SplitClient:
    """A fresh process: nothing survives but a copy of the saved records."""
    return SplitClient.from_state(copy.deepcopy(state))


def _momentum(client: SplitClient) -> list[torch.Tensor | None]:
    state = client.parts.optimizer.state
    return [state.get(p, {}).get("momentum_buffer") for p in client._params()]


def _assert_same_client(a: SplitClient, b: SplitClient) -> None:
    """Every weight, BatchNorm statistic and momentum buffer agrees bit for bit."""
    for name in a.modules:
        if a.modules[name] is None:
            assert b.modules[name] is None
            continue
        sa, sb = a.modules[name].state_dict(), b.modules[name].state_dict()
        assert sa.keys() == sb.keys()
        for key in sa:
            assert torch.equal(sa[key], sb[key]), f"{name}.{key}"
    ma, mb = _momentum(a), _momentum(b)
    assert len(ma) == len(mb)
    for i, (x, y) in enumerate(zip(ma, mb, strict=True)):
        assert (x is None) == (y is None), i
        if x is not None:
            assert torch.equal(x, y), i
    assert (a.epoch, a.cursor, a.pending) == (b.epoch, b.cursor, b.pending)


def _assert_same_reply(a: TrainReply | EvaluateReply, b: TrainReply | EvaluateReply) -> None:
    assert set(a.content().keys()) == set(b.content().keys())
    for name in ("activations", "weights"):
        ra, rb = getattr(a, name, None), getattr(b, name, None)
        assert (ra is None) == (rb is None), name
        if ra is not None:
            assert set(ra.keys()) == set(rb.keys())
            for key in ra:
                assert np.array_equal(ra[key].numpy(), rb[key].numpy()), f"{name}.{key}"
                assert ra[key].dtype == rb[key].dtype
    for key in ("num_examples", "aux_loss_sum", "aux_correct", "done"):
        assert getattr(a.metrics, key) == getattr(b.metrics, key), key


def _server_gradient(server: ServerSegment, reply: TrainReply, cfg: RunConfig):
    acts, labels = decode_activations(
        reply.activations, cut_shape(cfg.depth, cfg.cut), cfg.num_classes, server.device
    )
    _, grad = server.train_on(acts, labels, Phases(), needs_grad=True)
    assert grad is not None and grad.shape == acts.shape
    return encode_gradient(grad, "float32")


def _snapshot_modules(client: SplitClient) -> dict[str, torch.Tensor]:
    return {
        f"{name}.{k}": v.clone()
        for name, m in client.modules.items()
        if m is not None
        for k, v in m.state_dict().items()
    }


# ------------------------------------------------------------------------------------ CSL
def test_csl_recomputed_graph_equals_live_graph() -> None:
    """A CSL client rebuilt from state (no autograd graph) must redo the forward exactly.

    A diverges from B if the recomputed forward moves BatchNorm's running statistics a second
    time, if the batch (order or augmentation) is not reproducible, or if BatchNorm statistics
    or momentum are lost on the way through the RecordDict.
    """
    cfg = _cfg("csl")
    a = SplitClient.create(cfg, 0, 1, cfg.data_dir)
    state = RecordDict()
    a.save(state)
    assert a.num_batches == 3

    reply = a.train(_first(a))
    a.save(state)
    assert not reply.metrics.done
    assert reply.metrics.num_examples == BATCH
    assert reply.activations["acts"].shape == (BATCH, *cut_shape(cfg.depth, cfg.cut))
    assert reply.weights is None
    assert a.pending == 0 and a._graph is not None
    assert reply.metrics.held_saved_bytes > 0  # the live graph is held for the gradient

    server = ServerSegment(cfg)
    grad = _server_gradient(server, reply, cfg)
    b = _rebuild(state)
    assert b._graph is None and b.pending == 0

    live_before = _snapshot_modules(a)
    reply_a, reply_b = a.train(_grad_request(grad)), b.train(_grad_request(grad))
    assert (reply_a.metrics.recomputes, reply_b.metrics.recomputes) == (0, 1)
    assert reply_b.metrics.recompute_seconds > 0 == reply_a.metrics.recompute_seconds
    _assert_same_reply(reply_a, reply_b)
    _assert_same_client(a, b)
    assert any(not torch.equal(live_before[k], v) for k, v in _snapshot_modules(a).items())
    assert all(m is not None for m in _momentum(a))  # one SGD step has been taken

    # Go on to the end of the epoch; B is a fresh process for every message.
    state_b = RecordDict()
    b.save(state_b)
    steps = 1
    while not reply_a.metrics.done:
        assert reply_a.activations is not None
        grad = _server_gradient(server, reply_a, cfg)
        b = _rebuild(state_b)
        reply_a, reply_b = a.train(_grad_request(grad)), b.train(_grad_request(grad))
        b.save(state_b)
        _assert_same_reply(reply_a, reply_b)
        steps += 1
    assert steps == a.num_batches
    assert reply_a.activations is None and reply_a.weights is not None
    assert reply_a.metrics.epoch_examples == SAMPLES
    _assert_same_client(a, b)
    assert a.pending == -1 and a.cursor == a.num_batches


def test_csl_equals_a_client_that_never_saved() -> None:
    """Saving state must not disturb training: compare with a client that only ever runs live."""
    cfg = _cfg("csl")
    a, ref = (
        SplitClient.create(cfg, 0, 1, cfg.data_dir),
        SplitClient.create(cfg, 0, 1, cfg.data_dir),
    )
    state = RecordDict()
    server_a, server_ref = ServerSegment(cfg), ServerSegment(cfg)
    reply_a, reply_ref = a.train(_first(a)), ref.train(_first(ref))
    while not reply_a.metrics.done:
        a.save(state)
        a = _rebuild(state)
        ga, gr = (
            _server_gradient(server_a, reply_a, cfg),
            _server_gradient(server_ref, reply_ref, cfg),
        )
        reply_a, reply_ref = a.train(_grad_request(ga)), ref.train(_grad_request(gr))
        _assert_same_reply(reply_a, reply_ref)
    _assert_same_client(a, ref)


# ------------------------------------------------------------------------------------ DSL
def test_dsl_state_round_trip() -> None:
    """A DSL client rebuilt between chunks continues exactly where the live one does."""
    cfg = _cfg("dsl")
    a = SplitClient.create(cfg, 0, 1, cfg.data_dir)
    state = RecordDict()
    a.save(state)
    reply = a.train(_first(a))
    assert reply.metrics.num_examples == a.batches_per_message() * BATCH
    assert not reply.metrics.done
    assert reply.metrics.held_saved_bytes == 0  # DSL frees its graph at once
    a.save(state)
    b = _rebuild(state)
    _assert_same_client(a, b)

    reply_a = a.train(_next())
    reply_b = b.train(_next())
    _assert_same_reply(reply_a, reply_b)
    _assert_same_client(a, b)
    assert reply_a.metrics.done
    assert reply_a.weights is not None
    assert {k.split(".")[0] for k in reply_a.weights} == {"segment", "aux"}
    assert reply_a.metrics.epoch_examples == SAMPLES


def test_next_round_adopts_the_global_model() -> None:
    """The first message of a round resets the cursor and trains from the weights it carries.

    Momentum is the client's own and survives the round (live and rebuilt alike).
    """
    cfg = _cfg("dsl")
    a = SplitClient.create(cfg, 0, 1, cfg.data_dir)
    fresh = encode_modules(a.modules)
    a.train(_first(a))
    assert a.train(_next()).metrics.done
    assert a.cursor == a.num_batches
    state = RecordDict()
    a.save(state)
    b = _rebuild(state)

    reply_a = a.train(TrainRequest(2, 0.05, weights=fresh))
    reply_b = b.train(TrainRequest(2, 0.05, weights=copy.deepcopy(fresh)))
    assert (a.epoch, a.cursor) == (1, a.batches_per_message())
    _assert_same_reply(reply_a, reply_b)
    _assert_same_client(a, b)

    # DSL sends the activations of the forward before its step: those of the global weights.
    ref = SplitClient.create(cfg, 0, 1, cfg.data_dir)
    with torch.no_grad():
        x, y = ref.train_batch(1, 0)
        expected = ref.modules["segment"](x)
    acts, labels = decode_activations(reply_a.activations, ref.shape, 10, ref.compute.device)
    assert torch.equal(acts[:BATCH], expected)
    assert torch.equal(labels[:BATCH], y)


# --------------------------------------------------------------------------------- errors
def test_gradient_without_pending_batch() -> None:
    cfg = _cfg("csl")
    client = SplitClient.create(cfg, 0, 1, cfg.data_dir)
    grad = encode_gradient(torch.zeros(BATCH, *client.shape), "float32")
    with pytest.raises(PayloadError) as info:
        client.train(_grad_request(grad))
    assert str(info.value) == "received a gradient but no batch is waiting for one"


def test_forward_while_a_batch_waits() -> None:
    """CSL must not silently drop a batch whose gradient never came back."""
    cfg = _cfg("csl")
    client = SplitClient.create(cfg, 0, 1, cfg.data_dir)
    client.train(_first(client))
    with pytest.raises(PayloadError) as info:
        client.train(_next())
    assert str(info.value) == "batch 0 still waits for its gradient"
    assert client.pending == 0 and client.cursor == 1


def test_from_empty_state() -> None:
    with pytest.raises(RuntimeError) as info:
        SplitClient.from_state(RecordDict())
    assert str(info.value) == (
        "this node has no split-learning state: the set-up message never reached it"
    )
    assert "set-up" in str(info.value)


# ---------------------------------------------------------------------------------- chunks
def test_dsl_chunk_carries_two_batches() -> None:
    """chunk-mib decides how many DSL mini-batches ride in one message (2.5 batches -> 2)."""
    chunk_mib = 2.5 * BATCH * BYTES_PER_SAMPLE / 2**20
    cfg = _cfg("dsl", **{"chunk-mib": chunk_mib})
    client = SplitClient.create(cfg, 0, 1, cfg.data_dir)
    assert client.batches_per_message() == 2
    first = client.train(_first(client))
    assert first.metrics.num_examples == 2 * BATCH
    assert first.activations["acts"].shape[0] == 2 * BATCH
    assert first.activations["labels"].shape == (2 * BATCH,)
    second = client.train(_next())
    assert second.metrics.num_examples == SAMPLES - 2 * BATCH
    assert second.metrics.done


def test_dsl_chunk_of_exactly_two_batches_and_float16() -> None:
    """The limit is inclusive, and float16 fits twice as many samples in the same bytes."""
    exact = 2 * BATCH * BYTES_PER_SAMPLE / 2**20
    assert (
        SplitClient.create(
            _cfg("dsl", **{"chunk-mib": exact}), 0, 1, data_dir()
        ).batches_per_message()
        == 2
    )
    cfg16 = _cfg("dsl", **{"chunk-mib": exact, "payload-dtype": "float16"})
    assert SplitClient.create(cfg16, 0, 1, data_dir()).batches_per_message() == 4
    tiny = _cfg("dsl", **{"chunk-mib": 0.001})
    assert SplitClient.create(tiny, 0, 1, data_dir()).batches_per_message() == 1


def test_csl_carries_one_batch() -> None:
    """CSL needs the gradient of each batch before the next: one batch per message, though
    two would fit in chunk-mib."""
    chunk_mib = 2.5 * BATCH * BYTES_PER_SAMPLE / 2**20
    cfg = _cfg("csl", **{"chunk-mib": chunk_mib})
    client = SplitClient.create(cfg, 0, 1, cfg.data_dir)
    assert client.batches_per_message() == 2
    reply = client.train(_first(client))
    assert reply.metrics.num_examples == BATCH
    assert reply.activations["acts"].shape[0] == BATCH
    assert reply.metrics.awaits_gradient and client.pending == 0


# -------------------------------------------------------------------------------- evaluate
@pytest.mark.parametrize("method", ["dsl", "csl"])
def test_evaluate_covers_the_test_split(method: str) -> None:
    """Evaluation sends every test sample once, in eval mode, and leaves the model training."""
    chunk_mib = 16 * BYTES_PER_SAMPLE / 2**20  # 16 samples per message: 4 replies for 64
    cfg = _cfg(method, **{"chunk-mib": chunk_mib})
    client = SplitClient.create(cfg, 0, 1, cfg.data_dir)
    assert len(client.test_idx) == 64
    before = _snapshot_modules(client)
    replies = [client.evaluate(EvaluateRequest(1, encode_modules(client.modules)))]
    while not replies[-1].metrics.done:
        replies.append(client.evaluate(EvaluateRequest(1)))
        assert len(replies) <= 64
    assert len(replies) == 4
    assert [r.metrics.num_examples for r in replies] == [16] * 4
    assert sum(r.metrics.num_examples for r in replies) == len(client.test_idx)
    for m in client.modules.values():
        if m is not None:
            assert all(sub.training for sub in m.modules())
    after = _snapshot_modules(client)
    assert all(torch.equal(before[k], after[k]) for k in before)  # no BatchNorm update

    # The activations are the eval-mode segment applied to the test images, in order.
    segment = client.modules["segment"].eval()
    with torch.no_grad():
        x, y = client.test_batch(16, 32)
        expected = segment(x)
    segment.train()
    got, labels = decode_activations(
        replies[1].activations, client.shape, 10, client.compute.device
    )
    assert torch.equal(got, expected)
    assert torch.equal(labels, y)
    all_labels = np.concatenate([r.activations["labels"].numpy() for r in replies])
    assert all_labels.tolist() == client.data.y_test[client.test_idx].tolist()
    if method == "dsl":
        assert 0 <= sum(r.metrics.aux_correct for r in replies) <= 64
        assert sum(r.metrics.aux_loss_sum for r in replies) > 0


# ------------------------------------------------------------------------------ data stream
def test_train_batches_are_reproducible() -> None:
    """A recomputed CSL forward sees the same images only if batches can be rebuilt exactly."""
    cfg = _cfg("csl")
    client = SplitClient.create(cfg, 0, 1, cfg.data_dir)
    x1, y1 = client.train_batch(0, 1)
    x2, y2 = client.train_batch(0, 1)
    assert x1.shape == (BATCH, 3, 32, 32) and y1.dtype == torch.int64
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    other = SplitClient.create(cfg, 0, 1, cfg.data_dir)  # another process, same partition
    x3, y3 = other.train_batch(0, 1)
    assert torch.equal(x1, x3) and torch.equal(y1, y3)


def test_epochs_are_reshuffled() -> None:
    cfg = _cfg("csl")
    client = SplitClient.create(cfg, 0, 1, cfg.data_dir)
    y0 = torch.cat([client.train_batch(0, b)[1] for b in range(client.num_batches)])
    y1 = torch.cat([client.train_batch(1, b)[1] for b in range(client.num_batches)])
    assert not torch.equal(y0, y1)
    x0, x1 = client.train_batch(0, 0)[0], client.train_batch(1, 0)[0]
    assert not torch.equal(x0, x1)


@pytest.mark.parametrize("epoch", [0, 3])
def test_epoch_visits_every_sample_once(epoch: int) -> None:
    """One epoch is a permutation of the client's partition: every label exactly once."""
    cfg = _cfg("dsl", **{"samples-per-client": 80})  # last batch is short: 32 + 32 + 16
    client = SplitClient.create(cfg, 0, 1, cfg.data_dir)
    assert len(client.train_idx) == 80 and client.num_batches == 3
    batches = [client.train_batch(epoch, b)[1] for b in range(client.num_batches)]
    assert [len(y) for y in batches] == [32, 32, 16]
    got = Counter(torch.cat(batches).tolist())
    expected = Counter(np.asarray(client.data.y_train[client.train_idx]).tolist())
    assert got == expected
    assert sum(got.values()) == 80


def test_partitions_are_disjoint() -> None:
    """Two clients of one federation never train on the same image."""
    cfg = _cfg("dsl", **{"samples-per-client": 0})
    a = SplitClient.create(cfg, 0, 2, cfg.data_dir)
    b = SplitClient.create(cfg, 1, 2, cfg.data_dir)
    assert len(a.train_idx) == len(b.train_idx) == len(a.data.y_train) // 2
    assert len(np.intersect1d(a.train_idx, b.train_idx)) == 0
    assert len(np.intersect1d(a.test_idx, b.test_idx)) == 0
    assert len(a.test_idx) + len(b.test_idx) == 64


# ------------------------------------------------------------------------------ memory meter
def _saved_bytes(client: SplitClient, fn) -> int:
    """Independent count of the distinct non-parameter tensors autograd saves during ``fn``."""
    params = {
        p.data_ptr() for m in client.modules.values() if m is not None for p in m.parameters()
    }
    seen: dict[tuple[int, int], int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.data_ptr() not in params:
            seen[(t.data_ptr(), t.numel())] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    out.sum().backward()  # free the graph
    return sum(seen.values())


def test_csl_reports_the_held_graph() -> None:
    """held-saved-bytes is CSL's cost: the segment's saved activations until the gradient."""
    cfg = _cfg("csl")
    client = SplitClient.create(cfg, 0, 1, cfg.data_dir)
    ref = SplitClient.create(cfg, 0, 1, cfg.data_dir)
    x, _ = ref.train_batch(0, 0)
    expected = _saved_bytes(ref, lambda: ref.modules["segment"](x))
    assert expected > 2 * BATCH * BYTES_PER_SAMPLE  # several activation maps per block

    reply = client.train(_first(client))
    assert reply.metrics.held_saved_bytes == expected
    assert reply.metrics.peak_saved_bytes == expected
    server = ServerSegment(cfg)
    while not reply.metrics.done:
        reply = client.train(_grad_request(_server_gradient(server, reply, cfg)))
    assert reply.metrics.held_saved_bytes == 0
    assert client.meter.current == 0


def test_csl_abandoned_graph_is_released() -> None:
    """A round restarted before the gradient came must not keep the old batch's activations."""
    cfg = _cfg("csl")
    client = SplitClient.create(cfg, 0, 1, cfg.data_dir)
    first = client.train(_first(client))
    again = client.train(_first(client, rnd=2))  # e.g. the previous round failed mid-way
    assert again.metrics.held_saved_bytes == first.metrics.held_saved_bytes


def test_dsl_peak_is_one_batch_of_activations() -> None:
    """DSL frees each batch's graph at once: its peak is one batch's saved activations."""
    cfg = _cfg("dsl")
    client = SplitClient.create(cfg, 0, 1, cfg.data_dir)
    ref = SplitClient.create(cfg, 0, 1, cfg.data_dir)
    x, y = ref.train_batch(0, 0)
    segment, aux = ref.modules["segment"], ref.modules["aux"]
    expected = _saved_bytes(ref, lambda: F.cross_entropy(aux(segment(x)), y))
    reply = client.train(_first(client))
    assert reply.metrics.held_saved_bytes == 0
    assert reply.metrics.peak_saved_bytes == expected


@pytest.mark.parametrize(("taper", "sizes"), [(True, [4, 4, 4, 2, 1, 1]), (False, [4, 4, 4, 4])])
def test_chunks_taper_at_the_end_of_an_epoch(taper: bool, sizes: list[int]) -> None:
    """With chunk-taper a DSL epoch ends in halving chunks: the server's last one is a batch."""
    chunk_mib = 4 * BATCH * BYTES_PER_SAMPLE / 2**20
    cfg = _cfg("dsl", **{"chunk-mib": chunk_mib, "samples-per-client": 16 * BATCH})
    cfg = RunConfig.from_run_config(cfg.to_run_config() | {"chunk-taper": taper})
    client = SplitClient.create(cfg, 0, 1, cfg.data_dir)
    reply, got = client.train(_first(client)), []
    got.append(reply.metrics.num_examples // BATCH)
    while not reply.metrics.done:
        reply = client.train(_next())
        got.append(reply.metrics.num_examples // BATCH)
    assert got == sizes
