"""The fused MLP program per layer in Triton: any layouts and widths.

Semantics and notation: ``sparsekern.ref.mlp_fwd_ref`` / ``mlp_bwd_ref``. The
layer loop is ``sparsekern.program``'s, over ``LayerKernels``: per layer one
product (dense: cuBLAS, TF32 off unless the precision allows it; csr and
blocked: ``k_spmm``) and one Triton epilogue kernel; the backward uses
``k_sddmm`` for sparse weight gradients and the CSR's stored transpose for
W^T. For bf16/fp16 it rounds the operands of each product before it
(``round_operand``), which gives the fused kernel's products. The epilogue
math is ``epilogue``'s, shared with the single-launch strategy (``k_fused_mlp``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sparsekern.formats import LayerProgram, decode_program
from sparsekern.precision import round_operand
from sparsekern.program import Primitives, program_backward, program_forward, stack_columns
from sparsekern.triton.epilogue import act_d1, bwd_tile
from sparsekern.triton.k_sddmm import sddmm
from sparsekern.triton.k_spmm import spmm_blocked_into, spmm_into
from sparsekern.triton.launch import (
    AotRule,
    AotVariant,
    aot_variant,
    check_mlp,
    cublas_fp32,
    dot_operands,
    empty_batch,
    interpreting,
    next_pow2,
    program_widths,
)

__all__ = ["LayerKernels", "aot_variants", "general_mlp_bwd", "general_mlp_fwd",
           "layers_backward", "layers_forward"]


@triton.jit
def _tile(sc, sh, n, B, BLOCK_R: tl.constexpr, BLOCK_B: tl.constexpr):
    """This program's [BLOCK_R, BLOCK_B] tile of (feature rows, batch columns): the
    indices, the row mask, the tile mask and the rows' scale and shift."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)
    mask_r = rows < n
    mask = mask_r[:, None] & (cols < B)[None, :]
    s = tl.load(sc + rows, mask=mask_r, other=1.0)[:, None]
    c = tl.load(sh + rows, mask=mask_r, other=0.0)[:, None]
    return rows, cols, mask_r, mask, s, c


