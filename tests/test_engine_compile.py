"""compile_sparse against the dense masked model: the engine contract (docs/design.md, 3)."""

from __future__ import annotations

import copy
import itertools
import warnings

import pytest
import torch
from engine_helpers import (
    DENSITIES,
    DEVICE,
    F64_TOL,
    assert_as_accurate,
    assert_close,
    assert_same_steps,
    compiled_grads,
    contract_tol,
    dense_grads,
    field_terms,
    randn,
    random_mask,
    rel_err,
    solve_terms,
    step_slack,
)
from torch import nn
from torch.nn.utils import prune as torch_prune

from flows import CNF, ODEClassifier, ODEnet, SequentialFlow
from flows.odefunc import ODEFunc
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
from sparsekern.autotune import choose_layout, measure_layouts
from sparsekern.divergence import divergence_exact, divergence_hutchinson
from sparsekern.field import call_arity
from sparsekern.generic import detached_copy

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
    return net.to(DEVICE)


def _dense_reference(net, t, z, noise):
    """f, Hutchinson and exact divergences, by autograd through the dense masked model."""
    zz = z.clone().requires_grad_()
    out = net(t, zz) if call_arity(net) == 2 else net(zz)
    hutch = divergence_hutchinson(out, zz, noise)
    exact = divergence_exact(out, zz)
    return zz, out, hutch, exact


def _loss_weights(out, div):
    gen = torch.Generator().manual_seed(5)
    gf = randn(out.shape, gen, out.dtype)
    gd = randn(div.shape, gen, out.dtype)
    return gf, gd


def _dense_quantities(net, t, z, noise) -> dict[str, torch.Tensor]:
    """f, both divergences, and every gradient of a loss through f and the Hutchinson
    divergence (w.r.t. z and every parameter, at its kept places), of the dense model."""
    zz, out, hutch, exact = _dense_reference(net, t, z, noise)
    gf, gd = _loss_weights(out, hutch)
    net.zero_grad(set_to_none=True)
    ((out * gf).sum() + (hutch * gd).sum()).backward()
    q = {"f": out, "hutchinson": hutch, "exact": exact, "grad z": zz.grad}
    q.update({f"grad {name}": g for name, g in dense_grads(net).items()})
    return {k: v.detach() for k, v in q.items()}


def _compiled_quantities(fast, source, t, z, noise) -> dict[str, torch.Tensor]:
    """The same quantities as ``_dense_quantities``, by the compiled field (its own calls)."""
    args = (t, z) if fast.arity == 2 else (z,)
    q = {}
    with torch.no_grad():
        q["f (no grad)"] = fast(*args)
    q["f (grad)"] = fast(*args)
    q["f of forward_and_divergence"], q["hutchinson"] = fast.forward_and_divergence(t, z, noise)
    q["f of the exact forward_and_divergence"], q["exact"] = fast.forward_and_divergence(t, z)
    zc = z.clone().requires_grad_()
    fast.zero_grad(set_to_none=True)
    f3, d3 = fast.forward_and_divergence(t, zc, noise)
    gf, gd = _loss_weights(f3, d3)
    ((f3 * gf).sum() + (d3 * gd).sum()).backward()
    q["grad z"] = zc.grad
    grads = compiled_grads(fast, source)
    assert grads, "no compiled parameter received a gradient"
    q.update({f"grad {name}": g for name, g in grads.items()})
    return {k: v.detach() for k, v in q.items()}


def _reference_key(key: str) -> str:
    return "f" if key.startswith("f ") else key


def _float64_twin(net: nn.Module) -> nn.Module:
    """The same model (same weights and masks) in float64: the truth for float32 runs."""
    return detached_copy(net).double()


