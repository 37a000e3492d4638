"""The engine's ops against independent oracles: formats, spmm, sddmm, the fused MLP program."""

from __future__ import annotations

import itertools

import pytest
import torch
from engine_helpers import (
    BACKENDS,
    DENSITIES,
    DEVICE,
    FAST_BACKENDS,
    assert_close,
    contract_tol,
    program_terms,
    random_mask,
    rel_err,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsekern import ops
from sparsekern.activations import ACT_FNS, ACT_IDS, act_ref
from sparsekern.backends import REDUCED_BACKENDS
from sparsekern.formats import (
    BLOCK_ROWS,
    LAYOUT_BLOCKED,
    LAYOUT_CSR,
    LAYOUT_DENSE,
    BlockedPattern,
    CSRPattern,
    LayerProgram,
    ProgramError,
    ProgramTypeError,
    decode_program,
    encode_program,
)
from sparsekern.ref import mlp_bwd_ref, mlp_fwd_ref

DTYPES = (torch.float32, torch.float64)
SHAPES = ((1, 1), (37, 59), (59, 37), (1, 37))
BATCHES = (1, 37, 1025)
# Width 1025 as a matrix dimension: (shape, density, batch).
WIDE = (((1025, 59), 0.5, 37), ((59, 1025), 0.99, 1), ((1025, 1025), 0.9, 5))


# ----------------------------------------------------------------------------- formats


@settings(max_examples=60, deadline=None)
@given(
    rows=st.integers(0, 40),
    cols=st.integers(0, 40),
    density=st.sampled_from(DENSITIES),
    seed=st.integers(0, 2**31 - 1),
)
def test_csr_pattern_round_trips_any_mask(rows, cols, density, seed):
    gen = torch.Generator().manual_seed(seed)
    mask = torch.rand(rows, cols, generator=gen) < density
    p = CSRPattern.from_mask(mask)
    p.validate()
    assert p.shape == (rows, cols)
    assert p.nnz == int(mask.sum())
    assert torch.equal(p.mask(), mask)
    vals = torch.randn(p.nnz, generator=gen, dtype=torch.float64)
    dense = p.to_dense(vals)
    assert torch.equal(dense[mask], vals)  # row-major order of mask.nonzero()
    assert torch.count_nonzero(dense[~mask]) == 0
    # The stored transpose is the CSR of W^T with values vals[perm].
    pt = CSRPattern.from_mask(mask.t().contiguous())
    assert torch.equal(p.rowptr_t, pt.rowptr) and torch.equal(p.col_t, pt.col)
    assert torch.equal(pt.to_dense(vals[p.perm.long()]), dense.t())


@settings(max_examples=60, deadline=None)
@given(
    rows=st.integers(0, 30),
    cols=st.integers(0, 30),
    density=st.sampled_from(DENSITIES),
    seed=st.integers(0, 2**31 - 1),
)
def test_blocked_layout_holds_the_same_matrix(rows, cols, density, seed):
    gen = torch.Generator().manual_seed(seed)
    mask = torch.rand(rows, cols, generator=gen) < density
    p = CSRPattern.from_mask(mask)
    b = BlockedPattern.from_csr(p)
    vals = torch.randn(p.nnz, generator=gen, dtype=torch.float64)
    assert torch.equal(b.to_dense(vals, (rows, cols)), p.to_dense(vals))
    groups = (rows + BLOCK_ROWS - 1) // BLOCK_ROWS
    assert b.bptr.numel() == groups + 1 and int(b.bptr[-1]) == b.n_blocks
    # One block per (row group, column) with a kept entry, no more.
    expect = sum(int(mask[g * BLOCK_ROWS:(g + 1) * BLOCK_ROWS].any(0).sum()) for g in range(groups))
    assert b.n_blocks == expect
    assert torch.unique(b.bslot).numel() == p.nnz  # every kept value has its own slot


def test_csr_validate_rejects_inconsistent_patterns():
    p = CSRPattern.from_mask(torch.tensor([[1, 0], [1, 1]], dtype=torch.bool))
    bad = CSRPattern(p.rowptr, p.col, p.rowptr_t, p.col_t, p.perm.flip(0))
    with pytest.raises(ValueError, match="perm"):
        bad.validate()
    with pytest.raises(ValueError, match="int32"):
        CSRPattern(p.rowptr.long(), p.col, p.rowptr_t, p.col_t, p.perm).validate()
    with pytest.raises(ValueError, match="2-D"):
        CSRPattern.from_mask(torch.ones(3, dtype=torch.bool))


def test_decode_program_reads_one_record_per_layer_and_back():
    p = CSRPattern.from_mask(torch.tensor([[1, 0, 1], [0, 1, 0]], dtype=torch.bool))
    b = BlockedPattern.from_csr(p)
    w, vals = torch.randn(2, 3), torch.randn(p.nnz)
    values, index = [w, vals, vals], [*p.tensors(), *p.tensors(), *b.tensors()]
    layouts = [LAYOUT_DENSE, LAYOUT_CSR, LAYOUT_BLOCKED]
    layers = decode_program(values, index, layouts)
    assert [layer.layout for layer in layers] == ["dense", "csr", "blocked"]
    assert layers[0].csr is None and layers[0].shape == (2, 3) and layers[0].index() == []
    assert layers[1].csr.shape == (2, 3) and layers[1].blocks is None
    assert len(layers[1].index()) == 5 and len(layers[2].index()) == 8
    assert all(a is c for a, c in zip(layers[2].index(), index[5:], strict=True))
    assert layers[2].values is vals and layers[2].blocks.bslot is b.bslot
    back = encode_program(layers)
    assert back[2] == layouts and all(a is c for a, c in zip(back[0], values, strict=True))
    assert all(a is c for a, c in zip(back[1], index, strict=True))


def test_decode_program_names_what_does_not_fit():
    p = CSRPattern.from_mask(torch.ones(2, 2, dtype=torch.bool))
    w = torch.zeros(2, 2)
    with pytest.raises(ValueError, match=r"layer 1 has unknown layout code 3 \(0 dense, 1 csr"):
        decode_program([w, w], [], [LAYOUT_DENSE, 3])
    with pytest.raises(ProgramError, match="2 value tensors for 1 layers"):
        decode_program([w, w], [], [LAYOUT_DENSE])
    with pytest.raises(ValueError, match=r"4 index tensors for layouts \[0, 1\], expected 5 "
                                         r"\(0 per dense, 5 per csr, 8 per blocked layer\)"):
        decode_program([w, w.flatten()], p.tensors()[:4], [LAYOUT_DENSE, LAYOUT_CSR])
    with pytest.raises(ValueError, match="expected 8"):
        decode_program([w.flatten()], p.tensors(), [LAYOUT_BLOCKED])
    with pytest.raises(ValueError, match="a csr layer takes a CSR pattern only"):
        LayerProgram("csr", w)
    with pytest.raises(ValueError, match="unknown layout 'coo'"):
        LayerProgram("coo", w)


# ------------------------------------------------------------------------ spmm, sddmm


def _problem(shape, density, n, dtype, seed=0, device=DEVICE):
    gen = torch.Generator().manual_seed(seed)
    r, c = shape
    mask = random_mask(r, c, density, gen, empty_row=0, empty_col=min(1, c - 1)).to(device)
    p = CSRPattern.from_mask(mask)
    vals = torch.randn(p.nnz, generator=gen, dtype=torch.float64).to(device, dtype)
    x = torch.randn(c, n, generator=gen, dtype=torch.float64).to(device, dtype)
    g = torch.randn(r, n, generator=gen, dtype=torch.float64).to(device, dtype)
    return p, mask, vals, x, g


def _check_products(backend, dtype, density, shape, n):
    """spmm, its transpose, sddmm and the blocked spmm against float64 dense products
    (all measured within 1e-6 in float32, 2e-15 in float64)."""
    p, mask, vals, x, g = _problem(shape, density, n, dtype)
    w = p.to_dense(vals).double()
    y = ops.spmm(*p.tensors(), vals, x, False, backend)
    assert y.dtype == dtype and y.shape == (shape[0], n) and y.is_contiguous()
    assert_close(y, w @ x.double(), dtype, what="W x")
    yt = ops.spmm(*p.tensors(), vals, g, True, backend)
    assert_close(yt, w.t() @ g.double(), dtype, what="W^T g")
    s = ops.sddmm(*p.tensors(), g, x, backend)
    assert s.shape == (p.nnz,)
    assert_close(s, (g.double() @ x.double().t())[mask], dtype, what="sddmm")
    yb = ops.spmm_blocked(*p.tensors(), vals, *BlockedPattern.from_csr(p).tensors(), x, backend)
    assert yb.shape == (shape[0], n) and yb.is_contiguous()
    assert_close(yb, w @ x.double(), dtype, what="blocked W x")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("n", BATCHES)
def test_spmm_and_sddmm_match_dense_products(backend, dtype, density, shape, n):
    _check_products(backend, dtype, density, shape, n)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", WIDE, ids=lambda c: f"{c[0][0]}x{c[0][1]}-{c[1]}-B{c[2]}")
def test_spmm_and_sddmm_at_width_1025(backend, dtype, case):
    shape, density, n = case
    _check_products(backend, dtype, density, shape, n)


def test_cpu_spmm_of_an_empty_row_is_zero_and_reads_no_pruned_input():
    # The reference multiplies a dense matrix, where 0 * nan = nan; a sparse kernel
    # never reads the inputs of pruned places.
    backend = "cpu"
    mask = torch.tensor([[0, 0, 0], [1, 0, 1]], dtype=torch.bool)
    p = CSRPattern.from_mask(mask)
    x = torch.full((3, 9), float("nan"))
    x[0] = 1.0
    x[2] = 2.0
    y = ops.spmm(*p.tensors(), torch.tensor([3.0, 4.0]), x, False, backend)
    assert torch.equal(y[0], torch.zeros(9))
    assert torch.equal(y[1], torch.full((9,), 11.0))


@pytest.mark.parametrize("backend", BACKENDS)
def test_spmm_and_sddmm_are_differentiable_to_second_order(backend):
    p, _, vals, x, g = _problem((7, 5), 0.5, 6, torch.float64, seed=3)
    vals.requires_grad_()
    x.requires_grad_()
    g.requires_grad_()
    for tr, inp in ((False, x), (True, g)):
        fn = lambda v, a, tr=tr: ops.spmm(*p.tensors(), v, a, tr, backend)  # noqa: E731
        assert torch.autograd.gradcheck(fn, (vals, inp))
        assert torch.autograd.gradgradcheck(fn, (vals, inp))
    fn = lambda a, b: ops.sddmm(*p.tensors(), a, b, backend)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (g, x))
    assert torch.autograd.gradgradcheck(fn, (g, x))
    blocks = BlockedPattern.from_csr(p).tensors()
    fn = lambda v, a: ops.spmm_blocked(*p.tensors(), v, *blocks, a, backend)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (vals, x))
    assert torch.autograd.gradgradcheck(fn, (vals, x))


