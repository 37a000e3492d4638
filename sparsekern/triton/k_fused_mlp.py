"""The fused MLP program in one Triton launch: forward + JVP (divergence) and its backward.

Semantics and notation: ``sparsekern.ref.mlp_fwd_ref`` / ``mlp_bwd_ref`` (the
oracles; feature-major, columns [h | v_1 | ... | v_K] of width B each, G = 1 + K
column groups). The fast path of ``sparsekern.triton.mlp_fwd`` / ``mlp_bwd``
for programs it takes (``fused_eligible``: every layer dense, every width <=
``FUSED_MAX_WIDTH``); the rest run per layer (``k_mlp_layers``).

One launch runs the whole network for a block of BB batch columns: per layer,
per chunk of CH output features, the products W_l X_{l-1} for the state and
each tangent (``tl.dot`` over KC-wide input chunks: IEEE fp32, or TF32, bf16 or
fp16 operands as ``SparseConfig.precision`` asks), then the activation and its
JVP in registers; the divergence is contracted in the last layer, so one
launch yields f and div. The layer's output goes to a per-layer buffer (the
saved X_l, or scratch) that only this program reads back, with a CTA barrier
between layers. The backward is one launch too: per layer the epilogue
(activation derivatives, cotangents of the pre-activations, per-program
partial sums of the shift and scale gradients) then W_l^T times them; the
weight gradients are one dense GEMM per layer afterwards (they sum over the
batch, across programs). The epilogue math is ``epilogue``'s, shared with the
per-layer path.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypedDict

import torch
import triton
import triton.language as tl

from sparsekern.formats import LayerProgram, decode_program
from sparsekern.precision import round_operand
from sparsekern.program import stack_columns
from sparsekern.triton.epilogue import act_d1, bwd_tile
from sparsekern.triton.launch import (
    LOWP_BF16,
    LOWP_BF16_EMULATED,
    LOWP_FP16,
    LOWP_NONE,
    AotRule,
    AotVariant,
    aot_variant,
    check_mlp,
    cublas_fp32,
    dot_operands,
    dot_precision,
    empty_batch,
    interpreting,
    next_pow2,
    program_widths,
)

__all__ = ["FUSED_MAX_WIDTH", "aot_variants", "fused_backward", "fused_eligible",
           "fused_forward", "fused_mlp_bwd", "fused_mlp_fwd"]

FUSED_MAX_WIDTH = 256
FUSED_CH = 64
FUSED_KC = 16  # tl.dot's smallest K on Triton 3.6 (3.9 accepts 8)

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


@triton.jit
def _table_ptr(table, section, L, li, like):
    """Pointer number li of a section of the table, typed like the pointer ``like``."""
    return tl.load(table + section * L + li).to(tl.pointer_type(like.dtype.element_ty))


@triton.jit
def _program_block(table, B, K, L, BB: tl.constexpr):
    """This program's batch columns and their mask, the activations' row stride (G B)
    and the table's widths section."""
    offs_b = tl.program_id(0) * BB + tl.arange(0, BB)
    return offs_b, offs_b < B, (K + 1) * B, table + _T_DIMS * L


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
            h, d1 = act_d1(a, ACT)
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
    offs_b, mask_b, ld, dims = _program_block(table, B, K, L, BB)
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
        gh, gm = bwd_tile(m, xbar, grad_f, grad_div, probe, mbar, s, c, rows[None, :],
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
    offs_b, mask_b, ld, dims = _program_block(table, B, K, L, BB)
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



def fused_eligible(x0: torch.Tensor, layers: list[LayerProgram]) -> bool:
    """Whether the fused kernels take this program: dense layers, widths <= FUSED_MAX_WIDTH."""
    if x0.dtype not in (torch.float32, torch.float64) or not layers:
        return False
    if any(layer.csr is not None for layer in layers):
        return False
    return max([x0.shape[0], *(layer.n_out for layer in layers)]) <= FUSED_MAX_WIDTH


class _TensorOpts(TypedDict):
    """The dtype and device keywords of the factories (``torch.empty(..., **opts)``)."""

    dtype: torch.dtype
    device: torch.device


def _pointer_table(device: torch.device, sections: Sequence[Sequence[torch.Tensor | None]],
                   dims: list[int]) -> torch.Tensor:
    ptrs = [0 if t is None else t.data_ptr() for section in sections for t in section]
    return torch.tensor(ptrs + dims, dtype=torch.int64).to(device)


def _scales_or_ones(scales: list[torch.Tensor], ones: torch.Tensor) -> list[torch.Tensor]:
    return [s.contiguous() if s.numel() else ones for s in scales]


def _check_eligible(x0: torch.Tensor, layers: list[LayerProgram], general: str) -> None:
    if not fused_eligible(x0, layers):
        raise ValueError("sparsekern triton mlp: the fused kernel takes dense layers of width "
                         f"<= {FUSED_MAX_WIDTH}; use {general}")


def fused_forward(x0: torch.Tensor, tan0: torch.Tensor, probe: torch.Tensor,
                  layers: list[LayerProgram], scales: list[torch.Tensor],
                  shifts: list[torch.Tensor], act: int, exact: bool, save: bool, *,
                  precision: str = "ieee", config: tuple[int, int, int] | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """``mlp_fwd_ref`` in one launch on a checked program (``launch.check_mlp``); requires
    ``fused_eligible``. config: (BB, CH, KC)."""
    widths = program_widths(x0, layers)
    lowp = dot_operands(x0.dtype, precision)
    n_layers, b, k = len(layers), x0.shape[1], tan0.shape[0]
    if b == 0:
        return empty_batch(x0, widths, save)
    cols = (1 + k) * b
    opts = _TensorOpts(dtype=x0.dtype, device=x0.device)
    ws = [layer.values.contiguous() for layer in layers]
    ones = torch.ones(max(widths), **opts)
    f = torch.empty((widths[-1], b), **opts)
    div = torch.empty((b,), **opts)
    x0s = stack_columns(x0, tan0).contiguous()
    saved_m = [torch.empty((n, cols), **opts) for n in widths[1:]] if save else []
    m = saved_m if save else [None] * n_layers  # the table's M_l pointers: null unless saved
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
    return f, div, (saved_m + xs) if save else []


def fused_backward(grad_f: torch.Tensor, grad_div: torch.Tensor, x0: torch.Tensor,
                   tan0: torch.Tensor, probe: torch.Tensor, layers: list[LayerProgram],
                   scales: list[torch.Tensor], shifts: list[torch.Tensor], act: int,
                   exact: bool, saved: list[torch.Tensor], *, precision: str = "ieee",
                   config: tuple[int, int, int] | None = None
                   ) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor],
                              list[torch.Tensor]]:
    """``mlp_bwd_ref`` in one launch plus one GEMM per layer, on a checked program;
    requires ``fused_eligible``."""
    widths = program_widths(x0, layers)
    lowp = dot_operands(x0.dtype, precision)
    n_layers, (n0, b), k = len(layers), x0.shape, tan0.shape[0]
    cols = (1 + k) * b
    opts = _TensorOpts(dtype=x0.dtype, device=x0.device)
    bb, ch, kc = config or _fused_config(b, max(widths))
    nb = triton.cdiv(b, bb) if b else 0
    npart = max(widths)
    part = torch.zeros((2, n_layers, nb, npart), **opts)
    gx0 = torch.empty((n0, b), **opts)
    mbar = [torch.empty((n, cols), **opts) for n in widths[1:]]
    if b:
        # The table holds raw pointers: every tensor it points to stays referenced here.
        ws = [layer.values.contiguous() for layer in layers]
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