def _field_errors(net, fast, t, z, noise) -> dict[str, tuple[float, float]]:
    """Norm-wise relative error of every compiled quantity against the truth, next to the
    dense masked model's own error against it: (compiled, dense).

    float64: the truth is the dense masked model itself (dense error 0). float32: the
    truth is the dense masked model in float64 (same weights); the dense float32 model's
    error against it is its float rounding.
    """
    got = _compiled_quantities(fast, net, t, z, noise)
    dense = _dense_quantities(net, t, z, noise)
    if z.dtype == torch.float64:
        truth = dense
    else:
        t64 = None if t is None else t.double()
        truth = _dense_quantities(_float64_twin(net), t64, z.double(), noise.double())
    missing = {k for k, v in dense.items() if k.startswith("grad") and v.abs().sum() > 0} - set(got)
    assert not missing, f"nonzero dense gradients with no compiled counterpart: {missing}"
    errors = {}
    for key, value in got.items():
        ref = truth[_reference_key(key)]
        errors[key] = (rel_err(value, ref), rel_err(dense[_reference_key(key)], ref))
    return errors


def _check_field(net, fast, t, z, noise):
    """The compiled field against the dense masked model: f, both divergences, all gradients.

    float64: f within 1e-12 and everything else within 1e-10 (relative, norm-wise).
    float32: every quantity as accurate as the dense float32 model it replaces, against the
    float64 truth (``contract_tol``: 2 x the dense model's error plus the rounding floor of
    the field's sums); f also within 1e-5 of the truth.
    """
    dtype = z.dtype
    terms = field_terms(net, z.shape[0], z.shape[-1])
    for key, (err, dense_err) in _field_errors(net, fast, t, z, noise).items():
        tol = contract_tol(dtype, dense_err, terms, forward=key.startswith("f "))
        assert err <= tol, (f"{key}: relative error {err:.3g} > {tol:.3g} "
                            f"(dense {dtype} model: {dense_err:.3g})")


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
    z, noise = randn((37, 3), gen, dtype), randn((37, 3), gen, dtype)
    t = torch.tensor(0.37, dtype=dtype, device=DEVICE)
    _check_field(net, fast, t, z, noise)


@pytest.mark.parametrize("act", ["tanh", "sigmoid", "relu", "elu", "swish"])
@pytest.mark.parametrize("method", ["unstructured", "structured"])
def test_fused_activations_and_prune_methods(act, method):
    dtype = torch.float64
    net = _pruned_odenet(2, (64, 64, 64), "none", act, 0.3, dtype, seed=3, method=method)
    fast = compile_sparse(net)
    gen = torch.Generator().manual_seed(4)
    z = randn((59, 2), gen, dtype)
    _check_field(net, fast, None, z, randn((59, 2), gen, dtype))


@pytest.mark.parametrize("tier", ["fused", "generic"])
def test_batch_of_one_and_width_one(tier):
    dtype = torch.float64
    net = _pruned_odenet(1, (1, 37), "concat", "tanh", 0.9, dtype, seed=6)
    fast = compile_sparse(net, SparseConfig(tier=tier))
    gen = torch.Generator().manual_seed(6)
    z, noise = randn((1, 1), gen, dtype), randn((1, 1), gen, dtype)
    _check_field(net, fast, torch.tensor(0.5, dtype=dtype, device=DEVICE), z, noise)


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
    return net.to(DEVICE)


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
    z = randn((37, 2), gen, dtype)
    t = torch.tensor(0.8, dtype=dtype, device=DEVICE)
    _check_field(net, fast, t, z, randn((37, 2), gen, dtype))
    # Without reduction: same function, full-size cores.
    full = compile_sparse(net, SparseConfig(layout=layout, reduce_neurons=False))
    assert (full.layers[1].core.n_rows, full.layers[1].core.n_cols) == (8, 8)
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
    gen = torch.Generator().manual_seed(9)
    z = randn((5, 2), gen, dtype)
    t = torch.tensor(0.3, dtype=dtype, device=DEVICE)
    f, div = fast.forward_and_divergence(t, z)
    assert torch.equal(div, torch.zeros(5, dtype=dtype, device=DEVICE))
    assert_close(f, net(t, z), dtype)
    assert torch.allclose(f, f[:1].expand_as(f))  # constant in z
    _check_field(net, fast, t, z, randn((5, 2), gen, dtype))


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
    z = torch.randn(64, 2, dtype=dtype, device=DEVICE)
    t = torch.tensor(0.2, dtype=dtype, device=DEVICE)
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


