"""The sparse convolution ops (sparsekern::conv2d, conv2d_t, conv2d_wgrad) of the "ref" and
"cpu" backends against float64 truths, their autograd to second order, opcheck, fakes and
input checks. Tolerances and the reusable parts: tests/conv_helpers.py (a Triton or CUDA
test file imports them with its own backend). The compiled convolution modules built on
these ops: tests/test_conv_engine.py.
"""

from __future__ import annotations

import pytest
import torch
from conv_helpers import (
    CONV_CASES,
    CONV_DTYPES,
    GRAD_CASES,
    PRUNED,
    ConvCase,
    check_conv_grads,
    check_conv_opcheck,
    check_conv_ops,
    conv_problem,
    random_conv_pattern,
    run_conv_ops,
)
from torch._subclasses.fake_tensor import FakeTensorMode

from sparsekern import ops
from sparsekern.backends import cpu as cpu_backend
from sparsekern.formats import CSRPattern

CONV_BACKENDS = ("ref", "cpu")


@pytest.fixture(params=CONV_BACKENDS)
def backend(request) -> str:
    return request.param


# ----------------------------------------------------------------------- numbers


@pytest.mark.parametrize("dtype", CONV_DTYPES, ids=str)
@pytest.mark.parametrize("pruned", PRUNED)
@pytest.mark.parametrize("case", CONV_CASES, ids=str)
def test_conv_ops_match_the_float64_truth(backend, case, pruned, dtype):
    check_conv_ops(backend, case, pruned, dtype,
                   seed=10 * CONV_CASES.index(case) + PRUNED.index(pruned))


@pytest.mark.parametrize("dtype", CONV_DTYPES, ids=str)
def test_conv_ops_of_kept_taps_with_zero_values_are_zero(backend, dtype):
    case = ConvCase(5, 4, 3, 1, 1, 5, 7, 2)
    p = conv_problem(case, 0.5, dtype)
    p.vals.zero_()
    out = run_conv_ops(p, backend)
    assert torch.count_nonzero(out["conv2d"]) == 0
    assert torch.count_nonzero(out["conv2d_t"]) == 0
    assert out["conv2d_wgrad"].shape == (p.vals.numel(),)  # not zero: it does not read vals


def test_cpu_conv_reads_no_pruned_input():
    # A dead input channel full of NaN: the reference multiplies it by zeros (NaN), the
    # sparse kernels never read it. Likewise conv2d_t with NaN in a dead output channel.
    gen = torch.Generator().manual_seed(5)
    index, vals, _ = random_conv_pattern(4, 3, 3, 3, 0.3, gen, dead_out=2, dead_in=1,
                                         dtype=torch.float32)
    x = torch.randn(3, 2, 6, 5, generator=gen)
    x[1] = float("nan")
    y = ops.conv2d(*index, vals, x, 4, 3, 3, 1, 1, "cpu")
    assert torch.isfinite(y).all()
    assert torch.count_nonzero(y[2]) == 0
    g = torch.randn(4, 2, 6, 5, generator=gen)
    g[2] = float("nan")
    gx = ops.conv2d_t(*index, vals, g, 3, 6, 5, 3, 3, 1, 1, "cpu")
    assert torch.isfinite(gx).all()
    assert torch.count_nonzero(gx[1]) == 0
    gw = ops.conv2d_wgrad(*index, torch.nan_to_num(g), x, 3, 3, 1, 1, "cpu")
    assert torch.isfinite(gw).all()


@pytest.mark.parametrize("dtype", CONV_DTYPES, ids=str)
def test_cpu_conv_and_conv_t_do_not_depend_on_the_thread_count(dtype):
    # Each output sums its taps in CSR order whatever the work split (sparse_conv.cpp).
    case = ConvCase(37, 16, 3, 1, 1, 9, 9, 30)
    p = conv_problem(case, 0.5, dtype, seed=2)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run_conv_ops(p, "cpu")
        torch.set_num_threads(max(2, threads))
        many = run_conv_ops(p, "cpu")
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one["conv2d"], many["conv2d"])
    assert torch.equal(one["conv2d_t"], many["conv2d_t"])


