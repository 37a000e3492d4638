"""Pruned 2-D convolutions in Triton: conv2d, its input adjoint and its weight gradient.

A weight W [C_out, C_in, KH, KW] is the CSR matrix [C_out, C_in KH KW]
(``formats.CSRPattern``) whose column ``c = ci KH KW + ky KW + kx`` is one tap;
maps are feature-major, x [C_in, N, H, W] and y [C_out, N, Ho, Wo], so every
channel is one contiguous run of N H W (or N Ho Wo) values, the batch and the
spatial positions flattened together. Square stride s and zero padding p,
dilation 1, groups 1. Oracles: ``sparsekern.ref.conv2d_ref``, ``conv2d_t_ref``,
``conv2d_wgrad_ref``.

- **conv2d**: one program per (tile of BLOCK_P flattened output positions, output
  channel co: the second grid axis, so at most 65535 channels). It streams the
  row's kept taps BLOCK_K at a time; each tap gathers the shifted input tile
  x[ci, n, oy s + ky - p, ox s + kx - p] (masked at the borders, which is the
  zero padding) and adds vals * tile. A row is never split: no atomics,
  deterministic sums.
- **conv2d_t** (the adjoint w.r.t. x): one program per (tile of input positions,
  input channel ci), reading W through the stored transpose. The taps of ci
  are the transpose's rows ci KH KW .. ci KH KW + KH KW - 1; for each tap the
  output place an input position reaches, oy = (iy + p - ky) / s, is computed
  once (and masked where s does not divide or it falls outside Ho x Wo), then
  the tap's entries (output channel ``col_t``, value ``vals[perm]``) gather the
  cotangent there. Again no atomics.
- **conv2d_wgrad**: gw[e] = sum over n, oy, ox of g[co, n, oy, ox] x[ci, n, iy, ix]
  for each kept tap e; programs own blocks of BLOCK_E entries (their rows
  found by a binary search in ``rowptr``, as in ``k_sddmm``) and reduce over
  the flattened output positions. Few entries and many positions: the
  positions are split over a second grid axis into partial sums added in a
  fixed order afterwards (deterministic).

Positions within a channel are int32 (N H W and N Ho Wo must stay below 2^31;
the wrappers say so otherwise); channel offsets are int64. Products are plain
fp32/fp64 multiply-adds (no tensor cores).
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

__all__ = ["aot_variants", "conv2d", "conv2d_t", "conv2d_wgrad", "out_size"]

_INT32_LIMIT = 2**31
# The channel is the grid's second axis, which CUDA limits to 65535 programs.
_MAX_CHANNELS = 65535


@triton.jit(do_not_specialize=["N", "H", "W", "Ho", "Wo", "PX", "PO"])
def _conv2d_kernel(rowptr, col, vals, x, y, N, H, W, Ho, Wo, PX, PO, KH, KW, stride, padding,
                   BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr):
    """y[co, p] for the output positions p of this tile; PX = N H W, PO = N Ho Wo."""
    co = tl.program_id(1)
    offs_p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    mask_p = offs_p < PO
    hw_o = Ho * Wo
    n = offs_p // hw_o
    rem = offs_p - n * hw_o
    oy = rem // Wo
    ox = rem - oy * Wo
    iy0 = oy * stride - padding
    ix0 = ox * stride - padding
    x_pos = n * (H * W)
    kk = KH * KW
    k0 = tl.load(rowptr + co)
    k1 = tl.load(rowptr + co + 1)
    acc = tl.zeros([BLOCK_P], dtype=y.dtype.element_ty)
    for k in range(k0, k1, BLOCK_K):
        offs_k = k + tl.arange(0, BLOCK_K)
        mask_k = offs_k < k1
        c = tl.load(col + offs_k, mask=mask_k, other=0)
        v = tl.load(vals + offs_k, mask=mask_k, other=0.0)
        ci = c // kk
        tap = c - ci * kk
        ky = tap // KW
        kx = tap - ky * KW
        iy = iy0[None, :] + ky[:, None]
        ix = ix0[None, :] + kx[:, None]
        # Outside the image is the zero padding: masked, never read.
        m = (mask_k[:, None] & mask_p[None, :] & (iy >= 0) & (iy < H) & (ix >= 0) & (ix < W))
        off = ci.to(tl.int64)[:, None] * PX + (x_pos[None, :] + iy * W + ix)
        xt = tl.load(x + off, mask=m, other=0.0)
        acc += tl.sum(v[:, None] * xt, axis=0)
    tl.store(y + co.to(tl.int64) * PO + offs_p, acc, mask=mask_p)


@triton.jit(do_not_specialize=["N", "H", "W", "Ho", "Wo", "PX", "PO"])
def _conv2d_t_kernel(rowptr_t, col_t, perm, vals, g, gx, N, H, W, Ho, Wo, PX, PO, KH, KW, stride,
                     padding, BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr):
    """gx[ci, p] for the input positions p of this tile, from g through the transpose."""
    ci = tl.program_id(1)
    offs_p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    mask_p = offs_p < PX
    hw = H * W
    n = offs_p // hw
    rem = offs_p - n * hw
    iy = rem // W
    ix = rem - iy * W
    g_pos = n * (Ho * Wo)
    kk = KH * KW
    acc = tl.zeros([BLOCK_P], dtype=gx.dtype.element_ty)
    for tap in range(0, kk):
        ky = tap // KW
        kx = tap - ky * KW
        # The output place (oy, ox) with oy s + ky - p = iy, where there is one.
        ny = iy + padding - ky
        nx = ix + padding - kx
        nyc = tl.maximum(ny, 0)
        nxc = tl.maximum(nx, 0)
        oy = nyc // stride
        ox = nxc // stride
        hit = (mask_p & (ny >= 0) & (nx >= 0) & (oy * stride == ny) & (ox * stride == nx)
               & (oy < Ho) & (ox < Wo))
        g_off = g_pos + oy * Wo + ox
        r = ci * kk + tap
        k0 = tl.load(rowptr_t + r)
        k1 = tl.load(rowptr_t + r + 1)
        for k in range(k0, k1, BLOCK_K):
            offs_k = k + tl.arange(0, BLOCK_K)
            mask_k = offs_k < k1
            co = tl.load(col_t + offs_k, mask=mask_k, other=0)
            v = tl.load(vals + tl.load(perm + offs_k, mask=mask_k, other=0), mask=mask_k,
                        other=0.0)
            gt = tl.load(g + co.to(tl.int64)[:, None] * PO + g_off[None, :],
                         mask=mask_k[:, None] & hit[None, :], other=0.0)
            acc += tl.sum(v[:, None] * gt, axis=0)
    tl.store(gx + ci.to(tl.int64) * PX + offs_p, acc, mask=mask_p)


@triton.jit(do_not_specialize=["N", "H", "W", "Ho", "Wo", "PX", "PO", "p_per_split"])
def _conv2d_wgrad_kernel(rowptr, col, g, x, out, n_rows, nnz, N, H, W, Ho, Wo, PX, PO, KH, KW,
                         stride, padding, p_per_split, N_ITERS, BLOCK_E: tl.constexpr,
                         BLOCK_P: tl.constexpr):
    """Partial sums over this split's output positions of BLOCK_E entries' gradients."""
    offs_e = tl.program_id(0) * BLOCK_E + tl.arange(0, BLOCK_E)
    mask_e = offs_e < nnz
    # Row (output channel) of entry e: the first r with rowptr[r + 1] > e.
    lo = tl.zeros([BLOCK_E], tl.int32)
    hi = lo + n_rows - 1
    for _ in range(N_ITERS):
        active = lo < hi
        mid = (lo + hi) // 2
        right = tl.load(rowptr + mid + 1, mask=active, other=0) <= offs_e
        lo = tl.where(active & right, mid + 1, lo)
        hi = tl.where(active & (~right), mid, hi)
    kk = KH * KW
    c = tl.load(col + offs_e, mask=mask_e, other=0)
    ci = c // kk
    tap = c - ci * kk
    ky = tap // KW
    kx = tap - ky * KW
    g_rows = g + lo.to(tl.int64) * PO
    x_rows = x + ci.to(tl.int64) * PX
    hw_o = Ho * Wo
    p_start = tl.program_id(1) * p_per_split
    p_end = tl.minimum(p_start + p_per_split, PO)
    acc = tl.zeros([BLOCK_E], dtype=out.dtype.element_ty)
    for p0 in range(p_start, p_end, BLOCK_P):
        offs_p = p0 + tl.arange(0, BLOCK_P)
        mask_p = offs_p < p_end
        n = offs_p // hw_o
        rem = offs_p - n * hw_o
        oy = rem // Wo
        ox = rem - oy * Wo
        iy = (oy * stride - padding)[None, :] + ky[:, None]
        ix = (ox * stride - padding)[None, :] + kx[:, None]
        m = mask_e[:, None] & mask_p[None, :]
        gt = tl.load(g_rows[:, None] + offs_p[None, :], mask=m, other=0.0)
        inside = m & (iy >= 0) & (iy < H) & (ix >= 0) & (ix < W)
        xt = tl.load(x_rows[:, None] + ((n * (H * W))[None, :] + iy * W + ix), mask=inside,
                     other=0.0)
        acc += tl.sum(gt * xt, axis=1)
    tl.store(out + tl.program_id(1).to(tl.int64) * nnz + offs_e, acc, mask=mask_e)


# ------------------------------------------------------------------ launch rules


def _config(positions: int, dtype: torch.dtype) -> tuple[int, int]:
    """(BLOCK_K, BLOCK_P) of conv2d / conv2d_t."""
    if interpreting():
        # The interpreter pays per operation, not per element: few, wide programs.
        return 64, next_pow2(positions, lo=16, hi=1024)
    # The [BLOCK_K, BLOCK_P] gathered tile stays near 16 registers a thread at 4 warps.
    return (16 if dtype == torch.float32 else 8), next_pow2(positions, lo=16, hi=128)


def _wgrad_config(nnz: int, positions: int, dtype: torch.dtype) -> tuple[int, int, int]:
    """(BLOCK_E, BLOCK_P, splits of the positions) of conv2d_wgrad."""
    if interpreting():
        return next_pow2(nnz, lo=16, hi=1024), next_pow2(positions, lo=16, hi=256), 1
    # Two gathered [BLOCK_E, BLOCK_P] tiles (g and the shifted x), each with its own
    # addresses: 16 elements a thread at 4 warps keep it out of local memory.
    block_e = 32 if dtype == torch.float32 else 16
    block_p = next_pow2(positions, lo=16, hi=64)
    # Aim for about 1024 programs: enough to fill a GPU when nnz is small.
    programs = triton.cdiv(nnz, block_e)
    splits = max(1, min(triton.cdiv(1024, programs), triton.cdiv(positions, 4 * block_p)))
    return block_e, block_p, splits


def out_size(h: int, w: int, kh: int, kw: int, stride: int, padding: int, op: str
             ) -> tuple[int, int]:
    """(Ho, Wo) of a convolution of an h x w map; ValueError naming the sizes unless >= 1."""
    if kh < 1 or kw < 1:
        raise ValueError(f"sparsekern triton {op}: kernel size must be >= 1, got {kh} x {kw}")
    if stride < 1:
        raise ValueError(f"sparsekern triton {op}: stride must be >= 1, got {stride}")
    if padding < 0:
        raise ValueError(f"sparsekern triton {op}: padding must be >= 0, got {padding}")
    ho = (h + 2 * padding - kh) // stride + 1
    wo = (w + 2 * padding - kw) // stride + 1
    if ho < 1 or wo < 1:
        raise ValueError(f"sparsekern triton {op}: a {h} x {w} input with a {kh} x {kw} kernel, "
                         f"stride {stride} and padding {padding} has output size {ho} x {wo}; "
                         "both must be >= 1")
    return ho, wo


def _check_pattern(op: str, rowptr: torch.Tensor, col: torch.Tensor, rowptr_t: torch.Tensor,
                   col_t: torch.Tensor, perm: torch.Tensor, kh: int, kw: int,
                   like: torch.Tensor) -> tuple[int, int]:
    """The index tensors' checks; returns (C_out, C_in) read from the pattern."""
    for name, t in zip(("rowptr", "col", "rowptr_t", "col_t", "perm"),
                       (rowptr, col, rowptr_t, col_t, perm), strict=True):
        check_index(name, t)
        if t.device != like.device:
            raise ValueError(f"sparsekern triton {op}: {name} is on {t.device}, the data on "
                             f"{like.device}")
    if rowptr.numel() < 1 or rowptr_t.numel() < 1:
        raise ValueError(f"sparsekern triton {op}: rowptr and rowptr_t need at least one entry")
    nnz = col.numel()
    if col_t.numel() != nnz or perm.numel() != nnz:
        raise ValueError(f"sparsekern triton {op}: col, col_t and perm must have one entry per "
                         f"kept tap, got {nnz}, {col_t.numel()} and {perm.numel()}")
    if kh < 1 or kw < 1:
        raise ValueError(f"sparsekern triton {op}: kernel size must be >= 1, got {kh} x {kw}")
    taps = rowptr_t.numel() - 1
    if taps % (kh * kw):
        raise ValueError(f"sparsekern triton {op}: rowptr_t has {rowptr_t.numel()} entries, "
                         f"expected C_in * {kh} * {kw} + 1 (one column per tap)")
    return rowptr.numel() - 1, taps // (kh * kw)


