"""CSR x dense in Triton: y = W x (or W^T x through the stored transpose), feature-major.

W [R, C] is a ``formats.CSRPattern`` with values ``vals``; x is [C, N] with the
batch as the dense dimension, so every kept entry (r, c) adds vals * x[c, :] to
y[r, :], a contiguous row. Each program owns a block of rows and a block of N
columns (weight-stationary: a row's entries are read once per column block and
applied to the whole block). Row blocks are cut so that each holds about the
same work, nnz + rows (the binary search below runs in the kernel, so no
host-side preprocessing or extra launch is needed), which balances programs
when row lengths are uneven. A row is never split, so there are no atomics and
the result is deterministic. W^T x uses ``rowptr_t``/``col_t`` and reads the
values through ``perm`` in place.

The blocked layout (``formats.BlockedPattern``: groups of ``BLOCK_ROWS`` = 4
rows sharing a column list) has its own kernel for W x: every x row loaded
feeds four output rows. Its W^T x and weight gradient use the CSR it is built
from. Groups are balanced like rows, by blocks + groups.

Products are plain fp32/fp64 multiply-adds (no tensor cores), i.e. exact IEEE
arithmetic. Oracles: ``sparsekern.ref.spmm_ref``, ``spmm_blocked_ref``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sparsekern.formats import BLOCK_ROWS, BlockedPattern
from sparsekern.triton.launch import (
    AotRule,
    AotVariant,
    aot_variant,
    check_device,
    check_float,
    check_index,
    interpreting,
    next_pow2,
    search_iters,
)

__all__ = ["aot_variants", "spmm", "spmm_blocked", "spmm_blocked_into", "spmm_into"]


@triton.jit
def _row_lower_bound(rowptr, n_rows, target, N_ITERS):
    """First r in [0, n_rows] with rowptr[r] + r >= target (rowptr[r] + r is increasing)."""
    lo = tl.zeros([], tl.int32)
    hi = lo + n_rows
    # Fixed trip count: no data-dependent loop exit, the same code in every program.
    for _ in range(N_ITERS):
        active = lo < hi
        mid = (lo + hi) // 2
        less = (tl.load(rowptr + mid).to(tl.int64) + mid) < target
        lo = tl.where(active & less, mid + 1, lo)
        hi = tl.where(active & (~less), mid, hi)
    return lo


@triton.jit(do_not_specialize=["N", "ldx", "ldy"])
def _spmm_kernel(rowptr, col, perm, vals, x, y, n_rows, N, ldx, ldy, total, n_blocks, N_ITERS,
                 HAS_PERM: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    pid = tl.program_id(0)
    r0 = _row_lower_bound(rowptr, n_rows, (pid.to(tl.int64) * total) // n_blocks, N_ITERS)
    r1 = _row_lower_bound(rowptr, n_rows, ((pid + 1).to(tl.int64) * total) // n_blocks, N_ITERS)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    for r in range(r0, r1):
        k0 = tl.load(rowptr + r)
        k1 = tl.load(rowptr + r + 1)
        acc = tl.zeros([BLOCK_N], dtype=y.dtype.element_ty)
        for k in range(k0, k1, BLOCK_K):
            offs_k = k + tl.arange(0, BLOCK_K)
            mask_k = offs_k < k1
            c = tl.load(col + offs_k, mask=mask_k, other=0).to(tl.int64)
            if HAS_PERM:
                v = tl.load(vals + tl.load(perm + offs_k, mask=mask_k, other=0), mask=mask_k,
                            other=0.0)
            else:
                v = tl.load(vals + offs_k, mask=mask_k, other=0.0)
            xt = tl.load(x + c[:, None] * ldx + offs_n[None, :],
                         mask=mask_k[:, None] & mask_n[None, :], other=0.0)
            acc += tl.sum(v[:, None] * xt, axis=0)
        tl.store(y + tl.cast(r, tl.int64) * ldy + offs_n, acc, mask=mask_n)


_BLOCK_ROWS = tl.constexpr(BLOCK_ROWS)


@triton.jit(do_not_specialize=["N", "ldx", "ldy"])
def _spmm_blocked_kernel(bptr, bcol, bvals, x, y, n_rows, n_groups, N, ldx, ldy, total, n_blocks,
                         N_ITERS, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    pid = tl.program_id(0)
    g0 = _row_lower_bound(bptr, n_groups, (pid.to(tl.int64) * total) // n_blocks, N_ITERS)
    g1 = _row_lower_bound(bptr, n_groups, ((pid + 1).to(tl.int64) * total) // n_blocks, N_ITERS)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    offs_i = tl.arange(0, _BLOCK_ROWS)
    for g in range(g0, g1):
        k0 = tl.load(bptr + g)
        k1 = tl.load(bptr + g + 1)
        acc = tl.zeros([_BLOCK_ROWS, BLOCK_N], dtype=y.dtype.element_ty)
        for k in range(k0, k1, BLOCK_K):
            offs_k = k + tl.arange(0, BLOCK_K)
            mask_k = offs_k < k1
            c = tl.load(bcol + offs_k, mask=mask_k, other=0).to(tl.int64)
            # [BLOCK_K, 4]: the four rows' values of each block (zero where not kept).
            w = tl.load(bvals + offs_k[:, None] * _BLOCK_ROWS + offs_i[None, :],
                        mask=mask_k[:, None], other=0.0)
            xt = tl.load(x + c[:, None] * ldx + offs_n[None, :],
                         mask=mask_k[:, None] & mask_n[None, :], other=0.0)
            # Each loaded x row serves the group's four output rows.
            acc += tl.sum(w[:, :, None] * xt[:, None, :], axis=0)
        rows = tl.cast(g, tl.int64) * _BLOCK_ROWS + offs_i
        tl.store(y + rows[:, None] * ldy + offs_n[None, :], acc,
                 mask=(rows < n_rows)[:, None] & mask_n[None, :])


def _config(n_cols: int, dtype: torch.dtype) -> tuple[int, int, int]:
    """(BLOCK_K, BLOCK_N, work per row block) for a launch."""
    if interpreting():
        # The interpreter pays per operation, not per element: few, wide programs.
        return 64, next_pow2(n_cols, lo=16, hi=1024), 512
    # The [BLOCK_K, BLOCK_N] gathered tile stays near 16 registers a thread at 4 warps.
    return (16 if dtype == torch.float32 else 8), next_pow2(n_cols, lo=16, hi=128), 64


def spmm_into(rowptr: torch.Tensor, col: torch.Tensor, perm: torch.Tensor | None,
              vals: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
              config: tuple[int, int, int] | None = None) -> torch.Tensor:
    """y[r, :] = sum over the row's entries k of vals[p(k)] * x[col[k], :], p = perm or identity.

    The CSR (rowptr [R + 1], col [nnz]) is the one to stream: W's own for W x, the
    stored transpose for W^T x (then ``perm`` maps its entries onto ``vals``).
    x [C, N] and y [R, N] may be column slices (unit column stride, any row
    stride). ``config`` overrides (BLOCK_K, BLOCK_N, work per row block), for
    tests. Returns y.
    """
    n_rows, n_cols = rowptr.numel() - 1, x.shape[1]
    if n_cols > 1 and (x.stride(1) != 1 or y.stride(1) != 1):
        raise ValueError("sparsekern triton spmm: x and y need unit column stride")
    if n_rows == 0 or n_cols == 0:
        return y
    check_device(x)
    block_k, block_n, work = config or _config(n_cols, x.dtype)
    total = col.numel() + n_rows
    n_blocks = max(1, min(n_rows, triton.cdiv(total, work)))
    grid = (n_blocks, triton.cdiv(n_cols, block_n))
    has_perm = perm is not None
    _spmm_kernel[grid](rowptr, col, perm if has_perm else col, vals, x, y, n_rows, n_cols,
                       x.stride(0), y.stride(0), total, n_blocks, search_iters(n_rows),
                       HAS_PERM=has_perm, BLOCK_K=block_k, BLOCK_N=block_n, num_warps=4)
    return y


def spmm_blocked_into(bptr: torch.Tensor, bcol: torch.Tensor, bvals: torch.Tensor,
                      x: torch.Tensor, y: torch.Tensor,
                      config: tuple[int, int, int] | None = None) -> torch.Tensor:
    """y = W x for W in the blocked layout, from its block storage ``bvals`` [n_blocks, 4].

    x [C, N] and y [R, N] may be column slices (unit column stride). ``config``
    overrides (BLOCK_K, BLOCK_N, work per group block), for tests. Returns y.
    """
    n_rows, n_cols = y.shape
    if n_cols > 1 and (x.stride(1) != 1 or y.stride(1) != 1):
        raise ValueError("sparsekern triton spmm_blocked: x and y need unit column stride")
    n_groups = bptr.numel() - 1
    if n_rows == 0 or n_cols == 0:
        return y
    check_device(x)
    block_k, block_n, work = config or _config(n_cols, x.dtype)
    # The [BLOCK_K, 4, BLOCK_N] product tile is four times CSR's: a quarter of the entries.
    block_k = max(1, block_k // BLOCK_ROWS) if config is None else block_k
    total = bcol.numel() + n_groups
    n_blocks = max(1, min(n_groups, triton.cdiv(total, work)))
    grid = (n_blocks, triton.cdiv(n_cols, block_n))
    _spmm_blocked_kernel[grid](bptr, bcol, bvals, x, y, n_rows, n_groups, n_cols, x.stride(0),
                               y.stride(0), total, n_blocks, search_iters(n_groups),
                               BLOCK_K=block_k, BLOCK_N=block_n, num_warps=4)
    return y


def spmm_blocked(rowptr: torch.Tensor, col: torch.Tensor, rowptr_t: torch.Tensor,
                 col_t: torch.Tensor, perm: torch.Tensor, vals: torch.Tensor, bptr: torch.Tensor,
                 bcol: torch.Tensor, bslot: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """W x for W [R, C] in the blocked layout; same contract as ``spmm_blocked_ref``.

    Args:
        rowptr, col, rowptr_t, col_t, perm: the CSR pattern the blocks come from.
        vals: [nnz] kept values in CSR order. bptr, bcol, bslot: the blocks.
        x: [C, N].

    Returns:
        A fresh contiguous [R, N] tensor.
    """
    for name, t in zip(("rowptr", "col", "rowptr_t", "col_t", "perm", "bptr", "bcol", "bslot"),
                       (rowptr, col, rowptr_t, col_t, perm, bptr, bcol, bslot), strict=True):
        check_index(name, t)
    check_float("x", x)
    check_float("vals", vals, x.dtype)
    n_rows, n_cols = rowptr.numel() - 1, rowptr_t.numel() - 1
    if x.dim() != 2 or x.shape[0] != n_cols:
        raise ValueError(f"sparsekern triton spmm_blocked: x must be [{n_cols}, N], got "
                         f"{list(x.shape)}")
    if vals.shape != col.shape or bslot.shape != col.shape:
        raise ValueError(f"sparsekern triton spmm_blocked: vals {list(vals.shape)} and bslot "
                         f"{list(bslot.shape)} must have the pattern's {col.numel()} entries")
    if bptr.numel() != (n_rows + BLOCK_ROWS - 1) // BLOCK_ROWS + 1:
        raise ValueError(f"sparsekern triton spmm_blocked: bptr has {bptr.numel()} entries for "
                         f"{n_rows} rows in groups of {BLOCK_ROWS}")
    if any(t.device != x.device for t in (rowptr, col, vals, bptr, bcol, bslot)):
        raise ValueError(f"sparsekern triton spmm_blocked: the pattern and vals must be on "
                         f"{x.device}")
    bvals = BlockedPattern(bptr, bcol, bslot).block_values(vals)
    y = torch.empty((n_rows, x.shape[1]), dtype=x.dtype, device=x.device)
    return spmm_blocked_into(bptr, bcol, bvals, x.contiguous(), y)


def spmm(rowptr: torch.Tensor, col: torch.Tensor, rowptr_t: torch.Tensor, col_t: torch.Tensor,
         perm: torch.Tensor, vals: torch.Tensor, x: torch.Tensor, transpose: bool) -> torch.Tensor:
    """W x (W^T x with ``transpose``) for W [R, C] in CSR; same contract as ``spmm_ref``.

    Args:
        rowptr, col, rowptr_t, col_t, perm: int32 index tensors of the pattern.
        vals: [nnz] kept values (float32 or float64). x: [C, N] ([R, N] if transpose).

    Returns:
        A fresh contiguous [R, N] ([C, N] if transpose) tensor.
    """
    for name, t in zip(("rowptr", "col", "rowptr_t", "col_t", "perm"),
                       (rowptr, col, rowptr_t, col_t, perm), strict=True):
        check_index(name, t)
    check_float("x", x)
    check_float("vals", vals, x.dtype)
    n_rows, n_cols = rowptr.numel() - 1, rowptr_t.numel() - 1
    n_in, n_out = (n_rows, n_cols) if transpose else (n_cols, n_rows)
    if x.dim() != 2 or x.shape[0] != n_in:
        raise ValueError(f"sparsekern triton spmm: x must be [{n_in}, N], got {list(x.shape)}")
    if vals.shape != col.shape:
        raise ValueError(f"sparsekern triton spmm: vals has shape {list(vals.shape)}, the pattern "
                         f"{col.numel()} entries")
    if any(t.device != x.device for t in (rowptr, col, rowptr_t, col_t, perm, vals)):
        raise ValueError(f"sparsekern triton spmm: the pattern and vals must be on {x.device}")
    x = x.contiguous()
    y = torch.empty((n_out, x.shape[1]), dtype=x.dtype, device=x.device)
    if transpose:
        return spmm_into(rowptr_t, col_t, perm, vals.contiguous(), x, y)
    return spmm_into(rowptr, col, None, vals.contiguous(), x, y)


_SCALARS = ("n_rows", "N", "ldx", "ldy", "total", "n_blocks", "N_ITERS")
_SPMM_RULE = AotRule(ints=_SCALARS, index=("rowptr", "col", "perm"))
_BLOCKED_RULE = AotRule(ints=(*_SCALARS, "n_groups"), index=("bptr", "bcol"))


def aot_variants(dtype: torch.dtype) -> list[AotVariant]:
    """(kernel, signature, constexprs) of every compiled variant, for ahead-of-time checks."""
    block_k, block_n, _ = _config(1024, dtype)
    return [*(aot_variant(_spmm_kernel, dtype, _SPMM_RULE, HAS_PERM=has_perm, BLOCK_K=block_k,
                          BLOCK_N=block_n) for has_perm in (False, True)),
            aot_variant(_spmm_blocked_kernel, dtype, _BLOCKED_RULE,
                        BLOCK_K=max(1, block_k // BLOCK_ROWS), BLOCK_N=block_n)]