@pytest.mark.parametrize("backend", BACKENDS)
def test_sparse_ops_pass_opcheck(backend):
    p, _, vals, x, g = _problem((5, 7), 0.5, 9, torch.float64, seed=4)
    vals.requires_grad_()
    x.requires_grad_()
    torch.library.opcheck(ops.spmm, (*p.tensors(), vals, x, False, backend))
    torch.library.opcheck(ops.spmm, (*p.tensors(), vals, g.requires_grad_(), True, backend))
    torch.library.opcheck(ops.sddmm, (*p.tensors(), g, x, backend))
    blocks = BlockedPattern.from_csr(p).tensors()
    torch.library.opcheck(ops.spmm_blocked, (*p.tensors(), vals, *blocks, x, backend))


def test_cpu_backend_rejects_bad_inputs_with_clear_errors():
    p, _, vals, x, _ = _problem((5, 7), 0.5, 9, torch.float32, device="cpu")
    with pytest.raises(RuntimeError, match="x has 6 rows, expected 7"):
        ops.spmm(*p.tensors(), vals, x[:6], False, "cpu")
    with pytest.raises(RuntimeError, match="dtype"):
        ops.spmm(*p.tensors(), vals.double(), x, False, "cpu")
    with pytest.raises(ValueError, match="runs on CUDA tensors"):
        ops.spmm(*p.tensors(), vals, x, False, "triton")
    with pytest.raises(ValueError, match="not one of"):
        ops.spmm(*p.tensors(), vals, x, False, "fortran")


