"""compile_sparse against the dense masked model: the engine contract of DESIGN.md."""

from __future__ import annotations

import copy
import itertools
import warnings

import pytest
import torch
from engine_helpers import DENSITIES, assert_close, random_mask
from torch import nn
from torch.nn.utils import prune as torch_prune

from flows import CNF, ODEClassifier, ODEnet, SequentialFlow
from flows.divergence import divergence_exact, divergence_hutchinson
from flows.prune import apply_masks_, ensure_masks, prune_structured_, prune_unstructured_
from sparsekern import (
    CompileError,
    FusedMLP,
    GenericField,
    SparseConfig,
    compile_sparse,
    compiled_fields,
    write_back,
)
from sparsekern.cost import choose_layout, measure_layouts
from sparsekern.field import call_arity
from sparsekern.generic import detached_copy
from sparsekern.linear import KeptTensor

DTYPES = (torch.float32, torch.float64)


def _pruned_odenet(d, hidden, time, act, density, dtype, seed=0, method="random"):
    """An ODEnet with kept fraction ``density``: fresh random masks (with an empty row and
    column per layer) or flows' unstructured / structured pruning."""
    torch.manual_seed(seed)
    net = ODEnet(d, hidden, time=time, activation=act).to(dtype)
    layers = ensure_masks(net)
    if method == "random":
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for _, m in layers:
                r, c = m.weight.shape
                m.weight_mask.copy_(random_mask(r, c, density, gen, empty_row=r // 2,
                                                empty_col=c // 2))
        apply_masks_(net)
    elif method == "unstructured":
        prune_unstructured_(net, 1.0 - density)
    else:
        prune_structured_(net, 1.0 - density)
    return net


def _dense_reference(net, t, z, noise):
    """f, Hutchinson and exact divergences, by autograd through the dense masked model."""
    zz = z.clone().requires_grad_()
    out = net(t, zz) if call_arity(net) == 2 else net(zz)
    hutch = divergence_hutchinson(out, zz, noise)
    exact = divergence_exact(out, zz)
    return zz, out, hutch, exact


def _dense_grads(fast, source: nn.Module) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """(name, compiled grad scattered to the dense shape, dense param) for every kept tensor."""
    params = dict(source.named_parameters())
    out = []
    for m in fast.modules():
        if isinstance(m, KeptTensor) and m.values.grad is not None:
            g = m.values.grad.new_zeros(m.shape).flatten()
            g[m.flat_index] = m.values.grad
            name = m.name if m.name in params else m.name + "_orig"
            out.append((name, g.view(m.shape), params[name]))
    return out


def _check_field(net, fast, t, z, noise, dtype, factor=1.0):
    zz, out, hutch, exact = _dense_reference(net, t, z, noise)
    with torch.no_grad():
        args = (t, z) if fast.arity == 2 else (z,)
        assert_close(fast(*args), out, dtype, factor, "f (no grad)")
    args = (t, z) if fast.arity == 2 else (z,)
    assert_close(fast(*args), out, dtype, factor, "f (grad)")
    f1, d1 = fast.forward_and_divergence(t, z, noise)
    assert_close(f1, out, dtype, factor, "f of forward_and_divergence")
    assert_close(d1, hutch, dtype, 10 * factor, "Hutchinson divergence")
    _, d2 = fast.forward_and_divergence(t, z)
    assert_close(d2, exact, dtype, 10 * factor, "exact divergence")
    # All gradients of a loss through f and the divergence: z and every kept value.
    gen = torch.Generator().manual_seed(5)
    gf = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(dtype)
    gd = torch.randn(hutch.shape, generator=gen, dtype=torch.float64).to(dtype)
    net.zero_grad()
    ((out * gf).sum() + (hutch * gd).sum()).backward()
    zc = z.clone().requires_grad_()
    fast.zero_grad()
    f3, d3 = fast.forward_and_divergence(t, zc, noise)
    ((f3 * gf).sum() + (d3 * gd).sum()).backward()
    assert_close(zc.grad, zz.grad, dtype, 100 * factor, "grad z")
    grads = _dense_grads(fast, net)
    assert grads, "no compiled parameter received a gradient"
    for name, g, p in grads:
        ref = p.grad if p.grad is not None else torch.zeros_like(p)
        owner = net.get_submodule(name.rpartition(".")[0]) if "." in name else net
        attr = name.rpartition(".")[2].removesuffix("_orig")
        m = getattr(owner, f"{attr}_mask", None)
        if m is not None:
            ref = ref * m
        elif p.dim() >= 2:  # no mask: exact zeros of a weight matrix are its pruned places
            ref = ref * (p != 0)
        assert_close(g, ref, dtype, 1000 * factor, f"grad {name}")


# ------------------------------------------------------------ fused tier on flows.ODEnet


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("time", ["none", "concat", "concatsquash"])
@pytest.mark.parametrize("layout", ["dense", "csr", "blocked"])
@pytest.mark.parametrize("density", DENSITIES)
def test_fused_odenet_matches_dense_masked_model(dtype, time, layout, density):
    net = _pruned_odenet(3, (37, 59), time, "softplus", density, dtype, seed=1)
    fast = compile_sparse(net, SparseConfig(layout=layout))
    assert isinstance(fast, FusedMLP)
    gen = torch.Generator().manual_seed(2)
    z = torch.randn(37, 3, generator=gen, dtype=torch.float64).to(dtype)
    noise = torch.randn(37, 3, generator=gen, dtype=torch.float64).to(dtype)
    t = torch.tensor(0.37, dtype=dtype)
    _check_field(net, fast, t, z, noise, dtype)


@pytest.mark.parametrize("act", ["tanh", "sigmoid", "relu", "elu", "swish"])
@pytest.mark.parametrize("method", ["unstructured", "structured"])
def test_fused_activations_and_prune_methods(act, method):
    dtype = torch.float64
    net = _pruned_odenet(2, (64, 64, 64), "none", act, 0.3, dtype, seed=3, method=method)
    fast = compile_sparse(net)
    gen = torch.Generator().manual_seed(4)
    z = torch.randn(59, 2, generator=gen, dtype=dtype)
    _check_field(net, fast, None, z, torch.randn(59, 2, generator=gen, dtype=dtype), dtype)


@pytest.mark.parametrize("tier", ["fused", "generic"])
def test_batch_of_one_and_width_one(tier):
    dtype = torch.float64
    net = _pruned_odenet(1, (1, 37), "concat", "tanh", 0.9, dtype, seed=6)
    fast = compile_sparse(net, SparseConfig(tier=tier))
    z = torch.randn(1, 1, dtype=dtype)
    _check_field(net, fast, torch.tensor(0.5, dtype=dtype), z, torch.randn(1, 1, dtype=dtype),
                 dtype)


def _with_dead_and_unread_neurons(dtype):
    """2-8-8-2 tanh ODEnet where some neurons read nothing and some are read by no one."""
    torch.manual_seed(7)
    net = ODEnet(2, (8, 8), time="concatsquash", activation="tanh").to(dtype)
    ensure_masks(net)
    l0, l1, l2 = (layer.linear for layer in net.layers)
    with torch.no_grad():
        l0.weight_mask[[1, 4]] = 0  # neurons 1 and 4 of layer 0: dead (constants act(b))
        l2.weight_mask[:, [2, 5]] = 0  # neurons 2 and 5 of layer 1: read by no one
        l1.weight_mask[3] = 0  # neuron 3 of layer 1: dead ...
        l1.weight_mask[3, 1] = 1  # ... except it reads dead neuron 1: a constant of t
        l1.weight_mask[6, :] = 0  # neuron 6 of layer 1 reads only dead neuron 4
        l1.weight_mask[6, 4] = 1
    apply_masks_(net)
    return net


@pytest.mark.parametrize("layout", ["dense", "csr", "blocked"])
def test_neuron_reduction_folds_constants_and_drops_unread(layout):
    dtype = torch.float64
    net = _with_dead_and_unread_neurons(dtype)
    fast = compile_sparse(net, SparseConfig(layout=layout))
    first, second, last = fast.layers
    assert (first.core.n_rows, first.core.n_cols) == (6, 2)
    assert first.dead.tolist() == [1, 4]
    # Layer 1 computes neither unread (2, 5) nor constant (3, 6) neurons.
    assert (second.core.n_rows, second.core.n_cols) == (4, 6)
    assert second.dead.tolist() == [3, 6]
    assert (last.core.n_rows, last.core.n_cols) == (2, 4)
    gen = torch.Generator().manual_seed(8)
    z = torch.randn(37, 2, generator=gen, dtype=dtype)
    _check_field(net, fast, torch.tensor(0.8, dtype=dtype), z,
                 torch.randn(37, 2, generator=gen, dtype=dtype), dtype)
    # Without reduction: same function, full-size cores.
    full = compile_sparse(net, SparseConfig(layout=layout, reduce_neurons=False))
    assert (full.layers[1].core.n_rows, full.layers[1].core.n_cols) == (8, 8)
    t = torch.tensor(0.8, dtype=dtype)
    with torch.no_grad():
        assert_close(full(t, z), fast(t, z), dtype)


def test_fully_pruned_layer_gives_a_constant_field_with_zero_divergence():
    dtype = torch.float64
    net = _pruned_odenet(2, (16, 16), "concat", "tanh", 1.0, dtype, seed=9)
    with torch.no_grad():
        net.layers[1].linear.weight_mask[:, :16] = 0  # keep only its time column
    apply_masks_(net)
    fast = compile_sparse(net)
    assert fast.layers[1].core.n_rows == 0 and fast.layers[2].core.n_cols == 0
    z = torch.randn(5, 2, dtype=dtype)
    t = torch.tensor(0.3, dtype=dtype)
    f, div = fast.forward_and_divergence(t, z)
    assert torch.equal(div, torch.zeros(5, dtype=dtype))
    assert_close(f, net(t, z), dtype)
    assert torch.allclose(f, f[:1].expand_as(f))  # constant in z
    _check_field(net, fast, t, z, torch.randn_like(z), dtype)


def test_parameters_are_the_kept_values_only():
    net = _pruned_odenet(2, (64, 64, 64), "concatsquash", "tanh", 0.3, torch.float32, seed=10)
    fast = compile_sparse(net)
    kept_weights = sum(int(layer.linear.weight_mask.sum()) for layer in net.layers)
    biases = sum(layer.linear.bias.numel() for layer in net.layers)
    hyper = sum(p.numel() for n, p in net.named_parameters() if "hyper" in n)
    assert sum(p.numel() for p in fast.parameters()) == kept_weights + biases + hyper
    for p in fast.parameters():
        assert all(p is not q for q in net.parameters())


@pytest.mark.parametrize("tier", ["fused", "generic"])
def test_training_then_write_back_restores_a_dense_masked_model(tier):
    dtype = torch.float64
    net = _pruned_odenet(2, (32, 32), "concatsquash", "swish", 0.4, dtype, seed=11)
    before = copy.deepcopy(net)
    fast = compile_sparse(net, SparseConfig(tier=tier))
    opt = torch.optim.Adam(fast.parameters(), lr=1e-2)
    z = torch.randn(64, 2, dtype=dtype)
    t = torch.tensor(0.2, dtype=dtype)
    for _ in range(3):
        f, div = fast.forward_and_divergence(t, z, torch.randn_like(z))
        loss = (f**2).mean() + div.mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        trained = fast(t, z)
    assert not torch.allclose(trained, before(t, z))
    write_back(fast)
    for name, p in net.named_parameters():
        owner = net.get_submodule(name.rpartition(".")[0])
        mask = getattr(owner, "weight_mask", None)
        if name.endswith("weight") and mask is not None:
            assert torch.count_nonzero(p[mask == 0]) == 0, name
    with torch.no_grad():
        assert_close(net(t, z), trained, dtype)


# ---------------------------------------------------------------- the generic tier


class FFJORDConcatSquashLinear(nn.Module):
    """Written as FFJORD's diffeq_layers.ConcatSquashLinear (not flows' own class)."""

    def __init__(self, dim_in, dim_out):
        super().__init__()
        self._layer = nn.Linear(dim_in, dim_out)
        self._hyper_bias = nn.Linear(1, dim_out, bias=False)
        self._hyper_gate = nn.Linear(1, dim_out)

    def forward(self, t, x):
        return self._layer(x) * torch.sigmoid(self._hyper_gate(t.view(1, 1))) + self._hyper_bias(
            t.view(1, 1)
        )


class FFJORDODEnet(nn.Module):
    """FFJORD's ODEnet shape: ConcatSquash layers with softplus, no shape checks."""

    def __init__(self, dims):
        super().__init__()
        self.layers = nn.ModuleList(FFJORDConcatSquashLinear(a, b)
                                    for a, b in itertools.pairwise(dims))
        self.activation_fns = nn.ModuleList(nn.Softplus() for _ in dims[2:])

    def forward(self, t, y):
        dx = y
        for i, layer in enumerate(self.layers):
            dx = layer(t, dx)
            if i < len(self.layers) - 1:
                dx = self.activation_fns[i](dx)
        return dx


def _ffjord_divergence(dy, y, e):
    """FFJORD's divergence_approx: autograd.grad with create_graph=True."""
    e_dzdx = torch.autograd.grad(dy, y, e, create_graph=True)[0]
    return (e_dzdx * e).sum(1)


def _prune_linears(model, amount, seed):
    torch.manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.Linear) and m.in_features > 1:
            torch_prune.l1_unstructured(m, "weight", amount=amount)


def test_generic_tier_trains_an_ffjord_style_field_like_the_dense_one():
    dtype = torch.float64
    torch.manual_seed(12)
    net = FFJORDODEnet((3, 37, 59, 3)).to(dtype)
    _prune_linears(net, 0.7, seed=12)
    dense = detached_copy(net)
    fast = compile_sparse(net)
    assert isinstance(fast, GenericField) and fast.traced and len(fast.sparse) == 3
    opt_d = torch.optim.Adam(dense.parameters(), lr=1e-2)
    opt_f = torch.optim.Adam(fast.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(13)
    for _ in range(5):
        y = torch.randn(33, 3, generator=gen, dtype=dtype)
        e = torch.randn(33, 3, generator=gen, dtype=dtype)
        t = torch.rand((), generator=gen, dtype=dtype)
        losses = []
        for model, opt in ((dense, opt_d), (fast, opt_f)):
            yy = y.clone().requires_grad_()
            dy = model(t, yy)
            loss = (dy**2).mean() - _ffjord_divergence(dy, yy, e).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        assert losses[1] == pytest.approx(losses[0], rel=1e-10)
    # Pruned weights stayed pruned: the optimiser never saw them.
    write_back(fast)
    for m in net.modules():
        if hasattr(m, "weight_orig"):
            assert torch.count_nonzero(m.weight_orig[m.weight_mask == 0]) == 0


def test_generic_tier_second_derivatives_match_the_dense_model():
    dtype = torch.float64
    torch.manual_seed(14)
    net = FFJORDODEnet((2, 16, 2)).to(dtype)
    _prune_linears(net, 0.5, seed=14)
    fast = compile_sparse(net)
    y = torch.randn(8, 2, dtype=dtype)
    t = torch.tensor(0.3, dtype=dtype)

    def hvp(model, params):
        yy = y.clone().requires_grad_()
        dy = model(t, yy)
        div = divergence_exact(dy, yy)
        (g,) = torch.autograd.grad(div.sum(), yy, create_graph=True)
        return torch.autograd.grad((g**2).sum(), params)

    dense_g = hvp(net, [net.layers[0]._layer.weight_orig])[0] * net.layers[0]._layer.weight_mask
    sl = fast.sparse["layers.0._layer"]
    got = hvp(fast, [sl.weight.values])[0]
    assert_close(got, dense_g[net.layers[0]._layer.weight_mask.bool()], dtype, 100)


@pytest.mark.parametrize("tier", ["auto", "generic"])
@pytest.mark.parametrize("layout", ["auto", "blocked"])
def test_sequential_torchdyn_style_field(tier, layout):
    dtype = torch.float64
    torch.manual_seed(15)
    net = nn.Sequential(nn.Linear(2, 59), nn.Tanh(), nn.Linear(59, 37), nn.Tanh(),
                        nn.Linear(37, 2)).to(dtype)
    _prune_linears(net, 0.9, seed=15)
    fast = compile_sparse(net, SparseConfig(tier=tier, layout=layout))
    assert isinstance(fast, FusedMLP if tier == "auto" else GenericField)
    assert fast.arity == 1
    gen = torch.Generator().manual_seed(16)
    z = torch.randn(37, 2, generator=gen, dtype=dtype)
    _check_field(net, fast, None, z, torch.randn(37, 2, generator=gen, dtype=dtype), dtype)
    write_back(fast)
    assert torch.count_nonzero(net[0].weight_orig[net[0].weight_mask == 0]) == 0


def test_functional_linear_on_parameters_is_compiled():
    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.w1 = nn.Parameter(torch.randn(16, 2) * (torch.rand(16, 2) < 0.5))
            self.b1 = nn.Parameter(torch.randn(16))
            self.w2 = nn.Parameter(torch.randn(2, 16) * (torch.rand(2, 16) < 0.5))

        def forward(self, t, z):
            return nn.functional.linear(torch.tanh(nn.functional.linear(z, self.w1, self.b1)),
                                        self.w2)

    torch.manual_seed(17)
    net = Functional().double()
    fast = compile_sparse(net)
    assert isinstance(fast, GenericField) and len(fast.sparse) == 2
    names = {n for n, _ in fast.named_parameters()}
    assert not names & {"module.w1", "module.w2"}, names  # dense weights are not parameters
    z = torch.randn(9, 2, dtype=torch.float64)
    _check_field(net, fast, torch.tensor(0.0), z, torch.randn_like(z), torch.float64)


def test_untraceable_field_is_compiled_by_swapping_its_linears():
    class Dynamic(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(2, 8)
            self.b = nn.Linear(8, 2)

        def forward(self, t, z):
            h = torch.tanh(self.a(z))
            if h.sum() > 1e9:  # data-dependent control flow: fx cannot trace it
                h = h * 0
            return self.b(h)

    net = Dynamic().double()
    _prune_linears(net, 0.5, seed=18)
    with pytest.warns(UserWarning, match="could not trace"):
        fast = compile_sparse(net)
    assert not fast.traced and len(fast.sparse) == 2
    z = torch.randn(9, 2, dtype=torch.float64)
    _check_field(net, fast, torch.tensor(0.0), z, torch.randn_like(z), torch.float64)


# ------------------------------------------------------------------ errors, config


class ConvField(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 3, padding=1)
        self.lin = nn.Linear(4, 4)

    def forward(self, t, z):
        h = self.conv(z.view(-1, 1, 2, 2)).view(-1, 4)
        return self.lin(torch.tanh(h))


def test_unsupported_op_on_the_state_path_names_op_and_submodule():
    net = ConvField().double()
    torch_prune.l1_unstructured(net.conv, "weight", amount=0.5)
    with pytest.raises(CompileError, match=r"Conv2d in submodule 'conv'"):
        compile_sparse(net)
    with pytest.warns(UserWarning, match="runs dense"):
        fast = compile_sparse(net, SparseConfig(fallback="eager"))
    assert "Conv2d (conv)" in fast.summary()
    z = torch.randn(5, 4, dtype=torch.float64)
    _check_field(net, fast, torch.tensor(0.0), z, torch.randn_like(z), torch.float64)


def test_matmul_with_a_masked_parameter_is_named():
    class MatmulField(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 3)

        def forward(self, t, z):
            return z @ self.lin.weight.t()

    net = MatmulField()
    ensure_masks(net)
    with pytest.raises(CompileError, match="submodule 'lin'"):
        compile_sparse(net)


def test_bad_masks_and_weights_are_named():
    net = ODEnet(2, (8,), time="none")
    ensure_masks(net)
    net.layers[0].register_buffer("weight_mask", torch.ones(3, 3), persistent=True)
    with pytest.raises(CompileError, match=r"layers\.0\.weight_mask has shape \[3, 3\]"):
        compile_sparse(net)
    net = ODEnet(2, (8,), time="none")
    with torch.no_grad():
        net.layers[1].weight[0, 3] = float("nan")
    with pytest.raises(CompileError, match=r"layers\.1\.weight holds NaN"):
        compile_sparse(net)
    net = ODEnet(2, (8,), time="none")
    ensure_masks(net)
    with torch.no_grad():
        net.layers[0].weight_mask[0, 0] = 0  # mask says pruned, weight is not zero
    with pytest.raises(CompileError, match="apply the masks first"):
        compile_sparse(net)


def test_inputs_of_the_wrong_dtype_device_or_shape_are_refused():
    fast = compile_sparse(ODEnet(2, (8,), time="none"))
    t = torch.tensor(0.0)
    with pytest.raises(TypeError, match=r"z is torch.float64 on cpu.*holds torch.float32"):
        fast(t, torch.randn(3, 2, dtype=torch.float64))
    with pytest.raises(TypeError, match="on meta"):
        fast(t, torch.empty(3, 2, device="meta"))
    with pytest.raises(ValueError, match=r"expects z of shape \[B, 2\]"):
        fast(t, torch.randn(3, 5))
    with pytest.raises(ValueError, match="noise has shape"):
        fast.forward_and_divergence(t, torch.randn(3, 2), torch.randn(4, 2))
    with pytest.raises(TypeError, match=r"called as f\(t, z\)"):
        fast(torch.randn(3, 2))


def test_config_and_tier_errors():
    with pytest.raises(ValueError, match=r"SparseConfig\.layout='sparse'"):
        SparseConfig(layout="sparse")
    with pytest.raises(ValueError, match="batch_hint"):
        SparseConfig(batch_hint=0)
    with pytest.raises(CompileError, match="tier='fused' needs a recognised MLP"):
        compile_sparse(ConvField(), SparseConfig(tier="fused"))
    with pytest.raises(TypeError, match=r"nn\.Module"):
        compile_sparse(lambda t, z: z)

    class ThreeArgs(nn.Module):
        def forward(self, a, b, c):
            return a

    with pytest.raises(CompileError, match=r"takes \(a, b, c\)"):
        compile_sparse(ThreeArgs())


def test_fused_divergence_refuses_higher_derivatives_with_a_pointer_to_generic():
    net = _pruned_odenet(2, (8,), "none", "tanh", 0.5, torch.float64)
    fast = compile_sparse(net)
    z = torch.randn(4, 2, dtype=torch.float64, requires_grad=True)
    _, div = fast.forward_and_divergence(None, z, torch.randn(4, 2, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="tier='generic'"):
        torch.autograd.grad(div.sum(), z, create_graph=True)
    # The plain forward stays differentiable to any order.
    out = fast(None, z)
    (g,) = torch.autograd.grad(out.sum(), z, create_graph=True)
    (h,) = torch.autograd.grad(g.sum(), z)
    assert h.shape == z.shape


def test_auto_layout_follows_density():
    gen = torch.Generator().manual_seed(0)
    assert choose_layout(random_mask(256, 256, 0.9, gen), 2048, torch.float32, "cpu") == "dense"
    assert choose_layout(random_mask(256, 256, 0.02, gen), 2048, torch.float32, "cpu") == "csr"
    assert choose_layout(torch.zeros(0, 5, dtype=torch.bool), 64, torch.float32, "cpu") == "dense"
    mid = choose_layout(random_mask(512, 512, 0.2, gen), 2048, torch.float32, "cpu")
    assert mid in ("dense", "csr", "blocked")
    # The measurement is what decides in the middle: the winner is the fastest measured.
    times = measure_layouts(random_mask(256, 256, 0.3, gen), 512, torch.float32, "cpu")
    assert set(times) == {"dense", "csr", "blocked"} and min(times.values()) > 0
    rule = choose_layout(random_mask(256, 256, 0.3, gen), 512, torch.float32, "cpu",
                         measure=False)
    assert rule == "dense"  # the deterministic rule: density >= RULE_DENSE_ABOVE


def test_summary_lists_every_layer():
    net = _pruned_odenet(2, (64, 64), "concat", "tanh", 0.1, torch.float32)
    text = compile_sparse(net, SparseConfig(layout="csr")).summary()
    for name in ("layers.0.linear", "layers.1.linear", "layers.2.linear"):
        assert name in text
    assert "| csr |" in text


# ---------------------------------------------------------- flows models and solvers


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("adjoint", [False, True])
def test_compiled_cnf_solves_with_the_same_nfe_and_likelihood(dtype, adjoint):
    torch.manual_seed(19)
    cnf = CNF(ODEnet(2, (64, 64, 64), time="none", activation="sigmoid"), adjoint=adjoint)
    cnf = cnf.to(dtype)
    ensure_masks(cnf)
    prune_unstructured_(cnf, 0.7)
    fast = compile_sparse(cnf)
    assert isinstance(fast, CNF) and isinstance(fast.odenet, FusedMLP)
    x = torch.randn(128, 2, dtype=dtype)
    torch.manual_seed(20)
    lp = cnf.log_prob(x)
    torch.manual_seed(20)
    lp_fast = fast.log_prob(x)
    assert abs(fast.nfe_forward - cnf.nfe_forward) <= 0.02 * cnf.nfe_forward
    assert_close(lp_fast, lp, dtype, 10 if dtype == torch.float32 else 1e4, "log p")
    assert (lp_fast - lp).abs().max() <= 1e-4 * lp.abs().max()
    torch.manual_seed(21)
    (-cnf.log_prob(x).mean()).backward()
    torch.manual_seed(21)
    (-fast.log_prob(x).mean()).backward()
    assert abs(fast.nfe_backward - cnf.nfe_backward) <= 0.02 * max(cnf.nfe_backward, 1)
    for _, g, p in _dense_grads(fast, cnf.odenet):
        mask = cnf.odenet.get_submodule(_.rpartition(".")[0]).weight_mask if _.endswith(
            "weight") else torch.ones_like(p)
        tol = 1e-3 if dtype == torch.float32 else 1e-7
        assert (g - p.grad * mask).norm() <= tol * (p.grad * mask).norm() + 1e-12


def test_compiled_flows_share_parameters_outside_their_fields():
    torch.manual_seed(22)
    blocks = [CNF(ODEnet(3, (16,), time="concatsquash"), train_T=True) for _ in range(2)]
    flow = SequentialFlow(blocks)
    ensure_masks(flow)
    prune_unstructured_(flow, 0.5)
    fast = compile_sparse(flow)
    assert isinstance(fast, SequentialFlow) and len(compiled_fields(fast)) == 2
    assert fast.layers[0].sqrt_T is flow.layers[0].sqrt_T
    assert flow.layers[0].odenet is not fast.layers[0].odenet
    x = torch.randn(16, 3)
    torch.manual_seed(1)
    a = flow.log_prob(x)
    torch.manual_seed(1)
    b = fast.log_prob(x)
    assert_close(b, a, torch.float32, 100)
    assert write_back(fast) == 2


def test_compiled_classifier_matches():
    torch.manual_seed(23)
    clf = ODEClassifier(2, 2, hidden=(32,)).double()
    ensure_masks(clf)
    prune_unstructured_(clf, 0.6)
    fast = compile_sparse(clf)
    x = torch.randn(16, 2, dtype=torch.float64)
    assert_close(fast(x), clf(x), torch.float64, 1e3)


# ------------------------------------------------------------------ torch.compile


@pytest.mark.parametrize("tier", ["fused", "generic"])
def test_compiled_fields_trace_without_graph_breaks(tier):
    net = _pruned_odenet(2, (16, 16), "concatsquash", "tanh", 0.3, torch.float32)
    fast = compile_sparse(net, SparseConfig(tier=tier, layout="csr"))
    z, e, t = torch.randn(8, 2), torch.randn(8, 2), torch.tensor(0.5)

    def f_div(t, z, e):
        if tier == "fused":
            return fast.forward_and_divergence(t, z, e)
        # The generic tier's divergence is autograd.grad through the field, which
        # dynamo does not trace; the field itself must trace whole.
        out = fast(t, z)
        return out, (out * e).sum(1)

    torch._dynamo.reset()
    explained = torch._dynamo.explain(f_div)(t, z, e)
    assert explained.graph_break_count == 0, explained.break_reasons
    compiled = torch.compile(f_div, fullgraph=True)
    zz = z.clone().requires_grad_()
    out = compiled(t, zz, e)
    ref = f_div(t, z, e)
    assert_close(out[0], ref[0], torch.float32)
    assert_close(out[1], ref[1], torch.float32, 10)
    (out[0].sum() + out[1].sum()).backward()
    assert zz.grad is not None and torch.isfinite(zz.grad).all()


def test_a_plain_compile_warns_about_nothing():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        compile_sparse(ODEnet(2, (4,)))  # a plain compile warns about nothing