def test_cpu_conv_accepts_non_contiguous_inputs():
    case = ConvCase(3, 4, 3, 1, 1, 5, 6, 2)
    p = conv_problem(case, 0.5, torch.float64)
    xt = p.x.transpose(2, 3).contiguous().transpose(2, 3)  # same values, other strides
    assert not xt.is_contiguous()
    ext = cpu_backend.extension()
    y = ext.conv2d(*p.index, p.vals, xt, 4, 3, 3, 1, 1)
    assert torch.equal(y, ext.conv2d(*p.index, p.vals, p.x, 4, 3, 3, 1, 1))


# ----------------------------------------------------------------------- autograd


@pytest.mark.parametrize("case", GRAD_CASES, ids=str)
def test_conv_ops_are_differentiable_to_second_order(backend, case):
    check_conv_grads(backend, case)


@pytest.mark.parametrize("case", GRAD_CASES[:2], ids=str)
def test_conv_ops_pass_opcheck(backend, case):
    check_conv_opcheck(backend, case)


def test_conv2d_backward_is_conv2d_t_and_wgrad(backend):
    # The autograd formulas route through the ops themselves (any order of derivatives).
    case = ConvCase(3, 4, 3, 2, 1, 5, 6, 2)
    p = conv_problem(case, 0.5, torch.float64)
    vals, x = p.vals.requires_grad_(), p.x.requires_grad_()
    y = ops.conv2d(*p.index, vals, x, 4, 3, 3, 2, 1, backend)
    gv, gx = torch.autograd.grad(y, (vals, x), p.g)
    assert torch.equal(gv, ops.conv2d_wgrad(*p.index, p.g, x.detach(), 3, 3, 2, 1, backend))
    assert torch.equal(gx, ops.conv2d_t(*p.index, vals.detach(), p.g, 3, 5, 6, 3, 3, 2, 1,
                                        backend))


# ---------------------------------------------------------------------- fakes


def test_conv_fakes_give_the_output_shapes():
    case = ConvCase(3, 5, 3, 2, 1, 7, 6, 4)
    p = conv_problem(case, 0.5, torch.float32)
    ho, wo = case.out_size
    with FakeTensorMode() as mode:
        index = [mode.from_tensor(t) for t in p.index]
        vals, x, g = (mode.from_tensor(t) for t in (p.vals, p.x, p.g))
        y = ops.conv2d(*index, vals, x, 5, 3, 3, 2, 1, "cpu")
        gx = ops.conv2d_t(*index, vals, g, 3, 7, 6, 3, 3, 2, 1, "cpu")
        gw = ops.conv2d_wgrad(*index, g, x, 3, 3, 2, 1, "cpu")
    assert y.shape == (5, 4, ho, wo) and y.dtype == torch.float32
    assert gx.shape == (3, 4, 7, 6)
    assert gw.shape == (p.vals.numel(),)


def test_conv_fakes_check_shapes():
    case = ConvCase(3, 5, 3, 1, 1, 7, 6, 4)
    p = conv_problem(case, 0.5, torch.float32)
    with FakeTensorMode() as mode:
        index = [mode.from_tensor(t) for t in p.index]
        vals, x, g = (mode.from_tensor(t) for t in (p.vals, p.x, p.g))
        with pytest.raises(RuntimeError, match=r"sparsekern::conv2d: x has shape \[2, 4, 7, 6\], "
                                               r"expected \[3, 4, 7, 6\]"):
            ops.conv2d(*index, vals, x[:2], 5, 3, 3, 1, 1, "cpu")
        with pytest.raises(RuntimeError, match=r"conv2d_t: g has shape \[5, 4, 6, 6\], "
                                               r"expected \[5, 4, 7, 6\]"):
            ops.conv2d_t(*index, vals, g[:, :, :6], 3, 7, 6, 3, 3, 1, 1, "cpu")


def test_conv_ops_compile_without_graph_breaks():
    case = ConvCase(3, 4, 3, 1, 1, 5, 6, 2)
    p = conv_problem(case, 0.5, torch.float32)

    def f(vals, x):
        y = ops.conv2d(*p.index, vals, x, 4, 3, 3, 1, 1, "cpu")
        return ops.conv2d_t(*p.index, vals, y, 3, 5, 6, 3, 3, 1, 1, "cpu")

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(p.vals, p.x), f(p.vals, p.x))