# ------------------------------------------------------------------- fused MLP program


def _program(widths, density, dtype, layouts, scaled, seed=0, device=DEVICE):
    """Random masked layers as (dense masked matrices, op values, op index, scales, shifts).

    The numbers are drawn in float64 and cast, so every dtype gets the same values."""
    gen = torch.Generator().manual_seed(seed)
    dense, values, index, scales, shifts = [], [], [], [], []
    for i, (n_in, n_out) in enumerate(itertools.pairwise(widths)):
        mask = random_mask(n_out, n_in, density, gen, empty_row=0, empty_col=0).to(device)
        w = torch.randn(n_out, n_in, generator=gen, dtype=torch.float64) / n_in**0.5
        w = w.to(device, dtype) * mask
        dense.append(w)
        if layouts[i] == LAYOUT_DENSE:
            values.append(w)
        else:
            p = CSRPattern.from_mask(mask)
            values.append(w[mask])
            index += p.tensors()
            if layouts[i] == LAYOUT_BLOCKED:
                index += BlockedPattern.from_csr(p).tensors()
        s = (torch.rand(n_out, generator=gen, dtype=torch.float64) + 0.5).to(device, dtype)
        empty = torch.empty(0, dtype=dtype, device=device)
        scales.append(s if scaled and i % 2 == 0 else empty)
        shifts.append(torch.randn(n_out, generator=gen, dtype=torch.float64).to(device, dtype))
    return dense, values, index, scales, shifts


def _autograd_program(z, tangents, dense, scales, shifts, act, exact):
    """f and the divergence of the same MLP by autograd on dense matrices (batch-major)."""
    zz = z.clone().requires_grad_()

    def f(h):
        for i, w in enumerate(dense):
            m = h @ w.t()
            a = (m if scales[i].numel() == 0 else m * scales[i]) + shifts[i]
            h = act_ref(a, act)[0] if i + 1 < len(dense) else a
        return h

    out = f(zz)
    div = torch.zeros(z.shape[0], dtype=z.dtype)
    for e in tangents:  # [B, d] each
        (vjp,) = torch.autograd.grad(out, zz, e, create_graph=True)
        div = div + (vjp * e).sum(1)
    return zz, out, div


