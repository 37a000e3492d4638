"""Compiled convolutions: a pruned ``nn.Conv2d`` as a core over its kept taps.

A convolution weight [C_out, C_in, k, k] is the matrix [C_out, C_in * k * k]
whose column ``ci * k * k + ky * k + kx`` is one tap (``linear.CoreMatrix``
takes it so). Its core keeps the output channels computed (``rows``) and the
input channels read (``cols``), in one of two layouts:

- ``"dense"``: the reduced weight [n_rows, n_cols, k, k], run by PyTorch's own
  convolution (oneDNN / cuDNN): structured (filter) pruning leaves smaller dense
  convolutions;
- ``"csr"``: the kept taps of each output channel in CSR order, run by
  ``sparsekern::conv2d`` (and its adjoints ``conv2d_t``, ``conv2d_wgrad``) over
  feature-major inputs [C, N, H, W].

``conv_layout`` picks one by density. ``SparseConv2d`` is the generic tier's
drop-in for a pruned ``nn.Conv2d``; the fused tier (``sparsekern.fused_conv``)
runs the cores of a whole convolutional field.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.grad import conv2d_input, conv2d_weight

from sparsekern import ops
from sparsekern.backends import BackendChoice
from sparsekern.linear import CoreMatrix, KeptPool, KeptTensor
from sparsekern.masks import CompileError, MaskedTensor

# Kept-tap density at or above which a core runs PyTorch's dense convolution. Measured
# on 2 AMD EPYC cores, f with divergence of FFJORD's 64-channel ODEnet at batch 200:
# the csr kernel wins up to 0.7 on 28x28 maps and breaks even near 0.4 on 16x16 ones
# (smaller maps waste more of its tiles on the border); the rule takes the smaller.
CONV_DENSE_ABOVE = 0.4


def _swap(x: torch.Tensor, swap: bool) -> torch.Tensor:
    """Feature-major <-> batch-major (a view)."""
    return x.transpose(0, 1) if swap else x


def conv_layout(choice: str, density: float) -> str:
    """The layout of a convolution core: ``choice`` ("auto": by ``density``, the kept
    fraction of the core's taps). There is no blocked convolution: "blocked" is csr."""
    if choice == "dense" or (choice == "auto" and density >= CONV_DENSE_ABOVE):
        return "dense"
    return "csr"


class ConvCore(nn.Module):
    """W[rows][:, cols] of a kept convolution weight, convolving feature-major inputs.

    Args:
        weight: the kept values of a [C_out, C_in, k, k] weight (square k).
        rows, cols: int64 indices of the output channels computed and the input
            channels read.
        layout: "dense" or "csr".
        stride, padding: of the convolution (zero padding).
    """

    def __init__(self, weight: KeptTensor, rows: torch.Tensor, cols: torch.Tensor, layout: str,
                 stride: int = 1, padding: int = 0) -> None:
        super().__init__()
        if layout not in ("dense", "csr"):
            raise CompileError(f"{weight.name}: a convolution core is 'dense' or 'csr', "
                               f"got {layout!r}")
        k = weight.shape[2]
        self.k, self.taps, self.stride, self.padding = k, k * k, stride, padding
        self.n_rows, self.n_cols = rows.numel(), cols.numel()
        taps = torch.arange(self.taps, device=cols.device)
        self.matrix = CoreMatrix(weight, rows, (cols[:, None] * self.taps + taps).flatten(),
                                 layout)
        self.layout, self.nnz, self.density = layout, self.matrix.nnz, self.matrix.density
        self.name = weight.name

    def pattern(self) -> list[torch.Tensor]:
        """The csr core's five int32 index tensors (``formats.CSRPattern``)."""
        csr = self.matrix.csr_pattern()
        assert csr is not None, "a dense core has no pattern"
        return csr.tensors()

    def op_value(self, values: torch.Tensor) -> torch.Tensor:
        """The core's weight from the kept ``values`` (differentiable): [n_rows, n_cols, k, k]
        for dense, the [nnz] kept taps in CSR order for csr."""
        if self.layout == "dense":
            return self.matrix.matrix(values).view(self.n_rows, self.n_cols, self.k, self.k)
        return self.matrix.core_values(values)

    def out_size(self, h: int, w: int) -> tuple[int, int]:
        s, p, k = self.stride, self.padding, self.k
        return (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1

    @property
    def empty(self) -> bool:
        """No channel computed or none read: a zero map (PyTorch refuses empty weights)."""
        return self.n_rows * self.n_cols == 0

    # Each method takes and returns feature-major maps [C, N, H, W], or with
    # ``batch_major`` PyTorch's [N, C, H, W]. The dense layout runs PyTorch's convolution
    # on a contiguous NCHW tensor (a transposed view falls back to a slow path, about
    # 1.5x slower at MNIST's shapes), the csr layout the kernels on a contiguous
    # feature-major one: a transpose copy where the two differ.
    def conv(self, value: torch.Tensor, x: torch.Tensor, backend: str,
             batch_major: bool = False) -> torch.Tensor:
        """x [n_cols, N, H, W] -> [n_rows, N, Ho, Wo]; differentiable to any order."""
        n = x.shape[0 if batch_major else 1]
        ho, wo = self.out_size(x.shape[2], x.shape[3])
        if self.empty:
            # Plus a sum over no entries: a zero that keeps x's graph, so gradients w.r.t.
            # x are zeros, as the dense model's are, not None (and no 0 * inf = NaN).
            shape = (n, self.n_rows, ho, wo) if batch_major else (self.n_rows, n, ho, wo)
            return x.new_zeros(shape) + x.flatten()[:0].sum()
        if self.layout == "dense":
            y = F.conv2d(_swap(x, not batch_major).contiguous(), value, None, self.stride,
                         self.padding)
            return _swap(y, not batch_major)
        y = ops.conv2d(*self.pattern(), value, _swap(x, batch_major).contiguous(), self.n_rows,
                       self.k, self.k, self.stride, self.padding, backend)
        return _swap(y, batch_major)

    def conv_t(self, value: torch.Tensor, g: torch.Tensor, h: int, w: int, backend: str,
               batch_major: bool = False) -> torch.Tensor:
        """The adjoint of ``conv`` w.r.t. x: g [n_rows, N, Ho, Wo] -> [n_cols, N, h, w]."""
        n = g.shape[0 if batch_major else 1]
        if self.empty:
            return g.new_zeros((n, self.n_cols, h, w) if batch_major else (self.n_cols, n, h, w))
        if self.layout == "dense":
            gx = conv2d_input((n, self.n_cols, h, w), value,
                              _swap(g, not batch_major).contiguous(), self.stride, self.padding)
            return _swap(gx, not batch_major)
        gx = ops.conv2d_t(*self.pattern(), value, _swap(g, batch_major).contiguous(),
                          self.n_cols, h, w, self.k, self.k, self.stride, self.padding, backend)
        return _swap(gx, batch_major)

    def weight_grad(self, g: torch.Tensor, x: torch.Tensor, backend: str,
                    batch_major: bool = False) -> torch.Tensor:
        """d<g, conv(value, x)>/d value: [n_rows, n_cols, k, k] (dense) or [nnz] (csr)."""
        shape = (self.n_rows, self.n_cols, self.k, self.k)
        if self.empty:
            return g.new_zeros(shape if self.layout == "dense" else (0,))
        if self.layout == "dense":
            return conv2d_weight(_swap(x, not batch_major).contiguous(), shape,
                                 _swap(g, not batch_major).contiguous(), self.stride,
                                 self.padding)
        return ops.conv2d_wgrad(*self.pattern(), _swap(g, batch_major).contiguous(),
                                _swap(x, batch_major).contiguous(), self.k, self.k,
                                self.stride, self.padding, backend)

    def extra_repr(self) -> str:
        return (f"{self.name}: {self.layout} [{self.n_rows}, {self.n_cols}, {self.k}, {self.k}], "
                f"nnz={self.nnz} ({100 * self.density:.1f}%)")


def conv_geometry(conv: nn.Conv2d) -> tuple[int, int] | str:
    """(stride, padding) of a convolution the kernels run, or why they cannot."""
    k, s, p, d = conv.kernel_size, conv.stride, conv.padding, conv.dilation
    if k[0] != k[1]:
        return f"kernel {tuple(k)} is not square"
    if isinstance(p, str):
        if p == "valid":
            p = (0, 0)
        elif tuple(s) == (1, 1) and k[0] % 2 == 1:  # "same": k // 2 on each side for odd k
            p = (k[0] // 2, k[0] // 2)
        else:
            return f"padding {p!r} with kernel {tuple(k)} and stride {tuple(s)}"
    if s[0] != s[1] or p[0] != p[1]:
        return f"stride {tuple(s)} / padding {tuple(p)} differ between H and W"
    if tuple(d) != (1, 1) or conv.groups != 1 or conv.padding_mode != "zeros":
        return (f"dilation {tuple(d)}, groups {conv.groups}, padding_mode "
                f"{conv.padding_mode!r} (the kernels run dilation 1, groups 1, zero padding)")
    return s[0], p[0]


class SparseConv2d(nn.Module):
    """Drop-in for a pruned ``nn.Conv2d``: x [N, C_in, H, W] -> [N, C_out, Ho, Wo].

    Output channels with no kept tap output their bias, input channels with no
    kept tap are not read; the rest is a ``ConvCore``. Differentiable to any
    order (w.r.t. the input and the kept values), so autograd divergences train
    through it.
    """

    rows: torch.Tensor
    cols: torch.Tensor

    def __init__(self, weight: MaskedTensor, bias: MaskedTensor | None, layout: str,
                 backend: BackendChoice, stride: int, padding: int,
                 pool: KeptPool | None = None) -> None:
        super().__init__()
        pool = pool or KeptPool()
        self.weight = pool.get(weight)
        self.bias = None if bias is None else pool.get(bias)
        self.out_channels, self.in_channels = self.weight.shape[:2]
        mask = weight.mask
        rows = mask.flatten(1).any(1).nonzero().squeeze(1)
        cols = mask.transpose(0, 1).flatten(1).any(1).nonzero().squeeze(1)
        self.all_rows = rows.numel() == self.out_channels
        self.all_cols = cols.numel() == self.in_channels
        self.register_buffer("rows", rows, persistent=False)
        self.register_buffer("cols", cols, persistent=False)
        n_taps = rows.numel() * cols.numel() * self.weight.shape[2] * self.weight.shape[3]
        density = mask.sum().item() / n_taps if n_taps else 0.0
        self.core = ConvCore(self.weight, rows, cols, conv_layout(layout, density), stride,
                             padding)
        self.backend = backend  # the field's choice, read at call time

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"{self.weight.name}: input must be [N, {self.in_channels}, H, W], "
                             f"got {list(x.shape)}")
        bias = None if self.bias is None else self.bias.dense()
        value = self.core.op_value(self.weight.values)
        core = self.core
        if core.layout == "dense" and self.all_rows and self.all_cols:
            return F.conv2d(x, value, bias, core.stride, core.padding)
        xs = x if self.all_cols else x.index_select(1, self.cols)
        y = core.conv(value, xs, self.backend.name, batch_major=True)
        if not self.all_rows:
            ho, wo = core.out_size(x.shape[2], x.shape[3])
            y = y.new_zeros(x.shape[0], self.out_channels, ho, wo).index_copy(1, self.rows, y)
        if bias is not None:
            y = y + bias.view(1, -1, 1, 1)
        return y

    def write_back(self) -> None:
        self.weight.write_back()
        if self.bias is not None:
            self.bias.write_back()