GENERIC_TIMES = ("none", "concat", "concatsquash")
FORCED_LAYOUTS = ("dense", "csr", "blocked")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("time", GENERIC_TIMES)
@pytest.mark.parametrize("density", DENSITIES)
def test_generic_tier_matches_dense_masked_model(dtype, time, density):
    # Every (time, layout) pair and every (density, layout) pair occurs once per dtype.
    layout = FORCED_LAYOUTS[(DENSITIES.index(density) + GENERIC_TIMES.index(time)) % 3]
    net = _pruned_odenet(3, (37, 59), time, "softplus", density, dtype, seed=1)
    fast = compile_sparse(net, SparseConfig(tier="generic", layout=layout))
    assert isinstance(fast, GenericField) and fast.traced
    assert {lin.core.layout for lin in fast.sparse.values()} <= {layout}
    gen = torch.Generator().manual_seed(2)
    z, noise = randn((37, 3), gen, dtype), randn((37, 3), gen, dtype)
    _check_field(net, fast, torch.tensor(0.37, dtype=dtype, device=DEVICE), z, noise)


class _FieldAndDivergences(nn.Module):
    """z -> (f, Hutchinson divergence, exact divergence) of a compiled field at fixed t, noise:
    a module, so that torch.func.functional_call can substitute its kept values."""

    def __init__(self, field, t, noise):
        super().__init__()
        self.field, self.t, self.noise = field, t, noise

    def forward(self, z):
        f, hutch = self.field.forward_and_divergence(self.t, z, self.noise)
        _, exact = self.field.forward_and_divergence(self.t, z)
        return f, hutch, exact


def test_generic_field_passes_gradcheck_and_gradgradcheck():
    # Output and both divergences, w.r.t. z and every kept value, to second order.
    dtype = torch.float64
    net = _pruned_odenet(2, (5, 7), "concatsquash", "tanh", 0.5, dtype, seed=24)
    fast = compile_sparse(net, SparseConfig(tier="generic", layout="csr"))
    gen = torch.Generator().manual_seed(24)
    z, noise = randn((3, 2), gen, dtype), randn((3, 2), gen, dtype)
    wrapper = _FieldAndDivergences(fast, torch.tensor(0.4, dtype=dtype, device=DEVICE), noise)
    names, values = zip(*wrapper.named_parameters(), strict=True)
    values = [v.detach().clone().requires_grad_() for v in values]

    def fn(z, *vals):
        return torch.func.functional_call(wrapper, dict(zip(names, vals, strict=True)), (z,))

    inputs = (z.requires_grad_(), *values)
    assert torch.autograd.gradcheck(fn, inputs)
    assert torch.autograd.gradgradcheck(fn, inputs)


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
    net.to(DEVICE)
    fast = compile_sparse(net, SparseConfig(tier=tier, layout=layout))
    assert isinstance(fast, FusedMLP if tier == "auto" else GenericField)
    assert fast.arity == 1
    gen = torch.Generator().manual_seed(16)
    _check_field(net, fast, None, randn((37, 2), gen, dtype), randn((37, 2), gen, dtype))
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
    net = Functional().double().to(DEVICE)
    fast = compile_sparse(net)
    assert isinstance(fast, GenericField) and len(fast.sparse) == 2
    names = {n for n, _ in fast.named_parameters()}
    assert not names & {"module.w1", "module.w2"}, names  # dense weights are not parameters
    gen = torch.Generator().manual_seed(17)
    z, noise = randn((9, 2), gen, torch.float64), randn((9, 2), gen, torch.float64)
    _check_field(net, fast, torch.tensor(0.0, device=DEVICE), z, noise)


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
    net.to(DEVICE)
    with pytest.warns(UserWarning, match="could not trace"):
        fast = compile_sparse(net)
    assert not fast.traced and len(fast.sparse) == 2
    gen = torch.Generator().manual_seed(17)
    z, noise = randn((9, 2), gen, torch.float64), randn((9, 2), gen, torch.float64)
    _check_field(net, fast, torch.tensor(0.0, device=DEVICE), z, noise)