@triton.jit(do_not_specialize=["B"])
def _epilogue_fwd_kernel(m, x, sc, sh, n, B, K, ACT: tl.constexpr, BLOCK_R: tl.constexpr,
                         BLOCK_B: tl.constexpr):
    """Hidden layer: X = [sigma(a) | sigma'(a) * u], a = s M_h + c, u = s M_v. x may be m."""
    rows, cols, _, mask, s, c = _tile(sc, sh, n, B, BLOCK_R, BLOCK_B)
    off = rows[:, None].to(tl.int64) * ((K + 1) * B) + cols[None, :]
    h, d1 = act_d1(tl.load(m + off, mask=mask, other=0.0) * s + c, ACT)
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
    """One layer's backward epilogue (``epilogue.bwd_tile``) on a [BLOCK_R, BLOCK_B] tile.

    part [2, n, column blocks] receives the tile's row sums (shift, scale) for a
    fixed-order reduction on the host side.
    """
    rows, cols, mask_r, mask, s, c = _tile(sc, sh, n, B, BLOCK_R, BLOCK_B)
    gh, gm = bwd_tile(m, xbar, grad_f, grad_div, probe, mbar, s, c, rows[:, None], cols[None, :],
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


def _layer_product(layer: LayerProgram, x: torch.Tensor, transpose: bool, precision: str
                   ) -> torch.Tensor:
    """W x (W^T x): dense by cuBLAS with TF32 as requested, csr and blocked by ``k_spmm``.

    A blocked layer multiplies W x from its blocks and W^T x through the CSR
    pattern's stored transpose. bf16/fp16 round both operands first.
    """
    x = round_operand(x, precision)
    if layer.csr is None:
        w = round_operand(layer.values, precision)
        with cublas_fp32(x.device, precision):
            return torch.matmul(w.t() if transpose else w, x)
    csr, vals = layer.csr, round_operand(layer.values, precision).contiguous()
    y = x.new_empty((csr.shape[1] if transpose else csr.shape[0], x.shape[1]))
    if transpose:
        return spmm_into(csr.rowptr_t, csr.col_t, csr.perm, vals, x, y)
    if layer.blocks is not None:
        blocks = layer.blocks
        return spmm_blocked_into(blocks.bptr, blocks.bcol, blocks.block_values(vals), x, y)
    return spmm_into(csr.rowptr, csr.col, None, vals, x, y)


class LayerKernels(Primitives):
    """The program's primitives as Triton launches (``program.program_forward``).

    Args:
        x0: the program's state rows (dtype, device, batch B = x0.shape[1]).
        tangents, act, exact, precision: K and the program's settings.
        probe: [K, d, B] Hutchinson probes. widths: n_0..n_L (``check_mlp``).
        grad_f, grad_div: the backward's cotangents (read by the last epilogue).
    """

    def __init__(self, x0: torch.Tensor, tangents: int, act: int, exact: bool, precision: str,
                 probe: torch.Tensor, widths: list[int], grad_f: torch.Tensor | None = None,
                 grad_div: torch.Tensor | None = None) -> None:
        self.b, self.k, self.act, self.exact, self.precision = (x0.shape[1], tangents, act,
                                                                exact, precision)
        self.ones = torch.ones(max(widths), dtype=x0.dtype, device=x0.device)
        self.probe = probe.contiguous() if tangents and not exact else None
        self.grad_f = None if grad_f is None else grad_f.contiguous()
        self.grad_div = None if grad_div is None else grad_div.contiguous()

    def _scale(self, scale: torch.Tensor) -> torch.Tensor:
        return scale.contiguous() if scale.numel() else self.ones

    def product(self, layer, x):
        return _layer_product(layer, x, False, self.precision)

    def product_t(self, layer, g):
        return _layer_product(layer, g, True, self.precision)

    def weight_grad(self, layer, mbar, x_in):
        mbar_r = round_operand(mbar, self.precision)
        x_in_r = round_operand(x_in, self.precision).contiguous()
        if layer.csr is None:
            with cublas_fp32(mbar.device, self.precision):
                return torch.matmul(mbar_r, x_in_r.t())
        return sddmm(layer.csr.rowptr, layer.csr.col, mbar_r.contiguous(), x_in_r)

    def hidden(self, m, scale, shift, keep_m):
        n, b = m.shape[0], self.b
        # Without a backward to feed, the activations overwrite M in place.
        x = torch.empty_like(m) if keep_m else m
        br, bb = _epilogue_config(n, b)
        _epilogue_fwd_kernel[(triton.cdiv(n, br), triton.cdiv(b, bb))](
            m, x, self._scale(scale), shift.contiguous(), n, b, self.k, ACT=self.act,
            BLOCK_R=br, BLOCK_B=bb, num_warps=4)
        return x

    def head(self, m, scale, shift):
        d, b = m.shape[0], self.b
        f, div = m.new_empty((d, b)), m.new_empty((b,))
        br, bb = _epilogue_config(d, b)
        _head_fwd_kernel[(triton.cdiv(b, bb),)](
            m, f, div, m if self.probe is None else self.probe, self._scale(scale),
            shift.contiguous(), d, b, self.k, EXACT=self.exact, BLOCK_R=min(br, 16),
            BLOCK_B=bb, num_warps=4)
        return f, div

    def epilogue_bwd(self, m, xbar, scale, shift, last):
        n, b = m.shape[0], self.b
        m = m.contiguous()
        # The epilogue reads each xbar element before writing Mbar there: in place. The
        # last layer's reads grad_f and grad_div instead.
        mbar = m.new_empty((n, (1 + self.k) * b)) if last else xbar
        xbar = self.grad_f if last else xbar
        br, bb = _epilogue_config(n, b)
        n_cb = triton.cdiv(b, bb) if b else 0
        part = m.new_zeros((2, n, n_cb))
        if b:
            _epilogue_bwd_kernel[(triton.cdiv(n, br), n_cb)](
                m, xbar, self.grad_f, self.grad_div,
                self.grad_f if self.probe is None else self.probe, mbar, self._scale(scale),
                shift.contiguous(), part, n, b, self.k, ACT=self.act, LAST=last,
                EXACT=self.exact, BLOCK_R=br, BLOCK_B=bb, num_warps=4)
        g_scale = part[1].sum(1) if scale.numel() else scale.new_empty(0)
        return mbar, g_scale, part[0].sum(1)


def layers_forward(x0: torch.Tensor, tan0: torch.Tensor, probe: torch.Tensor,
                   layers: list[LayerProgram], scales: list[torch.Tensor],
                   shifts: list[torch.Tensor], act: int, exact: bool, save: bool, *,
                   precision: str = "ieee"
                   ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """``mlp_fwd_ref`` as one product and one Triton epilogue per layer (any layouts, widths),
    on a checked program (``launch.check_mlp``)."""
    widths = program_widths(x0, layers)
    dot_operands(x0.dtype, precision)  # refuses bf16/fp16 for float64
    if x0.shape[1] == 0:
        return empty_batch(x0, widths, save)
    prims = LayerKernels(x0, tan0.shape[0], act, exact, precision, probe, widths)
    (f, div), saved = program_forward(prims, layers, stack_columns(x0, tan0).contiguous(),
                                      scales, shifts, save)
    return f, div, saved


def layers_backward(grad_f: torch.Tensor, grad_div: torch.Tensor, x0: torch.Tensor,
                    tan0: torch.Tensor, probe: torch.Tensor, layers: list[LayerProgram],
                    scales: list[torch.Tensor], shifts: list[torch.Tensor], act: int,
                    exact: bool, saved: list[torch.Tensor], *, precision: str = "ieee"
                    ) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor],
                               list[torch.Tensor]]:
    """``mlp_bwd_ref`` per layer: Triton epilogue, W^T product, weight gradient (GEMM or
    SDDMM), on a checked program."""
    widths = program_widths(x0, layers)
    dot_operands(x0.dtype, precision)  # refuses bf16/fp16 for float64
    prims = LayerKernels(x0, tan0.shape[0], act, exact, precision, probe, widths, grad_f,
                         grad_div)
    return program_backward(prims, layers, stack_columns(x0, tan0).contiguous(), saved, scales,
                            shifts, x0.shape[1])


