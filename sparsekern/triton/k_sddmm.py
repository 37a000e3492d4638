"""SDDMM in Triton: out[k] = <a[row_k, :], b[col_k, :]>, the weight gradient at the kept places.

a [R, N] and b [C, N] are feature-major (the batch is N), so every kept entry is
the dot product of two contiguous rows. Programs own equal slices of the nnz
entries, not of the rows, so the work is balanced whatever the row lengths:
each program finds the rows of its entries by a vectorised binary search in
``rowptr`` (no COO row array has to exist). When there are few entries and a
long N, the N range is split over a second grid axis into partial sums that are
added in a fixed order afterwards (deterministic, no atomics).

Oracle: ``sparsekern.ref.sddmm_ref``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

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

__all__ = ["aot_variants", "sddmm"]


@triton.jit(do_not_specialize=["N", "lda", "ldb", "n_per_split"])
def _sddmm_kernel(rowptr, col, a, b, out, n_rows, nnz, N, lda, ldb, n_per_split, N_ITERS,
                  BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    offs_k = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_k = offs_k < nnz
    # Row of entry k: the first r with rowptr[r + 1] > k, searched over [0, n_rows).
    lo = tl.zeros([BLOCK_K], tl.int32)
    hi = lo + n_rows - 1
    for _ in range(N_ITERS):
        active = lo < hi
        mid = (lo + hi) // 2
        right = tl.load(rowptr + mid + 1, mask=active, other=0) <= offs_k
        lo = tl.where(active & right, mid + 1, lo)
        hi = tl.where(active & (~right), mid, hi)
    a_rows = a + lo.to(tl.int64) * lda
    b_rows = b + tl.load(col + offs_k, mask=mask_k, other=0).to(tl.int64) * ldb
    n_start = tl.program_id(1) * n_per_split
    n_end = tl.minimum(n_start + n_per_split, N)
    acc = tl.zeros([BLOCK_K], dtype=out.dtype.element_ty)
    for n0 in range(n_start, n_end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        m = mask_k[:, None] & (offs_n < n_end)[None, :]
        at = tl.load(a_rows[:, None] + offs_n[None, :], mask=m, other=0.0)
        bt = tl.load(b_rows[:, None] + offs_n[None, :], mask=m, other=0.0)
        acc += tl.sum(at * bt, axis=1)
    tl.store(out + tl.program_id(1).to(tl.int64) * nnz + offs_k, acc, mask=mask_k)


def _config(nnz: int, n_cols: int, dtype: torch.dtype) -> tuple[int, int, int]:
    """(BLOCK_K, BLOCK_N, splits of N) for a launch."""
    if interpreting():
        return next_pow2(nnz, lo=16, hi=1024), next_pow2(n_cols, lo=16, hi=256), 1
    block_k = 32 if dtype == torch.float32 else 16
    block_n = next_pow2(n_cols, lo=16, hi=128)
    # Aim for about 1024 programs: enough to fill a GPU when nnz is small.
    programs = triton.cdiv(nnz, block_k)
    splits = max(1, min(triton.cdiv(1024, programs), triton.cdiv(n_cols, 4 * block_n)))
    return block_k, block_n, splits


def sddmm(rowptr: torch.Tensor, col: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
          config: tuple[int, int, int] | None = None) -> torch.Tensor:
    """(a b^T) at the kept places of the CSR pattern (rowptr, col); same contract as ``sddmm_ref``.

    Args:
        rowptr: [R + 1] int32, col: [nnz] int32.
        a: [R, N], b: [C, N] (float32 or float64, unit column stride).
        config: overrides (BLOCK_K, BLOCK_N, splits of N), for tests.

    Returns:
        A fresh [nnz] tensor in the order of ``col``.
    """
    check_index("rowptr", rowptr)
    check_index("col", col)
    check_float("a", a)
    check_float("b", b, a.dtype)
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"sparsekern triton sddmm: a [R, N] and b [C, N] must share N, got "
                         f"{list(a.shape)} and {list(b.shape)}")
    if any(t.device != a.device for t in (rowptr, col, b)):
        raise ValueError(f"sparsekern triton sddmm: the pattern and b must be on {a.device}")
    n_rows, nnz, n_cols = rowptr.numel() - 1, col.numel(), a.shape[1]
    if a.shape[0] != n_rows:
        raise ValueError(f"sparsekern triton sddmm: a has {a.shape[0]} rows, the pattern {n_rows}")
    if nnz == 0 or n_cols == 0:
        return a.new_zeros(nnz)
    if a.stride(1) != 1 and n_cols > 1:
        a = a.contiguous()
    if b.stride(1) != 1 and n_cols > 1:
        b = b.contiguous()
    check_device(a)
    block_k, block_n, splits = config or _config(nnz, n_cols, a.dtype)
    n_per_split = triton.cdiv(triton.cdiv(n_cols, splits), block_n) * block_n
    splits = triton.cdiv(n_cols, n_per_split)
    out = a.new_empty((splits, nnz) if splits > 1 else (nnz,))
    grid = (triton.cdiv(nnz, block_k), splits)
    _sddmm_kernel[grid](rowptr, col, a, b, out, n_rows, nnz, n_cols, a.stride(0), b.stride(0),
                        n_per_split, search_iters(n_rows), BLOCK_K=block_k, BLOCK_N=block_n,
                        num_warps=4)
    return out if splits == 1 else out.sum(0)


_SDDMM_RULE = AotRule(ints=("n_rows", "nnz", "N", "lda", "ldb", "n_per_split", "N_ITERS"),
                      index=("rowptr", "col"))


def aot_variants(dtype: torch.dtype) -> list[AotVariant]:
    """(kernel, signature, constexprs) of every compiled variant, for ahead-of-time checks."""
    block_k, block_n, _ = _config(4096, 1024, dtype)
    return [aot_variant(_sddmm_kernel, dtype, _SDDMM_RULE, BLOCK_K=block_k, BLOCK_N=block_n)]