# ------------------------------------------------------------------ errors, config


class ConvField(nn.Module):
    # Dilated: a convolution the sparse kernels do not run (plain ones compile,
    # tests/test_conv_engine.py).
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 3, padding=2, dilation=2)
        self.lin = nn.Linear(4, 4)

    def forward(self, t, z):
        h = self.conv(z.view(-1, 1, 2, 2)).view(-1, 4)
        return self.lin(torch.tanh(h))


def test_unsupported_op_on_the_state_path_names_op_and_submodule():
    net = ConvField().double()
    torch_prune.l1_unstructured(net.conv, "weight", amount=0.5)
    net.to(DEVICE)
    with pytest.raises(CompileError, match=r"Conv2d with dilation \(2, 2\).* in submodule 'conv'"):
        compile_sparse(net)
    with pytest.warns(UserWarning, match="runs dense"):
        fast = compile_sparse(net, SparseConfig(fallback="eager"))
    assert "Conv2d with dilation (2, 2)" in fast.summary()
    gen = torch.Generator().manual_seed(19)
    z, noise = randn((5, 4), gen, torch.float64), randn((5, 4), gen, torch.float64)
    _check_field(net, fast, torch.tensor(0.0, device=DEVICE), z, noise)


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


@pytest.mark.parametrize("tier", ["auto", "generic"])
def test_a_mask_on_another_device_than_its_weight_is_named(tier):
    net = ODEnet(2, (8,), time="none").to(DEVICE)
    ensure_masks(net)
    net.layers[0].weight_mask = torch.ones(8, 2, device="meta")
    with pytest.raises(CompileError, match=r"layers\.0\.weight_mask is on meta, the weight on "
                                           + DEVICE.type):
        compile_sparse(net, SparseConfig(tier=tier))
    # torch.nn.utils.prune's masks (weight_orig * weight_mask) are checked alike.
    seq = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 2)).to(DEVICE)
    _prune_linears(seq, 0.5, seed=26)
    seq[2].weight_mask = torch.ones(2, 8, device="meta")
    with pytest.raises(CompileError, match=r"2\.weight_mask is on meta"):
        compile_sparse(seq, SparseConfig(tier=tier))


@pytest.mark.parametrize("tier", ["auto", "generic"])
def test_layers_of_mixed_dtype_are_named(tier):
    net = ODEnet(2, (8,), time="none").to(DEVICE)
    net.layers[1].double()
    with pytest.raises((CompileError, TypeError), match=r"layers\.1\.weight.*float64"):
        compile_sparse(net, SparseConfig(tier=tier))


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


@pytest.mark.parametrize("layout", ["dense", "csr", "blocked"])
def test_fused_forward_and_divergence_passes_gradcheck(layout):
    # The fused tier is differentiable once (the refusal of a second derivative is below).
    dtype = torch.float64
    net = _pruned_odenet(2, (5, 7), "concatsquash", "tanh", 0.5, dtype, seed=25)
    fast = compile_sparse(net, SparseConfig(layout=layout))
    assert isinstance(fast, FusedMLP)
    gen = torch.Generator().manual_seed(25)
    z, noise = randn((3, 2), gen, dtype), randn((3, 2), gen, dtype)
    wrapper = _FieldAndDivergences(fast, torch.tensor(0.4, dtype=dtype, device=DEVICE), noise)
    assert torch.autograd.gradcheck(wrapper, (z.requires_grad_(),))


def test_fused_divergence_refuses_higher_derivatives_with_a_pointer_to_generic():
    net = _pruned_odenet(2, (8,), "none", "tanh", 0.5, torch.float64)
    fast = compile_sparse(net)
    z = torch.randn(4, 2, dtype=torch.float64, device=DEVICE, requires_grad=True)
    _, div = fast.forward_and_divergence(None, z, torch.randn_like(z))
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


def _with_fixed_noise(flow: nn.Module, noise: torch.Tensor) -> nn.Module:
    """Make every solve of ``flow`` use ``noise`` (cast to the state's dtype) as its
    Hutchinson probe, so that models in different dtypes integrate the same estimate."""
    for m in flow.modules():
        if isinstance(m, ODEFunc):
            m.draw_noise = lambda like, m=m: setattr(m, "noise", noise.to(like.dtype))
    return flow


