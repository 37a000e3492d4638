"""The op registry: every engine kernel as a ``torch.library`` custom op.

One op per computation, whatever runs it: the ``backend`` argument picks the
implementation ("ref" plain PyTorch, "cpu" the C++ extension, "triton",
"cuda"). Each op has a fake (meta) implementation, so compiled modules trace
under ``torch.compile`` without graph breaks, and an autograd formula:

- ``spmm`` (W x or W^T x) and ``sddmm`` (a b^T at the kept places) have
  formulas made of each other, so they are differentiable to any order: the
  generic tier's sparse linear layers support autograd.grad(create_graph=True).
- ``conv2d`` (a pruned convolution on feature-major maps), ``conv2d_t`` (its
  adjoint w.r.t. the input) and ``conv2d_wgrad`` (its weight gradient at the kept
  taps) likewise: each one's backward is made of the three.
- ``mlp_fwd`` (the fused forward + JVP program, ``sparsekern.ref``) is
  differentiable once, through the hand-written ``mlp_bwd``. Both take the
  layers as (values, index, layouts) (``formats.decode_program``: ``values``
  one differentiable tensor per layer, ``index`` the constant pattern tensors)
  and are checked by ``program.check_program`` in the fake and in the eager path
  of "ref"; Triton's entry points run it themselves and the C++ backends check
  the same program in csrc/common/mlp_program.h (``_SELF_CHECKING``).

Precision (defined once in ``sparsekern.precision`` and docs/design.md §4):
``spmm``, ``spmm_blocked`` and ``sddmm`` are exact multiply-adds in every
backend; ``mlp_fwd`` / ``mlp_bwd`` take ``precision`` and pass it on as each
backend's entry point expects (``_run_mlp``); a backend without such products
refuses it (``backends.check_precision_supported``).

Tensors are feature-major (see ``sparsekern.ref``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from sparsekern.backends import BACKENDS, check_precision_supported, kernel
from sparsekern.formats import LAYOUT_BLOCKED, LAYOUT_CSR, LAYOUT_DENSE, decode_program
from sparsekern.precision import (
    check_precision,
    cublas_may_use_tf32,
    cuda_matmul_precision,
    uses_tf32,
)
from sparsekern.program import check_program


def _run_mlp(name: str, backend: str, device: torch.device, precision: str, *args: Any) -> Any:
    """Run the MLP kernel ``name`` of ``backend`` with the requested product precision."""
    check_precision(precision, f"sparsekern::{name} precision")
    check_precision_supported(backend, precision, f"sparsekern::{name}")
    fn = kernel(name, backend, device)
    if backend == "triton":
        return fn(*args, precision=precision)
    if backend == "cuda":
        return fn(*args, allow_tf32=uses_tf32(precision))
    # "ref" rounds bf16/fp16 operands itself and leaves TF32 to torch's flag; "cpu" is exact.
    with cuda_matmul_precision(device, cublas_may_use_tf32(precision)):
        return fn(*args, precision=precision) if backend == "ref" else fn(*args)


# --------------------------------------------------------------------------- spmm


@torch.library.custom_op("sparsekern::spmm", mutates_args=())
def spmm(
    rowptr: Tensor,
    col: Tensor,
    rowptr_t: Tensor,
    col_t: Tensor,
    perm: Tensor,
    vals: Tensor,
    x: Tensor,
    transpose: bool,
    backend: str,
) -> Tensor:
    """W x, or W^T x with ``transpose``, for W [R, C] in CSR (``formats.CSRPattern``).

    Args:
        rowptr, col, rowptr_t, col_t, perm: the pattern's index tensors.
        vals: [nnz] kept values. x: [C, N] ([R, N] if transpose), feature-major.
        backend: implementation (``BACKENDS``).

    Returns:
        [R, N] ([C, N] if transpose), contiguous.
    """
    fn = kernel("spmm", backend, x.device)
    return fn(rowptr, col, rowptr_t, col_t, perm, vals, x.contiguous(), transpose)


@spmm.register_fake
def _spmm_fake(rowptr, col, rowptr_t, col_t, perm, vals, x, transpose, backend):
    n_out = (rowptr_t if transpose else rowptr).shape[0] - 1
    return x.new_empty((n_out, x.shape[1]))


def _spmm_setup(ctx, inputs, output):
    *pattern, vals, x, transpose, backend = inputs
    ctx.save_for_backward(*pattern, vals, x)
    ctx.transpose, ctx.backend = transpose, backend


def _spmm_backward(ctx, gy):
    *pattern, vals, x = ctx.saved_tensors
    gy = gy.contiguous()
    g_vals = g_x = None
    if ctx.needs_input_grad[5]:
        a, b = (x, gy) if ctx.transpose else (gy, x)
        g_vals = sddmm(*pattern, a, b, ctx.backend)
    if ctx.needs_input_grad[6]:
        g_x = spmm(*pattern, vals, gy, not ctx.transpose, ctx.backend)
    return None, None, None, None, None, g_vals, g_x, None, None


torch.library.register_autograd("sparsekern::spmm", _spmm_backward, setup_context=_spmm_setup)


# ------------------------------------------------------------------- spmm_blocked


@torch.library.custom_op("sparsekern::spmm_blocked", mutates_args=())
def spmm_blocked(
    rowptr: Tensor,
    col: Tensor,
    rowptr_t: Tensor,
    col_t: Tensor,
    perm: Tensor,
    vals: Tensor,
    bptr: Tensor,
    bcol: Tensor,
    bslot: Tensor,
    x: Tensor,
    backend: str,
) -> Tensor:
    """W x for W [R, C] in the blocked layout (``formats.BlockedPattern``).

    Args:
        rowptr, col, rowptr_t, col_t, perm: the CSR pattern the blocks come from.
        vals: [nnz] kept values (CSR order). bptr, bcol, bslot: the blocks.
        x: [C, N] feature-major.

    Returns:
        [R, N]. Its backward runs on the CSR pattern (``spmm`` with the stored
        transpose, ``sddmm``), so it is differentiable to any order.
    """
    fn = kernel("spmm_blocked", backend, x.device)
    return fn(rowptr, col, rowptr_t, col_t, perm, vals, bptr, bcol, bslot, x.contiguous())


@spmm_blocked.register_fake
def _spmm_blocked_fake(rowptr, col, rowptr_t, col_t, perm, vals, bptr, bcol, bslot, x, backend):
    return x.new_empty((rowptr.shape[0] - 1, x.shape[1]))


def _spmm_blocked_setup(ctx, inputs, output):
    *pattern, vals, _, _, _, x, backend = inputs
    ctx.save_for_backward(*pattern, vals, x)
    ctx.backend = backend


def _spmm_blocked_backward(ctx, gy):
    *pattern, vals, x = ctx.saved_tensors
    gy = gy.contiguous()
    g_vals = sddmm(*pattern, gy, x, ctx.backend) if ctx.needs_input_grad[5] else None
    g_x = spmm(*pattern, vals, gy, True, ctx.backend) if ctx.needs_input_grad[9] else None
    return (None,) * 5 + (g_vals, None, None, None, g_x, None)


torch.library.register_autograd("sparsekern::spmm_blocked", _spmm_blocked_backward,
                                setup_context=_spmm_blocked_setup)


# -------------------------------------------------------------------------- sddmm


@torch.library.custom_op("sparsekern::sddmm", mutates_args=())
def sddmm(
    rowptr: Tensor,
    col: Tensor,
    rowptr_t: Tensor,
    col_t: Tensor,
    perm: Tensor,
    a: Tensor,
    b: Tensor,
    backend: str,
) -> Tensor:
    """out[k] = <a[row_k], b[col_k]>: the product a b^T read at the kept places.

    Args:
        rowptr, col, rowptr_t, col_t, perm: the pattern of W [R, C] (the
            transpose is needed by the op's own backward).
        a: [R, N], b: [C, N], feature-major.

    Returns:
        [nnz], in the order of ``col``.
    """
    fn = kernel("sddmm", backend, a.device)
    return fn(rowptr, col, a.contiguous(), b.contiguous())


@sddmm.register_fake
def _sddmm_fake(rowptr, col, rowptr_t, col_t, perm, a, b, backend):
    return a.new_empty(col.shape)


def _sddmm_setup(ctx, inputs, output):
    *pattern, a, b, backend = inputs
    ctx.save_for_backward(*pattern, a, b)
    ctx.backend = backend


def _sddmm_backward(ctx, go):
    *pattern, a, b = ctx.saved_tensors
    go = go.contiguous()
    g_a = spmm(*pattern, go, b, False, ctx.backend) if ctx.needs_input_grad[5] else None
    g_b = spmm(*pattern, go, a, True, ctx.backend) if ctx.needs_input_grad[6] else None
    return None, None, None, None, None, g_a, g_b, None


torch.library.register_autograd("sparsekern::sddmm", _sddmm_backward, setup_context=_sddmm_setup)


# ---------------------------------------------------------------- convolutions
#
# A pruned convolution weight W [C_out, C_in, kh, kw] as the matrix
# [C_out, C_in * kh * kw] (column ci * kh * kw + ky * kw + kx is one tap) in CSR
# (``formats.CSRPattern``, its transpose over the taps), on feature-major
# tensors x [C_in, N, H, W]. Square stride and zero padding, dilation 1, groups 1.
# The three ops' backwards are made of each other, so they are differentiable to
# any order, like spmm / sddmm.


def _conv_check(op: str, rowptr: Tensor, col: Tensor, rowptr_t: Tensor, col_t: Tensor,
                perm: Tensor, data: dict[str, Tensor], kh: int, kw: int, stride: int,
                padding: int) -> tuple[Any, Any]:
    """The pattern's and the data tensors' checks shared by the three ops (eager and fake).

    ``data`` maps names to the float tensors (vals and 4-D feature-major maps), all of
    one dtype. Returns (C_out, C_in) read from the pattern. Sizes go through
    ``torch._check`` so that symbolic ones become runtime asserts.
    """
    torch._check_value(kh >= 1 and kw >= 1,
                       lambda: f"{op}: kernel size must be >= 1, got {kh} x {kw}")
    torch._check_value(stride >= 1, lambda: f"{op}: stride must be >= 1, got {stride}")
    torch._check_value(padding >= 0, lambda: f"{op}: padding must be >= 0, got {padding}")
    for name, t in (("rowptr", rowptr), ("col", col), ("rowptr_t", rowptr_t), ("col_t", col_t),
                    ("perm", perm)):
        torch._check(t.dtype == torch.int32 and t.dim() == 1,
                     lambda name=name, t=t: f"{op}: {name} must be a 1-D int32 tensor, got "
                                            f"{t.dtype} of shape {list(t.shape)}")
    nnz = col.shape[0]
    torch._check(col_t.shape[0] == nnz and perm.shape[0] == nnz,
                 lambda: f"{op}: col, col_t and perm must have one entry per kept tap, got "
                         f"{col.shape[0]}, {col_t.shape[0]} and {perm.shape[0]}")
    taps = rowptr_t.shape[0] - 1
    torch._check(taps % (kh * kw) == 0,
                 lambda: f"{op}: rowptr_t has {rowptr_t.shape[0]} entries, expected "
                         f"C_in * {kh} * {kw} + 1 (one column per tap)")
    first, dtype = next(iter(data.items()))[0], next(iter(data.values())).dtype
    for name, t in data.items():
        torch._check(t.dtype in (torch.float32, torch.float64),
                     lambda name=name, t=t: f"{op}: {name} must be float32 or float64, got "
                                            f"{t.dtype}")
        torch._check(t.dtype == dtype, lambda name=name, t=t: f"{op}: {name} has dtype "
                                                             f"{t.dtype}, expected {dtype} "
                                                             f"(that of {first})")
        if name == "vals":
            torch._check(t.dim() == 1 and t.shape[0] == nnz,
                         lambda t=t: f"{op}: vals must have shape [{nnz}] (one value per kept "
                                     f"tap), got {list(t.shape)}")
        else:
            torch._check(t.dim() == 4, lambda name=name, t=t: f"{op}: {name} must be 4-D "
                                                             f"[C, N, H, W] (feature-major), "
                                                             f"got shape {list(t.shape)}")
    return rowptr.shape[0] - 1, taps // (kh * kw)


def _conv_out_size(op: str, h: Any, w: Any, kh: int, kw: int, stride: int, padding: int
                   ) -> tuple[Any, Any]:
    """(Ho, Wo) of a convolution of an h x w map; ValueError naming the sizes unless >= 1."""
    ho = (h + 2 * padding - kh) // stride + 1
    wo = (w + 2 * padding - kw) // stride + 1
    torch._check_value(ho >= 1, lambda: f"{op}: a {h} x {w} input with a {kh} x {kw} kernel, "
                                         f"stride {stride} and padding {padding} has output "
                                         f"size {ho} x {wo}; both must be >= 1")
    torch._check_value(wo >= 1, lambda: f"{op}: a {h} x {w} input with a {kh} x {kw} kernel, "
                                         f"stride {stride} and padding {padding} has output "
                                         f"size {ho} x {wo}; both must be >= 1")
    return ho, wo


def _expect_shape(op: str, name: str, t: Tensor, shape: tuple[Any, ...]) -> None:
    for i, n in enumerate(shape):
        torch._check(t.shape[i] == n, lambda: f"{op}: {name} has shape {list(t.shape)}, "
                                              f"expected {list(shape)}")


def _conv2d_shape(rowptr, col, rowptr_t, col_t, perm, vals, x, c_out, kh, kw, stride, padding):
    op = "sparsekern::conv2d"
    rows, c_in = _conv_check(op, rowptr, col, rowptr_t, col_t, perm, {"vals": vals, "x": x},
                             kh, kw, stride, padding)
    torch._check(rows == c_out, lambda: f"{op}: rowptr has {rowptr.shape[0]} entries, "
                                        f"expected C_out + 1 = {c_out + 1}")
    n, h, w = x.shape[1:]
    _expect_shape(op, "x", x, (c_in, n, h, w))
    ho, wo = _conv_out_size(op, h, w, kh, kw, stride, padding)
    return (c_out, n, ho, wo)


@torch.library.custom_op("sparsekern::conv2d", mutates_args=())
def conv2d(
    rowptr: Tensor,
    col: Tensor,
    rowptr_t: Tensor,
    col_t: Tensor,
    perm: Tensor,
    vals: Tensor,
    x: Tensor,
    c_out: int,
    kh: int,
    kw: int,
    stride: int,
    padding: int,
    backend: str,
) -> Tensor:
    """The convolution of feature-major x with a pruned weight W [C_out, C_in, kh, kw].

    y[co, n, oy, ox] = sum_e vals[e] x[ci, n, oy * stride + ky - padding,
    ox * stride + kx - padding] over the kept taps e = (co, ci, ky, kx), zero padding
    (``sparsekern.ref.conv2d_ref``).

    Args:
        rowptr, col, rowptr_t, col_t, perm: the CSR pattern of W as the matrix
            [C_out, C_in * kh * kw] (int32; column ci * kh * kw + ky * kw + kx).
        vals: [nnz] kept values in CSR order. x: [C_in, N, H, W], C_in =
            (rowptr_t.numel() - 1) / (kh * kw); N may be 0.
        c_out: C_out = rowptr.numel() - 1. kh, kw: kernel size. stride (>= 1),
            padding (>= 0): square. backend: implementation (``BACKENDS``).

    Returns:
        y [C_out, N, Ho, Wo], contiguous, Ho = (H + 2 padding - kh) // stride + 1 and
        Wo likewise (both must be >= 1, else ValueError).
    """
    _conv2d_shape(rowptr, col, rowptr_t, col_t, perm, vals, x, c_out, kh, kw, stride, padding)
    fn = kernel("conv2d", backend, x.device)
    return fn(rowptr, col, rowptr_t, col_t, perm, vals.contiguous(), x.contiguous(), c_out, kh,
              kw, stride, padding)


@conv2d.register_fake
def _conv2d_fake(rowptr, col, rowptr_t, col_t, perm, vals, x, c_out, kh, kw, stride, padding,
                 backend):
    shape = _conv2d_shape(rowptr, col, rowptr_t, col_t, perm, vals, x, c_out, kh, kw, stride,
                          padding)
    return x.new_empty(shape)


def _conv2d_setup(ctx, inputs, output):
    *pattern, vals, x, _, kh, kw, stride, padding, backend = inputs
    ctx.save_for_backward(*pattern, vals, x)
    ctx.conv = (kh, kw, stride, padding)
    ctx.backend = backend


def _conv2d_backward(ctx, gy):
    *pattern, vals, x = ctx.saved_tensors
    kh, kw, stride, padding = ctx.conv
    gy = gy.contiguous()
    g_vals = g_x = None
    if ctx.needs_input_grad[5]:
        g_vals = conv2d_wgrad(*pattern, gy, x, kh, kw, stride, padding, ctx.backend)
    if ctx.needs_input_grad[6]:
        g_x = conv2d_t(*pattern, vals, gy, x.shape[0], x.shape[2], x.shape[3], kh, kw, stride,
                       padding, ctx.backend)
    return (None,) * 5 + (g_vals, g_x) + (None,) * 6


torch.library.register_autograd("sparsekern::conv2d", _conv2d_backward,
                                setup_context=_conv2d_setup)


def _conv2d_t_shape(rowptr, col, rowptr_t, col_t, perm, vals, g, c_in, h, w, kh, kw, stride,
                    padding):
    op = "sparsekern::conv2d_t"
    c_out, taps_in = _conv_check(op, rowptr, col, rowptr_t, col_t, perm, {"vals": vals, "g": g},
                                 kh, kw, stride, padding)
    torch._check(taps_in == c_in, lambda: f"{op}: rowptr_t has {rowptr_t.shape[0]} entries, "
                                          f"expected C_in * {kh} * {kw} + 1 = "
                                          f"{c_in * kh * kw + 1}")
    ho, wo = _conv_out_size(op, h, w, kh, kw, stride, padding)
    _expect_shape(op, "g", g, (c_out, g.shape[1], ho, wo))
    return (c_in, g.shape[1], h, w)


@torch.library.custom_op("sparsekern::conv2d_t", mutates_args=())
def conv2d_t(
    rowptr: Tensor,
    col: Tensor,
    rowptr_t: Tensor,
    col_t: Tensor,
    perm: Tensor,
    vals: Tensor,
    g: Tensor,
    c_in: int,
    h: int,
    w: int,
    kh: int,
    kw: int,
    stride: int,
    padding: int,
    backend: str,
) -> Tensor:
    """The adjoint of ``conv2d`` w.r.t. its input (the transposed convolution).

    gx[ci, n, iy, ix] = sum of vals[e] g[co, n, oy, ox] over the kept taps
    e = (co, ci, ky, kx) and output places with iy = oy * stride + ky - padding,
    ix = ox * stride + kx - padding (``sparsekern.ref.conv2d_t_ref``). The kernels
    read W through the stored transpose, so they need no atomics.

    Args:
        rowptr, col, rowptr_t, col_t, perm, vals: the pruned weight, as in ``conv2d``.
        g: [C_out, N, Ho, Wo], Ho and Wo those ``conv2d`` gives for an h x w input.
        c_in, h, w: the input's channels and size (several h give one Ho when
            stride > 1). kh, kw, stride, padding, backend: as in ``conv2d``.

    Returns:
        gx [C_in, N, h, w], contiguous.
    """
    _conv2d_t_shape(rowptr, col, rowptr_t, col_t, perm, vals, g, c_in, h, w, kh, kw, stride,
                    padding)
    fn = kernel("conv2d_t", backend, g.device)
    return fn(rowptr, col, rowptr_t, col_t, perm, vals.contiguous(), g.contiguous(), c_in, h, w,
              kh, kw, stride, padding)


@conv2d_t.register_fake
def _conv2d_t_fake(rowptr, col, rowptr_t, col_t, perm, vals, g, c_in, h, w, kh, kw, stride,
                   padding, backend):
    shape = _conv2d_t_shape(rowptr, col, rowptr_t, col_t, perm, vals, g, c_in, h, w, kh, kw,
                            stride, padding)
    return g.new_empty(shape)


def _conv2d_t_setup(ctx, inputs, output):
    *pattern, vals, g, _, _, _, kh, kw, stride, padding, backend = inputs
    ctx.save_for_backward(*pattern, vals, g)
    ctx.conv = (kh, kw, stride, padding)
    ctx.backend = backend


def _conv2d_t_backward(ctx, gbar):
    *pattern, vals, g = ctx.saved_tensors
    kh, kw, stride, padding = ctx.conv
    gbar = gbar.contiguous()
    g_vals = g_g = None
    if ctx.needs_input_grad[5]:
        g_vals = conv2d_wgrad(*pattern, g, gbar, kh, kw, stride, padding, ctx.backend)
    if ctx.needs_input_grad[6]:
        g_g = conv2d(*pattern, vals, gbar, g.shape[0], kh, kw, stride, padding, ctx.backend)
    return (None,) * 5 + (g_vals, g_g) + (None,) * 8


torch.library.register_autograd("sparsekern::conv2d_t", _conv2d_t_backward,
                                setup_context=_conv2d_t_setup)


def _conv2d_wgrad_shape(rowptr, col, rowptr_t, col_t, perm, g, x, kh, kw, stride, padding):
    op = "sparsekern::conv2d_wgrad"
    c_out, c_in = _conv_check(op, rowptr, col, rowptr_t, col_t, perm, {"g": g, "x": x}, kh, kw,
                              stride, padding)
    n, h, w = x.shape[1:]
    _expect_shape(op, "x", x, (c_in, n, h, w))
    ho, wo = _conv_out_size(op, h, w, kh, kw, stride, padding)
    _expect_shape(op, "g", g, (c_out, n, ho, wo))
    return col.shape


@torch.library.custom_op("sparsekern::conv2d_wgrad", mutates_args=())
def conv2d_wgrad(
    rowptr: Tensor,
    col: Tensor,
    rowptr_t: Tensor,
    col_t: Tensor,
    perm: Tensor,
    g: Tensor,
    x: Tensor,
    kh: int,
    kw: int,
    stride: int,
    padding: int,
    backend: str,
) -> Tensor:
    """The weight gradient of ``conv2d`` at the kept taps (SDDMM-like).

    gw[e] = sum_{n, oy, ox} g[co, n, oy, ox] x[ci, n, oy * stride + ky - padding,
    ox * stride + kx - padding] for each kept tap e = (co, ci, ky, kx)
    (``sparsekern.ref.conv2d_wgrad_ref``).

    Args:
        rowptr, col, rowptr_t, col_t, perm: the pattern, as in ``conv2d``.
        g: [C_out, N, Ho, Wo], the cotangent of conv2d's output. x: [C_in, N, H, W].
        kh, kw, stride, padding, backend: as in ``conv2d``.

    Returns:
        gw [nnz], in the order of ``col`` (and ``vals``).
    """
    _conv2d_wgrad_shape(rowptr, col, rowptr_t, col_t, perm, g, x, kh, kw, stride, padding)
    fn = kernel("conv2d_wgrad", backend, x.device)
    return fn(rowptr, col, rowptr_t, col_t, perm, g.contiguous(), x.contiguous(), kh, kw, stride,
              padding)


@conv2d_wgrad.register_fake
def _conv2d_wgrad_fake(rowptr, col, rowptr_t, col_t, perm, g, x, kh, kw, stride, padding,
                       backend):
    shape = _conv2d_wgrad_shape(rowptr, col, rowptr_t, col_t, perm, g, x, kh, kw, stride,
                                padding)
    return x.new_empty(shape)


def _conv2d_wgrad_setup(ctx, inputs, output):
    *pattern, g, x, kh, kw, stride, padding, backend = inputs
    ctx.save_for_backward(*pattern, g, x)
    ctx.conv = (kh, kw, stride, padding)
    ctx.backend = backend


def _conv2d_wgrad_backward(ctx, gw_bar):
    *pattern, g, x = ctx.saved_tensors
    kh, kw, stride, padding = ctx.conv
    gw_bar = gw_bar.contiguous()
    g_g = g_x = None
    if ctx.needs_input_grad[5]:
        g_g = conv2d(*pattern, gw_bar, x, g.shape[0], kh, kw, stride, padding, ctx.backend)
    if ctx.needs_input_grad[6]:
        g_x = conv2d_t(*pattern, gw_bar, g, x.shape[0], x.shape[2], x.shape[3], kh, kw, stride,
                       padding, ctx.backend)
    return (None,) * 5 + (g_g, g_x) + (None,) * 5


torch.library.register_autograd("sparsekern::conv2d_wgrad", _conv2d_wgrad_backward,
                                setup_context=_conv2d_wgrad_setup)


# ------------------------------------------------------------------ fused MLP


def _check_program(x0, tan0, probe, values, index, scales, shifts, layouts, act, exact,
                   **backward) -> list[int]:
    """``program.check_program`` on the op's arguments: the eager path's and the fake's."""
    return check_program(x0, tan0, probe, values, index, scales, shifts, layouts, act, exact,
                         **backward)