@pytest.mark.parametrize("act", sorted(ACT_IDS))
@pytest.mark.parametrize("mode", ["hutchinson", "exact"])
def test_reference_program_matches_autograd(act, mode):
    dtype = torch.float64
    d, b = 3, 11
    widths = (d, 37, 1, 59, d)
    layouts = [LAYOUT_CSR, LAYOUT_DENSE, LAYOUT_CSR, LAYOUT_DENSE]
    dense, values, index, scales, shifts = _program(widths, 0.5, dtype, layouts, scaled=True,
                                                    device="cpu")
    gen = torch.Generator().manual_seed(1)
    z = torch.randn(b, d, generator=gen, dtype=dtype)
    if mode == "exact":
        tangents = [torch.eye(d, dtype=dtype)[k].expand(b, d) for k in range(d)]
    else:
        tangents = [torch.randn(b, d, generator=gen, dtype=dtype) for _ in range(2)]
    tan = torch.stack([e.t() for e in tangents]).contiguous()
    params = [t.requires_grad_() for t in (*dense, *scales, *shifts) if t.numel()]
    zz, out, div = _autograd_program(z, tangents, dense, scales, shifts, ACT_IDS[act],
                                     mode == "exact")
    values = [w.detach() for w in values]
    scales = [s.detach() for s in scales]
    shifts = [h.detach() for h in shifts]
    f, dv, saved = mlp_fwd_ref(z.t().contiguous(), tan, tan, values, index, scales, shifts,
                               layouts, ACT_IDS[act], mode == "exact", True)
    assert_close(f.t(), out, dtype, what="f")
    assert_close(dv, div, dtype, factor=100, what="div")
    gf = torch.randn(b, d, generator=gen, dtype=dtype)
    gd = torch.randn(b, generator=gen, dtype=dtype)
    ref_grads = torch.autograd.grad((out * gf).sum() + (div * gd).sum(), [zz, *params],
                                    allow_unused=True)
    g_x, g_w, g_s, g_h = mlp_bwd_ref(gf.t().contiguous(), gd, z.t().contiguous(), tan, tan,
                                     values, index, scales, shifts, layouts, ACT_IDS[act],
                                     mode == "exact", saved)
    assert_close(g_x.t(), ref_grads[0], dtype, factor=100, what="grad z")
    got = []
    for i, g in enumerate(g_w):
        mask = dense[i].detach() != 0
        got.append(g * mask if layouts[i] == LAYOUT_DENSE else
                   CSRPattern.from_mask(mask).to_dense(g))
    got += [g for g in g_s if g.numel()] + list(g_h)
    masks = [w.detach() != 0 for w in dense]
    for k, (g, r) in enumerate(zip(got, ref_grads[1:], strict=True)):
        r = torch.zeros_like(g) if r is None else r
        if k < len(dense):
            r = r * masks[k]
        assert_close(g, r, dtype, factor=100, what=f"grad {k}")


def _fused_case(dtype, widths, density, mode, b, act, layouts, scaled=True, seed=0,
                device=DEVICE):
    """mlp_fwd's arguments but ``save`` and ``backend``; the same numbers for every dtype."""
    _, values, index, scales, shifts = _program(widths, density, dtype, layouts, scaled, seed,
                                                device)
    gen = torch.Generator().manual_seed(seed + 1)
    d = widths[0]
    x0 = torch.randn(d, b, generator=gen, dtype=torch.float64).to(device, dtype)
    if mode == "exact":
        tan0 = torch.eye(d, dtype=dtype, device=device)[:, :, None].expand(d, d, b).contiguous()
    elif mode == "hutchinson":
        tan0 = torch.randn(1, d, b, generator=gen, dtype=torch.float64).to(device, dtype)
    else:
        tan0 = torch.empty(0, d, b, dtype=dtype, device=device)
    probe = tan0 if mode == "hutchinson" else torch.empty(0, dtype=dtype, device=device)
    return (x0, tan0, probe, values, index, scales, shifts, layouts, ACT_IDS[act],
            mode == "exact")


FUSED_CASES = [
    # (widths, density, mode, batch, act)
    ((2, 64, 64, 64, 2), 1.0, "hutchinson", 1025, "sigmoid"),
    ((2, 64, 64, 64, 2), 0.3, "exact", 37, "tanh"),
    ((1, 37, 1), 0.5, "hutchinson", 1, "softplus"),
    ((3, 59, 37, 3), 0.9, "none", 37, "relu"),
    ((3, 59, 37, 3), 0.99, "exact", 1025, "elu"),
    ((5, 37, 59, 5), 0.0, "hutchinson", 37, "swish"),
    ((5, 37, 59, 5), 0.5, "hutchinson", 37, "identity"),
    # Width 1025 as a layer width (input and output of a hidden layer).
    ((3, 1025, 59, 3), 0.5, "hutchinson", 37, "tanh"),
    ((2, 59, 1025, 2), 0.99, "exact", 5, "softplus"),
]


