"""The fused MLP program in Triton: forward + JVP (divergence) and its hand-written backward.

Semantics and notation: ``sparsekern.ref.mlp_fwd_ref`` / ``mlp_bwd_ref`` (the
oracles; feature-major, columns [h | v_1 | ... | v_K] of width B each, G = 1 + K
column groups).

Two paths, picked by ``mlp_fwd`` / ``mlp_bwd``:

- Fused (``fused_eligible``: every layer dense, every width <= ``FUSED_MAX_WIDTH``).
  One launch runs the whole network for a block of BB batch columns: per layer,
  per chunk of CH output features, the products W_l X_{l-1} for the state and
  each tangent (``tl.dot`` over KC-wide input chunks: IEEE fp32, or TF32, bf16
  or fp16 operands as ``SparseConfig.precision`` asks), then the activation
  and its JVP in registers; the divergence is contracted in the last layer, so
  one launch yields f and div. The layer's output goes to a per-layer buffer
  (the saved X_l, or scratch) that only this program reads back, with a CTA
  barrier between layers. The backward is one launch too: per layer the
  epilogue (activation derivatives, cotangents of the pre-activations,
  per-program partial sums of the shift and scale gradients) then W_l^T times
  them; the weight gradients are one dense GEMM per layer afterwards (they sum
  over the batch, across programs).
- General (CSR, blocked or wide layers): per layer one product (dense: cuBLAS,
  TF32 off unless the precision allows it; CSR and blocked: ``k_spmm``) and
  one Triton epilogue kernel; the backward uses ``k_sddmm`` for sparse weight
  gradients and the CSR's stored transpose for W^T. For bf16/fp16 it rounds
  the operands of each product before it (``round_operand``), which gives the
  fused kernel's products.

Both paths share the activation code (``_act_d1``, ``_act_d1_d2``, written to
match ``sparsekern.activations.act_ref``, Triton's core math only so it also
runs in the interpreter) and the backward epilogue (``_bwd_tile``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sparsekern.activations import ACT_IDS, SOFTPLUS_THRESHOLD
from sparsekern.formats import split_weights
from sparsekern.precision import round_operand
from sparsekern.ref import mlp_bwd_ref, mlp_fwd_ref, stack_columns
from sparsekern.triton.k_sddmm import sddmm
from sparsekern.triton.k_spmm import spmm_blocked_into, spmm_into
from sparsekern.triton.launch import (
    AOT_DTYPES,
    LOWP_BF16,
    LOWP_BF16_EMULATED,
    LOWP_FP16,
    LOWP_NONE,
    check_device,
    check_float,
    cublas_fp32,
    dot_operands,
    dot_precision,
    interpreting,
    next_pow2,
)

__all__ = [
    "FUSED_MAX_WIDTH",
    "aot_variants",
    "fused_eligible",
    "fused_mlp_bwd",
    "fused_mlp_fwd",
    "general_mlp_bwd",
    "general_mlp_fwd",
    "mlp_bwd",
    "mlp_bwd_ref",
    "mlp_fwd",
    "mlp_fwd_ref",
]

FUSED_MAX_WIDTH = 256
FUSED_CH = 64
FUSED_KC = 16  # tl.dot's smallest K on Triton 3.6 (3.9 accepts 8)

_TANH = tl.constexpr(ACT_IDS["tanh"])
_SIGMOID = tl.constexpr(ACT_IDS["sigmoid"])
_SOFTPLUS = tl.constexpr(ACT_IDS["softplus"])
_RELU = tl.constexpr(ACT_IDS["relu"])
_ELU = tl.constexpr(ACT_IDS["elu"])
_SWISH = tl.constexpr(ACT_IDS["swish"])
_SOFTPLUS_THRESHOLD = tl.constexpr(SOFTPLUS_THRESHOLD)  # identity above it, as torch
_LOWP_BF16 = tl.constexpr(LOWP_BF16)
_LOWP_FP16 = tl.constexpr(LOWP_FP16)
_LOWP_BF16_EMULATED = tl.constexpr(LOWP_BF16_EMULATED)

# Offsets of the sections of the fused kernels' pointer table (one int64 per
# layer each, then the L + 1 widths).
_T_W = tl.constexpr(0)
_T_SCALE = tl.constexpr(1)
_T_SHIFT = tl.constexpr(2)
_T_M = tl.constexpr(3)
_T_OUT = tl.constexpr(4)  # the layers' outputs: X_l forward, Mbar_l backward
_T_DIMS = tl.constexpr(5)


# ----------------------------------------------------------------- activations


@triton.jit
def _expm1_nonpos(x):
    """exp(x) - 1 for x <= 0 without the cancellation of exp(x) - 1 near 0.

    Kahan's trick: with u = exp(x) rounded, (u - 1) * x / log(u) is accurate to
    a few ulps because the rounding error of u cancels between numerator and
    denominator. Triton's core math has no expm1 (libdevice's cannot run in
    the interpreter).
    """
    u = tl.exp(x)
    # Both branches of tl.where are evaluated: keep the unused one finite.
    degenerate = (u == 1.0) | (u == 0.0)
    v = tl.where(degenerate, 2.0, u)
    r = (v - 1.0) * x / tl.log(v)
    return tl.where(u == 1.0, x, tl.where(u == 0.0, -1.0, r))


@triton.jit
def _log1p_nonneg(x):
    """log(1 + x) for x >= 0, accurate for small x (Kahan's trick, as in _expm1_nonpos)."""
    u = 1.0 + x
    v = tl.where(u == 1.0, 2.0, u)
    return tl.where(u == 1.0, x, tl.log(v) * x / (v - 1.0))


@triton.jit
def _sigmoid(x):
    # exp(-|x|) never overflows, and the x < 0 branch keeps relative accuracy there.
    e = tl.exp(-tl.abs(x))
    return tl.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


@triton.jit
def _tanh(x):
    # tanh|x| = -expm1(-2|x|) / (2 + expm1(-2|x|)): no overflow, no cancellation at 0.
    e = _expm1_nonpos(-2.0 * tl.abs(x))
    t = -e / (2.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def _act_d1(a, ACT: tl.constexpr):
    """(sigma(a), sigma'(a)), as ``activations.act_ref``."""
    if ACT == _TANH:
        h = _tanh(a)
        d1 = 1.0 - h * h
    elif ACT == _SIGMOID:
        h = _sigmoid(a)
        d1 = h * (1.0 - h)
    elif ACT == _SOFTPLUS:
        lin = a > _SOFTPLUS_THRESHOLD
        h = tl.where(lin, a, _log1p_nonneg(tl.exp(tl.minimum(a, _SOFTPLUS_THRESHOLD))))
        d1 = tl.where(lin, 1.0, _sigmoid(a))
    elif ACT == _RELU:
        pos = a > 0
        h = tl.where(pos, a, 0.0)
        d1 = tl.where(pos, 1.0, 0.0)
    elif ACT == _ELU:
        pos = a > 0
        neg = tl.minimum(a, 0.0)
        h = tl.where(pos, a, _expm1_nonpos(neg))
        d1 = tl.where(pos, 1.0, tl.exp(neg))
    elif ACT == _SWISH:
        s = _sigmoid(a)
        h = a * s
        d1 = s * (1.0 + a * (1.0 - s))
    else:
        h = a
        d1 = tl.zeros_like(a) + 1.0
    return h, d1


@triton.jit
def _act_d1_d2(a, ACT: tl.constexpr):
    """(sigma'(a), sigma''(a)), as ``activations.act_ref``."""
    if ACT == _TANH:
        h = _tanh(a)
        d1 = 1.0 - h * h
        d2 = -2.0 * h * d1
    elif ACT == _SIGMOID:
        h = _sigmoid(a)
        d1 = h * (1.0 - h)
        d2 = d1 * (1.0 - 2.0 * h)
    elif ACT == _SOFTPLUS:
        lin = a > _SOFTPLUS_THRESHOLD
        s = _sigmoid(a)
        d1 = tl.where(lin, 1.0, s)
        d2 = tl.where(lin, 0.0, s * (1.0 - s))
    elif ACT == _RELU:
        d1 = tl.where(a > 0, 1.0, 0.0)
        d2 = tl.zeros_like(a)
    elif ACT == _ELU:
        pos = a > 0
        e = tl.exp(tl.minimum(a, 0.0))
        d1 = tl.where(pos, 1.0, e)
        d2 = tl.where(pos, 0.0, e)
    elif ACT == _SWISH:
        s = _sigmoid(a)
        d1 = s * (1.0 + a * (1.0 - s))
        d2 = s * (1.0 - s) * (2.0 + a * (1.0 - 2.0 * s))
    else:
        d1 = tl.zeros_like(a) + 1.0
        d2 = tl.zeros_like(a)
    return d1, d2


# ------------------------------------------------------- shared backward epilogue


@triton.jit
def _bwd_tile(m, xbar, grad_f, grad_div, probe, mbar, s, c, rows, cols, mask, ld, B, n, K,
              ACT: tl.constexpr, LAST: tl.constexpr, EXACT: tl.constexpr):
    """Reverse of one layer's epilogue on a tile of (feature ``rows``, batch ``cols``).

    Reads M (the saved pre-products) and the cotangent of the layer's output
    (``xbar``; on the last layer grad_f and grad_div * probe instead), writes
    Mbar = s * G, the cotangent of M, for all G column groups, and returns the
    tile's G_h (summed by the caller into the shift gradient) and sum_g G * M
    (into the scale gradient). ``rows``/``cols`` are broadcastable 2-D index
    tensors, so the fused ([batch, feature]) and the general ([feature, batch])
    kernels share this code. xbar and mbar may be the same buffer: every
    element is read before it is written, by the same thread.
    """
    off = rows.to(tl.int64) * ld + cols
    mh = tl.load(m + off, mask=mask, other=0.0)
    gm = tl.zeros_like(mh)
    if LAST:
        gh = tl.load(grad_f + rows.to(tl.int64) * B + cols, mask=mask, other=0.0)
        # grad_div is per column; the row term only broadcasts the pointer to the tile.
        gd = tl.load(grad_div + (cols + rows * 0), mask=mask, other=0.0)
    else:
        d1, d2 = _act_d1_d2(mh * s + c, ACT)
        hbar = tl.load(xbar + off, mask=mask, other=0.0)
        t = tl.zeros_like(mh)
    for k in range(K):
        off_k = off + (k + 1) * B
        mv = tl.load(m + off_k, mask=mask, other=0.0)
        if LAST:
            if EXACT:
                gv = tl.where(rows == k, gd, 0.0)
            else:
                gv = gd * tl.load(probe + (rows.to(tl.int64) + k * n) * B + cols, mask=mask,
                                  other=0.0)
        else:
            vbar = tl.load(xbar + off_k, mask=mask, other=0.0)
            t += vbar * (mv * s)
            gv = vbar * d1
        gm += gv * mv
        tl.store(mbar + off_k, gv * s, mask=mask)
    if not LAST:
        gh = hbar * d1 + t * d2
    gm += gh * mh
    tl.store(mbar + off, gh * s, mask=mask)
    return gh, gm


# ------------------------------------------------------------------ fused path


@triton.jit
def _table_ptr(table, section, L, li, like):
    """Pointer number li of a section of the table, typed like the pointer ``like``."""
    return tl.load(table + section * L + li).to(tl.pointer_type(like.dtype.element_ty))


@triton.jit
def _dot_operand(x, LOWP: tl.constexpr):
    """x as tl.dot takes it for ``launch.dot_operands``' code LOWP (0: unchanged)."""
    if LOWP == _LOWP_BF16:
        x = x.to(tl.bfloat16)
    elif LOWP == _LOWP_FP16:
        x = x.to(tl.float16)
    elif LOWP == _LOWP_BF16_EMULATED:
        # bf16 round-to-nearest-even kept in float32 bits: add half an ulp of the
        # 16 bits that go (plus one when the kept part is odd), then clear them.
        bits = x.to(tl.uint32, bitcast=True)
        bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
        x = tl.where(x != x, x, bits.to(tl.float32, bitcast=True))
    return x


@triton.jit
def _product(src, ld, col0, w, n_in, rows, mask_r, offs_b, mask_b, BB: tl.constexpr,
             CH: tl.constexpr, KC: tl.constexpr, PRECISION: tl.constexpr,
             LOWP: tl.constexpr):
    """[BB, CH] tile of (W X)^T: batch columns offs_b of group col0, features ``rows``.

    src is [n_in, ld] feature-major, w is [n_out, n_in] row-major. The input
    dimension is walked in KC-wide chunks: W never has to fit on chip whole,
    and Triton's FMA dot (the IEEE path) keeps a KC-long slice of both operands
    in each thread's registers, so a short KC is what avoids spills.
    """
    acc = tl.zeros([BB, CH], dtype=src.dtype.element_ty)
    for i0 in range(0, n_in, KC):
        cols = i0 + tl.arange(0, KC)
        mask_c = cols < n_in
        xt = tl.load(src + cols[None, :].to(tl.int64) * ld + col0 + offs_b[:, None],
                     mask=mask_b[:, None] & mask_c[None, :], other=0.0)
        wt = tl.load(w + rows[None, :] * n_in + cols[:, None],
                     mask=mask_c[:, None] & mask_r[None, :], other=0.0)
        # out_dtype said explicitly: Triton 3.6 assumes float32 even for float64 operands.
        acc = tl.dot(_dot_operand(xt, LOWP), _dot_operand(wt, LOWP), acc,
                     input_precision=PRECISION, out_dtype=acc.dtype)
    return acc


@triton.jit
def _fused_fwd_layer(src, w, sc, sh, m_out, x_out, f, probe, n_in, n_out, ld, B, K, offs_b,
                     mask_b, div_acc, ACT: tl.constexpr, LAST: tl.constexpr,
                     EXACT: tl.constexpr, SAVE: tl.constexpr, BB: tl.constexpr,
                     CH: tl.constexpr, KC: tl.constexpr, PRECISION: tl.constexpr,
                     LOWP: tl.constexpr):
    for o0 in range(0, n_out, CH):
        rows = o0 + tl.arange(0, CH)
        mask_r = rows < n_out
        s = tl.load(sc + rows, mask=mask_r, other=1.0)[None, :]
        c = tl.load(sh + rows, mask=mask_r, other=0.0)[None, :]
        mask = mask_b[:, None] & mask_r[None, :]
        off = rows[None, :].to(tl.int64) * ld + offs_b[:, None]
        acc = _product(src, ld, 0, w, n_in, rows, mask_r, offs_b, mask_b, BB, CH, KC, PRECISION,
                       LOWP)
        if SAVE:
            tl.store(m_out + off, acc, mask=mask)
        a = acc * s + c
        if LAST:
            tl.store(f + rows[None, :].to(tl.int64) * B + offs_b[:, None], a, mask=mask)
        else:
            h, d1 = _act_d1(a, ACT)
            tl.store(x_out + off, h, mask=mask)
        for k in range(K):
            acc = _product(src, ld, (k + 1) * B, w, n_in, rows, mask_r, offs_b, mask_b, BB, CH,
                           KC, PRECISION, LOWP)
            if SAVE:
                tl.store(m_out + off + (k + 1) * B, acc, mask=mask)
            u = acc * s
            if LAST:
                if EXACT:
                    div_acc += tl.sum(tl.where(rows[None, :] == k, u, 0.0), axis=1)
                else:
                    p = tl.load(probe + (rows[None, :].to(tl.int64) + k * n_out) * B
                                + offs_b[:, None], mask=mask, other=0.0)
                    div_acc += tl.sum(p * u, axis=1)
            else:
                tl.store(x_out + off + (k + 1) * B, d1 * u, mask=mask)
    return div_acc


@triton.jit(do_not_specialize=["B"])
def _fused_fwd_kernel(x0s, table, f, div, probe, B, K, L, ACT: tl.constexpr,
                      EXACT: tl.constexpr, SAVE: tl.constexpr, BB: tl.constexpr,
                      CH: tl.constexpr, KC: tl.constexpr, PRECISION: tl.constexpr,
                      LOWP: tl.constexpr):
    offs_b = tl.program_id(0) * BB + tl.arange(0, BB)
    mask_b = offs_b < B
    ld = (K + 1) * B
    dims = table + _T_DIMS * L
    div_acc = tl.zeros([BB], dtype=f.dtype.element_ty)
    src = x0s
    n_in = tl.load(dims).to(tl.int32)
    for li in range(L - 1):
        n_out = tl.load(dims + li + 1).to(tl.int32)
        x_out = _table_ptr(table, _T_OUT, L, li, f)
        div_acc = _fused_fwd_layer(
            src, _table_ptr(table, _T_W, L, li, f), _table_ptr(table, _T_SCALE, L, li, f),
            _table_ptr(table, _T_SHIFT, L, li, f), _table_ptr(table, _T_M, L, li, f), x_out, f,
            probe, n_in, n_out, ld, B, K, offs_b, mask_b, div_acc, ACT, False, EXACT, SAVE, BB,
            CH, KC, PRECISION, LOWP)
        # X_l is read back by other threads of this program in the next layer.
        tl.debug_barrier()
        src = x_out
        n_in = n_out
    last = L - 1
    div_acc = _fused_fwd_layer(
        src, _table_ptr(table, _T_W, L, last, f), _table_ptr(table, _T_SCALE, L, last, f),
        _table_ptr(table, _T_SHIFT, L, last, f), _table_ptr(table, _T_M, L, last, f), src, f,
        probe, n_in, tl.load(dims + L).to(tl.int32), ld, B, K, offs_b, mask_b, div_acc, ACT,
        True, EXACT, SAVE, BB, CH, KC, PRECISION, LOWP)
    tl.store(div + offs_b, div_acc, mask=mask_b)


@triton.jit
def _fused_bwd_epilogue(table, xbar, grad_f, grad_div, probe, part, li, n, L, NB, NPART, ld, B,
                        K, offs_b, mask_b, ACT: tl.constexpr, LAST: tl.constexpr,
                        EXACT: tl.constexpr, CH: tl.constexpr):
    m = _table_ptr(table, _T_M, L, li, xbar)
    mbar = _table_ptr(table, _T_OUT, L, li, xbar)
    sc = _table_ptr(table, _T_SCALE, L, li, xbar)
    sh = _table_ptr(table, _T_SHIFT, L, li, xbar)
    part_shift = part + (li * NB + tl.program_id(0)) * NPART
    part_scale = part_shift + L * NB * NPART
    for o0 in range(0, n, CH):
        rows = o0 + tl.arange(0, CH)
        mask_r = rows < n
        s = tl.load(sc + rows, mask=mask_r, other=1.0)[None, :]
        c = tl.load(sh + rows, mask=mask_r, other=0.0)[None, :]
        gh, gm = _bwd_tile(m, xbar, grad_f, grad_div, probe, mbar, s, c, rows[None, :],
                           offs_b[:, None], mask_b[:, None] & mask_r[None, :], ld, B, n, K, ACT,
                           LAST, EXACT)
        tl.store(part_shift + rows, tl.sum(gh, axis=0), mask=mask_r)
        tl.store(part_scale + rows, tl.sum(gm, axis=0), mask=mask_r)


@triton.jit
def _fused_bwd_product(mbar, w, n_out, n_in, ld, dst, ld_dst, B, groups, offs_b, mask_b,
                       BB: tl.constexpr, CH: tl.constexpr, KC: tl.constexpr,
                       PRECISION: tl.constexpr, LOWP: tl.constexpr):
    """dst[:, group g] = W^T Mbar[:, group g] for the program's batch columns, g < groups."""
    for g in range(groups):
        for i0 in range(0, n_in, CH):
            cols = i0 + tl.arange(0, CH)
            mask_c = cols < n_in
            acc = tl.zeros([BB, CH], dtype=mbar.dtype.element_ty)
            for o0 in range(0, n_out, KC):
                rows = o0 + tl.arange(0, KC)
                mask_r = rows < n_out
                mt = tl.load(mbar + rows[None, :].to(tl.int64) * ld + g * B + offs_b[:, None],
                             mask=mask_b[:, None] & mask_r[None, :], other=0.0)
                wt = tl.load(w + rows[:, None] * n_in + cols[None, :],
                             mask=mask_r[:, None] & mask_c[None, :], other=0.0)
                acc = tl.dot(_dot_operand(mt, LOWP), _dot_operand(wt, LOWP), acc,
                             input_precision=PRECISION, out_dtype=acc.dtype)
            tl.store(dst + cols[None, :].to(tl.int64) * ld_dst + g * B + offs_b[:, None], acc,
                     mask=mask_b[:, None] & mask_c[None, :])


@triton.jit(do_not_specialize=["B", "NB"])
def _fused_bwd_kernel(grad_f, grad_div, probe, table, xbar, gx0, part, B, K, L, NB, NPART,
                      ACT: tl.constexpr, EXACT: tl.constexpr, BB: tl.constexpr,
                      CH: tl.constexpr, KC: tl.constexpr, PRECISION: tl.constexpr,
                      LOWP: tl.constexpr):
    offs_b = tl.program_id(0) * BB + tl.arange(0, BB)
    mask_b = offs_b < B
    ld = (K + 1) * B
    dims = table + _T_DIMS * L
    _fused_bwd_epilogue(table, xbar, grad_f, grad_div, probe, part, L - 1,
                        tl.load(dims + L).to(tl.int32), L, NB, NPART, ld, B, K, offs_b, mask_b,
                        ACT, True, EXACT, CH)
    # Mbar_l and xbar are written and read back by different threads of this program.
    tl.debug_barrier()
    for j in range(L - 1):
        li = L - 1 - j
        n_in = tl.load(dims + li).to(tl.int32)
        _fused_bwd_product(_table_ptr(table, _T_OUT, L, li, xbar),
                           _table_ptr(table, _T_W, L, li, xbar),
                           tl.load(dims + li + 1).to(tl.int32), n_in, ld, xbar, ld, B, K + 1,
                           offs_b, mask_b, BB, CH, KC, PRECISION, LOWP)
        tl.debug_barrier()
        _fused_bwd_epilogue(table, xbar, grad_f, grad_div, probe, part, li - 1, n_in, L, NB, NPART,
                            ld, B, K, offs_b, mask_b, ACT, False, EXACT, CH)
        tl.debug_barrier()
    # The first layer's tangent inputs are constants: only the state group.
    _fused_bwd_product(_table_ptr(table, _T_OUT, L, 0, xbar), _table_ptr(table, _T_W, L, 0, xbar),
                       tl.load(dims + 1).to(tl.int32), tl.load(dims).to(tl.int32), ld, gx0, B, B,
                       1, offs_b, mask_b, BB, CH, KC, PRECISION, LOWP)


def _fused_config(b: int, width: int) -> tuple[int, int, int]:
    """(BB batch columns per program, CH output features per chunk, KC input chunk)."""
    if interpreting():
        # The interpreter pays per operation: one wide program, whole layers per chunk.
        ch = next_pow2(width, lo=16, hi=FUSED_MAX_WIDTH)
        return next_pow2(b, lo=16, hi=128), ch, ch
    # BB = 16 is tl.dot's smallest M, and more programs matter more than reuse at
    # B ~ 1e3. KC bounds the FMA dot's per-thread operand slices: at KC = 64 the
    # kernels spill over 1 KB a thread on sm_80, at 16 a few bytes at most (the
    # ahead-of-time test checks the spill stack on sm_80 and sm_90).
    return 16, next_pow2(width, lo=16, hi=FUSED_CH), FUSED_KC


def fused_eligible(x0: torch.Tensor, weights: list[torch.Tensor], layouts: list[int]) -> bool:
    """Whether the fused kernels take this program: dense layers, widths <= FUSED_MAX_WIDTH."""
    if x0.dtype not in (torch.float32, torch.float64) or not layouts:
        return False
    layers = split_weights(weights, layouts)
    if not all(isinstance(w, torch.Tensor) for w in layers):
        return False
    return max([x0.shape[0], *(w.shape[0] for w in layers)]) <= FUSED_MAX_WIDTH


def _pointer_table(device: torch.device, sections: list[list[torch.Tensor | None]],
                   dims: list[int]) -> torch.Tensor:
    ptrs = [0 if t is None else t.data_ptr() for section in sections for t in section]
    return torch.tensor(ptrs + dims, dtype=torch.int64).to(device)


def _scales_or_ones(scales: list[torch.Tensor], ones: torch.Tensor) -> list[torch.Tensor]:
    return [s.contiguous() if s.numel() else ones for s in scales]


def _check_program(x0: torch.Tensor, tan0: torch.Tensor, probe: torch.Tensor,
                   layers: list, scales: list[torch.Tensor], shifts: list[torch.Tensor],
                   exact: bool, act: int) -> list[int]:
    """Validate shapes, dtypes, devices and the activation; return the widths n_0..n_L."""
    if act not in ACT_IDS.values():
        # The kernels would fall through to the identity: refuse instead.
        raise ValueError(f"sparsekern triton mlp: unknown activation id {act}; expected one of "
                         f"{ACT_IDS}")
    check_float("x0", x0)
    check_device(x0)
    if x0.dim() != 2:
        raise ValueError(f"sparsekern triton mlp: x0 must be [n0, B], got {list(x0.shape)}")
    n0, b = x0.shape
    if tan0.dim() != 3 or tan0.shape[1:] != (n0, b):
        raise ValueError(f"sparsekern triton mlp: tan0 must be [K, {n0}, {b}], got "
                         f"{list(tan0.shape)}")
    if not layers:
        raise ValueError("sparsekern triton mlp: the program has no layer")
    if len(scales) != len(layers) or len(shifts) != len(layers):
        raise ValueError(f"sparsekern triton mlp: {len(layers)} layers, {len(scales)} scales, "
                         f"{len(shifts)} shifts")
    widths = [n0]
    for i, layer in enumerate(layers):
        if isinstance(layer, torch.Tensor):
            w, n_out, n_in = layer, layer.shape[0], layer.shape[1]
        else:
            w, (n_out, n_in) = layer[1], layer[0].shape
        if n_in != widths[-1]:
            raise ValueError(f"sparsekern triton mlp: layer {i} reads {n_in} features, the "
                             f"previous layer gives {widths[-1]}")
        check_float(f"layer {i} weights", w, x0.dtype)
        check_float(f"layer {i} shift", shifts[i], x0.dtype)
        for name, t in (("weights", w), ("shift", shifts[i]), ("scale", scales[i])):
            if t.device != x0.device:
                raise ValueError(f"sparsekern triton mlp: layer {i} {name} is on {t.device}, "
                                 f"x0 on {x0.device}")
        if shifts[i].shape != (n_out,) or scales[i].numel() not in (0, n_out):
            raise ValueError(f"sparsekern triton mlp: layer {i} has {n_out} outputs, its shift "
                             f"is {list(shifts[i].shape)} and scale {list(scales[i].shape)}")
        widths.append(n_out)
    k, d = tan0.shape[0], widths[-1]
    if exact and k != d:
        raise ValueError(f"sparsekern triton mlp: the exact trace needs K = d = {d} unit "
                         f"tangents, got K = {k}")
    if not exact and k and probe.shape != (k, d, b):
        raise ValueError(f"sparsekern triton mlp: probe must be [{k}, {d}, {b}], got "
                         f"{list(probe.shape)}")
    return widths


def fused_mlp_fwd(x0: torch.Tensor, tan0: torch.Tensor, probe: torch.Tensor,
                  weights: list[torch.Tensor], scales: list[torch.Tensor],
                  shifts: list[torch.Tensor], layouts: list[int], act: int, exact: bool,
                  save: bool, *, precision: str = "ieee",
                  config: tuple[int, int, int] | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """``mlp_fwd_ref`` in one launch; requires ``fused_eligible``. config: (BB, CH, KC)."""
    layers = split_weights(weights, layouts)
    widths = _check_program(x0, tan0, probe, layers, scales, shifts, exact, act)
    lowp = dot_operands(x0.dtype, precision)
    if not fused_eligible(x0, weights, layouts):
        raise ValueError("sparsekern triton mlp: the fused kernel takes dense layers of width "
                         f"<= {FUSED_MAX_WIDTH}; use general_mlp_fwd")
    n_layers, b, k = len(layers), x0.shape[1], tan0.shape[0]
    if b == 0:
        return _empty_batch(x0, widths, save)
    cols = (1 + k) * b
    opts = dict(dtype=x0.dtype, device=x0.device)
    ws = [w.contiguous() for w in layers]
    ones = torch.ones(max(widths), **opts)
    f = torch.empty((widths[-1], b), **opts)
    div = torch.empty((b,), **opts)
    x0s = stack_columns(x0, tan0).contiguous()
    m = [torch.empty((n, cols), **opts) for n in widths[1:]] if save else [None] * n_layers
    if save:
        xs = [torch.empty((n, cols), **opts) for n in widths[1:-1]]
    else:
        scratch = [torch.empty((max(widths), cols), **opts) for _ in range(min(2, n_layers - 1))]
        xs = [scratch[i % 2] for i in range(n_layers - 1)]
    # The table holds raw pointers: every tensor it points to stays referenced here.
    scl = _scales_or_ones(scales, ones)
    shf = [h.contiguous() for h in shifts]
    table = _pointer_table(x0.device, [ws, scl, shf, m, [*xs, None]], widths)
    bb, ch, kc = config or _fused_config(b, max(widths))
    pr = probe.contiguous() if k and not exact else x0s
    _fused_fwd_kernel[(triton.cdiv(b, bb),)](
        x0s, table, f, div, pr, b, k, n_layers, ACT=act, EXACT=exact, SAVE=save, BB=bb, CH=ch,
        KC=kc, PRECISION=dot_precision(x0.dtype, precision), LOWP=lowp, num_warps=4)
    return f, div, (m + xs) if save else []


def fused_mlp_bwd(grad_f: torch.Tensor, grad_div: torch.Tensor, x0: torch.Tensor,
                  tan0: torch.Tensor, probe: torch.Tensor, weights: list[torch.Tensor],
                  scales: list[torch.Tensor], shifts: list[torch.Tensor], layouts: list[int],
                  act: int, exact: bool, saved: list[torch.Tensor], *, precision: str = "ieee",
                  config: tuple[int, int, int] | None = None
                  ) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor],
                             list[torch.Tensor]]:
    """``mlp_bwd_ref`` in one launch plus one GEMM per layer; requires ``fused_eligible``."""
    layers = split_weights(weights, layouts)
    widths = _check_program(x0, tan0, probe, layers, scales, shifts, exact, act)
    lowp = dot_operands(x0.dtype, precision)
    if not fused_eligible(x0, weights, layouts):
        raise ValueError("sparsekern triton mlp: the fused kernel takes dense layers of width "
                         f"<= {FUSED_MAX_WIDTH}; use general_mlp_bwd")
    n_layers, (n0, b), k = len(layers), x0.shape, tan0.shape[0]
    cols = (1 + k) * b
    check_float("grad_f", grad_f, x0.dtype)
    _check_saved(saved, widths, b, cols, grad_f, grad_div)
    opts = dict(dtype=x0.dtype, device=x0.device)
    bb, ch, kc = config or _fused_config(b, max(widths))
    nb = triton.cdiv(b, bb) if b else 0
    npart = max(widths)
    part = torch.zeros((2, n_layers, nb, npart), **opts)
    gx0 = torch.empty((n0, b), **opts)
    mbar = [torch.empty((n, cols), **opts) for n in widths[1:]]
    if b:
        # The table holds raw pointers: every tensor it points to stays referenced here.
        ws = [w.contiguous() for w in layers]
        scl = _scales_or_ones(scales, torch.ones(max(widths), **opts))
        shf = [h.contiguous() for h in shifts]
        ms = [t.contiguous() for t in saved[:n_layers]]
        table = _pointer_table(x0.device, [ws, scl, shf, ms, mbar], widths)
        xbar = torch.empty((max(widths), cols), **opts)
        pr = probe.contiguous() if k and not exact else grad_f
        _fused_bwd_kernel[(nb,)](
            grad_f.contiguous(), grad_div.contiguous(), pr, table, xbar, gx0, part, b, k,
            n_layers, nb, npart, ACT=act, EXACT=exact, BB=bb, CH=ch, KC=kc,
            PRECISION=dot_precision(x0.dtype, precision), LOWP=lowp, num_warps=4)
    x_in = [stack_columns(x0, tan0), *saved[n_layers:]]
    with cublas_fp32(x0.device, precision):
        g_w = [torch.matmul(round_operand(mb, precision), round_operand(xi, precision).t())
               for mb, xi in zip(mbar, x_in, strict=True)]
    g_shift = [part[0, i, :, :n].sum(0) for i, n in enumerate(widths[1:])]
    g_scale = [part[1, i, :, :n].sum(0) if scales[i].numel() else scales[i].new_empty(0)
               for i, n in enumerate(widths[1:])]
    return gx0, g_w, g_scale, g_shift


def _empty_batch(x0: torch.Tensor, widths: list[int], save: bool
                 ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """mlp_fwd's outputs for B = 0 (no launch: a grid must not be empty)."""
    saved = [x0.new_empty((n, 0)) for n in (*widths[1:], *widths[1:-1])] if save else []
    return x0.new_empty((widths[-1], 0)), x0.new_empty((0,)), saved


def _check_saved(saved: list[torch.Tensor], widths: list[int], b: int, cols: int,
                 grad_f: torch.Tensor, grad_div: torch.Tensor) -> None:
    n_layers = len(widths) - 1
    expected = [(n, cols) for n in (*widths[1:], *widths[1:-1])]
    if [tuple(t.shape) for t in saved] != expected:
        raise ValueError(f"sparsekern triton mlp_bwd: saved must be the {2 * n_layers - 1} "
                         f"tensors of mlp_fwd(save=True) with shapes {expected}, got "
                         f"{[list(t.shape) for t in saved]}")
    for i, t in enumerate(saved):
        check_float(f"saved[{i}]", t, grad_f.dtype)
    check_float("grad_div", grad_div, grad_f.dtype)
    if grad_f.shape != (widths[-1], b) or grad_div.shape != (b,):
        raise ValueError(f"sparsekern triton mlp_bwd: grad_f must be [{widths[-1]}, {b}] and "
                         f"grad_div [{b}], got {list(grad_f.shape)} and {list(grad_div.shape)}")


# ---------------------------------------------------------------- general path


@triton.jit(do_not_specialize=["B"])
def _epilogue_fwd_kernel(m, x, sc, sh, n, B, K, ACT: tl.constexpr, BLOCK_R: tl.constexpr,
                         BLOCK_B: tl.constexpr):
    """Hidden layer: X = [sigma(a) | sigma'(a) * u], a = s M_h + c, u = s M_v. x may be m."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)
    mask_r = rows < n
    mask = mask_r[:, None] & (cols < B)[None, :]
    s = tl.load(sc + rows, mask=mask_r, other=1.0)[:, None]
    c = tl.load(sh + rows, mask=mask_r, other=0.0)[:, None]
    off = rows[:, None].to(tl.int64) * ((K + 1) * B) + cols[None, :]
    h, d1 = _act_d1(tl.load(m + off, mask=mask, other=0.0) * s + c, ACT)
    tl.store(x + off, h, mask=mask)
    for k in range(K):
        off_k = off + (k + 1) * B
        tl.store(x + off_k, d1 * (tl.load(m + off_k, mask=mask, other=0.0) * s), mask=mask)


@triton.jit(do_not_specialize=["B"])
def _head_fwd_kernel(m, f, div, probe, sc, sh, d, B, K, EXACT: tl.constexpr,
                     BLOCK_R: tl.constexpr, BLOCK_B: tl.constexpr):
    """Last layer: f = s M_h + c and div = sum_k <probe_k, s M_v> over the d features."""
    cols = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    mask_b = cols < B
    acc = tl.zeros([BLOCK_B], dtype=f.dtype.element_ty)
    for r0 in range(0, d, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        mask_r = rows < d
        mask = mask_r[:, None] & mask_b[None, :]
        s = tl.load(sc + rows, mask=mask_r, other=1.0)[:, None]
        c = tl.load(sh + rows, mask=mask_r, other=0.0)[:, None]
        off = rows[:, None].to(tl.int64) * ((K + 1) * B) + cols[None, :]
        tl.store(f + rows[:, None].to(tl.int64) * B + cols[None, :],
                 tl.load(m + off, mask=mask, other=0.0) * s + c, mask=mask)
        for k in range(K):
            u = tl.load(m + off + (k + 1) * B, mask=mask, other=0.0) * s
            if EXACT:
                acc += tl.sum(tl.where(rows[:, None] == k, u, 0.0), axis=0)
            else:
                p = tl.load(probe + (rows[:, None].to(tl.int64) + k * d) * B + cols[None, :],
                            mask=mask, other=0.0)
                acc += tl.sum(p * u, axis=0)
    tl.store(div + cols, acc, mask=mask_b)


@triton.jit(do_not_specialize=["B"])
def _epilogue_bwd_kernel(m, xbar, grad_f, grad_div, probe, mbar, sc, sh, part, n, B, K,
                         ACT: tl.constexpr, LAST: tl.constexpr, EXACT: tl.constexpr,
                         BLOCK_R: tl.constexpr, BLOCK_B: tl.constexpr):
    """One layer's backward epilogue (``_bwd_tile``) on a [BLOCK_R, BLOCK_B] tile.

    part [2, n, column blocks] receives the tile's row sums (shift, scale) for a
    fixed-order reduction on the host side.
    """
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)
    mask_r = rows < n
    mask = mask_r[:, None] & (cols < B)[None, :]
    s = tl.load(sc + rows, mask=mask_r, other=1.0)[:, None]
    c = tl.load(sh + rows, mask=mask_r, other=0.0)[:, None]
    gh, gm = _bwd_tile(m, xbar, grad_f, grad_div, probe, mbar, s, c, rows[:, None], cols[None, :],
                       mask, (K + 1) * B, B, n, K, ACT, LAST, EXACT)
    n_cb = tl.num_programs(1)
    part_off = rows.to(tl.int64) * n_cb + tl.program_id(1)
    tl.store(part + part_off, tl.sum(gh, axis=1), mask=mask_r)
    tl.store(part + n * n_cb + part_off, tl.sum(gm, axis=1), mask=mask_r)


def _epilogue_config(n: int, b: int) -> tuple[int, int]:
    """(BLOCK_R, BLOCK_B) of the general path's elementwise kernels."""
    if interpreting():
        return next_pow2(n, lo=1, hi=64), next_pow2(b, lo=16, hi=1024)
    return 4, next_pow2(b, lo=32, hi=256)


def _layer_product(layer, x: torch.Tensor, transpose: bool, precision: str) -> torch.Tensor:
    """W x (W^T x): dense by cuBLAS with TF32 as requested, CSR and blocked by ``k_spmm``.

    A blocked layer (pattern, vals, blocks) multiplies W x from its blocks and
    W^T x through the CSR pattern's stored transpose. bf16/fp16 round both
    operands first.
    """
    x = round_operand(x, precision)
    if isinstance(layer, torch.Tensor):
        with cublas_fp32(x.device, precision):
            return torch.matmul(round_operand(layer, precision).t() if transpose
                                else round_operand(layer, precision), x)
    pattern, vals = layer[0], round_operand(layer[1], precision).contiguous()
    n_out = pattern.shape[1] if transpose else pattern.shape[0]
    y = x.new_empty((n_out, x.shape[1]))
    if transpose:
        return spmm_into(pattern.rowptr_t, pattern.col_t, pattern.perm, vals, x, y)
    if len(layer) == 3:
        blocks = layer[2]
        return spmm_blocked_into(blocks.bptr, blocks.bcol, blocks.block_values(vals), x, y)
    return spmm_into(pattern.rowptr, pattern.col, None, vals, x, y)


def general_mlp_fwd(x0: torch.Tensor, tan0: torch.Tensor, probe: torch.Tensor,
                    weights: list[torch.Tensor], scales: list[torch.Tensor],
                    shifts: list[torch.Tensor], layouts: list[int], act: int, exact: bool,
                    save: bool, *, precision: str = "ieee"
                    ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """``mlp_fwd_ref`` as one product and one Triton epilogue per layer (any layouts, widths)."""
    layers = split_weights(weights, layouts)
    widths = _check_program(x0, tan0, probe, layers, scales, shifts, exact, act)
    dot_operands(x0.dtype, precision)  # refuses bf16/fp16 for float64
    n_layers, b, k = len(layers), x0.shape[1], tan0.shape[0]
    if b == 0:
        return _empty_batch(x0, widths, save)
    ones = torch.ones(max(widths), dtype=x0.dtype, device=x0.device)
    scl = _scales_or_ones(scales, ones)
    x = stack_columns(x0, tan0).contiguous()
    saved_m, saved_x = [], []
    f = x0.new_empty((widths[-1], b))
    div = x0.new_empty((b,))
    for i, layer in enumerate(layers):
        m = _layer_product(layer, x, False, precision)
        n = widths[i + 1]
        if save:
            saved_m.append(m)
        if i + 1 < n_layers:
            # Without a backward to feed, the activations overwrite M in place.
            x = torch.empty_like(m) if save else m
            br, bb = _epilogue_config(n, b)
            _epilogue_fwd_kernel[(triton.cdiv(n, br), triton.cdiv(b, bb))](
                m, x, scl[i], shifts[i].contiguous(), n, b, k, ACT=act, BLOCK_R=br, BLOCK_B=bb,
                num_warps=4)
            if save:
                saved_x.append(x)
        else:
            br, bb = _epilogue_config(n, b)
            pr = probe.contiguous() if k and not exact else m
            _head_fwd_kernel[(triton.cdiv(b, bb),)](
                m, f, div, pr, scl[i], shifts[i].contiguous(), n, b, k, EXACT=exact,
                BLOCK_R=min(br, 16), BLOCK_B=bb, num_warps=4)
    return f, div, (saved_m + saved_x) if save else []


def general_mlp_bwd(grad_f: torch.Tensor, grad_div: torch.Tensor, x0: torch.Tensor,
                    tan0: torch.Tensor, probe: torch.Tensor, weights: list[torch.Tensor],
                    scales: list[torch.Tensor], shifts: list[torch.Tensor], layouts: list[int],
                    act: int, exact: bool, saved: list[torch.Tensor], *,
                    precision: str = "ieee"
                    ) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor],
                               list[torch.Tensor]]:
    """``mlp_bwd_ref`` per layer: Triton epilogue, W^T product, weight gradient (GEMM or SDDMM)."""
    layers = split_weights(weights, layouts)
    widths = _check_program(x0, tan0, probe, layers, scales, shifts, exact, act)
    dot_operands(x0.dtype, precision)  # refuses bf16/fp16 for float64
    n_layers, b, k = len(layers), x0.shape[1], tan0.shape[0]
    cols = (1 + k) * b
    check_float("grad_f", grad_f, x0.dtype)
    _check_saved(saved, widths, b, cols, grad_f, grad_div)
    ones = torch.ones(max(widths), dtype=x0.dtype, device=x0.device)
    scl = _scales_or_ones(scales, ones)
    grad_f, grad_div = grad_f.contiguous(), grad_div.contiguous()
    pr = probe.contiguous() if k and not exact else grad_f
    g_w: list[torch.Tensor] = [None] * n_layers  # type: ignore[list-item]
    g_scale: list[torch.Tensor] = [None] * n_layers  # type: ignore[list-item]
    g_shift: list[torch.Tensor] = [None] * n_layers  # type: ignore[list-item]
    xbar = grad_f  # unused by the last layer's epilogue, which reads grad_f and grad_div
    for i in reversed(range(n_layers)):
        n, last = widths[i + 1], i + 1 == n_layers
        m = saved[i].contiguous()
        # The epilogue reads each xbar element before writing Mbar there: in place.
        mbar = x0.new_empty((n, cols)) if last else xbar
        br, bb = _epilogue_config(n, b)
        n_cb = triton.cdiv(b, bb) if b else 0
        part = x0.new_zeros((2, n, n_cb))
        if b:
            _epilogue_bwd_kernel[(triton.cdiv(n, br), n_cb)](
                m, xbar, grad_f, grad_div, pr, mbar, scl[i], shifts[i].contiguous(), part, n, b,
                k, ACT=act, LAST=last, EXACT=exact, BLOCK_R=br, BLOCK_B=bb, num_warps=4)
        g_shift[i] = part[0].sum(1)
        g_scale[i] = part[1].sum(1) if scales[i].numel() else scales[i].new_empty(0)
        x_in = stack_columns(x0, tan0).contiguous() if i == 0 else saved[n_layers + i - 1]
        layer = layers[i]
        mbar_r = round_operand(mbar, precision)
        x_in_r = round_operand(x_in, precision).contiguous()
        if isinstance(layer, torch.Tensor):
            with cublas_fp32(x0.device, precision):
                g_w[i] = torch.matmul(mbar_r, x_in_r.t())
        else:
            g_w[i] = sddmm(layer[0].rowptr, layer[0].col, mbar_r.contiguous(), x_in_r)
        # The first layer's tangent inputs are constants: only the state columns.
        xbar = _layer_product(layer, mbar[:, :b] if i == 0 else mbar, True, precision)
    return xbar, g_w, g_scale, g_shift


# -------------------------------------------------------------------- dispatch


def mlp_fwd(x0: torch.Tensor, tan0: torch.Tensor, probe: torch.Tensor,
            weights: list[torch.Tensor], scales: list[torch.Tensor], shifts: list[torch.Tensor],
            layouts: list[int], act: int, exact: bool, save: bool, *, precision: str = "ieee"
            ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """``mlp_fwd_ref``: the fused kernel when ``fused_eligible``, else the general path."""
    path = fused_mlp_fwd if fused_eligible(x0, weights, layouts) else general_mlp_fwd
    return path(x0, tan0, probe, weights, scales, shifts, layouts, act, exact, save,
                precision=precision)


def mlp_bwd(grad_f: torch.Tensor, grad_div: torch.Tensor, x0: torch.Tensor, tan0: torch.Tensor,
            probe: torch.Tensor, weights: list[torch.Tensor], scales: list[torch.Tensor],
            shifts: list[torch.Tensor], layouts: list[int], act: int, exact: bool,
            saved: list[torch.Tensor], *, precision: str = "ieee"
            ) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """``mlp_bwd_ref``: the fused kernel when ``fused_eligible``, else the general path."""
    path = fused_mlp_bwd if fused_eligible(x0, weights, layouts) else general_mlp_bwd
    return path(grad_f, grad_div, x0, tan0, probe, weights, scales, shifts, layouts, act, exact,
                saved, precision=precision)


# ------------------------------------------------------------------------ AOT


def aot_variants(dtype: torch.dtype, acts: tuple[int, ...] = (ACT_IDS["tanh"],),
                 precision: str = "ieee"
                 ) -> list[tuple[object, dict[str, str], dict[str, object]]]:
    """(kernel, signature, constexprs) of the compiled variants, for ahead-of-time checks.

    Every kernel once per activation in ``acts``, with and without the exact
    trace; the fused kernels at the toy model's chunk (CH = 64), with their
    ``tl.dot`` precision and operand type as the wrappers pass them for
    ``precision`` (as compiled for a GPU, not as interpreted).
    """
    t = AOT_DTYPES[dtype]
    p = f"*{t}"
    bb, ch, kc = _fused_config(4096, 64)
    prec = dot_precision(dtype, precision)
    lowp = dot_operands(dtype, precision, compiled=True) if dtype == torch.float32 \
        else LOWP_NONE
    br, bblk = 4, 128
    out = []
    for act in acts:
        for exact in (False, True):
            out.append((_fused_fwd_kernel,
                        {"x0s": p, "table": "*i64", "f": p, "div": p, "probe": p, "B": "i32",
                         "K": "i32", "L": "i32", "ACT": "constexpr", "EXACT": "constexpr",
                         "SAVE": "constexpr", "BB": "constexpr", "CH": "constexpr",
                         "KC": "constexpr", "PRECISION": "constexpr", "LOWP": "constexpr"},
                        {"ACT": act, "EXACT": exact, "SAVE": not exact, "BB": bb, "CH": ch,
                         "KC": kc, "PRECISION": prec, "LOWP": lowp}))
            out.append((_fused_bwd_kernel,
                        {"grad_f": p, "grad_div": p, "probe": p, "table": "*i64", "xbar": p,
                         "gx0": p, "part": p, "B": "i32", "K": "i32", "L": "i32", "NB": "i32",
                         "NPART": "i32", "ACT": "constexpr", "EXACT": "constexpr",
                         "BB": "constexpr", "CH": "constexpr", "KC": "constexpr",
                         "PRECISION": "constexpr", "LOWP": "constexpr"},
                        {"ACT": act, "EXACT": exact, "BB": bb, "CH": ch, "KC": kc,
                         "PRECISION": prec, "LOWP": lowp}))
            out.append((_head_fwd_kernel,
                        {"m": p, "f": p, "div": p, "probe": p, "sc": p, "sh": p, "d": "i32",
                         "B": "i32", "K": "i32", "EXACT": "constexpr", "BLOCK_R": "constexpr",
                         "BLOCK_B": "constexpr"},
                        {"EXACT": exact, "BLOCK_R": br, "BLOCK_B": bblk}))
            for last in (False, True):
                out.append((_epilogue_bwd_kernel,
                            {"m": p, "xbar": p, "grad_f": p, "grad_div": p, "probe": p,
                             "mbar": p, "sc": p, "sh": p, "part": p, "n": "i32", "B": "i32",
                             "K": "i32", "ACT": "constexpr", "LAST": "constexpr",
                             "EXACT": "constexpr", "BLOCK_R": "constexpr",
                             "BLOCK_B": "constexpr"},
                            {"ACT": act, "LAST": last, "EXACT": exact, "BLOCK_R": br,
                             "BLOCK_B": bblk}))
        out.append((_epilogue_fwd_kernel,
                    {"m": p, "x": p, "sc": p, "sh": p, "n": "i32", "B": "i32", "K": "i32",
                     "ACT": "constexpr", "BLOCK_R": "constexpr", "BLOCK_B": "constexpr"},
                    {"ACT": act, "BLOCK_R": br, "BLOCK_B": bblk}))
    return out
