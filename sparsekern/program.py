"""The fused MLP program's layer loop, written once, and its one shape check.

The program (``sparsekern.ref`` states it) runs layer by layer: a product
M_l = W_l X_{l-1}, then an epilogue (scale, shift, activation and its JVP; the
divergence on the last layer); its reverse runs the epilogue's reverse, the
weight gradient and W_l^T Mbar_l. ``program_forward`` / ``program_backward``
are that loop over ``Primitives``, which each backend fills in with its own
products and epilogues: "ref" (plain PyTorch, ``ref.RefPrimitives``), Triton's
per-layer path (``triton.k_mlp_layers``), and ``FusedMLP``'s f with autograd
(``fused``: differentiable ops, no tangent). Triton's single-launch kernels run
the whole program in one go instead; the C++ backends run the same loop in C++
(csrc/common/mlp_loop.h).

``check_program`` checks a program's shapes (with ``torch._check``), dtypes and
devices: the same function for the ops' fakes (``register_fake``), their eager
path and Triton's entry points.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake

from sparsekern.activations import ACT_IDS
from sparsekern.formats import (
    BLOCK_ROWS,
    INDEX_DTYPE,
    INDEX_NAMES,
    LayerProgram,
    ProgramError,
    ProgramTypeError,
    decode_program,
)


def stack_columns(h: Tensor, tangents: Tensor) -> Tensor:
    """[n, B] and [K, n, B] -> [n, (1+K) B] as [h | v_1 | ... | v_K]."""
    k, n, b = tangents.shape
    return torch.cat([h, tangents.permute(1, 0, 2).reshape(n, k * b)], 1)


# ------------------------------------------------------------------------ the loop


class Primitives:
    """What a backend supplies to the layer loop. Activations are feature-major with
    the column groups [h | v_1 | ... | v_K] of B columns each; ``scale`` is a layer's
    [n] gate, or an empty tensor (or None) for none; ``shift`` its [n] shift."""

    def product(self, layer: LayerProgram, x: Tensor) -> Tensor:
        """M = W x."""
        raise NotImplementedError

    def product_t(self, layer: LayerProgram, g: Tensor) -> Tensor:
        """W^T g."""
        raise NotImplementedError

    def weight_grad(self, layer: LayerProgram, mbar: Tensor, x_in: Tensor) -> Tensor:
        """Mbar X^T: the [n_out, n_in] matrix (dense) or its [nnz] kept places (SDDMM)."""
        raise NotImplementedError

    def hidden(self, m: Tensor, scale: Tensor | None, shift: Tensor, keep_m: bool) -> Tensor:
        """A hidden layer's output X = [sigma(a) | sigma'(a) u] from M (``keep_m``: M is
        saved, so it must not be overwritten)."""
        raise NotImplementedError

    def head(self, m: Tensor, scale: Tensor | None, shift: Tensor) -> Any:
        """The last layer's result from its M: (f, div) for the op, f alone for a graph."""
        raise NotImplementedError

    def epilogue_bwd(self, m: Tensor, xbar: Tensor | None, scale: Tensor | None,
                     shift: Tensor, last: bool) -> tuple[Tensor, Tensor, Tensor]:
        """(Mbar, scale gradient, shift gradient) from a layer's saved M and the cotangent
        ``xbar`` of its output (None for the last layer, whose cotangent is the
        primitives' own: grad_f, and grad_div through the probes)."""
        raise NotImplementedError


def program_forward(prims: Primitives, layers: Sequence[LayerProgram], x: Tensor,
                    scales: Sequence[Tensor | None], shifts: Sequence[Tensor], save: bool
                    ) -> tuple[Any, list[Tensor]]:
    """The program forward from X_0 = ``x``: (the head's result, [M_1..M_L, X_1..X_{L-1}]
    if ``save`` else [])."""
    saved_m: list[Tensor] = []
    saved_x: list[Tensor] = []
    last = len(layers) - 1
    for i, layer in enumerate(layers):
        m = prims.product(layer, x)
        if save:
            saved_m.append(m)
        if i == last:
            return prims.head(m, scales[i], shifts[i]), saved_m + saved_x
        x = prims.hidden(m, scales[i], shifts[i], save)
        if save:
            saved_x.append(x)
    raise ProgramError("the MLP program has no layer")


