"""Compiled convolutions in both tiers, against the dense masked models they replace.

The fused tier (``sparsekern.fused_conv``) runs flows' ConvODEnet (concat convolutions)
as one program with a hand-written backward; the generic tier (``sparsekern.conv``'s
SparseConv2d) any field's pruned nn.Conv2d. Kernels themselves: tests/test_conv_ops.py.
"""

from __future__ import annotations

import pytest
import torch
from engine_helpers import DENSITIES, DEVICE, contract_tol, randn, rel_err
from test_engine_compile import _field_errors
from torch import nn

from flows import CNF, SequentialFlow
from flows.odenet import ConvODEnet
from flows.prune import ensure_masks, prune_structured_
from sparsekern import CompileError, SparseConfig, compile_sparse, compiled_fields
from sparsekern.conv import SparseConv2d
from sparsekern.fused_conv import FusedConvNet

DTYPES = (torch.float64, torch.float32)
# The compiled backends of the test device (bench/gpu_check.sh runs this file on CUDA).
BACKENDS = ("ref", "cpu") if DEVICE.type == "cpu" else ("ref", "triton")


def _conv_terms(net: nn.Module, z: torch.Tensor) -> int:
    """``engine_helpers.program_terms`` for convolutions: every layer's fan-in (taps) along
    the forward and backward paths, the batch and pixels summed into a weight gradient, and
    the state entries summed into a divergence."""
    fan_ins = [m.in_channels * m.kernel_size[0] * m.kernel_size[1]
               for m in net.modules() if isinstance(m, nn.Conv2d)]
    b, c, h, w = z.shape
    return 2 * sum(fan_ins) + b * h * w + c * h * w


def _check_conv_field(net, fast, t, z, noise):
    for key, (err, dense_err) in _field_errors(net, fast, t, z, noise).items():
        tol = contract_tol(z.dtype, dense_err, _conv_terms(net, z), forward=key.startswith("f "))
        assert err <= tol, (f"{key}: relative error {err:.3g} > {tol:.3g} "
                            f"(dense {z.dtype} model: {dense_err:.3g})")


def _pruned_convnet(shape, hidden, density, dtype, seed, kernel=3):
    """A ConvODEnet whose state and time taps keep ``density`` of their weights at random."""
    torch.manual_seed(seed)
    net = ConvODEnet(shape, hidden, activation="softplus", kernel_size=kernel)
    ensure_masks(net)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for layer in net.layers:
            conv = layer.conv
            conv.weight_mask.copy_(torch.rand(conv.weight.shape, generator=gen) < density)
            conv.weight.mul_(conv.weight_mask)
            conv.bias.normal_(0, 0.5, generator=gen)
    return net.to(dtype=dtype, device=DEVICE)


def _inputs(shape, batch, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    z = randn((batch, *shape), gen, dtype)
    noise = randn((batch, *shape), gen, dtype)
    return torch.tensor(0.37, dtype=dtype, device=DEVICE), z, noise


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["dense", "csr"])
@pytest.mark.parametrize("density", DENSITIES)
def test_fused_convnet_matches_dense_masked_model(dtype, layout, density):
    shape = (3, 5, 4)
    net = _pruned_convnet(shape, (7, 6), density, dtype, seed=3)
    fast = compile_sparse(net, SparseConfig(layout=layout))
    assert isinstance(fast, FusedConvNet)
    t, z, noise = _inputs(shape, 3, dtype, seed=4)
    _check_conv_field(net, fast, t, z, noise)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("batch", [0, 1])
def test_fused_convnet_small_batches_and_odd_shapes(backend, batch):
    shape = (1, 7, 3)
    net = _pruned_convnet(shape, (5,), 0.3, torch.float64, seed=5, kernel=1)
    fast = compile_sparse(net, SparseConfig(layout="csr", backend=backend))
    t, z, noise = _inputs(shape, batch, torch.float64, seed=6)
    f, div = fast.forward_and_divergence(t, z, noise)
    assert f.shape == z.shape and div.shape == (batch,)
    if batch:
        _check_conv_field(net, fast, t, z, noise)