# ---------------------------------------------------------------------- errors


def _small():
    return conv_problem(ConvCase(3, 4, 3, 1, 1, 5, 6, 2), 0.5, torch.float32)


def test_conv_ops_reject_bad_inputs_with_clear_errors(backend):
    p = _small()
    idx = p.index
    with pytest.raises(RuntimeError, match=r"conv2d: x has shape \[2, 2, 5, 6\], expected "
                                           r"\[3, 2, 5, 6\]"):
        ops.conv2d(*idx, p.vals, p.x[:2], 4, 3, 3, 1, 1, backend)
    with pytest.raises(RuntimeError, match="rowptr has 5 entries, expected C_out"):
        ops.conv2d(*idx, p.vals, p.x, 5, 3, 3, 1, 1, backend)
    with pytest.raises(RuntimeError, match=r"col must be a 1-D int32 tensor, got torch\.int64"):
        ops.conv2d(idx[0], idx[1].long(), *idx[2:], p.vals, p.x, 4, 3, 3, 1, 1, backend)
    with pytest.raises(RuntimeError, match=r"vals must have shape \["):
        ops.conv2d(*idx, p.vals[1:], p.x, 4, 3, 3, 1, 1, backend)
    with pytest.raises(RuntimeError, match=r"x has dtype torch\.float64, expected torch\.float32"):
        ops.conv2d(*idx, p.vals, p.x.double(), 4, 3, 3, 1, 1, backend)
    with pytest.raises(RuntimeError, match="must be 4-D"):
        ops.conv2d(*idx, p.vals, p.x[0], 4, 3, 3, 1, 1, backend)
    with pytest.raises(RuntimeError, match="rowptr_t has 28 entries, expected C_in"):
        ops.conv2d(*idx, p.vals, p.x, 4, 2, 2, 1, 1, backend)
    with pytest.raises(ValueError, match=r"a 1 x 1 input with a 3 x 3 kernel, stride 1 and "
                                         r"padding 0 has output size -1 x -1; both must be >= 1"):
        ops.conv2d(*idx, p.vals, p.x[:, :, :1, :1], 4, 3, 3, 1, 0, backend)
    with pytest.raises(ValueError, match="stride must be >= 1"):
        ops.conv2d(*idx, p.vals, p.x, 4, 3, 3, 0, 1, backend)
    with pytest.raises(ValueError, match="padding must be >= 0"):
        ops.conv2d(*idx, p.vals, p.x, 4, 3, 3, 1, -1, backend)
    with pytest.raises(RuntimeError, match="conv2d_t: rowptr_t has 28 entries, expected C_in"):
        ops.conv2d_t(*idx, p.vals, p.g, 2, 5, 6, 3, 3, 1, 1, backend)
    with pytest.raises(RuntimeError, match=r"conv2d_t: g has shape \[4, 2, 5, 6\], expected "
                                           r"\[4, 2, 4, 6\]"):
        ops.conv2d_t(*idx, p.vals, p.g, 3, 4, 6, 3, 3, 1, 1, backend)
    with pytest.raises(ValueError, match="conv2d_t: a 1 x 6 input"):
        ops.conv2d_t(*idx, p.vals, p.g, 3, 1, 6, 3, 3, 1, 0, backend)
    with pytest.raises(RuntimeError, match=r"conv2d_wgrad: g has shape \[4, 1, 5, 6\], expected "
                                           r"\[4, 2, 5, 6\]"):
        ops.conv2d_wgrad(*idx, p.g[:, :1], p.x, 3, 3, 1, 1, backend)
    with pytest.raises(RuntimeError, match=r"perm must be a 1-D int32 tensor, got torch\.int64"):
        ops.conv2d_wgrad(*idx[:4], idx[4].long(), p.g, p.x, 3, 3, 1, 1, backend)
    with pytest.raises(ValueError, match="not one of"):
        ops.conv2d(*idx, p.vals, p.x, 4, 3, 3, 1, 1, "fortran")