def _cnf_run(cnf, x, noise, source=None):
    """log p(x), the NFE of its solve, the kept gradients of -mean log p(x) and the NFE of
    their backward. ``source``: the dense CNF a compiled ``cnf`` came from."""
    _with_fixed_noise(cnf, noise)
    lp = cnf.log_prob(x).detach()
    nfe_forward = cnf.nfe_forward
    cnf.zero_grad(set_to_none=True)
    (-cnf.log_prob(x).mean()).backward()
    if source is None:
        grads = dense_grads(cnf.odenet)
    else:
        grads = compiled_grads(cnf, source.odenet)
    return lp, nfe_forward, grads, cnf.nfe_backward


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("adjoint", [False, True])
def test_compiled_cnf_solves_with_the_same_nfe_and_likelihood(dtype, adjoint):
    torch.manual_seed(19)
    cnf = CNF(ODEnet(2, (64, 64, 64), time="none", activation="sigmoid"), adjoint=adjoint)
    cnf = cnf.to(dtype)
    ensure_masks(cnf)
    prune_unstructured_(cnf, 0.7)
    cnf.to(DEVICE)
    fast = compile_sparse(cnf)
    assert isinstance(fast, CNF) and isinstance(fast.odenet, FusedMLP)
    gen = torch.Generator().manual_seed(20)
    x, noise = randn((128, 2), gen, dtype), randn((128, 2), gen, torch.float64)
    lp, nfe, grads, nfe_back = _cnf_run(cnf, x, noise)
    lp_fast, nfe_fast, grads_fast, nfe_back_fast = _cnf_run(fast, x, noise, source=cnf)
    assert_same_steps(nfe_fast, nfe, dtype, "forward solve")
    assert_same_steps(nfe_back_fast, nfe_back, dtype, "adjoint backward solve")
    assert (nfe_back > 0) == adjoint
    assert {n for n, g in grads.items() if g.abs().sum() > 0} <= set(grads_fast)
    if dtype == torch.float64:
        # Measured: log p 2e-17, gradients 2e-15.
        assert rel_err(lp_fast, lp) <= F64_TOL, "log p"
        for name, g in grads_fast.items():
            assert rel_err(g, grads[name]) <= F64_TOL, name
        return
    # float32: as accurate as the dense float32 CNF, against the same CNF in float64 with
    # the same noise (measured: log p 7e-8 for both; gradients up to 7e-6 for both, the
    # compiled one within 1e-6 of the dense one); test_engine_solve says why the bound is
    # contract_tol over the solve's sums plus step_slack for other steps.
    twin = detached_copy(cnf).double()
    lp64, nfe64, grads64, _ = _cnf_run(twin, x.double(), noise)
    assert_same_steps(nfe, nfe64, dtype, "float32 against float64 forward")
    terms = solve_terms(field_terms(cnf.odenet, x.shape[0]), nfe + nfe_back)
    tol = cnf.atol
    slack = (max(step_slack(nfe_fast, nfe, tol), step_slack(nfe_back_fast, nfe_back, tol))
             + step_slack(nfe, nfe64, tol))
    assert_as_accurate(lp_fast, lp, lp64, terms, "log p", slack)
    for name, g in grads_fast.items():
        assert_as_accurate(g, grads[name], grads64[name], terms, name, slack)


