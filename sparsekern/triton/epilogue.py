"""The layer epilogue's jit math, shared by both Triton MLP strategies.

The activations with their first and second derivatives (``act_d1``,
``act_d1_d2``, written to match ``sparsekern.activations.act_ref``) and the
reverse of one layer's epilogue on a tile (``bwd_tile``). Triton's core math
only (no libdevice), so it also runs in the interpreter. Semantics and notation:
``sparsekern.ref``.
"""

from __future__ import annotations

import triton
import triton.language as tl

from sparsekern.activations import ACT_IDS, SOFTPLUS_THRESHOLD

__all__ = ["act_d1", "act_d1_d2", "bwd_tile"]

_TANH = tl.constexpr(ACT_IDS["tanh"])
_SIGMOID = tl.constexpr(ACT_IDS["sigmoid"])
_SOFTPLUS = tl.constexpr(ACT_IDS["softplus"])
_RELU = tl.constexpr(ACT_IDS["relu"])
_ELU = tl.constexpr(ACT_IDS["elu"])
_SWISH = tl.constexpr(ACT_IDS["swish"])
_SOFTPLUS_THRESHOLD = tl.constexpr(SOFTPLUS_THRESHOLD)  # identity above it, as torch


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
def act_d1(a, ACT: tl.constexpr):
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
def act_d1_d2(a, ACT: tl.constexpr):
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


# ------------------------------------------------------------ backward epilogue


@triton.jit
def bwd_tile(m, xbar, grad_f, grad_div, probe, mbar, s, c, rows, cols, mask, ld, B, n, K,
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
        d1, d2 = act_d1_d2(mh * s + c, ACT)
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

