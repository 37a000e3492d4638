"""The engine at its edges: empty layers, batches of 0 and 1, tied weights (issue 13).

- A field with a layer fully pruned (first, middle, last) or every weight pruned is a
  valid model: it compiles to the same function, divergence and gradients as the dense
  masked model, trains under odeint and odeint_adjoint, writes back, and exposes no
  empty (numel 0) parameter (torchdiffeq's adjoint cannot flatten those).
- Batches of 0 and 1 run in every backend and layout, through every op of the registry
  and through compiled fields; a [n, 1] tensor's stride(1) means nothing.
- One nn.Linear used twice, or two Linear modules sharing a weight Parameter, compile to
  one kept-values tensor serving every use (its gradient is the sum), in both tiers.

The Triton backend runs here under its interpreter in a child pytest with
TRITON_INTERPRET=1 set from its start (as tests/test_triton_kernels.py does): the
``*Interpreted`` classes are collected only there.

``check_field`` is shared with tests/test_engine_property.py.
"""

from __future__ import annotations

import copy
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from engine_helpers import DEVICE, F64_F_TOL, F64_TOL, compiled_grads, dense_grads, rel_err
from torch import nn
from torchdiffeq import odeint, odeint_adjoint

from flows import CNF, ODEnet
from flows.odefunc import ODEFunc
from flows.prune import apply_masks_, ensure_masks, prunable_layers
from sparsekern import CompileError, SparseConfig, compile_sparse
from sparsekern import ops as registry
from sparsekern.divergence import divergence_exact, divergence_hutchinson
from sparsekern.field import call_arity
from sparsekern.formats import LAYOUT_BLOCKED, LAYOUT_CSR, LAYOUT_DENSE, BlockedPattern, CSRPattern
from sparsekern.ref import mlp_bwd_ref, mlp_fwd_ref

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
ROOT = Path(__file__).resolve().parents[1]
DTYPE = torch.float64
LAYOUTS = ("dense", "csr", "blocked")
# The backends of the parent process; "triton" runs in the interpreter child.
HOST_BACKENDS = ("ref", "cpu") if DEVICE.type == "cpu" else ("ref", "triton", "cuda")
SEQ_ACTS = {"tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "softplus": nn.Softplus, "relu": nn.ReLU,
            "elu": nn.ELU, "swish": nn.SiLU, "identity": nn.Identity}

if INTERPRETED:
    from test_triton_kernels import _interpreter_numpy_fix

    _interpreter_numpy_fix()


# ---------------------------------------------------------------------- fields


def build_field(kind: str, hidden: tuple[int, ...], act: str, masks: list[torch.Tensor] | None,
                d: int = 2, seed: int = 0, dtype: torch.dtype = DTYPE,
                bias_masks: list[torch.Tensor | None] | None = None) -> nn.Module:
    """An ODEnet (``kind`` = its time mode) or an nn.Sequential MLP ("sequential") with the
    given state-weight masks (None: a random 60% per layer), pruned flows-style."""
    torch.manual_seed(seed)
    if kind == "sequential":
        widths = (d, *hidden, d)
        mods: list[nn.Module] = []
        for i in range(len(widths) - 1):
            mods.append(nn.Linear(widths[i], widths[i + 1]))
            if i + 2 < len(widths):
                mods.append(SEQ_ACTS[act]())
        net: nn.Module = nn.Sequential(*mods)
    else:
        net = ODEnet(d, hidden, time=kind, activation=act)
    net = net.to(dtype)
    layers = [m for _, m in ensure_masks(net)]
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for i, m in enumerate(layers):
            # Larger weights than the default init: a pruned layer still moves the output.
            m.weight.mul_(2.0)
            m.bias.uniform_(-1.0, 1.0, generator=gen)
            state_cols = m.weight.shape[1] - (1 if kind == "concat" else 0)
            if masks is None:
                mask = torch.rand(m.weight.shape, generator=gen) < 0.6
            else:
                mask = torch.ones(m.weight.shape, dtype=torch.bool)
                mask[:, :state_cols] = masks[i].to(torch.bool)
            m.weight_mask.copy_(mask)
            if bias_masks is not None and bias_masks[i] is not None:
                m.bias_mask.copy_(bias_masks[i])
    apply_masks_(net)
    return net.to(DEVICE)


def layer_shapes(kind: str, hidden: tuple[int, ...], d: int = 2) -> list[tuple[int, int]]:
    widths = (d, *hidden, d)
    return [(widths[i + 1], widths[i]) for i in range(len(widths) - 1)]