def program_backward(prims: Primitives, layers: Sequence[LayerProgram], x_in: Tensor,
                     saved: Sequence[Tensor], scales: Sequence[Tensor | None],
                     shifts: Sequence[Tensor], batch: int
                     ) -> tuple[Tensor, list[Tensor], list[Tensor], list[Tensor]]:
    """Reverse mode of ``program_forward`` from its saved list; ``x_in`` is X_0.

    Returns the gradient of the first layer's state rows [n0, B] and, per layer,
    the weight, scale and shift gradients.
    """
    n = len(layers)
    saved_m, saved_x = saved[:n], saved[n:]
    g_w: list[Tensor] = [None] * n  # type: ignore[list-item]
    g_scale: list[Tensor] = [None] * n  # type: ignore[list-item]
    g_shift: list[Tensor] = [None] * n  # type: ignore[list-item]
    xbar = None
    for i in reversed(range(n)):
        mbar, g_scale[i], g_shift[i] = prims.epilogue_bwd(saved_m[i], xbar, scales[i],
                                                          shifts[i], i == n - 1)
        g_w[i] = prims.weight_grad(layers[i], mbar, x_in if i == 0 else saved_x[i - 1])
        # The first layer's tangent inputs are constants: only the state columns.
        xbar = prims.product_t(layers[i], mbar[:, :batch] if i == 0 else mbar)
    return xbar, g_w, g_scale, g_shift  # type: ignore[return-value]


# --------------------------------------------------------------------- the check


def _require(cond: bool | torch.SymBool, message: Callable[[], str]) -> None:
    # A plain True costs nothing; a SymBool (fake tensors with symbolic sizes under
    # torch.compile or opcheck) becomes a runtime assert rather than a guard.
    if cond is not True:
        torch._check_with(ProgramError, cond, message)


def _shape(t: Tensor) -> list[int]:
    return list(t.shape)


def check_program(x0: Tensor, tan0: Tensor, probe: Tensor, values: Sequence[Tensor],
                  index: Sequence[Tensor], scales: Sequence[Tensor], shifts: Sequence[Tensor],
                  layouts: Sequence[int], act: int, exact: bool, *,
                  grad_f: Tensor | None = None, grad_div: Tensor | None = None,
                  saved: Sequence[Tensor] | None = None) -> list[int]:
    """Check the arguments of ``sparsekern::mlp_fwd`` (or, given ``grad_f``, ``grad_div``
    and ``saved``, of ``mlp_bwd``); return the widths n_0..n_L.

    Shapes are checked with ``torch._check`` (a symbolic size becomes a runtime
    assert); every tensor must be on x0's device, float ones of x0's dtype, index
    tensors 1-D int32. The layers' own part (``decode_program``, patterns, values,
    the chain of widths) is remembered for the same tensors, so a field's repeated
    calls check only what changes per call. Raises ``ProgramError`` (shapes,
    devices, counts) or ``ProgramTypeError`` (dtypes), naming the culprit.
    """
    op = "sparsekern::mlp_fwd" if grad_f is None else "sparsekern::mlp_bwd"
    _require(act in ACT_IDS.values(),
             lambda: f"{op}: unknown activation id {act}; expected one of {ACT_IDS}")
    _require(x0.dim() == 2, lambda: f"{op}: x0 must be [n0, B], got {_shape(x0)}")
    n0, b = x0.shape
    _require(tan0.dim() == 3 and tan0.shape[1] == n0 and tan0.shape[2] == b,
             lambda: f"{op}: tan0 must be [K, {n0}, {b}], got {_shape(tan0)}")
    widths = _layer_widths(op, values, index, layouts, x0.dtype, x0.device)
    _require(widths[0] == n0, lambda: f"{op}: layer 0 reads {widths[0]} features, x0 has {n0}")
    n_layers = len(widths) - 1
    _require(len(scales) == n_layers and len(shifts) == n_layers,
             lambda: f"{op}: {n_layers} layers, {len(scales)} scales, {len(shifts)} shifts")
    k, d = tan0.shape[0], widths[-1]
    _check_kinds(op, x0, tan0, probe if k and not exact else None, scales, shifts, grad_f,
                 grad_div, saved)
    for i, (scale, shift) in enumerate(zip(scales, shifts, strict=True)):
        _check_affine(op, i, scale, shift, widths[i + 1])
    if exact:
        _require(k == d, lambda: f"{op}: the exact trace needs K = d = {d} unit tangents, "
                                 f"got K = {k}")
    elif k != 0:
        _require(probe.dim() == 3 and probe.shape[0] == k and probe.shape[1] == d
                 and probe.shape[2] == b,
                 lambda: f"{op}: probe must be [{k}, {d}, {b}], got {_shape(probe)}")
    if grad_f is not None:
        _check_backward(op, widths, b, k, grad_f, grad_div, saved)
    return [n0, *widths[1:]]