# Backends whose MLP entry points check the whole program themselves: Triton's run
# ``check_program`` (``launch.check_mlp``), the C++ kernels decode and check it in
# csrc/common/mlp_program.h. The eager path leaves it to them rather than check twice;
# a Python check would cost the C++ path some 20 us per call, a tenth of a small field's
# evaluation. The fakes (and "ref") check here.
_SELF_CHECKING = ("triton", "cpu", "cuda")


@torch.library.custom_op("sparsekern::mlp_fwd", mutates_args=())
def mlp_fwd(
    x0: Tensor,
    tan0: Tensor,
    probe: Tensor,
    values: list[Tensor],
    index: list[Tensor],
    scales: list[Tensor],
    shifts: list[Tensor],
    layouts: list[int],
    act: int,
    exact: bool,
    save: bool,
    backend: str,
    precision: str = "ieee",
) -> tuple[Tensor, Tensor, list[Tensor]]:
    """The fused forward + JVP program of an MLP (``sparsekern.ref.mlp_fwd_ref``).

    The layers are (values, index, layouts) (``formats.decode_program``): ``values``
    one tensor per layer (the dense matrix, or the [nnz] kept values of a csr or
    blocked layer), ``index`` the layers' index tensors concatenated. Returns f
    [d, B], div [B] and, with ``save``, the activations the backward needs.
    Differentiable once (w.r.t. x0, values, scales and shifts). ``precision``: the
    products' precision (``sparsekern.precision``; default exact).
    """
    if backend not in _SELF_CHECKING:
        _check_program(x0, tan0, probe, values, index, scales, shifts, layouts, act, exact)
    return _run_mlp("mlp_fwd", backend, x0.device, precision, x0.contiguous(),
                    tan0.contiguous(), probe.contiguous(), values, index, scales, shifts,
                    layouts, act, exact, save)


