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
"""

from __future__ import annotations

import torch

from sparsekern.activations import act_ref
from sparsekern.formats import BlockedPattern, CSRPattern, split_weights
from sparsekern.precision import check_precision, round_operand


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


def _layer_matmul(layer, x: torch.Tensor, transpose: bool = False, precision: str = "ieee"
                  ) -> torch.Tensor:
    x = round_operand(x, precision)
    if isinstance(layer, torch.Tensor):
        layer = round_operand(layer, precision)
        return (layer.t() if transpose else layer) @ x
    pattern, vals = layer[0], round_operand(layer[1], precision)
    if len(layer) == 3 and not transpose:  # blocked: W x from the blocks; W^T g by CSR
        return spmm_blocked_ref(*pattern.tensors(), vals, *layer[2].tensors(), x)
    return spmm_ref(*pattern.tensors(), vals, x, transpose)


def stack_columns(h: torch.Tensor, tangents: torch.Tensor) -> torch.Tensor:
    """[n, B] and [K, n, B] -> [n, (1+K) B] as [h | v_1 | ... | v_K]."""
    k, n, b = tangents.shape
    return torch.cat([h, tangents.permute(1, 0, 2).reshape(n, k * b)], 1)


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


def mlp_fwd_ref(
    x0: torch.Tensor,
    tan0: torch.Tensor,
    probe: torch.Tensor,
    weights: list[torch.Tensor],
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
        weights, layouts: the layers (``formats.split_weights``); layer l maps
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
    layers = split_weights(weights, layouts)
    b = x0.shape[1]
    k = tan0.shape[0]
    x = stack_columns(x0, tan0)
    saved_m, saved_x = [], []
    for i, layer in enumerate(layers):
        m = _layer_matmul(layer, x, precision=precision)
        s = scales[i]
        scaled = m if s.numel() == 0 else s[:, None] * m
        a = scaled[:, :b] + shifts[i][:, None]
        u = scaled[:, b:]
        if i + 1 < len(layers):
            h, d1, _ = act_ref(a, act)
            x = torch.cat([h, d1.repeat(1, k) * u], 1)
            saved_x.append(x)
        else:
            x = torch.cat([a, u], 1)
        saved_m.append(m)
    f = x[:, :b].contiguous()
    d = f.shape[0]
    v = x[:, b:].reshape(d, k, b)
    if k == 0:
        div = f.new_zeros(b)
    elif exact:
        div = torch.diagonal(v, dim1=0, dim2=1).sum(-1)
    else:
        div = (probe.permute(1, 0, 2) * v).sum((0, 1))
    saved = saved_m + saved_x if save else []
    return f, div, saved


def mlp_bwd_ref(
    grad_f: torch.Tensor,
    grad_div: torch.Tensor,
    x0: torch.Tensor,
    tan0: torch.Tensor,
    probe: torch.Tensor,
    weights: list[torch.Tensor],
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
        grad_x0 [n0, B]; per layer the weight gradient ([n_l, n_{l-1}] for a
        dense layer, [nnz] at the kept places for a CSR one), the scale
        gradient (empty where there is no scale) and the shift gradient [n_l].
    """
    check_precision(precision)
    layers = split_weights(weights, layouts)
    n_layers = len(layers)
    b = x0.shape[1]
    k = tan0.shape[0]
    d = grad_f.shape[0]
    saved_m, saved_x = saved[:n_layers], saved[n_layers:]
    xbar = torch.cat([grad_f, _probe_cotangent(grad_div, probe, exact, d, k)], 1)
    g_w: list[torch.Tensor] = [None] * n_layers  # type: ignore[list-item]
    g_scale: list[torch.Tensor] = [None] * n_layers  # type: ignore[list-item]
    g_shift: list[torch.Tensor] = [None] * n_layers  # type: ignore[list-item]
    for i in reversed(range(n_layers)):
        m = saved_m[i]
        s = scales[i]
        x_in = stack_columns(x0, tan0) if i == 0 else saved_x[i - 1]
        if i + 1 < n_layers:
            scaled = m if s.numel() == 0 else s[:, None] * m
            a = scaled[:, :b] + shifts[i][:, None]
            _, d1, d2 = act_ref(a, act)
            hbar, vbar = xbar[:, :b], xbar[:, b:]
            u = scaled[:, b:]
            abar = hbar * d1 + (vbar * u).reshape(m.shape[0], k, b).sum(1) * d2
            g = torch.cat([abar, vbar * d1.repeat(1, k)], 1)
        else:
            g = xbar
        g_shift[i] = g[:, :b].sum(1)
        if s.numel() == 0:
            g_scale[i] = s.new_empty(0)
            mbar = g
        else:
            g_scale[i] = (g * m).sum(1)
            mbar = s[:, None] * g
        layer = layers[i]
        mbar_r, x_in_r = round_operand(mbar, precision), round_operand(x_in, precision)
        if isinstance(layer, torch.Tensor):
            g_w[i] = mbar_r @ x_in_r.t()
        else:
            g_w[i] = sddmm_ref(layer[0].rowptr, layer[0].col, mbar_r, x_in_r)
        # The first layer's tangent inputs are constants: only the state part.
        xbar = _layer_matmul(layer, mbar[:, :b] if i == 0 else mbar, True, precision)
    return xbar, g_w, g_scale, g_shift