def _check_kinds(op: str, x0: Tensor, tan0: Tensor, probe: Tensor | None,
                 scales: Sequence[Tensor], shifts: Sequence[Tensor], grad_f: Tensor | None,
                 grad_div: Tensor | None, saved: Sequence[Tensor] | None) -> None:
    """The per-call float tensors' dtypes and devices (never symbolic) in one pass; names
    are made only for a culprit."""
    dtype, device = x0.dtype, x0.device
    floats = [tan0, *scales, *shifts]
    if probe is not None:
        floats.append(probe)
    if grad_f is not None:
        assert grad_div is not None and saved is not None, "mlp_bwd takes grad_div and saved"
        floats += [grad_f, grad_div, *saved]
    if all(t.dtype == dtype and t.device == device for t in floats):
        return
    named = [("tan0", tan0), *((f"layer {i} scale", t) for i, t in enumerate(scales)),
             *((f"layer {i} shift", t) for i, t in enumerate(shifts))]
    if probe is not None:
        named.append(("probe", probe))
    if grad_f is not None:
        assert grad_div is not None and saved is not None
        named += [("grad_f", grad_f), ("grad_div", grad_div),
                  *((f"saved[{i}]", t) for i, t in enumerate(saved))]
    for name, t in named:
        _check_kind(op, name, t, dtype, device)


def _check_kind(op: str, name: str, t: Tensor, dtype: torch.dtype, device: torch.device
                ) -> None:
    if t.dtype != dtype:
        raise ProgramTypeError(f"{op}: {name} is {t.dtype}, expected x0's {dtype}")
    if t.device != device:
        raise ProgramError(f"{op}: {name} is on {t.device}, x0 on {device}")


def _check_affine(op: str, i: int, scale: Tensor, shift: Tensor, n_out: int) -> None:
    _require(shift.dim() == 1 and shift.shape[0] == n_out,
             lambda: f"{op}: layer {i} shift has shape {_shape(shift)}, expected [{n_out}]")
    _require(scale.dim() == 1 and (scale.shape[0] == 0 or scale.shape[0] == n_out),
             lambda: f"{op}: layer {i} scale has shape {_shape(scale)}, expected [{n_out}], "
                     "or [0] for none")


# The layers that passed ``_check_layers``, by the identity of their tensors, weakly
# held: a hit needs every one alive and the same object. The fused tier passes the same
# tensors call after call, and decoding and re-checking them would cost more than small
# kernels do.
_CHECKED: dict[tuple, tuple[tuple[weakref.ref, ...], list[int]]] = {}
_CHECKED_MAX = 64


def _layer_widths(op: str, values: Sequence[Tensor], index: Sequence[Tensor],
                  layouts: Sequence[int], dtype: torch.dtype, device: torch.device
                  ) -> list[int]:
    """``_check_layers`` of the decoded program, remembered for the same tensors."""
    tensors = (*values, *index)
    # Real tensors only: fake ones (tracing) may have symbolic sizes and live briefly.
    if torch.compiler.is_compiling() or any(map(is_fake, tensors[:1])):
        return _check_layers(op, decode_program(values, index, layouts), dtype, device)
    # The values' shape, dtype and device too: ``p.data = ...`` changes them in place.
    key = (dtype, device, *layouts, *((v.shape, v.dtype, v.device) for v in values),
           *map(id, tensors))
    hit = _CHECKED.get(key)
    if hit is not None and all(r() is t for r, t in zip(hit[0], tensors, strict=True)):
        return hit[1]
    widths = _check_layers(op, decode_program(values, index, layouts), dtype, device)
    if len(_CHECKED) >= _CHECKED_MAX:
        del _CHECKED[next(iter(_CHECKED))]
    _CHECKED[key] = (tuple(map(weakref.ref, tensors)), widths)
    return widths


