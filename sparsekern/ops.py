"""The op registry: every engine kernel as a ``torch.library`` custom op.

One op per computation, whatever runs it: the ``backend`` argument picks the
implementation ("ref" plain PyTorch, "cpu" the C++ extension, "triton",
"cuda"). Each op has a fake (meta) implementation, so compiled modules trace
under ``torch.compile`` without graph breaks, and an autograd formula:

- ``spmm`` (W x or W^T x) and ``sddmm`` (a b^T at the kept places) have
  formulas made of each other, so they are differentiable to any order: the
  generic tier's sparse linear layers support autograd.grad(create_graph=True).
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


__all__ = ["BACKENDS", "LAYOUT_BLOCKED", "LAYOUT_CSR", "LAYOUT_DENSE", "mlp_bwd", "mlp_fwd",
           "sddmm", "spmm", "spmm_blocked"]