def fused_mlp_fwd(x0: torch.Tensor, tan0: torch.Tensor, probe: torch.Tensor,
                  values: list[torch.Tensor], index: list[torch.Tensor],
                  scales: list[torch.Tensor], shifts: list[torch.Tensor], layouts: list[int],
                  act: int, exact: bool, save: bool, *, precision: str = "ieee",
                  config: tuple[int, int, int] | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """``fused_forward`` with the op's arguments (``mlp_fwd_ref``'s), checked."""
    check_mlp(x0, tan0, probe, values, index, scales, shifts, layouts, act, exact)
    layers = decode_program(values, index, layouts)
    _check_eligible(x0, layers, "general_mlp_fwd")
    return fused_forward(x0, tan0, probe, layers, scales, shifts, act, exact, save,
                         precision=precision, config=config)


def fused_mlp_bwd(grad_f: torch.Tensor, grad_div: torch.Tensor, x0: torch.Tensor,
                  tan0: torch.Tensor, probe: torch.Tensor, values: list[torch.Tensor],
                  index: list[torch.Tensor], scales: list[torch.Tensor],
                  shifts: list[torch.Tensor], layouts: list[int], act: int, exact: bool,
                  saved: list[torch.Tensor], *, precision: str = "ieee",
                  config: tuple[int, int, int] | None = None
                  ) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor],
                             list[torch.Tensor]]:
    """``fused_backward`` with the op's arguments (``mlp_bwd_ref``'s), checked."""
    check_mlp(x0, tan0, probe, values, index, scales, shifts, layouts, act, exact,
              grad_f=grad_f, grad_div=grad_div, saved=saved)
    layers = decode_program(values, index, layouts)
    _check_eligible(x0, layers, "general_mlp_bwd")
    return fused_backward(grad_f, grad_div, x0, tan0, probe, layers, scales, shifts, act, exact,
                          saved, precision=precision, config=config)


# ------------------------------------------------------------------------ AOT

_FWD_RULE = AotRule(ints=("B", "K", "L"), table=("table",))
_BWD_RULE = AotRule(ints=("B", "K", "L", "NB", "NPART"), table=("table",))


def aot_variants(dtype: torch.dtype, acts: tuple[int, ...], precision: str = "ieee"
                 ) -> list[AotVariant]:
    """(kernel, signature, constexprs) of the compiled variants, for ahead-of-time checks.

    Both kernels once per activation in ``acts``, with and without the exact trace,
    at the toy model's chunk (CH = 64), with their ``tl.dot`` precision and operand
    type as the wrappers pass them for ``precision`` (as compiled for a GPU, not as
    interpreted).
    """
    bb, ch, kc = _fused_config(4096, 64)
    prec = dot_precision(dtype, precision)
    lowp = dot_operands(dtype, precision, compiled=True) if dtype == torch.float32 \
        else LOWP_NONE
    tiling = dict(BB=bb, CH=ch, KC=kc, PRECISION=prec, LOWP=lowp)
    return [v for act in acts for exact in (False, True) for v in (
        aot_variant(_fused_fwd_kernel, dtype, _FWD_RULE, ACT=act, EXACT=exact, SAVE=not exact,
                    **tiling),
        aot_variant(_fused_bwd_kernel, dtype, _BWD_RULE, ACT=act, EXACT=exact, **tiling))]