def _dead_channel_net(dtype):
    """Layer 1's channel 0 reads no alive channel (a constant, t-dependent image that layer
    2 reads: folded), channel 1 is read by no one (dropped), layer 0's channel 2 by no
    kept tap of layer 1 (dropped)."""
    net = _pruned_convnet((2, 5, 6), (4, 3), 0.7, dtype, seed=7)
    with torch.no_grad():
        c1, c2 = net.layers[1].conv, net.layers[2].conv
        c1.weight_mask[0, :-1] = False  # keeps its bias and time taps: a constant
        c1.weight_mask[0, -1] = True
        c2.weight_mask[:, 0] = True  # ... that the last layer reads
        c2.weight_mask[:, 1] = False  # channel 1 of layer 1: read by nobody
        c1.weight_mask[:, 2] = False  # channel 2 of layer 0: read by nobody
        c1.weight_mask[1:, 0] = True
        for conv in (c1, c2):
            conv.weight.copy_(torch.randn(conv.weight.shape, dtype=dtype) * conv.weight_mask)
    return net


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["dense", "csr"])
def test_dead_channels_fold_and_unread_ones_drop(dtype, layout):
    net = _dead_channel_net(dtype)
    fast = compile_sparse(net, SparseConfig(layout=layout))
    layers = fast.layers
    assert layers[1].dead is not None and layers[1].dead.tolist() == [0]
    assert layers[2].fold_sel is not None
    assert 2 not in layers[0].rows.tolist() and 1 not in layers[1].rows.tolist()
    assert "| 1 |" in fast.summary().splitlines()[4]  # one dead channel folded in layer 1
    t, z, noise = _inputs((2, 5, 6), 4, dtype, seed=8)
    _check_conv_field(net, fast, t, z, noise)


def test_structured_pruning_gives_smaller_dense_convolutions():
    net = _pruned_convnet((3, 6, 6), (16, 16), 1.0, torch.float64, seed=9)
    prune_structured_(net, 0.5)
    fast = compile_sparse(net)
    cores = [layer.core for layer in fast.layers]
    assert [(c.n_rows, c.n_cols) for c in cores] == [(8, 3), (8, 8), (3, 8)]
    assert all(c.layout == "dense" for c in cores)
    t, z, noise = _inputs((3, 6, 6), 2, torch.float64, seed=10)
    _check_conv_field(net, fast, t, z, noise)


def test_time_gradient_and_second_order_through_f():
    net = _pruned_convnet((2, 4, 5), (5,), 0.5, torch.float64, seed=11)
    fast = compile_sparse(net, SparseConfig(layout="csr"))
    _, z, noise = _inputs((2, 4, 5), 3, torch.float64, seed=12)
    t = torch.tensor(0.2, dtype=torch.float64, requires_grad=True)
    fz, dz = fast.forward_and_divergence(t, z, noise)
    fd = net(t, z)
    from sparsekern.divergence import divergence_hutchinson

    zz = z.clone().requires_grad_()
    d_ref = divergence_hutchinson(net(t, zz), zz, noise)
    g = torch.autograd.grad(fz.sum() + dz.sum(), t)[0]
    g_ref = torch.autograd.grad(fd.sum() + d_ref.sum(), t)[0]
    assert rel_err(g, g_ref) < 1e-10
    # f alone is differentiable to any order (gradgradcheck through the sparse ops).
    zs = z[:1].clone().requires_grad_()
    torch.autograd.gradgradcheck(lambda x: fast(t.detach(), x), (zs,))


def test_fused_divergence_gradcheck():
    # The hand-written backward w.r.t. z and t (the kept values' gradients are checked
    # against the dense model above).
    net = _pruned_convnet((2, 3, 3), (3,), 0.6, torch.float64, seed=13)
    fast = compile_sparse(net, SparseConfig(layout="csr"))
    _, z, noise = _inputs((2, 3, 3), 2, torch.float64, seed=14)
    t = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda z, t: fast.forward_and_divergence(t, z, noise),
                             (z.requires_grad_(), t))


def test_the_divergence_refuses_a_second_derivative():
    net = _pruned_convnet((2, 3, 3), (3,), 0.6, torch.float64, seed=15)
    fast = compile_sparse(net)
    _, z, noise = _inputs((2, 3, 3), 2, torch.float64, seed=16)
    z.requires_grad_()
    _, div = fast.forward_and_divergence(torch.tensor(0.1, dtype=torch.float64), z, noise)
    with pytest.raises(RuntimeError, match="tier='generic'"):
        torch.autograd.grad(div.sum(), z, create_graph=True)


def test_fused_convnet_checks_its_inputs():
    net = _pruned_convnet((2, 3, 3), (3,), 0.6, torch.float64, seed=17)
    fast = compile_sparse(net)
    t = torch.tensor(0.1, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"expects z of shape \[B, 2, H, W\]"):
        fast(t, torch.randn(2, 3, 3, 3, dtype=torch.float64))
    with pytest.raises(TypeError, match="float32"):
        fast(t, torch.randn(2, 2, 3, 3))
    with pytest.raises(ValueError, match="noise has shape"):
        fast.forward_and_divergence(t, torch.randn(2, 2, 3, 3, dtype=torch.float64),
                                    torch.randn(2, 2, 3, 4, dtype=torch.float64))