@mlp_fwd.register_fake
def _mlp_fwd_fake(x0, tan0, probe, values, index, scales, shifts, layouts, act, exact, save,
                  backend, precision="ieee"):
    widths = _check_program(x0, tan0, probe, values, index, scales, shifts, layouts, act, exact)
    b = x0.shape[1]
    cols = (1 + tan0.shape[0]) * b
    f = x0.new_empty((widths[-1], b))
    div = x0.new_empty((b,))
    saved: list[Tensor] = []
    if save:
        saved = [x0.new_empty((w, cols)) for w in (*widths[1:], *widths[1:-1])]
    return f, div, saved


def _mlp_setup(ctx, inputs, output):
    # Some torch versions pass the defaulted precision along, others not.
    (x0, tan0, probe, values, index, scales, shifts, layouts, act, exact, save, backend,
     *rest) = inputs
    _, _, saved = output
    ctx.counts = (len(values), len(index), len(scales), len(shifts))
    ctx.save_for_backward(x0, tan0, probe, *values, *index, *scales, *shifts, *saved)
    ctx.layouts, ctx.act, ctx.exact, ctx.save, ctx.backend = layouts, act, exact, save, backend
    ctx.precision = rest[0] if rest else "ieee"


def _mlp_backward(ctx, grad_f, grad_div, grad_saved):
    if not ctx.save:
        raise RuntimeError(
            "sparsekern::mlp_fwd ran with save=False, so it kept nothing for backward; "
            "call it with save=True when gradients are needed"
        )
    if torch.is_grad_enabled():
        raise RuntimeError(
            "the fused tier (forward_and_divergence of a compiled MLP) is differentiable once; "
            "for higher derivatives (create_graph=True through the divergence) compile with "
            "SparseConfig(tier='generic')"
        )
    x0, tan0, probe, *rest = ctx.saved_tensors
    parts = []
    for n in ctx.counts:
        parts.append(rest[:n])
        rest = rest[n:]
    values, index, scales, shifts = parts
    b = x0.shape[1]
    d = decode_program(values, index, ctx.layouts)[-1].n_out
    grad_f = x0.new_zeros((d, b)) if grad_f is None else grad_f
    grad_div = x0.new_zeros((b,)) if grad_div is None else grad_div
    g_x, g_v, g_s, g_h = mlp_bwd(grad_f, grad_div, x0, tan0, probe, values, index, scales, shifts,
                                 ctx.layouts, ctx.act, ctx.exact, rest, ctx.backend,
                                 ctx.precision)
    # values are the only differentiable weight inputs; index tensors get no gradient.
    grad_scales = [g if s.numel() else None for g, s in zip(g_s, scales, strict=True)]
    grads = (g_x, None, None, list(g_v), [None] * len(index), grad_scales, list(g_h), None, None,
             None, None, None)
    # One gradient per argument the call passed: the dispatcher drops precision when it
    # has its default value, so the op was applied to 12 or 13 arguments.
    return grads + (None,) * (len(ctx.needs_input_grad) - len(grads))