def masks_with_empty(kind: str, hidden: tuple[int, ...], empty: str, seed: int
                     ) -> list[torch.Tensor]:
    """Random masks (60%) with the ``empty`` layer(s) fully pruned: first, middle, last, all."""
    shapes = layer_shapes(kind, hidden)
    gen = torch.Generator().manual_seed(seed)
    masks = [torch.rand(s, generator=gen) < 0.6 for s in shapes]
    which = {"first": [0], "middle": [len(shapes) // 2], "last": [len(shapes) - 1],
             "all": list(range(len(shapes)))}[empty]
    for i in which:
        masks[i][:] = False
    return masks


# ---------------------------------------------------------------- the checker


def _dense(net, t, z, noise, gf, gd, with_noise: bool):
    zz = z.clone().requires_grad_()
    out = net(t, zz) if call_arity(net) == 2 else net(zz)
    if with_noise:
        div = divergence_hutchinson(out, zz, noise)
    else:
        div = divergence_exact(out, zz)
    net.zero_grad(set_to_none=True)
    ((out * gf).sum() + (div * gd).sum()).backward()
    return out.detach(), div.detach(), zz.grad, dense_grads(net)


def _dense_f_grads(net, t, z, gf):
    zz = z.clone().requires_grad_()
    out = net(t, zz) if call_arity(net) == 2 else net(zz)
    net.zero_grad(set_to_none=True)
    (out * gf).sum().backward()
    return zz.grad, dense_grads(net)


def _compare_grads(got: dict, want: dict, what: str) -> None:
    for name, g in want.items():
        if name in got:
            err = rel_err(got[name], g)
            assert err <= F64_TOL, f"{what}: grad {name}: relative error {err:.3g}"
        else:
            # No kept value in the compiled field: the dense masked gradient is zero there.
            assert g.abs().sum() == 0, f"{what}: nonzero dense grad {name} has no compiled twin"
    extra = set(got) - set(want)
    assert not extra, f"{what}: compiled grads of unknown parameters {extra}"


def assert_no_empty_parameter(model: nn.Module) -> None:
    empty = [n for n, p in model.named_parameters() if p.numel() == 0]
    assert not empty, f"empty parameters (odeint_adjoint cannot take them): {empty}"


def check_field(net: nn.Module, fast: nn.Module, t, z: torch.Tensor, noise: torch.Tensor,
                what: str = "") -> None:
    """A compiled field against the dense masked model (float64): f (no grad, grad, and of
    forward_and_divergence), Hutchinson and exact divergence, and the gradients w.r.t. z
    and every kept value of a loss through f and each divergence, and through f alone."""
    assert_no_empty_parameter(fast)
    args = (z,) if fast.arity == 1 else (t, z)
    gen = torch.Generator().manual_seed(1)
    gf = torch.randn(tuple(z.shape), generator=gen, dtype=torch.float64).to(z)
    gd = torch.randn((z.shape[0],), generator=gen, dtype=torch.float64).to(z)
    for with_noise in (True, False):
        kind = f"{what} {'hutchinson' if with_noise else 'exact'}"
        f_ref, div_ref, gz_ref, grads_ref = _dense(net, t, z, noise, gf, gd, with_noise)
        with torch.no_grad():
            f0 = fast(*args)
            f1, div1 = fast.forward_and_divergence(t, z, noise if with_noise else None)
        assert rel_err(f0, f_ref) <= F64_F_TOL, f"{kind}: f without grad"
        assert rel_err(f1, f_ref) <= F64_F_TOL, f"{kind}: f of forward_and_divergence"
        assert rel_err(div1, div_ref) <= F64_TOL, f"{kind}: divergence"
        zc = z.clone().requires_grad_()
        fast.zero_grad(set_to_none=True)
        f2, div2 = fast.forward_and_divergence(t, zc, noise if with_noise else None)
        assert rel_err(f2, f_ref) <= F64_F_TOL, f"{kind}: f with grad"
        assert rel_err(div2, div_ref) <= F64_TOL, f"{kind}: divergence with grad"
        ((f2 * gf).sum() + (div2 * gd).sum()).backward()
        assert rel_err(zc.grad, gz_ref) <= F64_TOL, f"{kind}: grad z"
        _compare_grads(compiled_grads(fast, net), grads_ref, kind)
    # f alone with gradients (the fused tier's differentiable per-layer path).
    gz_ref, grads_ref = _dense_f_grads(net, t, z, gf)
    zc = z.clone().requires_grad_()
    fast.zero_grad(set_to_none=True)
    f3 = fast(*((zc,) if fast.arity == 1 else (t, zc)))
    assert rel_err(f3, f_ref) <= F64_F_TOL, f"{what}: f (grad)"
    (f3 * gf).sum().backward()
    assert rel_err(zc.grad, gz_ref) <= F64_TOL, f"{what}: grad z through f"
    _compare_grads(compiled_grads(fast, net), grads_ref, f"{what} f only")


def sample_inputs(d: int, batch: int, seed: int, dtype: torch.dtype = DTYPE):
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(batch, d, generator=gen, dtype=torch.float64).to(DEVICE, dtype)
    noise = torch.randn(batch, d, generator=gen, dtype=torch.float64).to(DEVICE, dtype)
    return torch.tensor(0.4, dtype=dtype, device=DEVICE), z, noise


# ------------------------------------------------------------------ empty layers

EMPTY = ("first", "middle", "last", "all")
KINDS = ("none", "concat", "concatsquash", "sequential")


@pytest.mark.parametrize("empty", EMPTY)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("tier", ("fused", "generic"))
def test_fields_with_an_empty_layer_match_the_dense_model(empty, kind, tier):
    hidden = (6, 5)
    net = build_field(kind, hidden, "tanh", masks_with_empty(kind, hidden, empty, seed=3),
                      seed=3)
    for layout in LAYOUTS:
        fast = compile_sparse(net, SparseConfig(tier=tier, layout=layout, autotune=False))
        assert fast.tier == tier
        t, z, noise = sample_inputs(2, 7, seed=4)
        check_field(net, fast, t, z, noise, f"{kind}/{empty}/{tier}/{layout}")


@pytest.mark.parametrize("empty", EMPTY)
@pytest.mark.parametrize("tier", ("fused", "generic"))
def test_the_issue_repro_trains_under_odeint_adjoint(empty, tier):
    f = ODEnet(2, (16, 16), time="none", activation="sigmoid").double()
    ensure_masks(f)
    lins = [m for _, m in prunable_layers(f)]
    which = {"first": [0], "middle": [1], "last": [2], "all": [0, 1, 2]}[empty]
    with torch.no_grad():
        for i in which:
            lins[i].weight_mask.zero_()
            lins[i].weight.zero_()
    cnf = CNF(f, adjoint=True)
    fast = compile_sparse(cnf, SparseConfig(tier=tier))
    assert_no_empty_parameter(fast)
    x = torch.randn(8, 2, dtype=torch.float64)
    fast.log_prob(x).mean().backward()  # crashed: setStorage ... storage of size 0
    assert any(p.grad is not None for p in fast.parameters())


def _fixed_noise(flow: nn.Module, noise: torch.Tensor) -> nn.Module:
    for m in flow.modules():
        if isinstance(m, ODEFunc):
            m.draw_noise = lambda like, m=m: setattr(m, "noise", noise.to(like.dtype))
    return flow


def _cnf_grads(cnf, x, noise, source=None):
    _fixed_noise(cnf, noise)
    cnf.zero_grad(set_to_none=True)
    lp = cnf.log_prob(x)
    (-lp.mean()).backward()
    grads = dense_grads(cnf.odenet) if source is None else compiled_grads(cnf, source.odenet)
    return lp.detach(), grads


@pytest.mark.parametrize("adjoint", (False, True))
@pytest.mark.parametrize("divergence", ("hutchinson", "exact"))
@pytest.mark.parametrize("tier", ("fused", "generic"))
@pytest.mark.parametrize("empty", EMPTY)
def test_cnfs_with_an_empty_layer_train_like_the_dense_one(empty, tier, divergence, adjoint):
    hidden = (6, 5)
    net = build_field("concat", hidden, "softplus",
                      masks_with_empty("concat", hidden, empty, seed=5), seed=5)
    cnf = CNF(net, divergence=divergence, adjoint=adjoint, atol=1e-9, rtol=1e-9)
    fast = compile_sparse(cnf, SparseConfig(tier=tier, autotune=False))
    assert_no_empty_parameter(fast)
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(9, 2, generator=gen, dtype=DTYPE).to(DEVICE)
    noise = torch.randn(9, 2, generator=gen, dtype=DTYPE).to(DEVICE)
    lp, grads = _cnf_grads(cnf, x, noise)
    lp_fast, grads_fast = _cnf_grads(fast, x, noise, source=cnf)
    # The solver takes the same steps (the fields agree to rounding): tight tolerances.
    assert rel_err(lp_fast, lp) <= 1e-9, "log p"
    for name, g in grads.items():
        if name in grads_fast:
            assert rel_err(grads_fast[name], g) <= 1e-8, name
        else:
            assert g.abs().sum() == 0, name


@pytest.mark.parametrize("solver", (odeint, odeint_adjoint))
@pytest.mark.parametrize("tier", ("fused", "generic"))
def test_a_bare_field_with_every_weight_pruned_solves_and_differentiates(solver, tier):
    hidden = (4, 3)
    net = build_field("none", hidden, "tanh", masks_with_empty("none", hidden, "all", 7), seed=7)
    fast = compile_sparse(net, SparseConfig(tier=tier))
    assert_no_empty_parameter(fast)
    z0 = torch.randn(5, 2, dtype=DTYPE)
    ts = torch.tensor([0.0, 0.7], dtype=DTYPE)
    out = {}
    for name, field in (("dense", net), ("fast", fast)):
        field.zero_grad(set_to_none=True)
        kw = {"adjoint_params": tuple(field.parameters())} if solver is odeint_adjoint else {}
        zt = solver(field, z0, ts, rtol=1e-9, atol=1e-9, **kw)[-1]
        (zt ** 2).sum().backward()
        out[name] = zt.detach()
    # Every weight pruned: f(z) is the last bias, so z(t) = z0 + t b.
    bias = net.layers[-1].bias.detach()
    assert rel_err(out["fast"], z0 + 0.7 * bias) <= 1e-12
    assert rel_err(out["fast"], out["dense"]) <= 1e-12
    fast_grads = compiled_grads(fast, net)
    assert rel_err(fast_grads["layers.2.bias"], net.layers[2].bias.grad) <= 1e-10


@pytest.mark.parametrize("tier", ("fused", "generic"))
def test_write_back_of_an_empty_layer_writes_zeros_and_trains_its_bias(tier):
    hidden = (6, 5)
    masks = masks_with_empty("none", hidden, "middle", seed=8)
    # The middle layer's bias is kept, the last layer's bias fully pruned: no kept value.
    bias_masks = [None, None, torch.zeros(2)]
    net = build_field("none", hidden, "tanh", masks, seed=8, bias_masks=bias_masks)
    fast = compile_sparse(net, SparseConfig(tier=tier))
    assert_no_empty_parameter(fast)
    before = copy.deepcopy(net)
    opt = torch.optim.SGD(fast.parameters(), lr=0.1)
    t, z, noise = sample_inputs(2, 11, seed=9)
    for _ in range(3):
        opt.zero_grad()
        f, div = fast.forward_and_divergence(t, z, noise)
        ((f ** 2).sum() + div.sum()).backward()
        opt.step()
    fast.write_back()
    mid = net.layers[1]
    assert torch.count_nonzero(mid.weight) == 0, "an empty layer writes back zeros"
    assert not torch.equal(mid.bias, before.layers[1].bias), "its kept bias trained"
    assert torch.count_nonzero(net.layers[2].bias) == 0, "a fully pruned bias stays zero"
    for name, p in net.named_parameters():
        mask = getattr(net.get_submodule(name.rpartition(".")[0]), name.rpartition(".")[2]
                       + "_mask")
        assert torch.count_nonzero(p[mask == 0]) == 0, f"{name}: pruned places stay zero"
    with torch.no_grad():
        assert rel_err(fast(t, z), net(t, z)) <= F64_F_TOL
    # The written-back model compiles again to the same function.
    again = compile_sparse(net, SparseConfig(tier=tier))
    with torch.no_grad():
        assert rel_err(again(t, z), net(t, z)) <= F64_F_TOL


def test_a_field_with_no_parameter_at_all_is_a_zero_field():
    net = nn.Sequential(nn.Linear(3, 4, bias=False), nn.Tanh(), nn.Linear(4, 3, bias=False))
    net = net.double()
    with torch.no_grad():
        for m in (net[0], net[2]):
            m.weight.zero_()
    for tier in ("fused", "generic"):
        fast = compile_sparse(net, SparseConfig(tier=tier))
        assert list(fast.parameters()) == []
        z = torch.randn(4, 3, dtype=DTYPE)
        f, div = fast.forward_and_divergence(None, z)
        assert torch.equal(f, torch.zeros_like(z)) and torch.equal(div, torch.zeros(4, dtype=DTYPE))
        fast.write_back()
        fast.to(torch.float32)  # converts its (empty) kept values with it
        f32, _ = fast.forward_and_divergence(None, z.float())
        assert f32.dtype == torch.float32


# -------------------------------------------------------------- batches 0 and 1


def _strided_state(batch: int, n: int, seed: int) -> torch.Tensor:
    """A [n, batch] feature-major matrix that is "contiguous" but has stride(1) != 1 when
    batch <= 1 (the transpose of a [batch, n] row-major matrix), as a state's transpose is."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, n, generator=gen, dtype=DTYPE).to(DEVICE).t()


def _pattern(rows: int, cols: int, seed: int) -> CSRPattern:
    gen = torch.Generator().manual_seed(seed)
    mask = torch.rand(rows, cols, generator=gen) < 0.5
    if rows > 2 and cols > 2:
        mask[1] = False
        mask[:, 2] = False
    return CSRPattern(*(t.to(DEVICE) for t in CSRPattern.from_mask(mask).tensors()))


def check_sparse_ops_at_batch(backend: str, batch: int) -> None:
    """spmm (W x, W^T x), spmm_blocked and sddmm, with their autograd, at a batch width."""
    p = _pattern(7, 5, seed=batch)
    blocks = [t.to(DEVICE) for t in BlockedPattern.from_csr(p).tensors()]
    gen = torch.Generator().manual_seed(3)
    vals = torch.randn(p.nnz, generator=gen, dtype=DTYPE).to(DEVICE)
    x, g = _strided_state(batch, 5, 1), _strided_state(batch, 7, 2)
    assert x.is_contiguous() and (batch > 1 or x.stride(1) != 1 or x.shape[0] == 1)
    cases = {
        "spmm": lambda v, a: registry.spmm(*p.tensors(), v, a, False, backend),
        "spmm^T": lambda v, a: registry.spmm(*p.tensors(), v, a, True, backend),
        "spmm_blocked": lambda v, a: registry.spmm_blocked(*p.tensors(), v, *blocks, a, backend),
    }
    refs = {
        "spmm": lambda v, a: registry.spmm(*p.tensors(), v, a.contiguous(), False, "ref"),
        "spmm^T": lambda v, a: registry.spmm(*p.tensors(), v, a, True, "ref"),
        "spmm_blocked": lambda v, a: registry.spmm_blocked(*p.tensors(), v, *blocks, a, "ref"),
    }
    for name, fn in cases.items():
        a = g if name == "spmm^T" else x
        # clone() keeps the strides: aa is as oddly strided as a.
        vv, aa = vals.clone().requires_grad_(), a.detach().clone().requires_grad_()
        y = fn(vv, aa)
        y_ref = refs[name](vals, a)
        assert y.shape == y_ref.shape, (name, batch)
        assert rel_err(y, y_ref) <= F64_F_TOL, (name, batch)
        # Gradients: zero at batch 0 (nothing to sum), exact at batch 1.
        gy = _strided_state(batch, y.shape[0], 4)
        gv, ga = torch.autograd.grad(y, (vv, aa), gy)
        rv, ra = torch.autograd.grad(refs[name](vv, aa), (vv, aa), gy)
        assert rel_err(gv, rv) <= F64_TOL and rel_err(ga, ra) <= F64_TOL, (name, batch)
        assert gv.shape == vals.shape and ga.shape == a.shape
    s = registry.sddmm(*p.tensors(), g, x, backend)
    assert rel_err(s, registry.sddmm(*p.tensors(), g, x, "ref")) <= F64_TOL, ("sddmm", batch)
    assert s.shape == (p.nnz,)
    if batch == 0:
        assert torch.count_nonzero(s) == 0


def _mlp_program(widths: tuple[int, ...], layouts: list[int], seed: int):
    """values, index, scales, shifts of a random program (a CSR/blocked layer: 60% kept)."""
    gen = torch.Generator().manual_seed(seed)
    values, index, scales, shifts = [], [], [], []
    for i, code in enumerate(layouts):
        n_out, n_in = widths[i + 1], widths[i]
        if code == LAYOUT_DENSE:
            values.append(torch.randn(n_out, n_in, generator=gen, dtype=DTYPE).to(DEVICE))
        else:
            mask = torch.rand(n_out, n_in, generator=gen) < 0.6
            p = CSRPattern.from_mask(mask)
            vals = torch.randn(p.nnz, generator=gen, dtype=DTYPE)
            values.append(vals.to(DEVICE))
            index += [t.to(DEVICE) for t in p.tensors()]
            if code == LAYOUT_BLOCKED:
                index += [t.to(DEVICE) for t in BlockedPattern.from_csr(p).tensors()]
        # Odd layers have a scale (a concatsquash gate), even ones none (an empty tensor).
        if i % 2:
            scales.append((torch.rand(n_out, generator=gen, dtype=DTYPE) + 0.5).to(DEVICE))
        else:
            scales.append(torch.empty(0, dtype=DTYPE, device=DEVICE))
        shifts.append(torch.randn(n_out, generator=gen, dtype=DTYPE).to(DEVICE))
    return values, index, scales, shifts


# Programs: widths n0..nL and a layout per layer; zero widths are what neuron reduction
# leaves of an empty layer (no neuron computed, nothing read).
PROGRAMS = (
    ((2, 5, 4, 2), [LAYOUT_DENSE, LAYOUT_CSR, LAYOUT_BLOCKED]),
    ((2, 5, 4, 2), [LAYOUT_BLOCKED, LAYOUT_DENSE, LAYOUT_CSR]),
    ((2, 0, 4, 2), [LAYOUT_DENSE, LAYOUT_DENSE, LAYOUT_DENSE]),
    ((0, 0, 2), [LAYOUT_CSR, LAYOUT_BLOCKED]),
    ((0, 0, 0, 3), [LAYOUT_DENSE, LAYOUT_DENSE, LAYOUT_DENSE]),
    ((3, 1, 3), [LAYOUT_DENSE, LAYOUT_CSR]),
)


def check_mlp_ops_at_batch(backend: str, batch: int, programs=PROGRAMS) -> None:
    """mlp_fwd (no tangent, Hutchinson, exact; saving or not) and mlp_bwd against the
    references, with a state whose transpose has stride(1) != 1 at batch 1."""
    for widths, layouts in programs:
        values, index, scales, shifts = _mlp_program(widths, layouts, seed=sum(widths) + batch)
        n0, d = widths[0], widths[-1]
        x0 = _strided_state(batch, n0, 5)
        for mode in ("none", "hutchinson", "exact"):
            if mode == "none":
                tan0, probe, exact = x0.new_empty(0, n0, batch), x0.new_empty(0), False
            elif mode == "hutchinson":
                probe = _strided_state(batch, d, 6)[None]
                tan0 = probe[:, :n0] if n0 <= d else _strided_state(batch, n0, 7)[None]
                exact = False
            else:
                eye = torch.eye(d, dtype=DTYPE, device=DEVICE)[:, :n0]
                tan0, probe, exact = eye[:, :, None].expand(d, n0, batch), x0.new_empty(0), True
            what = f"{backend} {widths} {layouts} {mode} B={batch}"
            args = (x0, tan0, probe, values, index, scales, shifts, layouts, 1, exact)
            ref = mlp_fwd_ref(*[a.contiguous() if isinstance(a, torch.Tensor) else a
                                for a in args], True)
            for save in (False, True):
                f, div, saved = registry.mlp_fwd(*args, save, backend)
                # Another call in between: no output may alias a kernel's scratch memory
                # (the C++ f did at B = 1, a contiguous() that did not copy).
                registry.mlp_fwd(x0 * 2, *args[1:], save, backend)
                assert f.shape == (d, batch) and div.shape == (batch,), what
                assert rel_err(f, ref[0]) <= F64_F_TOL, f"{what}: f"
                assert rel_err(div, ref[1]) <= F64_TOL, f"{what}: div"
            gen = torch.Generator().manual_seed(8)
            grad_f = torch.randn(batch, d, generator=gen, dtype=DTYPE).to(DEVICE).t()
            grad_div = torch.randn(batch, generator=gen, dtype=DTYPE).to(DEVICE)
            got = registry.mlp_bwd(grad_f, grad_div, *args[:9], exact, saved, backend)
            want = mlp_bwd_ref(grad_f.contiguous(), grad_div, *[
                a.contiguous() if isinstance(a, torch.Tensor) else a for a in args[:9]],
                exact, ref[2])
            assert rel_err(got[0], want[0]) <= F64_TOL, f"{what}: grad x0"
            assert got[0].shape == (n0, batch), what
            for part, gs, ws in zip(("weights", "scales", "shifts"), got[1:], want[1:],
                                    strict=True):
                for i, (a, b) in enumerate(zip(gs, ws, strict=True)):
                    assert a.shape == b.shape, f"{what}: grad {part}[{i}] shape"
                    assert rel_err(a, b) <= F64_TOL, f"{what}: grad {part}[{i}]"


@pytest.mark.parametrize("batch", (0, 1))
@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_sparse_ops_at_batch_0_and_1(backend, batch):
    check_sparse_ops_at_batch(backend, batch)


@pytest.mark.parametrize("batch", (0, 1, 3))
@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_mlp_ops_at_batch_0_and_1_and_zero_widths(backend, batch):
    check_mlp_ops_at_batch(backend, batch)


def check_fields_at_batch(backend: str, batch: int, layouts=LAYOUTS,
                          kinds=("concatsquash", "sequential")) -> None:
    hidden = (5, 4)
    for kind in kinds:
        net = build_field(kind, hidden, "tanh", None, seed=10)
        for tier in ("fused", "generic"):
            for layout in layouts:
                fast = compile_sparse(net, SparseConfig(tier=tier, layout=layout,
                                                        backend=backend, autotune=False))
                t, z, noise = sample_inputs(2, batch, seed=11)
                check_field(net, fast, t, z, noise, f"{kind}/{tier}/{layout}/{backend}/B={batch}")


@pytest.mark.parametrize("batch", (0, 1))
@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_compiled_fields_at_batch_0_and_1(backend, batch):
    check_fields_at_batch(backend, batch)


@pytest.mark.parametrize("tier", ("fused", "generic"))
@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_compiled_cnf_samples_one_point(tier, layout):
    torch.manual_seed(12)
    cnf = CNF(ODEnet(2, (16, 16), time="none", activation="sigmoid"))
    ensure_masks(cnf)
    fast = compile_sparse(cnf, SparseConfig(tier=tier, layout=layout, autotune=False))
    torch.manual_seed(13)
    x = fast.sample(1)  # crashed: x.stride(1) == 1 && y.stride(1) == 1 INTERNAL ASSERT
    torch.manual_seed(13)
    assert x.shape == (1, 2)
    assert rel_err(x, cnf.sample(1)) <= 1e-5
    lp = fast.log_prob(x.detach())
    lp.sum().backward()
    assert lp.shape == (1,)


# ------------------------------------------------------------------ tied weights


class TwiceUsed(nn.Module):
    """One nn.Linear applied twice (generic tier)."""

    def __init__(self, d: int = 3, h: int = 6) -> None:
        super().__init__()
        self.inp = nn.Linear(d, h)
        self.mid = nn.Linear(h, h)
        self.out = nn.Linear(h, d)

    def forward(self, z):
        h = torch.tanh(self.inp(z))
        h = torch.tanh(self.mid(h))
        h = torch.tanh(self.mid(h))
        return self.out(h)


class SharedWeight(nn.Module):
    """Two Linear modules sharing one weight Parameter (their biases apart)."""

    def __init__(self, d: int = 3, h: int = 6) -> None:
        super().__init__()
        self.inp = nn.Linear(d, h)
        self.a = nn.Linear(h, h)
        self.b = nn.Linear(h, h)
        self.b.weight = self.a.weight
        self.out = nn.Linear(h, d)

    def forward(self, t, z):
        h = torch.tanh(self.inp(z))
        h = torch.sigmoid(self.a(h)) * (1 + t)
        return self.out(torch.tanh(self.b(h)))


class TwiceHeldUntraceable(nn.Module):
    """One nn.Linear held in two attributes, behind control flow fx cannot trace (the
    generic tier then swaps the Linear modules in place, in every slot)."""

    def __init__(self, d: int = 3, h: int = 6) -> None:
        super().__init__()
        self.inp = nn.Linear(d, h)
        self.mid = nn.Linear(h, h)
        self.again = self.mid
        self.out = nn.Linear(h, d)

    def forward(self, z):
        h = torch.tanh(self.inp(z))
        if float(h.abs().sum()) >= 0:  # data-dependent: not traceable
            h = torch.tanh(self.again(torch.tanh(self.mid(h))))
        return self.out(h)


def _tied_models() -> dict[str, nn.Module]:
    torch.manual_seed(14)
    mid = nn.Linear(6, 6)
    seq = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), mid, nn.Tanh(), mid, nn.Tanh(),
                        nn.Linear(6, 3))
    odenet = ODEnet(3, (6, 6, 6), time="none", activation="softplus")
    odenet.layers[2] = odenet.layers[1]
    shared_seq = nn.Sequential(nn.Linear(3, 6), nn.ELU(), nn.Linear(6, 6), nn.ELU(),
                               nn.Linear(6, 6), nn.ELU(), nn.Linear(6, 3))
    shared_seq[4].weight = shared_seq[2].weight
    models = {"sequential-twice": seq, "odenet-twice": odenet, "sequential-shared": shared_seq,
              "module-twice": TwiceUsed(), "module-shared": SharedWeight(),
              "untraceable-twice": TwiceHeldUntraceable()}
    for m in models.values():
        m.double()
        layers = ensure_masks(m)
        gen = torch.Generator().manual_seed(15)
        with torch.no_grad():
            masks: dict[int, torch.Tensor] = {}
            for _, lin in layers:
                # One mask per Parameter: modules sharing a weight share its mask too.
                mask = masks.setdefault(id(lin.weight),
                                        torch.rand(lin.weight.shape, generator=gen) < 0.6)
                lin.weight_mask.copy_(mask)
        apply_masks_(m)
    return models


TIED = ("sequential-twice", "odenet-twice", "sequential-shared", "module-twice",
        "module-shared", "untraceable-twice")


@pytest.mark.filterwarnings("ignore:sparsekern. torch.fx could not trace")
@pytest.mark.parametrize("name", TIED)
@pytest.mark.parametrize("tier", ("auto", "generic"))
def test_tied_weights_stay_tied(name, tier):
    net = _tied_models()[name]
    fast = compile_sparse(net, SparseConfig(tier=tier, autotune=False))
    kept = [n for n, p in fast.named_parameters()]
    n_params = sum(1 for _ in net.parameters())  # deduplicated: a tied weight counts once
    assert len(kept) == n_params, f"one kept tensor per (tied) parameter: {kept}"
    t, z, noise = sample_inputs(3, 6, seed=16)
    check_field(net, fast, t, z, noise, name)
    # A training step on the compiled field, written back: the same model as the dense
    # one after the same step on its masked gradients.
    dense = copy.deepcopy(net)
    opt = torch.optim.SGD(fast.parameters(), lr=0.2)
    opt_dense = torch.optim.SGD(dense.parameters(), lr=0.2)
    args = (z,) if fast.arity == 1 else (t, z)
    opt.zero_grad()
    f, div = fast.forward_and_divergence(t, z, noise)
    ((f ** 2).sum() + div.sum()).backward()
    opt.step()
    fast.write_back()
    opt_dense.zero_grad()
    zz = z.clone().requires_grad_()
    out = dense(*((zz,) if fast.arity == 1 else (t, zz)))
    ((out ** 2).sum() + divergence_hutchinson(out, zz, noise).sum()).backward()
    for pname, p in dense.named_parameters():
        owner = dense.get_submodule(pname.rpartition(".")[0])
        mask = getattr(owner, pname.rpartition(".")[2] + "_mask", None)
        if mask is not None:
            p.grad.mul_(mask)
    opt_dense.step()
    with torch.no_grad():
        assert rel_err(net(*args), dense(*args)) <= 1e-12, "written back = dense step"
        assert rel_err(fast(*args), net(*args)) <= 1e-12, "compiled = written back"
    for (pn, p), (_, q) in zip(net.named_parameters(), dense.named_parameters(), strict=True):
        assert rel_err(p, q) <= 1e-12, pn


def test_tied_weights_with_different_masks_are_refused():
    torch.manual_seed(17)
    seq = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 6), nn.Tanh(),
                        nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    seq[4].weight = seq[2].weight
    ensure_masks(seq)
    with torch.no_grad():
        seq[2].weight_mask[0, 0] = 0
        seq[4].weight_mask[1, 1] = 0
        seq[2].weight[0, 0] = seq[2].weight[1, 1] = 0
    for tier in ("auto", "generic"):
        with pytest.raises(CompileError, match=r"'2\.weight'.*'4\.weight'.*tied.*masks differ"):
            compile_sparse(seq, SparseConfig(tier=tier))


def test_a_tied_weight_also_used_outside_a_linear_map_is_refused():
    class Mixed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 3)

        def forward(self, z):
            # The same weight as a linear map and as a plain tensor off the state path.
            return self.lin(z) + self.lin.weight.sum()

    # Not pruned (no mask, no zero), so no other rule refuses it: only the tie is wrong.
    net = Mixed().double()
    with pytest.raises(CompileError, match=r"'lin\.weight'.*tied"):
        compile_sparse(net)


# ------------------------------------------------------ Triton under the interpreter


class TestEdgesInterpreted:
    """The same edges on backend "triton", interpreted on CPU tensors (child process)."""

    __test__ = INTERPRETED

    @pytest.mark.parametrize("batch", (0, 1))
    def test_sparse_ops(self, batch):
        check_sparse_ops_at_batch("triton", batch)

    @pytest.mark.parametrize("batch", (0, 1))
    def test_mlp_ops(self, batch):
        check_mlp_ops_at_batch("triton", batch)

    @pytest.mark.parametrize("batch", (0, 1))
    def test_compiled_fields(self, batch):
        check_fields_at_batch("triton", batch, kinds=("sequential",))

    @pytest.mark.parametrize("empty", EMPTY)
    def test_empty_layers(self, empty):
        hidden = (4, 3)
        net = build_field("concat", hidden, "sigmoid",
                          masks_with_empty("concat", hidden, empty, seed=18), seed=18)
        for tier in ("fused", "generic"):
            for layout in LAYOUTS:
                fast = compile_sparse(net, SparseConfig(tier=tier, layout=layout,
                                                        backend="triton", autotune=False))
                t, z, noise = sample_inputs(2, 3, seed=19)
                check_field(net, fast, t, z, noise, f"triton/{empty}/{tier}/{layout}")

    def test_a_compiled_cnf_samples_one_point(self):
        torch.manual_seed(20)
        cnf = CNF(ODEnet(2, (8,), time="none", activation="tanh"))
        fast = compile_sparse(cnf, SparseConfig(backend="triton", layout="csr"))
        assert fast.sample(1).shape == (1, 2)


def run_interpreted_child(test_file: Path, min_passed: int, timeout: float = 600) -> None:
    """Run ``test_file``'s ``*Interpreted`` classes in a child pytest with TRITON_INTERPRET=1."""
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", str(test_file), "-q", "-p", "no:cacheprovider",
         "-k", "Interpreted"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    passed = re.search(r"(\d+) passed", out)
    assert passed and int(passed.group(1)) >= min_passed, out[-3000:]


def test_interpreted_edges_pass():
    """Every TestEdgesInterpreted case passes on the Triton interpreter (child process)."""
    run_interpreted_child(Path(__file__), min_passed=11)


test_interpreted_edges_pass.__test__ = not INTERPRETED and DEVICE.type == "cpu"


def test_generic_divergence_under_no_grad_of_a_state_that_requires_grad():
    """A state that requires grad but was viewed under no_grad (odeint_adjoint's forward
    solve of a later flow block) has no path back to itself: the generic tier's autograd
    divergence must still be the trace of df/dz, not zero."""
    from sparsekern import SparseConfig, compile_sparse

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    f = compile_sparse(net, SparseConfig(tier="generic", backend="ref"))
    w = torch.randn(5, 2, requires_grad=True) * 1.0
    y = torch.cat([w.reshape(-1), torch.zeros(5)])
    with torch.no_grad():
        _, div = f.forward_and_divergence(None, y[:10].view(5, 2))
    _, ref = f.forward_and_divergence(None, w.detach())
    torch.testing.assert_close(div, ref)