def _check_map(op: str, name: str, t: torch.Tensor, shape: tuple[int, ...]) -> None:
    if tuple(t.shape) != shape:
        raise ValueError(f"sparsekern triton {op}: {name} has shape {list(t.shape)}, expected "
                         f"{list(shape)} (feature-major [C, N, H, W])")


def _check_positions(op: str, channels: int, *sizes: int) -> None:
    if max(sizes) >= _INT32_LIMIT:
        raise ValueError(f"sparsekern triton {op}: a channel of {max(sizes)} values (N * H * W) "
                         "does not fit the kernels' int32 positions")
    if channels > _MAX_CHANNELS:
        raise ValueError(f"sparsekern triton {op}: {channels} channels, the kernels' grid takes "
                         f"at most {_MAX_CHANNELS}")


def _check_4d(op: str, name: str, t: torch.Tensor) -> None:
    if t.dim() != 4:
        raise ValueError(f"sparsekern triton {op}: {name} must be 4-D [C, N, H, W] "
                         f"(feature-major), got shape {list(t.shape)}")


def conv2d(rowptr: torch.Tensor, col: torch.Tensor, rowptr_t: torch.Tensor, col_t: torch.Tensor,
           perm: torch.Tensor, vals: torch.Tensor, x: torch.Tensor, c_out: int, kh: int, kw: int,
           stride: int, padding: int, config: tuple[int, int] | None = None) -> torch.Tensor:
    """The pruned convolution of feature-major x; same contract as ``conv2d_ref``.

    Args:
        rowptr, col, rowptr_t, col_t, perm: int32 pattern of W as [C_out, C_in kh kw].
        vals: [nnz] kept values (CSR order). x: [C_in, N, H, W] (float32 or float64).
        c_out, kh, kw, stride, padding: as ``sparsekern.ops.conv2d``.
        config: overrides (BLOCK_K, BLOCK_P), for tests.

    Returns:
        A fresh contiguous [C_out, N, Ho, Wo] tensor.
    """
    op = "conv2d"
    check_float("x", x)
    check_float("vals", vals, x.dtype)
    _check_4d(op, "x", x)
    rows, c_in = _check_pattern(op, rowptr, col, rowptr_t, col_t, perm, kh, kw, x)
    if rows != c_out:
        raise ValueError(f"sparsekern triton {op}: rowptr has {rowptr.numel()} entries, expected "
                         f"C_out + 1 = {c_out + 1}")
    if vals.shape != col.shape or vals.device != x.device:
        raise ValueError(f"sparsekern triton {op}: vals [{vals.numel()}] on {vals.device} must "
                         f"hold the pattern's {col.numel()} entries on {x.device}")
    _, n, h, w = x.shape
    _check_map(op, "x", x, (c_in, n, h, w))
    ho, wo = out_size(h, w, kh, kw, stride, padding, op)
    px, po = n * h * w, n * ho * wo
    _check_positions(op, c_out, px, po)
    if c_out == 0 or po == 0 or col.numel() == 0:
        return x.new_zeros((c_out, n, ho, wo))
    check_device(x)
    x = x.contiguous()
    y = torch.empty((c_out, n, ho, wo), dtype=x.dtype, device=x.device)
    block_k, block_p = config or _config(po, x.dtype)
    grid = (triton.cdiv(po, block_p), c_out)
    _conv2d_kernel[grid](rowptr, col, vals.contiguous(), x, y, n, h, w, ho, wo, px, po, kh, kw,
                         stride, padding, BLOCK_K=block_k, BLOCK_P=block_p, num_warps=4)
    return y


