"""The GPU hot path, exercised on the CPU: device-resident images, bfloat16 autocast, NHWC.

On a GPU a client keeps its uint8 images on the device and builds whole batches there; on the
CPU it gathers rows from the memory map. Both must give the same batches. Tests marked ``gpu``
run the same checks on CUDA and skip where there is none.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import RecordDict

from split_core.client import SplitClient
from split_core.compute import Compute
from split_core.config import RunConfig
from split_core.data import ClientImages
from split_core.payload import encode_gradient, encode_modules
from split_core.protocol import TrainRequest
from split_core.steps import Phases
from strategies.server_segment import ServerSegment
from tests.conftest import TINY, data_dir, real_data_dir

CPU = Compute.create(torch.device("cpu"))


def _cfg(**extra) -> RunConfig:
    base = {"data-dir": data_dir(), "samples-per-client": 96, "test-samples": 64}
    return RunConfig.from_run_config(TINY | base | extra)


def _first(client: SplitClient) -> TrainRequest:
    return TrainRequest(1, 0.05, weights=encode_modules(client.modules))


def test_resident_images_give_the_same_batches_as_gathered_ones():
    """The upload-once path (GPU) and the gather-per-batch path (CPU) agree bit for bit."""
    client = SplitClient.create(_cfg(), 0, 2, data_dir())
    data, idx = client.data, client.train_idx
    gathered = ClientImages(data.x_train, data.y_train, idx, "cifar10", CPU, resident=False)
    resident = ClientImages(data.x_train, data.y_train, idx, "cifar10", CPU, resident=True)
    positions = np.array([5, 0, 17, 3, 95, 42])
    for seed in (None, 7):
        gen_a = None if seed is None else torch.Generator().manual_seed(seed)
        gen_b = None if seed is None else torch.Generator().manual_seed(seed)
        xa, ya = gathered.batch(positions, gen_a)
        xb, yb = resident.batch(positions, gen_b)
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert resident._on_device is not None and resident._on_device.dtype == torch.uint8
    assert gathered._on_device is None  # nothing uploaded or copied whole on the CPU path


def test_bfloat16_autocast_keeps_weights_float32_and_sends_float32():
    cfg = _cfg(method="dsl", **{"compute-dtype": "bfloat16", "channels-last": True})
    client = SplitClient.create(cfg, 0, 1, data_dir())
    reply = client.train(_first(client))
    acts = reply.activations["acts"].numpy()
    assert acts.dtype == np.float32 and acts.flags.c_contiguous
    # the values are bfloat16 ones, upcast without loss
    as_bf16 = torch.from_numpy(acts).to(torch.bfloat16).float().numpy()
    assert np.array_equal(acts, as_bf16)
    assert all(p.dtype == torch.float32 for m in client.modules.values() for p in m.parameters())
    conv = client.modules["segment"][0][0].weight
    assert conv.is_contiguous(memory_format=torch.channels_last)
    assert all(a.numpy().flags.c_contiguous for a in encode_modules(client.modules).values())


def test_bfloat16_csl_recompute_is_exact():
    """The CSL recompute path under autocast and NHWC still reproduces the live graph."""
    cfg = _cfg(method="csl", **{"compute-dtype": "bfloat16", "channels-last": True})
    a = SplitClient.create(cfg, 0, 1, data_dir())
    reply = a.train(_first(a))
    state = RecordDict()
    a.save(state)
    b = SplitClient.from_state(state)
    server = ServerSegment(cfg)
    acts = torch.from_numpy(reply.activations["acts"].numpy())
    labels = torch.from_numpy(reply.activations["labels"].numpy().astype(np.int64))
    _, grad = server.train_on(acts, labels, Phases(), needs_grad=True)
    request = TrainRequest(1, 0.05, gradient=encode_gradient(grad, "float32"))
    reply_a, reply_b = a.train(request), b.train(request)
    assert reply_b.metrics.recomputes == 1
    acts_a, acts_b = reply_a.activations["acts"], reply_b.activations["acts"]
    assert np.array_equal(acts_a.numpy(), acts_b.numpy())
    for (key, wa), wb in zip(
        encode_modules(a.modules).items(), encode_modules(b.modules).values(), strict=True
    ):
        assert np.array_equal(wa.numpy(), wb.numpy()), key


def test_bfloat16_learns():
    """A few DSL steps in bfloat16 lower the aux loss as float32 does."""
    losses = {}
    for dtype in ("float32", "bfloat16"):
        extra = {"compute-dtype": dtype, "samples-per-client": 320, "data-dir": real_data_dir()}
        cfg = _cfg(method="dsl", **extra)
        client = SplitClient.create(cfg, 0, 1, cfg.data_dir)
        reply, per_batch = client.train(_first(client)), []
        per_batch.append(reply.metrics.aux_loss_sum / reply.metrics.num_examples)
        while not reply.metrics.done:
            reply = client.train(TrainRequest(1, 0.05))
            per_batch.append(reply.metrics.aux_loss_sum / reply.metrics.num_examples)
        losses[dtype] = per_batch
    for dtype, per_batch in losses.items():
        assert per_batch[-1] < per_batch[0], dtype
    assert losses["bfloat16"][-1] == pytest.approx(losses["float32"][-1], rel=0.15)


def test_model_weights_are_saved_as_cpu_tensors():
    state = ServerSegment(_cfg()).state_dict()
    assert all(t.device.type == "cpu" for t in state.values())


# ------------------------------------------------------------------------------------ CUDA
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.gpu
@needs_cuda
def test_cuda_batches_equal_cpu_batches():
    client = SplitClient.create(_cfg(), 0, 2, data_dir())
    data, idx = client.data, client.train_idx
    cuda = Compute.create(torch.device("cuda"))
    on_gpu = ClientImages(data.x_train, data.y_train, idx, "cifar10", cuda)
    on_cpu = ClientImages(data.x_train, data.y_train, idx, "cifar10", CPU)
    positions = np.arange(32)
    xg, yg = on_gpu.batch(positions, torch.Generator().manual_seed(3))
    xc, yc = on_cpu.batch(positions, torch.Generator().manual_seed(3))
    assert xg.device.type == "cuda" and on_gpu.resident
    torch.testing.assert_close(xg.cpu(), xc, rtol=0, atol=1e-6)
    assert torch.equal(yg.cpu(), yc)
    assert torch.backends.cudnn.benchmark


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("method", ["dsl", "csl"])
def test_cuda_client_trains_and_saves_cpu_state(method):
    cfg = _cfg(method=method, device="cuda", **{"compute-dtype": "bfloat16"})
    client = SplitClient.create(cfg, 0, 1, data_dir())
    reply = client.train(_first(client))
    assert reply.metrics.peak_cuda_bytes > 0
    state = RecordDict()
    client.save(state)
    rebuilt = SplitClient.from_state(state)
    assert rebuilt.compute.device.type == "cuda"
