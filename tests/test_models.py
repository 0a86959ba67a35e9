"""Tests for models/: the split is exact, shapes and sizes are the paper's, bad input is refused."""

from __future__ import annotations

import pytest
import torch

from models import (
    AUX_HEADS,
    build_aux_head,
    check_cut,
    cut_shape,
    num_blocks,
    resnet,
    split_resnet,
)
from models.resnet import blocks_per_stage


def _cuts(depth: int) -> list[int]:
    """1, the stage boundaries n and 2n, the first block of stage 2, and the last legal cut."""
    n = blocks_per_stage(depth)
    return sorted({1, n, n + 1, 2 * n, 3 * n - 1})


SPLIT_CASES = [(d, c) for d in (8, 20, 32) for c in _cuts(d)] + [(56, 9), (56, 18)]


def _inputs(batch: int = 2, seed: int = 123) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, 32, 32, generator=g)


@pytest.mark.parametrize(("depth", "cut"), SPLIT_CASES)
def test_split_is_bit_exact(depth: int, cut: int) -> None:
    """server(client(x)) must be the unsplit network, or split learning trains another model."""
    seed = 7 + depth + cut
    x = _inputs()
    net = resnet(depth, 10, seed).eval()
    client, server = net.split(cut)
    with torch.no_grad():
        expected = net(x)
        assert torch.equal(server(client(x)), expected)

        # Client and server processes each build their half on their own from the seed.
        client2, _ = split_resnet(depth, cut, 10, seed=seed)
        _, server2 = split_resnet(depth, cut, 10, seed=seed)
        client2.eval()
        server2.eval()
        fresh = resnet(depth, 10, seed).eval()
        assert torch.equal(server2(client2(x)), fresh(x))
        assert torch.equal(server2(client2(x)), expected)


def test_split_halves_partition_the_parameters() -> None:
    """Every weight lives on exactly one side: nothing is duplicated or lost at the cut."""
    net = resnet(20, 10, 0)
    client, server = net.split(4)
    ids = [id(p) for p in client.parameters()] + [id(p) for p in server.parameters()]
    assert len(ids) == len(set(ids))
    assert set(ids) == {id(p) for p in net.parameters()}


def test_seed_fixes_weights_and_leaves_global_rng_alone() -> None:
    """Same seed, same weights (different seed differs), and the caller's RNG is not consumed."""
    before = torch.random.get_rng_state()
    a, b, c = resnet(8, 10, 1), resnet(8, 10, 1), resnet(8, 10, 2)
    assert torch.equal(torch.random.get_rng_state(), before)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["stem.0.weight"], sc["stem.0.weight"])


@pytest.mark.parametrize("cut", range(1, 9))
def test_cut_shape_matches_activations_resnet20(cut: int) -> None:
    """The server and the payload checks trust cut_shape; it must be what the client emits."""
    client, _ = split_resnet(20, cut, 10, seed=0)
    with torch.no_grad():
        out = client.eval()(_inputs())
    assert tuple(out.shape) == (2, *cut_shape(20, cut))


@pytest.mark.parametrize(
    ("cut", "shape"),
    [(1, (16, 32, 32)), (18, (16, 32, 32)), (19, (32, 16, 16)), (37, (64, 8, 8)), (53, (64, 8, 8))],
)
def test_cut_shape_matches_activations_resnet110(cut: int, shape: tuple[int, int, int]) -> None:
    """Deep networks too, at both sides of each stage boundary (18 blocks per stage)."""
    assert cut_shape(110, cut) == shape
    client, _ = split_resnet(110, cut, 10, seed=0)
    with torch.no_grad():
        out = client.eval()(_inputs())
    assert tuple(out.shape) == (2, *shape)


def test_resnet110_forward_shape() -> None:
    """The full ResNet-110 runs end to end and yields one logit per class."""
    with torch.no_grad():
        out = resnet(110, 10, 0).eval()(_inputs())
    assert out.shape == (2, 10)
    assert torch.isfinite(out).all()


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_parameter_counts_match_he_et_al() -> None:
    """0.27M and 1.7M in He et al. (2016), Table 6: option-A shortcuts add no parameters."""
    assert _count(resnet(20)) == 269_722
    assert _count(resnet(110)) == 1_727_962
    assert num_blocks(110) == 54
    assert num_blocks(20) == 9
    assert num_blocks(8) == 3


def test_split_parameter_counts_add_up() -> None:
    client, server = split_resnet(110, 27, 10, seed=0)
    assert _count(client) + _count(server) == 1_727_962