def test_compiled_flows_share_parameters_outside_their_fields():
    torch.manual_seed(22)
    blocks = [CNF(ODEnet(3, (16,), time="concatsquash"), train_T=True) for _ in range(2)]
    flow = SequentialFlow(blocks)
    ensure_masks(flow)
    prune_unstructured_(flow, 0.5)
    flow.to(DEVICE)
    fast = compile_sparse(flow)
    assert isinstance(fast, SequentialFlow) and len(compiled_fields(fast)) == 2
    assert fast.layers[0].sqrt_T is flow.layers[0].sqrt_T
    assert flow.layers[0].odenet is not fast.layers[0].odenet
    twin = detached_copy(flow).double()
    gen = torch.Generator().manual_seed(1)
    x, noise = randn((16, 3), gen, torch.float32), randn((16, 3), gen, torch.float64)
    a, b, truth = (_with_fixed_noise(m, noise).log_prob(xx).detach()
                   for m, xx in ((flow, x), (fast, x), (twin, x.double())))
    # As accurate as the dense float32 flow against the float64 one with the same noise
    # (measured: dense 2.7e-7, compiled 1.2e-7).
    nfe = max(f.nfe_forward for f in flow.layers if isinstance(f, CNF))
    terms = solve_terms(sum(field_terms(f.odenet, x.shape[0]) for f in blocks), nfe)
    assert_as_accurate(b, a, truth, terms, "log p")
    assert write_back(fast) == 2


def test_compiled_classifier_matches():
    torch.manual_seed(23)
    clf = ODEClassifier(2, 2, hidden=(32,)).double()
    ensure_masks(clf)
    prune_unstructured_(clf, 0.6)
    fast = compile_sparse(clf)
    x = torch.randn(16, 2, dtype=torch.float64)
    assert rel_err(fast(x), clf(x)) <= F64_TOL  # measured: 0


# ------------------------------------------------------------------ torch.compile


@pytest.mark.parametrize("tier", ["fused", "generic"])
def test_compiled_fields_trace_without_graph_breaks(tier):
    net = _pruned_odenet(2, (16, 16), "concatsquash", "tanh", 0.3, torch.float32)
    fast = compile_sparse(net, SparseConfig(tier=tier, layout="csr"))
    z, e = torch.randn(8, 2, device=DEVICE), torch.randn(8, 2, device=DEVICE)
    t = torch.tensor(0.5, device=DEVICE)

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


@pytest.mark.parametrize("time", ["none", "concat", "concatsquash"])
def test_no_grad_calls_follow_every_change_of_the_kept_values_and_of_t(time):
    # Without a graph to record, the fused tier reuses the op's weights between
    # calls; each way of changing a kept value, and a new t, must still show.
    net = _pruned_odenet(3, (16, 16), time, "tanh", 0.5, torch.float64, seed=3)
    fast = compile_sparse(net)
    assert isinstance(fast, FusedMLP)
    z = torch.randn(9, 3, dtype=torch.float64)
    noise = torch.randn(9, 3, dtype=torch.float64)

    def dense_at(t):
        write_back(fast)
        _, out, hutch, _ = _dense_reference(net, t, z, noise)
        return out.detach(), hutch.detach()

    def check(t):
        with torch.no_grad():
            f, div = fast.forward_and_divergence(t, z, noise)
            f_only = fast(t, z)
        ref_f, ref_div = dense_at(t)
        assert_close(f, ref_f, torch.float64, what="f")
        assert_close(f_only, ref_f, torch.float64, what="f alone")
        assert_close(div, ref_div, torch.float64, what="divergence")

    t0, t1 = torch.tensor(0.2, dtype=torch.float64), torch.tensor(0.9, dtype=torch.float64)
    check(t0)
    check(t1)  # a new t (no effect for time "none")
    opt = torch.optim.SGD(fast.parameters(), lr=0.5)
    f, div = fast.forward_and_divergence(t1, z, noise)
    (f.square().sum() + div.sum()).backward()
    opt.step()  # in-place update of every kept value
    check(t1)
    state = {k: v * 1.5 for k, v in fast.state_dict().items()}
    fast.load_state_dict(state)
    check(t0)
    with torch.no_grad():
        next(fast.parameters()).mul_(-1.0)
    check(t0)
    # A fused optimiser updates the values without bumping their version counters.
    opt = torch.optim.Adam(fast.parameters(), lr=0.1, fused=True)
    f, div = fast.forward_and_divergence(t1, z, noise)
    (f.square().sum() + div.sum()).backward()
    opt.step()
    check(t1)
    # New Parameter objects in place of the old ones.
    fast.load_state_dict({k: v * 0.5 for k, v in fast.state_dict().items()}, assign=True)
    check(t0)
