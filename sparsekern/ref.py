"""Plain-PyTorch references of every engine op: the oracle the kernels are tested against.

All activations are feature-major: a batch of B vectors of width n is an
[n, B] matrix, so a sparse row of W streams contiguous batch rows (see
docs/design.md, "The fused program"). The fused MLP program stacks the state and K tangent
batches side by side as the columns [h | v_1 | ... | v_K] of one [n, (1+K)B]
matrix, so one product with W serves the forward pass and the JVP.

The fused program, for layers l = 1..L (sigma only for l < L):
    M_l = W_l X_{l-1}                      X_0 = [x0 | tan0]
    a_l = scale_l * M_l[:, :B] + shift_l   u_l = scale_l * M_l[:, B:]
    X_l = [sigma(a_l) | sigma'(a_l) * u_l]
    f = X_L[:, :B],  div_b = sum_k <probe_k[:, b], X_L[:, B k : B (k+1)][:, b]>
With probe = tangents this is the Hutchinson estimate e^T (df/dz) e; with unit
tangents (``exact``) the trace of df/dz.

With ``precision`` "bf16" or "fp16" both operands of every product (W_l X_{l-1}
forward, W_l^T Mbar_l and Mbar_l X_{l-1}^T backward) are rounded first
(``sparsekern.precision.round_operand``); the rest stays in the input dtype.

``mlp_fwd_ref`` / ``mlp_bwd_ref`` are the layer loop of ``sparsekern.program`` over
``RefPrimitives``, on the layers ``formats.decode_program`` reads from the ops'
(values, index, layouts).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.grad import conv2d_input, conv2d_weight

from sparsekern.activations import act_ref
from sparsekern.formats import BlockedPattern, CSRPattern, LayerProgram, decode_program
from sparsekern.precision import check_precision, round_operand
from sparsekern.program import Primitives, program_backward, program_forward, stack_columns


def spmm_ref(
    rowptr: torch.Tensor,
    col: torch.Tensor,
    rowptr_t: torch.Tensor,
    col_t: torch.Tensor,
    perm: torch.Tensor,
    vals: torch.Tensor,
    x: torch.Tensor,
    transpose: bool,
) -> torch.Tensor:
    """W x (or W^T x with ``transpose``) for W [R, C] in CSR with values ``vals`` [nnz].

    x: [C, N] ([R, N] if transpose). Returns [R, N] ([C, N]).
    """
    w = CSRPattern(rowptr, col, rowptr_t, col_t, perm).to_dense(vals)
    return (w.t() if transpose else w) @ x


def spmm_blocked_ref(
    rowptr: torch.Tensor,
    col: torch.Tensor,
    rowptr_t: torch.Tensor,
    col_t: torch.Tensor,
    perm: torch.Tensor,
    vals: torch.Tensor,
    bptr: torch.Tensor,
    bcol: torch.Tensor,
    bslot: torch.Tensor,
    x: torch.Tensor,
) -> torch.Tensor:
    """W x for W [R, C] in the blocked layout (``formats.BlockedPattern``).

    Built from the blocks alone, not from the CSR pattern, so it checks the
    layout as well as the product. x: [C, N]. Returns [R, N].
    """
    shape = CSRPattern(rowptr, col, rowptr_t, col_t, perm).shape
    return BlockedPattern(bptr, bcol, bslot).to_dense(vals, shape) @ x


def sddmm_ref(rowptr: torch.Tensor, col: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> (
    torch.Tensor
):
    """Sampled dense-dense product: out[k] = <a[row_k, :], b[col_k, :]> at the kept places.

    a: [R, N], b: [C, N]. Returns [nnz]; it is (a b^T) read at the pattern, the
    weight gradient of W x restricted to the kept entries.
    """
    counts = (rowptr[1:] - rowptr[:-1]).long()
    rows = torch.repeat_interleave(torch.arange(a.shape[0], device=a.device), counts)
    return (a[rows] * b[col.long()]).sum(1)


def _conv_weight(rowptr: torch.Tensor, col: torch.Tensor, rowptr_t: torch.Tensor,
                 col_t: torch.Tensor, perm: torch.Tensor, vals: torch.Tensor, kh: int, kw: int
                 ) -> torch.Tensor:
    """The dense [C_out, C_in, kh, kw] weight with ``vals`` at the pattern's kept taps."""
    p = CSRPattern(rowptr, col, rowptr_t, col_t, perm)
    c_out, taps = p.shape
    return p.to_dense(vals).view(c_out, taps // (kh * kw), kh, kw)


def conv2d_ref(
    rowptr: torch.Tensor,
    col: torch.Tensor,
    rowptr_t: torch.Tensor,
    col_t: torch.Tensor,
    perm: torch.Tensor,
    vals: torch.Tensor,
    x: torch.Tensor,
    c_out: int,
    kh: int,
    kw: int,
    stride: int,
    padding: int,
) -> torch.Tensor:
    """The convolution of feature-major x with the pruned weight W [C_out, C_in, kh, kw].

    The pattern is that of W as the matrix [C_out, C_in * kh * kw] (column
    ``ci * kh * kw + ky * kw + kx`` is one tap), ``vals`` [nnz] its kept values.
    x: [C_in, N, H, W]. Returns y [C_out, N, Ho, Wo] with

        y[co, n, oy, ox] = sum_e vals[e] x[ci, n, oy s + ky - p, ox s + kx - p]

    (s the stride, p the zero padding): ``F.conv2d`` of the dense weight on
    x.transpose(0, 1).
    """
    w = _conv_weight(rowptr, col, rowptr_t, col_t, perm, vals, kh, kw)
    n, h, wd = x.shape[1:]
    ho, wo = (h + 2 * padding - kh) // stride + 1, (wd + 2 * padding - kw) // stride + 1
    if w.numel() == 0:  # no input or no output channel: F.conv2d refuses an empty weight
        return x.new_zeros((c_out, n, ho, wo))
    y = F.conv2d(x.transpose(0, 1), w, None, stride, padding)
    return y.transpose(0, 1).contiguous()


def conv2d_t_ref(
    rowptr: torch.Tensor,
    col: torch.Tensor,
    rowptr_t: torch.Tensor,
    col_t: torch.Tensor,
    perm: torch.Tensor,
    vals: torch.Tensor,
    g: torch.Tensor,
    c_in: int,
    h: int,
    w: int,
    kh: int,
    kw: int,
    stride: int,
    padding: int,
) -> torch.Tensor:
    """The adjoint of ``conv2d_ref`` w.r.t. x: g [C_out, N, Ho, Wo] -> [C_in, N, h, w].

    ``torch.nn.grad.conv2d_input`` of the dense weight (it picks the output padding
    that gives h x w when the stride does not divide the input size).
    """
    weight = _conv_weight(rowptr, col, rowptr_t, col_t, perm, vals, kh, kw)
    n = g.shape[1]
    if weight.numel() == 0 or n == 0:
        return g.new_zeros((c_in, n, h, w))
    gx = conv2d_input((n, c_in, h, w), weight, g.transpose(0, 1), stride, padding)
    return gx.transpose(0, 1).contiguous()


def conv2d_wgrad_ref(
    rowptr: torch.Tensor,
    col: torch.Tensor,
    rowptr_t: torch.Tensor,
    col_t: torch.Tensor,
    perm: torch.Tensor,
    g: torch.Tensor,
    x: torch.Tensor,
    kh: int,
    kw: int,
    stride: int,
    padding: int,
) -> torch.Tensor:
    """The weight gradient of ``conv2d_ref`` at the kept taps: g [C_out, N, Ho, Wo] and
    x [C_in, N, H, W] -> [nnz], gw[e] = sum_{n, oy, ox} g[co, n, oy, ox]
    x[ci, n, oy * stride + ky - padding, ox * stride + kx - padding].

    ``torch.nn.grad.conv2d_weight`` (the dense gradient) read at the pattern.
    """
    p = CSRPattern(rowptr, col, rowptr_t, col_t, perm)
    c_out, taps = p.shape
    if p.nnz == 0 or x.shape[1] == 0:
        return x.new_zeros((p.nnz,))
    gw = conv2d_weight(x.transpose(0, 1), (c_out, taps // (kh * kw), kh, kw),
                       g.transpose(0, 1), stride, padding)
    return gw.reshape(c_out, taps)[p.rows(), p.col.long()]


def _product(layer: LayerProgram, x: torch.Tensor, transpose: bool, precision: str
             ) -> torch.Tensor:
    """W x (W^T x): dense by matmul, csr by ``spmm_ref``, blocked W x from its blocks."""
    x = round_operand(x, precision)
    vals = round_operand(layer.values, precision)
    csr, blocks = layer.csr, layer.blocks
    if csr is None:
        return (vals.t() if transpose else vals) @ x
    if blocks is not None and not transpose:  # blocked: W x from the blocks; W^T g by CSR
        return spmm_blocked_ref(csr.rowptr, csr.col, csr.rowptr_t, csr.col_t, csr.perm, vals,
                                blocks.bptr, blocks.bcol, blocks.bslot, x)
    return spmm_ref(csr.rowptr, csr.col, csr.rowptr_t, csr.col_t, csr.perm, vals, x, transpose)


def _probe_cotangent(
    grad_div: torch.Tensor, probe: torch.Tensor, exact: bool, d: int, k: int
) -> torch.Tensor:
    """d div / d (tangent outputs) as [d, K B]."""
    b = grad_div.shape[0]
    if k == 0:
        return grad_div.new_zeros(d, 0)
    if exact:
        eye = torch.eye(d, k, dtype=grad_div.dtype, device=grad_div.device)
        return (eye[:, :, None] * grad_div).reshape(d, k * b)
    return (probe.permute(1, 0, 2) * grad_div).reshape(d, k * b)


class RefPrimitives(Primitives):
    """The program's primitives in plain PyTorch (``program.program_forward``).

    Args:
        batch, tangents: B and K. act, exact, precision: as ``mlp_fwd_ref``.
        probe: [K, d, B] Hutchinson probes. grad_f, grad_div: the backward's cotangents.
    """

    def __init__(self, batch: int, tangents: int, act: int, exact: bool, precision: str,
                 probe: torch.Tensor, grad_f: torch.Tensor | None = None,
                 grad_div: torch.Tensor | None = None) -> None:
        self.b, self.k, self.act, self.exact = batch, tangents, act, exact
        self.precision, self.probe = precision, probe
        self.grad_f, self.grad_div = grad_f, grad_div

    def _affine(self, m: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(scale * M, a, u): the pre-activations a and the tangents' u."""
        scaled = m if scale.numel() == 0 else scale[:, None] * m
        return scaled, scaled[:, :self.b] + shift[:, None], scaled[:, self.b:]

    def product(self, layer, x):
        return _product(layer, x, False, self.precision)

    def product_t(self, layer, g):
        return _product(layer, g, True, self.precision)

    def weight_grad(self, layer, mbar, x_in):
        mbar_r, x_in_r = round_operand(mbar, self.precision), round_operand(x_in, self.precision)
        if layer.csr is None:
            return mbar_r @ x_in_r.t()
        return sddmm_ref(layer.csr.rowptr, layer.csr.col, mbar_r, x_in_r)

    def hidden(self, m, scale, shift, keep_m):
        _, a, u = self._affine(m, scale, shift)
        h, d1, _ = act_ref(a, self.act)
        return torch.cat([h, d1.repeat(1, self.k) * u], 1)

    def head(self, m, scale, shift):
        _, f, u = self._affine(m, scale, shift)
        d, k, b = f.shape[0], self.k, self.b
        v = u.reshape(d, k, b)
        if k == 0:
            div = f.new_zeros(b)
        elif self.exact:
            div = torch.diagonal(v, dim1=0, dim2=1).sum(-1)
        else:
            div = (self.probe.permute(1, 0, 2) * v).sum((0, 1))
        return f, div

    def epilogue_bwd(self, m, xbar, scale, shift, last):
        b, k = self.b, self.k
        if last:
            assert self.grad_f is not None and self.grad_div is not None, (
                "the backward's primitives take grad_f and grad_div")
            d = m.shape[0]
            g = torch.cat([self.grad_f, _probe_cotangent(self.grad_div, self.probe, self.exact,
                                                         d, k)], 1)
        else:
            _, a, u = self._affine(m, scale, shift)
            _, d1, d2 = act_ref(a, self.act)
            hbar, vbar = xbar[:, :b], xbar[:, b:]
            abar = hbar * d1 + (vbar * u).reshape(m.shape[0], k, b).sum(1) * d2
            g = torch.cat([abar, vbar * d1.repeat(1, k)], 1)
        if scale.numel() == 0:
            return g, scale.new_empty(0), g[:, :b].sum(1)
        return scale[:, None] * g, (g * m).sum(1), g[:, :b].sum(1)


def mlp_fwd_ref(
    x0: torch.Tensor,
    tan0: torch.Tensor,
    probe: torch.Tensor,
    values: list[torch.Tensor],
    index: list[torch.Tensor],
    scales: list[torch.Tensor],
    shifts: list[torch.Tensor],
    layouts: list[int],
    act: int,
    exact: bool,
    save: bool,
    *,
    precision: str = "ieee",
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """The fused MLP program (module docstring): f, the divergence, and what backward needs.

    Args:
        x0: [n0, B] state rows the first layer reads.
        tan0: [K, n0, B] tangent rows (K = 0: no divergence).
        probe: [K, d, B] probes for the Hutchinson contraction; ignored if exact.
        values, index, layouts: the layers (``formats.decode_program``); layer l maps
            n_{l-1} to n_l features, the last one to d.
        scales: per layer a [n_l] gate, or an empty tensor for none.
        shifts: per layer a [n_l] additive term (bias and time terms).
        act: activation id (``activations.ACT_IDS``) of the hidden layers.
        exact: contract with unit probes (tan0 must hold them): the trace.
        save: also return [M_1..M_L, X_1..X_{L-1}] for ``mlp_bwd_ref``.
        precision: "bf16"/"fp16" round every product's operands (module
            docstring); "ieee" and "tf32" compute in the input dtype.

    Returns:
        f [d, B], div [B], saved (empty unless ``save``).
    """
    check_precision(precision)
    layers = decode_program(values, index, layouts)
    prims = RefPrimitives(x0.shape[1], tan0.shape[0], act, exact, precision, probe)
    (f, div), saved = program_forward(prims, layers, stack_columns(x0, tan0), scales, shifts,
                                      save)
    return f, div, saved


def mlp_bwd_ref(
    grad_f: torch.Tensor,
    grad_div: torch.Tensor,
    x0: torch.Tensor,
    tan0: torch.Tensor,
    probe: torch.Tensor,
    values: list[torch.Tensor],
    index: list[torch.Tensor],
    scales: list[torch.Tensor],
    shifts: list[torch.Tensor],
    layouts: list[int],
    act: int,
    exact: bool,
    saved: list[torch.Tensor],
    *,
    precision: str = "ieee",
) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """Reverse mode through ``mlp_fwd_ref`` (by hand, no autograd).

    Args:
        grad_f: [d, B] cotangent of f; grad_div: [B] cotangent of div.
        saved: what ``mlp_fwd_ref(..., save=True)`` returned.
        Others as in ``mlp_fwd_ref``.

    Returns:
        grad_x0 [n0, B]; per layer the gradient of its values ([n_l, n_{l-1}] for a
        dense layer, [nnz] at the kept places for a csr or blocked one), the scale
        gradient (empty where there is no scale) and the shift gradient [n_l].
    """
    check_precision(precision)
    layers = decode_program(values, index, layouts)
    b = x0.shape[1]
    prims = RefPrimitives(b, tan0.shape[0], act, exact, precision, probe, grad_f, grad_div)
    return program_backward(prims, layers, stack_columns(x0, tan0), saved, scales, shifts, b)