def _check_layers(op: str, layers: Sequence[LayerProgram], dtype: torch.dtype,
                  device: torch.device) -> list[int]:
    """The layers on their own; returns the widths n_0..n_L they read and give."""
    _require(len(layers) > 0, lambda: f"{op}: the MLP program has no layer")
    widths: list[int] = []
    for i, layer in enumerate(layers):
        n_out, n_in = _check_layer(op, i, layer, dtype, device, widths[-1] if widths else None)
        widths += [n_out] if widths else [n_in, n_out]
    return widths


def _check_layer(op: str, i: int, layer: LayerProgram, dtype: torch.dtype,
                 device: torch.device, n_prev: int | None) -> tuple[int, int]:
    """Layer i's values and patterns, reading the n_prev features of the layer before it
    (None for the first); returns its (n_out, n_in)."""
    vals, csr = layer.values, layer.csr
    _check_kind(op, f"layer {i} weights (values[{i}])", vals, dtype, device)
    if csr is None:
        _require(vals.dim() == 2, lambda: f"{op}: layer {i} is dense: its values must be the "
                                          f"[n_out, n_in] matrix, got {_shape(vals)}")
    else:
        for name, t in zip(INDEX_NAMES, layer.index(), strict=False):
            if t.dtype != INDEX_DTYPE or t.dim() != 1:
                raise ProgramTypeError(f"{op}: layer {i} {name} must be a 1-D int32 tensor, "
                                       f"got {t.dtype} of shape {_shape(t)}")
            if t.device != device:
                raise ProgramError(f"{op}: layer {i} {name} is on {t.device}, x0 on {device}")
        _check_pattern(op, i, layer)
    n_out, n_in = layer.shape
    if n_prev is not None:
        _require(n_in == n_prev, lambda: f"{op}: layer {i} reads {n_in} features, the "
                                         f"previous layer gives {n_prev}")
    return n_out, n_in


def _check_pattern(op: str, i: int, layer: LayerProgram) -> None:
    vals, csr = layer.values, layer.csr
    assert csr is not None, "a csr or blocked layer (the caller's check)"
    nnz = csr.col.shape[0]
    _require(vals.dim() == 1 and vals.shape[0] == nnz,
             lambda: f"{op}: layer {i} values have shape {_shape(vals)}, expected [{nnz}] "
                     "(its kept places)")
    _require(csr.col_t.shape[0] == nnz and csr.perm.shape[0] == nnz,
             lambda: f"{op}: layer {i} col_t and perm have {csr.col_t.shape[0]} and "
                     f"{csr.perm.shape[0]} entries for {nnz} kept places")
    if layer.blocks is not None:
        blocks, n_rows = layer.blocks, csr.shape[0]
        groups = (n_rows + BLOCK_ROWS - 1) // BLOCK_ROWS
        _require(blocks.bslot.shape[0] == nnz,
                 lambda: f"{op}: layer {i} bslot has {blocks.bslot.shape[0]} entries for {nnz} "
                         "kept places")
        _require(blocks.bptr.shape[0] == groups + 1,
                 lambda: f"{op}: layer {i} bptr has {blocks.bptr.shape[0]} entries for "
                         f"{n_rows} rows in groups of {BLOCK_ROWS}")


def _check_backward(op: str, widths: list[int], b: int, k: int, grad_f: Tensor,
                    grad_div: Tensor | None, saved: Sequence[Tensor] | None) -> None:
    d, cols = widths[-1], (1 + k) * b
    assert grad_div is not None and saved is not None, "mlp_bwd takes grad_div and saved"
    _require(grad_f.dim() == 2 and grad_f.shape[0] == d and grad_f.shape[1] == b
             and grad_div.dim() == 1 and grad_div.shape[0] == b,
             lambda: f"{op}: grad_f must be [{d}, {b}] and grad_div [{b}], got "
                     f"{_shape(grad_f)} and {_shape(grad_div)}")
    rows = [*widths[1:], *widths[1:-1]]

    def message() -> str:
        return (f"{op}: saved must be the {len(rows)} tensors of mlp_fwd(save=True) with "
                f"shapes {[[n, cols] for n in rows]}, got {[_shape(t) for t in saved]}")

    _require(len(saved) == len(rows), message)
    for t, n in zip(saved, rows, strict=True):
        _require(t.dim() == 2 and t.shape[0] == n and t.shape[1] == cols, message)