def test_write_back_round_trips():
    net = _pruned_convnet((2, 4, 4), (4,), 0.5, torch.float64, seed=18)
    fast = compile_sparse(net, SparseConfig(layout="csr"))
    with torch.no_grad():
        for k in fast._kept:
            k.values.add_(1.0)
    fast.write_back()
    conv = net.layers[0].conv
    assert torch.all(conv.weight[~conv.weight_mask.bool()] == 0)
    t, z, _ = _inputs((2, 4, 4), 2, torch.float64, seed=19)
    assert rel_err(fast(t, z), net(t, z)) < 1e-12


# ------------------------------------------------------------------------ generic tier


class StridedField(nn.Module):
    """A field with a strided, unpadded and a 1x1 convolution: the generic tier's case."""

    def __init__(self):
        super().__init__()
        self.down = nn.Conv2d(3, 6, 3, stride=2, padding=1)
        self.mix = nn.Conv2d(6, 6, 1)
        self.up = nn.ConvTranspose2d(6, 3, 2, stride=2)

    def forward(self, t, z):
        return self.up(torch.tanh(self.mix(torch.tanh(self.down(z)))))


def _pruned_strided(density, dtype, seed):
    torch.manual_seed(seed)
    net = StridedField()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for conv in (net.down, net.mix):
            mask = torch.rand(conv.weight.shape, generator=gen) < density
            conv.register_buffer("weight_mask", mask.to(conv.weight.dtype))
            conv.weight.mul_(mask)
    return net.to(dtype=dtype, device=DEVICE)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("density", [0.0, 0.5, 0.9, 1.0])
def test_generic_tier_compiles_strided_convolutions(dtype, density):
    net = _pruned_strided(density, dtype, seed=20)
    fast = compile_sparse(net, SparseConfig(layout="csr"))
    assert fast.tier == "generic" and not fast.eager_ops
    assert {type(m) for m in fast.sparse.values()} == {SparseConv2d}
    gen = torch.Generator().manual_seed(21)
    z, noise = randn((2, 3, 6, 6), gen, dtype), randn((2, 3, 6, 6), gen, dtype)
    _check_conv_field(net, fast, torch.tensor(0.0, dtype=dtype, device=DEVICE), z, noise)


def test_generic_tier_trains_through_create_graph_divergences():
    net = _pruned_strided(0.5, torch.float64, seed=22)
    fast = compile_sparse(net, SparseConfig(layout="csr"))
    gen = torch.Generator().manual_seed(23)
    z = randn((2, 3, 4, 4), gen, torch.float64).requires_grad_()
    torch.autograd.gradgradcheck(lambda x: fast(None, x), (z,))


def test_generic_tier_on_the_conv_odenet_matches_the_fused_tier():
    net = _pruned_convnet((2, 4, 4), (5,), 0.4, torch.float64, seed=24)
    generic = compile_sparse(net, SparseConfig(tier="generic"))
    fused = compile_sparse(net)
    t, z, noise = _inputs((2, 4, 4), 3, torch.float64, seed=25)
    fg, dg = generic.forward_and_divergence(t, z, noise)
    ff, df = fused.forward_and_divergence(t, z, noise)
    assert rel_err(fg, ff) < 1e-12 and rel_err(dg, df) < 1e-10


# ------------------------------------------------------------------------ whole flows


def test_an_image_flow_compiles_with_nothing_left_dense():
    shape = (2, 4, 4)
    flow = SequentialFlow([CNF(_pruned_convnet(shape, (4,), 0.3, torch.float64, seed=26),
                               noise="rademacher", atol=1e-8, rtol=1e-8)
                           for _ in range(2)])
    fast = compile_sparse(flow)
    fields = compiled_fields(fast)
    assert len(fields) == 2 and all(isinstance(f, FusedConvNet) for f in fields)
    x = torch.randn(3, *shape, dtype=torch.float64)
    torch.manual_seed(0)
    ref = flow.log_prob(x)
    torch.manual_seed(0)
    got = fast.log_prob(x)
    assert rel_err(got, ref) < 1e-6


def test_unsupported_geometry_is_named():
    class Dilated(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(2, 2, 3, padding=2, dilation=2)

        def forward(self, t, z):
            return self.conv(z)

    net = Dilated().double()
    ensure_masks(net)
    with pytest.raises(CompileError, match=r"Conv2d with dilation \(2, 2\).*'conv'"):
        compile_sparse(net)


@pytest.mark.parametrize("activation", ["tanh", "swish"])
def test_other_activations_take_the_general_epilogue(activation):
    torch.manual_seed(27)
    net = ConvODEnet((2, 4, 5), (5,), activation=activation)
    ensure_masks(net)
    net = net.to(dtype=torch.float64, device=DEVICE)
    fast = compile_sparse(net, SparseConfig(layout="csr"))
    assert isinstance(fast, FusedConvNet) and fast.act == activation
    t, z, noise = _inputs((2, 4, 5), 3, torch.float64, seed=28)
    _check_conv_field(net, fast, t, z, noise)