def _check_accuracy(what, got, ref, truth, terms, forward=False):
    """A backend's result against the reference backend's (see _check_field in
    test_engine_compile): float64 within F64_F_TOL (f) / F64_TOL (everything else) of
    the reference; float32 within ``contract_tol`` of the float32 reference's own error
    against the float64 truth (``terms``: the program's sums, ``field_terms``)."""
    if got.dtype == torch.float64:
        err, tol = rel_err(got, ref), contract_tol(torch.float64, 0.0, terms, forward)
        assert err <= tol, f"{what}: relative error {err:.3g} > {tol:.1g}"
        return
    err, ref_err = rel_err(got, truth), rel_err(ref, truth)
    tol = contract_tol(torch.float32, ref_err, terms, forward)
    assert err <= tol, f"{what}: relative error {err:.3g} > {tol:.3g} (reference {ref_err:.3g})"


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", FUSED_CASES, ids=lambda c: f"{c[0]}-{c[1]}-{c[2]}-B{c[3]}-{c[4]}")
@pytest.mark.parametrize("layout", ["dense", "csr", "blocked", "mixed"])
def test_fused_program_backends_match_reference(backend, dtype, case, layout):
    widths, density, mode, b, act = case
    n = len(widths) - 1
    cycle = (LAYOUT_DENSE, LAYOUT_CSR, LAYOUT_BLOCKED)
    layouts = {"dense": [LAYOUT_DENSE] * n, "csr": [LAYOUT_CSR] * n,
               "blocked": [LAYOUT_BLOCKED] * n,
               "mixed": [cycle[i % 3] for i in range(n)]}[layout]
    args = _fused_case(dtype, widths, density, mode, b, act, layouts)
    f, div, saved = ops.mlp_fwd(*args, True, backend)
    rf, rdiv, rsaved = ops.mlp_fwd(*args, True, "ref")
    # The truth: the reference backend in float64 on the same numbers.
    args64 = _fused_case(torch.float64, widths, density, mode, b, act, layouts)
    tf, tdiv, tsaved = ops.mlp_fwd(*args64, True, "ref")
    terms = program_terms(list(widths[:-1]), b, widths[0])
    _check_accuracy("f", f, rf, tf, terms, forward=True)
    if mode != "none":
        _check_accuracy("div", div, rdiv, tdiv, terms)
    else:
        assert torch.equal(div, torch.zeros_like(div))
    assert len(saved) == len(rsaved) == 2 * n - 1
    for i, (s, r, t) in enumerate(zip(saved, rsaved, tsaved, strict=True)):
        _check_accuracy(f"saved {i}", s, r, t, terms, forward=True)
    # Without save, nothing is kept and the result is the same.
    f2, div2, saved2 = ops.mlp_fwd(*args, False, backend)
    assert saved2 == [] and torch.equal(f2, f) and torch.equal(div2, div)
    gen = torch.Generator().manual_seed(9)
    gf = torch.randn(f.shape, generator=gen, dtype=torch.float64).to(DEVICE)
    gd = torch.randn(div.shape, generator=gen, dtype=torch.float64).to(DEVICE)
    got = ops.mlp_bwd(gf.to(dtype), gd.to(dtype), *args[:-1], args[-1], saved, backend)
    ref = ops.mlp_bwd(gf.to(dtype), gd.to(dtype), *args[:-1], args[-1], rsaved, "ref")
    truth = ops.mlp_bwd(gf, gd, *args64[:-1], args64[-1], tsaved, "ref")
    _check_accuracy("grad x0", got[0], ref[0], truth[0], terms)
    for k, what in ((1, "weights"), (2, "scales"), (3, "shifts")):
        for i, (g, r, t) in enumerate(zip(got[k], ref[k], truth[k], strict=True)):
            assert g.shape == r.shape
            if r.numel():
                _check_accuracy(f"grad {what} {i}", g, r, t, terms)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_program_gradcheck_and_opcheck(backend):
    dtype = torch.float64
    layouts = [LAYOUT_CSR, LAYOUT_DENSE, LAYOUT_BLOCKED]
    x0, tan0, probe, values, index, scales, shifts, layouts, act, exact = _fused_case(
        dtype, (3, 5, 6, 3), 0.6, "hutchinson", 4, "tanh", layouts)
    x0.requires_grad_()
    for w in (*values, *[s for s in scales if s.numel()], *shifts):
        w.requires_grad_()
    args = (x0, tan0, probe, values, index, scales, shifts, layouts, act, exact, True, backend)
    torch.library.opcheck(ops.mlp_fwd, args)

    def fn(x0, *params):
        it = iter(params)
        vs = [next(it) for _ in values]
        ss = [next(it) if s.numel() else s for s in scales]
        hs = [next(it) for _ in shifts]
        return ops.mlp_fwd(x0, tan0, probe, vs, index, ss, hs, layouts, act, exact, True,
                           backend)[:2]

    params = (*values, *[s for s in scales if s.numel()], *shifts)
    assert torch.autograd.gradcheck(fn, (x0, *params))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["hutchinson", "exact"])
def test_fused_backward_passes_opcheck(backend, mode):
    layouts = [LAYOUT_CSR, LAYOUT_DENSE, LAYOUT_BLOCKED]
    args = _fused_case(torch.float64, (3, 5, 6, 3), 0.6, mode, 4, "tanh", layouts)
    f, div, saved = ops.mlp_fwd(*args, True, backend)
    gen = torch.Generator().manual_seed(10)
    gf = torch.randn(f.shape, generator=gen, dtype=torch.float64).to(DEVICE)
    gd = torch.randn(div.shape, generator=gen, dtype=torch.float64).to(DEVICE)
    torch.library.opcheck(ops.mlp_bwd, (gf, gd, *args, saved, backend))


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b in REDUCED_BACKENDS])
@pytest.mark.parametrize("precision", ("bf16", "fp16"))
def test_reduced_precision_program_passes_opcheck_and_stays_near_the_exact_one(backend, precision):
    layouts = [LAYOUT_CSR, LAYOUT_DENSE, LAYOUT_BLOCKED]
    args = _fused_case(torch.float32, (3, 37, 59, 3), 0.6, "hutchinson", 5, "tanh", layouts)
    x0, tan0, probe, values, index, scales, shifts, layouts, act, exact = args
    x0 = x0.clone().requires_grad_()
    shifts = [h.clone().requires_grad_() for h in shifts]
    op_args = (x0, tan0, probe, values, index, scales, shifts, layouts, act, exact, True,
               backend, precision)
    torch.library.opcheck(ops.mlp_fwd, op_args)
    f, div, saved = ops.mlp_fwd(*op_args)
    saved_const = [t.detach() for t in saved]  # mlp_bwd itself is not differentiable
    torch.library.opcheck(ops.mlp_bwd, (torch.ones_like(f), torch.ones_like(div), *args,
                                        saved_const, backend, precision))
    # Against the exact program: off by the rounding (not by more), and not exact.
    fe, _, _ = ops.mlp_fwd(*args, False, backend)
    err = ((f - fe).norm() / fe.norm()).item()
    unit = {"bf16": 2.0 ** -8, "fp16": 2.0 ** -11}[precision]
    assert unit / 100 < err < unit, err
    # The gradient reaches x0 and the shifts through the hand-written backward.
    (f.sum() + div.sum()).backward()
    assert x0.grad is not None and all(h.grad is not None for h in shifts)