@pytest.mark.parametrize("depth", [21, 2, 0, -4, 9, 19])
def test_bad_depth_is_refused(depth: int) -> None:
    """Only 6n+2 depths with n >= 1 are CIFAR ResNets (8 is the smallest; 2 has no blocks)."""
    msg = f"depth must be 6n+2 with n >= 1 (8, 20, 32, 56, 110, ...), got {depth}"
    for build in (resnet, num_blocks, blocks_per_stage):
        with pytest.raises(ValueError) as info:
            build(depth)
        assert str(info.value) == msg


@pytest.mark.parametrize("cut", [0, 9, -1, 100])
def test_cut_out_of_range_is_refused(cut: int) -> None:
    """Both sides need at least one residual block; the message names the valid range."""
    msg = f"cut must satisfy 1 <= cut < 9 for ResNet-20 (9 residual blocks), got {cut}"
    net = resnet(20, 10, 0)
    for call in (
        lambda: net.split(cut),
        lambda: split_resnet(20, cut),
        lambda: cut_shape(20, cut),
        lambda: check_cut(20, cut),
    ):
        with pytest.raises(ValueError) as info:
            call()
        assert str(info.value) == msg


# ------------------------------------------------------------------------------------ aux heads
STAGE_SHAPES = [cut_shape(20, c) for c in (1, 4, 7)]  # (16,32,32), (32,16,16), (64,8,8)


@pytest.mark.parametrize("name", sorted(AUX_HEADS))
@pytest.mark.parametrize("shape", STAGE_SHAPES)
@pytest.mark.parametrize("num_classes", [10, 100])
def test_aux_head_output_shape(name: str, shape: tuple[int, int, int], num_classes: int) -> None:
    """Every aux head must turn the cut's activations into one logit per class."""
    head = build_aux_head(name, shape, num_classes, seed=0)
    x = torch.randn(4, *shape, generator=torch.Generator().manual_seed(1))
    out = head(x)
    assert out.shape == (4, num_classes)


def test_aux_head_takes_real_client_activations() -> None:
    """Shapes from cut_shape are what a real client segment produces."""
    client, _ = split_resnet(20, 4, 10, seed=0)
    acts = client(_inputs(batch=4))
    for name in AUX_HEADS:
        assert build_aux_head(name, cut_shape(20, 4), 10, seed=0)(acts).shape == (4, 10)


def test_unknown_aux_head_names_the_choices() -> None:
    with pytest.raises(ValueError) as info:
        build_aux_head("nope", (16, 32, 32), 10)
    assert str(info.value) == (
        "unknown aux-head 'nope'; choose one of ['conv_mlp', 'fc', 'fc_unscaled', 'pool_fc']"
    )


@pytest.mark.parametrize("name", sorted(AUX_HEADS))
def test_aux_head_seed_fixes_weights(name: str) -> None:
    """Every client builds the same aux head from the seed, so FedAvg starts from one model."""
    shape = (32, 16, 16)
    a = build_aux_head(name, shape, 10, seed=5).state_dict()
    b = build_aux_head(name, shape, 10, seed=5).state_dict()
    c = build_aux_head(name, shape, 10, seed=6).state_dict()
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a if a[k].is_floating_point())


def test_aux_head_parameter_counts() -> None:
    """fc's scale adds no parameter; pool_fc needs only C x classes weights."""
    shape = (16, 32, 32)
    fc = build_aux_head("fc", shape, 10, seed=0)
    raw = build_aux_head("fc_unscaled", shape, 10, seed=0)
    assert _count(fc) == _count(raw) == 16 * 32 * 32 * 10 + 10
    assert _count(build_aux_head("pool_fc", shape, 10, seed=0)) == 16 * 10 + 10


@pytest.mark.parametrize("shape", STAGE_SHAPES)
def test_fc_is_fc_unscaled_on_scaled_input(shape: tuple[int, int, int]) -> None:
    """fc only rescales its input by 1/sqrt(H*W); with the same weights the outputs agree."""
    c, h, w = shape
    fc = build_aux_head("fc", shape, 10, seed=3)
    raw = build_aux_head("fc_unscaled", shape, 10, seed=4)
    fc_linear, raw_linear = fc[-1], raw[-1]
    assert isinstance(fc_linear, torch.nn.Linear) and isinstance(raw_linear, torch.nn.Linear)
    raw_linear.load_state_dict(fc_linear.state_dict())
    x = torch.randn(4, c, h, w, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(fc(x), raw(x * (h * w) ** -0.5))
        assert not torch.equal(fc(x), raw(x))  # the scale is really applied