def test_cpu_kernels_check_their_inputs_themselves():
    # The extension's entry points are callable without the op layer: they check too.
    ext = cpu_backend.extension()
    p = _small()
    idx = p.index
    with pytest.raises(RuntimeError, match="sparsekern::conv2d: x has 2 channels, the pattern "
                                           "has 3"):
        ext.conv2d(*idx, p.vals, p.x[:2], 4, 3, 3, 1, 1)
    with pytest.raises(RuntimeError, match="col must be a contiguous 1-D int32 tensor, got Long"):
        ext.conv2d(idx[0], idx[1].long(), *idx[2:], p.vals, p.x, 4, 3, 3, 1, 1)
    with pytest.raises(RuntimeError, match=r"\(not contiguous\)"):
        ext.conv2d(idx[0], idx[1].repeat_interleave(2)[::2], *idx[2:], p.vals, p.x, 4, 3, 3,
                   1, 1)
    with pytest.raises(RuntimeError, match="rowptr has 5 entries, expected C_out \\+ 1 = 6"):
        ext.conv2d(*idx, p.vals, p.x, 5, 3, 3, 1, 1)
    with pytest.raises(RuntimeError, match="vals must have shape"):
        ext.conv2d(*idx, p.vals[1:], p.x, 4, 3, 3, 1, 1)
    with pytest.raises(RuntimeError, match="has no output \\(Ho and Wo must be >= 1\\)"):
        ext.conv2d(*idx, p.vals, p.x[:, :, :1, :1], 4, 3, 3, 1, 0)
    with pytest.raises(RuntimeError, match="supports float32 and float64; x is Half"):
        ext.conv2d(*idx, p.vals.half(), p.x.half(), 4, 3, 3, 1, 1)
    with pytest.raises(RuntimeError, match="stride must be >= 1"):
        ext.conv2d(*idx, p.vals, p.x, 4, 3, 3, 0, 1)
    bad_col = idx[1].clone()
    bad_col[0] = 27
    with pytest.raises(RuntimeError, match=r"col\[0\] = 27 is outside \[0, 27\)"):
        ext.conv2d(idx[0], bad_col, *idx[2:], p.vals, p.x, 4, 3, 3, 1, 1)
    bad_ptr = idx[0].clone()
    bad_ptr[-1] += 1
    with pytest.raises(RuntimeError, match="rowptr must run from 0 to nnz"):
        ext.conv2d(bad_ptr, *idx[1:], p.vals, p.x, 4, 3, 3, 1, 1)
    with pytest.raises(RuntimeError, match="col, col_t and perm must have one entry per kept tap"):
        ext.conv2d_t(*idx[:4], idx[4][1:], p.vals, p.g, 3, 5, 6, 3, 3, 1, 1)
    with pytest.raises(RuntimeError, match=r"conv2d_t: g has shape \[4, 2, 5, 6\], expected "
                                           r"\[4, 2, 4, 6\]"):
        ext.conv2d_t(*idx, p.vals, p.g, 3, 4, 6, 3, 3, 1, 1)
    with pytest.raises(RuntimeError, match="conv2d_wgrad: g has dtype Double, expected Float"):
        ext.conv2d_wgrad(*idx, p.g.double(), p.x, 3, 3, 1, 1)
    bad_perm = idx[4].clone()
    bad_perm[0] = -1
    with pytest.raises(RuntimeError, match=r"perm\[0\] = -1 is outside"):
        ext.conv2d_t(*idx[:4], bad_perm, p.vals, p.g, 3, 5, 6, 3, 3, 1, 1)


def test_conv_pattern_maker_builds_dead_channels():
    gen = torch.Generator().manual_seed(0)
    index, vals, weight = random_conv_pattern(5, 4, 3, 3, 0.0, gen)
    p = CSRPattern.from_tensors(index)
    p.validate()
    assert p.shape == (5, 36) and p.nnz == 4 * 27  # four live rows, each without channel 1
    assert torch.count_nonzero(weight[0]) == 0 and torch.count_nonzero(weight[:, 1]) == 0
    assert torch.equal(weight.reshape(5, 36)[p.mask()], vals)