@pytest.mark.parametrize("precision", ("bf16", "fp16"))
def test_reference_rounds_the_operands_of_every_product_by_hand(precision):
    # The reference against the program written out in float64 from rounded operands:
    # what the kernels are held to must itself be right.
    low = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]

    def r(t):
        return t.to(low).double()

    gen = torch.Generator().manual_seed(3)
    n0, n1, d, b = 5, 7, 4, 6
    x0, tan0 = torch.randn(n0, b, generator=gen), torch.randn(1, n0, b, generator=gen)
    probe = torch.randn(1, d, b, generator=gen)
    w1, w2 = torch.randn(n1, n0, generator=gen), torch.randn(d, n1, generator=gen)
    h1, h2 = torch.randn(n1, generator=gen), torch.randn(d, generator=gen)
    none = torch.empty(0)
    x_in = torch.cat([x0, tan0[0]], 1)
    # Two layers forward: the hidden activations and tangents are rounded too.
    f, div, _ = mlp_fwd_ref(x0, tan0, probe, [w1, w2], [], [none, none], [h1, h2],
                            [LAYOUT_DENSE] * 2, ACT_IDS["tanh"], False, False,
                            precision=precision)
    m1 = r(w1) @ r(x_in)
    a1 = m1[:, :b] + h1.double()[:, None]
    x1 = torch.cat([torch.tanh(a1), (1 - torch.tanh(a1) ** 2) * m1[:, b:]], 1).float()
    m2 = r(w2) @ r(x1)
    torch.testing.assert_close(f.double(), m2[:, :b] + h2.double()[:, None], rtol=1e-6,
                               atol=1e-6)
    torch.testing.assert_close(div.double(), (probe[0].double() * m2[:, b:]).sum(0),
                               rtol=1e-5, atol=1e-5)
    # One layer backward: W^T Mbar and Mbar X^T both take rounded operands.
    gf, gd = torch.randn(d, b, generator=gen), torch.randn(b, generator=gen)
    _, _, saved = mlp_fwd_ref(x0, tan0, probe, [w2[:, :n0]], [], [none], [h2], [LAYOUT_DENSE],
                              ACT_IDS["tanh"], False, True, precision=precision)
    gx, gw, _, gh = mlp_bwd_ref(gf, gd, x0, tan0, probe, [w2[:, :n0]], [], [none], [h2],
                                [LAYOUT_DENSE], ACT_IDS["tanh"], False, saved,
                                precision=precision)
    mbar = torch.cat([gf, probe[0] * gd], 1)
    torch.testing.assert_close(gw[0].double(), r(mbar) @ r(x_in).t(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gx.double(), r(w2[:, :n0]).t() @ r(mbar)[:, :b], rtol=1e-6,
                               atol=1e-6)
    torch.testing.assert_close(gh[0], gf.sum(1))


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_program_refuses_a_second_derivative(backend):
    args = _fused_case(torch.float64, (2, 4, 2), 1.0, "hutchinson", 3, "tanh",
                       [LAYOUT_DENSE, LAYOUT_DENSE])
    x0 = args[0].requires_grad_()
    _, div, _ = ops.mlp_fwd(*args, True, backend)
    (g,) = torch.autograd.grad(div.sum(), x0)  # first order works
    assert g.shape == x0.shape
    _, div, _ = ops.mlp_fwd(*args, True, backend)
    with pytest.raises(RuntimeError, match="differentiable once"):
        torch.autograd.grad(div.sum(), x0, create_graph=True)


def _meta(a):
    """``a`` with every tensor (also inside lists) on the meta device: the ops' fakes run."""
    if isinstance(a, torch.Tensor):
        return a.to("meta")
    return [_meta(t) for t in a] if isinstance(a, list) else a


def _set(i, j, fn):
    def apply(args):
        if j is None:
            args[i] = fn(args[i])
        else:
            args[i] = [fn(t) if k == j else t for k, t in enumerate(args[i])]
    return apply


# (what, how the arguments break, error type, message): layer 0 csr [5, 3] with a
# scale, layer 1 dense [6, 5], layer 2 blocked [3, 6]; B = 4, one Hutchinson tangent.
BROKEN_PROGRAMS = [
    ("shift", _set(6, 0, lambda t: t[:3]), ProgramError,
     r"sparsekern::mlp_fwd: layer 0 shift has shape \[3\], expected \[5\]"),
    ("scale", _set(5, 0, lambda t: t[:2]), ProgramError,
     r"layer 0 scale has shape \[2\], expected \[5\], or \[0\] for none"),
    ("fan-in", _set(3, 1, lambda t: t[:, :4]), ProgramError,
     "layer 1 reads 4 features, the previous layer gives 5"),
    ("dtype", _set(3, 1, lambda t: t.float()), ProgramTypeError,
     r"layer 1 weights \(values\[1\]\) is torch.float32, expected x0's torch.float64"),
    ("kept values", _set(3, 0, lambda t: t[:-1]), ProgramError,
     r"layer 0 values have shape \[\d+\], expected \[\d+\] \(its kept places\)"),
    ("index dtype", _set(4, 1, lambda t: t.long()), ProgramTypeError,
     "layer 0 col must be a 1-D int32 tensor, got torch.int64"),
    ("blocks", _set(4, 10, lambda t: t[:-1]), ProgramError,
     "layer 2 bptr has 1 entries for 3 rows in groups of 4"),
    ("tangents", _set(1, None, lambda t: t[:, :2]), ProgramError,
     r"tan0 must be \[K, 3, 4\], got \[1, 2, 4\]"),
    ("probe", _set(2, None, lambda t: t[:, :2]), ProgramError,
     r"probe must be \[1, 3, 4\], got \[1, 2, 4\]"),
    ("activation", _set(8, None, lambda a: 9), ProgramError, "unknown activation id 9"),
    ("device", _set(6, 2, lambda t: t.to("meta")), ProgramError,
     "layer 2 shift is on meta, x0 on cpu"),
]


@pytest.mark.parametrize(("case", "fake"), [
    (c, fake) for c in BROKEN_PROGRAMS for fake in (False, True)
    if not (fake and c[0] == "device")  # every fake tensor is on meta
], ids=lambda v: v[0] if isinstance(v, tuple) else ("fake" if v else "eager"))
def test_one_program_check_serves_the_fakes_and_the_eager_path(case, fake):
    # The same check_program runs in the op's eager path (before any backend) and in its
    # fake, so a traced call fails as the eager one does, naming what is wrong.
    _, breaks, error, message = case
    args = list(_fused_case(torch.float64, (3, 5, 6, 3), 0.6, "hutchinson", 4, "tanh",
                            [LAYOUT_CSR, LAYOUT_DENSE, LAYOUT_BLOCKED], device="cpu"))
    ops.mlp_fwd(*(_meta(args) if fake else args), False, "ref")  # intact: runs
    breaks(args)
    with pytest.raises(error, match=message) as caught:
        ops.mlp_fwd(*(_meta(args) if fake else args), False, "ref")
    assert isinstance(caught.value, RuntimeError), "torch's op checks raise RuntimeErrors"


@pytest.mark.parametrize("fake", [False, True], ids=["eager", "fake"])
def test_the_backward_checks_its_cotangents_and_saved_list(fake):
    args = _fused_case(torch.float64, (3, 5, 6, 3), 0.6, "exact", 4, "tanh",
                       [LAYOUT_CSR, LAYOUT_DENSE, LAYOUT_BLOCKED], device="cpu")
    f, div, saved = ops.mlp_fwd(*args, True, "ref")
    call = [torch.ones_like(f), torch.ones_like(div), *args, saved, "ref"]
    run = (lambda a: ops.mlp_bwd(*_meta(a))) if fake else (lambda a: ops.mlp_bwd(*a))
    g_x, g_v, g_s, g_h = run(call)
    assert [g.shape for g in g_s] == [s.shape for s in args[5]]
    assert [g.shape for g in g_v] == [v.shape for v in args[3]]
    assert g_x.shape == args[0].shape and [g.shape for g in g_h] == [h.shape for h in args[6]]
    with pytest.raises(ProgramError, match=r"sparsekern::mlp_bwd: saved must be the 5 tensors "
                                           r"of mlp_fwd\(save=True\) with shapes \[\[5, 16\]"):
        run([*call[:-2], saved[:4], "ref"])
    with pytest.raises(ProgramError, match=r"grad_f must be \[3, 4\] and grad_div \[4\], got "
                                           r"\[3, 3\] and \[4\]"):
        run([call[0][:, :3], *call[1:]])


def test_fused_program_without_saved_activations_has_no_backward():
    args = _fused_case(torch.float64, (2, 4, 2), 1.0, "hutchinson", 3, "tanh",
                       [LAYOUT_DENSE, LAYOUT_DENSE], device="cpu")
    args[0].requires_grad_()
    _, div, _ = ops.mlp_fwd(*args, False, "cpu")
    with pytest.raises(RuntimeError, match="save=False"):
        div.sum().backward()


def test_cpu_fused_program_checks_shapes():
    args = list(_fused_case(torch.float32, (2, 4, 2), 1.0, "exact", 3, "tanh",
                            [LAYOUT_DENSE, LAYOUT_DENSE], device="cpu"))
    args[1] = args[1][:1]  # one tangent where the exact trace needs d = 2
    with pytest.raises(RuntimeError, match="exact trace needs K = d = 2"):
        ops.mlp_fwd(*args, False, "cpu")
    args = list(_fused_case(torch.float32, (2, 4, 2), 1.0, "none", 3, "tanh",
                            [LAYOUT_DENSE, LAYOUT_DENSE], device="cpu"))
    args[6] = [args[6][0][:3], args[6][1]]
    with pytest.raises(RuntimeError, match="layer 0 shift has shape"):
        ops.mlp_fwd(*args, False, "cpu")


@pytest.mark.parametrize("act", sorted(ACT_IDS))
def test_activation_derivatives_match_autograd(act):
    a = torch.linspace(-25, 25, 2001, dtype=torch.float64)
    a = torch.cat([a, torch.tensor([0.0, 20.0, 20.5, -1e-9])]).requires_grad_()
    h, d1, d2 = act_ref(a, ACT_IDS[act])
    (g1,) = torch.autograd.grad(h.sum(), a, create_graph=True)
    if g1.requires_grad:  # identity's derivative is a constant with no graph
        (g2,) = torch.autograd.grad(g1.sum(), a, allow_unused=True)
    else:
        g2 = None
    g2 = torch.zeros_like(a) if g2 is None else g2
    assert torch.allclose(d1, g1, atol=1e-12), act
    assert torch.allclose(d2, g2, atol=1e-10), act
    module = {"tanh": torch.nn.Tanh(), "sigmoid": torch.nn.Sigmoid(),
              "softplus": torch.nn.Softplus(), "relu": torch.nn.ReLU(), "elu": torch.nn.ELU(),
              "swish": torch.nn.SiLU(), "identity": torch.nn.Identity()}[act]
    assert torch.equal(h, module(a))


def _activation_through_the_program(act: str, a: torch.Tensor, backend: str):
    """sigma(a) and sigma'(a) from the fused program of the 1-1-1 MLP a -> sigma(a) -> itself."""
    dt = a.dtype
    one = torch.ones(1, 1, dtype=dt)
    f, div, _ = ops.mlp_fwd(a[None].contiguous(), torch.ones(1, 1, a.numel(), dtype=dt),
                            a.new_empty(0), [one, one.clone()], [], [a.new_empty(0)] * 2,
                            [a.new_zeros(1)] * 2, [0, 0], ACT_IDS[act], True, False, backend)
    return f[0], div


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act", ["tanh", "sigmoid", "softplus", "elu", "swish"])
def test_activations_are_accurate_over_the_whole_range(backend, dtype, act):
    # The CPU kernels compute these with their own exp/log1p/tanh approximations
    # (csrc/cpu/kernels.h): every value within a few ulps of the float64 truth,
    # across the branch points (|a| = 0.5 for tanh, 20 for softplus), tiny and
    # huge arguments, and the exp range limits; NaN stays NaN.
    gen = torch.Generator().manual_seed(11)
    a = torch.cat([
        torch.linspace(-30, 30, 60001, dtype=torch.float64),
        torch.randn(20000, generator=gen, dtype=torch.float64) * 4,
        torch.logspace(-12, 2, 2000, dtype=torch.float64),
        -torch.logspace(-12, 2, 2000, dtype=torch.float64),
        torch.tensor([0.0, -0.0, 0.5, -0.5, 0.4999999, 0.5000001, 20.0, 20.0000019, 19.999998,
                      -87.3, -87.4, -88.8, -104.0, 88.0, 88.8, 1e4, -1e4], dtype=torch.float64),
    ]).to(dtype)
    h, d1 = _activation_through_the_program(act, a, backend)
    x = a.double().requires_grad_()
    truth = ACT_FNS[act](x)
    (truth_d1,) = torch.autograd.grad(truth.sum(), x)
    eps = torch.finfo(dtype).eps
    # Below this, values are lost to the exponent range (torch's own too: its float32
    # silu(-88.8) is 0 where the truth is -2.4e-37).
    tiny = 1e-30 if dtype == torch.float32 else 1e-300
    # Values: relative error; derivatives lie in [0, 1.1], so also an absolute eps
    # (1 - tanh^2 where tanh rounds to 1 cannot do better, nor can torch's own).
    err_h = (h.double() - truth).abs() - (8 * eps * truth.abs() + tiny)
    err_d = (d1.double() - truth_d1).abs() - (8 * eps * truth_d1.abs() + 2 * eps)
    assert err_h.max() <= 0, f"{act} at a={a[err_h.argmax()].item()}"
    assert err_d.max() <= 0, f"{act}' at a={a[err_d.argmax()].item()}"
    nan = torch.full((9,), float("nan"), dtype=dtype)
    h_nan, d_nan = _activation_through_the_program(act, nan, backend)
    assert h_nan.isnan().all() and d_nan.isnan().all()


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("which", ["tan0", "probe"])
def test_tangents_and_probes_of_another_dtype_are_refused_by_name(backend, which):
    # The C++ kernels read every float input through x0's element type (void* in the
    # CUDA ABI): a float64 probe beside float32 weights would be reinterpreted, not
    # converted. Every backend must refuse it, naming the tensor.
    _, values, index, scales, shifts = _program((3, 8, 3), 0.5, torch.float32,
                                                [LAYOUT_DENSE, LAYOUT_CSR], False)
    x0 = torch.randn(3, 4, device=DEVICE)
    tan0 = torch.randn(1, 3, 4, device=DEVICE)
    probe = torch.randn(1, 3, 4, device=DEVICE)
    if which == "tan0":
        tan0 = tan0.double()
    else:
        probe = probe.double()
    with pytest.raises((TypeError, RuntimeError), match=which):
        ops.mlp_fwd(x0, tan0, probe, values, index, scales, shifts,
                    [LAYOUT_DENSE, LAYOUT_CSR], ACT_IDS["tanh"], False, False, backend)