def conv2d_t(rowptr: torch.Tensor, col: torch.Tensor, rowptr_t: torch.Tensor,
             col_t: torch.Tensor, perm: torch.Tensor, vals: torch.Tensor, g: torch.Tensor,
             c_in: int, h: int, w: int, kh: int, kw: int, stride: int, padding: int,
             config: tuple[int, int] | None = None) -> torch.Tensor:
    """The adjoint of ``conv2d`` w.r.t. x; same contract as ``conv2d_t_ref``.

    Args:
        rowptr, col, rowptr_t, col_t, perm, vals: the pruned weight, as in ``conv2d``.
        g: [C_out, N, Ho, Wo] with Ho, Wo those of an h x w input.
        c_in, h, w: the input's channels and size. kh, kw, stride, padding: as conv2d.
        config: overrides (BLOCK_K, BLOCK_P), for tests.

    Returns:
        A fresh contiguous [C_in, N, h, w] tensor.
    """
    op = "conv2d_t"
    check_float("g", g)
    check_float("vals", vals, g.dtype)
    _check_4d(op, "g", g)
    c_out, taps_in = _check_pattern(op, rowptr, col, rowptr_t, col_t, perm, kh, kw, g)
    if taps_in != c_in:
        raise ValueError(f"sparsekern triton {op}: rowptr_t has {rowptr_t.numel()} entries, "
                         f"expected C_in * {kh} * {kw} + 1 = {c_in * kh * kw + 1}")
    if vals.shape != col.shape or vals.device != g.device:
        raise ValueError(f"sparsekern triton {op}: vals [{vals.numel()}] on {vals.device} must "
                         f"hold the pattern's {col.numel()} entries on {g.device}")
    ho, wo = out_size(h, w, kh, kw, stride, padding, op)
    n = g.shape[1]
    _check_map(op, "g", g, (c_out, n, ho, wo))
    px, po = n * h * w, n * ho * wo
    _check_positions(op, c_in, px, po)
    if c_in == 0 or px == 0 or col.numel() == 0:
        return g.new_zeros((c_in, n, h, w))
    check_device(g)
    g = g.contiguous()
    gx = torch.empty((c_in, n, h, w), dtype=g.dtype, device=g.device)
    block_k, block_p = config or _config(px, g.dtype)
    grid = (triton.cdiv(px, block_p), c_in)
    _conv2d_t_kernel[grid](rowptr_t, col_t, perm, vals.contiguous(), g, gx, n, h, w, ho, wo, px,
                           po, kh, kw, stride, padding, BLOCK_K=block_k, BLOCK_P=block_p,
                           num_warps=4)
    return gx