torch.library.register_autograd("sparsekern::mlp_fwd", _mlp_backward, setup_context=_mlp_setup)


@torch.library.custom_op("sparsekern::mlp_bwd", mutates_args=())
def mlp_bwd(
    grad_f: Tensor,
    grad_div: Tensor,
    x0: Tensor,
    tan0: Tensor,
    probe: Tensor,
    values: list[Tensor],
    index: list[Tensor],
    scales: list[Tensor],
    shifts: list[Tensor],
    layouts: list[int],
    act: int,
    exact: bool,
    saved: list[Tensor],
    backend: str,
    precision: str = "ieee",
) -> tuple[Tensor, list[Tensor], list[Tensor], list[Tensor]]:
    """Reverse mode of ``mlp_fwd`` (``sparsekern.ref.mlp_bwd_ref``); ``precision`` as there.

    Returns (g_x0, g_values, g_scales, g_shifts), g_values one per layer, shaped as
    its values.
    """
    if backend not in _SELF_CHECKING:
        _check_program(x0, tan0, probe, values, index, scales, shifts, layouts, act, exact,
                       grad_f=grad_f, grad_div=grad_div, saved=saved)
    return _run_mlp("mlp_bwd", backend, x0.device, precision, grad_f.contiguous(),
                    grad_div.contiguous(), x0.contiguous(), tan0.contiguous(), probe.contiguous(),
                    values, index, scales, shifts, layouts, act, exact, saved)


@mlp_bwd.register_fake
def _mlp_bwd_fake(grad_f, grad_div, x0, tan0, probe, values, index, scales, shifts, layouts, act,
                  exact, saved, backend, precision="ieee"):
    _check_program(x0, tan0, probe, values, index, scales, shifts, layouts, act, exact,
                   grad_f=grad_f, grad_div=grad_div, saved=saved)
    # The kernels return fresh contiguous tensors, whatever the inputs' strides.
    return (x0.new_empty(x0.shape), [v.new_empty(v.shape) for v in values],
            [s.new_empty(s.shape) for s in scales], [h.new_empty(h.shape) for h in shifts])


__all__ = ["BACKENDS", "LAYOUT_BLOCKED", "LAYOUT_CSR", "LAYOUT_DENSE", "conv2d", "conv2d_t",
           "conv2d_wgrad", "mlp_bwd", "mlp_fwd", "sddmm", "spmm", "spmm_blocked"]