def general_mlp_fwd(x0: torch.Tensor, tan0: torch.Tensor, probe: torch.Tensor,
                    values: list[torch.Tensor], index: list[torch.Tensor],
                    scales: list[torch.Tensor], shifts: list[torch.Tensor], layouts: list[int],
                    act: int, exact: bool, save: bool, *, precision: str = "ieee"
                    ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """``layers_forward`` with the op's arguments (``mlp_fwd_ref``'s), checked."""
    check_mlp(x0, tan0, probe, values, index, scales, shifts, layouts, act, exact)
    return layers_forward(x0, tan0, probe, decode_program(values, index, layouts), scales,
                          shifts, act, exact, save, precision=precision)


def general_mlp_bwd(grad_f: torch.Tensor, grad_div: torch.Tensor, x0: torch.Tensor,
                    tan0: torch.Tensor, probe: torch.Tensor, values: list[torch.Tensor],
                    index: list[torch.Tensor], scales: list[torch.Tensor],
                    shifts: list[torch.Tensor], layouts: list[int], act: int, exact: bool,
                    saved: list[torch.Tensor], *, precision: str = "ieee"
                    ) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor],
                               list[torch.Tensor]]:
    """``layers_backward`` with the op's arguments (``mlp_bwd_ref``'s), checked."""
    check_mlp(x0, tan0, probe, values, index, scales, shifts, layouts, act, exact,
              grad_f=grad_f, grad_div=grad_div, saved=saved)
    return layers_backward(grad_f, grad_div, x0, tan0, probe,
                           decode_program(values, index, layouts), scales, shifts, act, exact,
                           saved, precision=precision)


# ------------------------------------------------------------------------ AOT

_EPILOGUE_RULE = AotRule(ints=("n", "B", "K"))
_HEAD_RULE = AotRule(ints=("d", "B", "K"))


def aot_variants(dtype: torch.dtype, acts: tuple[int, ...]
                 ) -> list[AotVariant]:
    """(kernel, signature, constexprs) of the compiled variants, for ahead-of-time checks:
    every epilogue once per activation in ``acts``, with and without the exact trace,
    at the GPU's tile shape."""
    tile = dict(BLOCK_R=4, BLOCK_B=128)
    out = []
    for act in acts:
        for exact in (False, True):
            out.append(aot_variant(_head_fwd_kernel, dtype, _HEAD_RULE, EXACT=exact, **tile))
            out += [aot_variant(_epilogue_bwd_kernel, dtype, _EPILOGUE_RULE, ACT=act,
                                LAST=last, EXACT=exact, **tile) for last in (False, True)]
        out.append(aot_variant(_epilogue_fwd_kernel, dtype, _EPILOGUE_RULE, ACT=act, **tile))
    return out