def conv2d_wgrad(rowptr: torch.Tensor, col: torch.Tensor, rowptr_t: torch.Tensor,
                 col_t: torch.Tensor, perm: torch.Tensor, g: torch.Tensor, x: torch.Tensor,
                 kh: int, kw: int, stride: int, padding: int,
                 config: tuple[int, int, int] | None = None) -> torch.Tensor:
    """The weight gradient of ``conv2d`` at the kept taps; same contract as ``conv2d_wgrad_ref``.

    Args:
        rowptr, col, rowptr_t, col_t, perm: the pattern, as in ``conv2d``.
        g: [C_out, N, Ho, Wo], the cotangent of conv2d's output. x: [C_in, N, H, W].
        kh, kw, stride, padding: as in ``conv2d``.
        config: overrides (BLOCK_E, BLOCK_P, splits of the positions), for tests.

    Returns:
        A fresh [nnz] tensor in the order of ``col``.
    """
    op = "conv2d_wgrad"
    check_float("x", x)
    check_float("g", g, x.dtype)
    _check_4d(op, "x", x)
    _check_4d(op, "g", g)
    if g.device != x.device:
        raise ValueError(f"sparsekern triton {op}: g is on {g.device}, x on {x.device}")
    c_out, c_in = _check_pattern(op, rowptr, col, rowptr_t, col_t, perm, kh, kw, x)
    _, n, h, w = x.shape
    _check_map(op, "x", x, (c_in, n, h, w))
    ho, wo = out_size(h, w, kh, kw, stride, padding, op)
    _check_map(op, "g", g, (c_out, n, ho, wo))
    px, po = n * h * w, n * ho * wo
    _check_positions(op, 0, px, po)
    nnz = col.numel()
    if nnz == 0 or po == 0:
        return x.new_zeros(nnz)
    check_device(x)
    g, x = g.contiguous(), x.contiguous()
    block_e, block_p, splits = config or _wgrad_config(nnz, po, x.dtype)
    p_per_split = triton.cdiv(triton.cdiv(po, splits), block_p) * block_p
    splits = triton.cdiv(po, p_per_split)
    out = x.new_empty((splits, nnz) if splits > 1 else (nnz,))
    grid = (triton.cdiv(nnz, block_e), splits)
    _conv2d_wgrad_kernel[grid](rowptr, col, g, x, out, c_out, nnz, n, h, w, ho, wo, px, po, kh,
                               kw, stride, padding, p_per_split, search_iters(c_out),
                               BLOCK_E=block_e, BLOCK_P=block_p, num_warps=4)
    return out if splits == 1 else out.sum(0)


# ------------------------------------------------------------------ ahead of time

_SIZES = ("N", "H", "W", "Ho", "Wo", "PX", "PO", "KH", "KW", "stride", "padding")
_CONV_RULE = AotRule(ints=_SIZES, index=("rowptr", "col"))
_CONV_T_RULE = AotRule(ints=_SIZES, index=("rowptr_t", "col_t", "perm"))
_WGRAD_RULE = AotRule(ints=("n_rows", "nnz", *_SIZES, "p_per_split", "N_ITERS"),
                      index=("rowptr", "col"))


def aot_variants(dtype: torch.dtype) -> list[AotVariant]:
    """(kernel, signature, constexprs) of every compiled variant, for ahead-of-time checks."""
    block_k, block_p = _config(1 << 20, dtype)
    block_e, wblock_p, _ = _wgrad_config(1 << 16, 1 << 20, dtype)
    return [aot_variant(_conv2d_kernel, dtype, _CONV_RULE, BLOCK_K=block_k, BLOCK_P=block_p),
            aot_variant(_conv2d_t_kernel, dtype, _CONV_T_RULE, BLOCK_K=block_k, BLOCK_P=block_p),
            aot_variant(_conv2d_wgrad_kernel, dtype, _WGRAD_RULE, BLOCK_E=block_e,
                        BLOCK_P=wblock_p)]
