"""Compiled linear maps: kept values as parameters, and the layouts that multiply with them.

- ``KeptTensor``: the kept entries of one pruned tensor as a Parameter (the
  only thing an optimiser sees) plus where they go in the dense tensor;
  ``KeptPool`` gives tied (shared) parameters one KeptTensor.
- ``CoreMatrix``: the part of a weight that multiplies live inputs into live
  outputs, in a layout: "dense" (a neuron-reduced dense matrix), "csr"
  (``formats.CSRPattern``, transpose stored) or "blocked"; as a layer of the
  fused program it is a ``formats.LayerProgram`` (``program``), its constant
  index tensors ``index_tensors`` and its per-call values ``op_value``.
- ``SparseLinear``: the generic tier's drop-in for ``nn.Linear`` (any batch
  shape, autograd to any order).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from sparsekern import ops
from sparsekern.backends import BackendChoice
from sparsekern.formats import LAYOUT_CODES, BlockedPattern, CSRPattern, LayerProgram
from sparsekern.masks import CompileError, MaskedTensor


class KeptTensor(nn.Module):
    """The kept entries of a masked tensor, trainable, and the way back to it.

    Index buffers here and in the layouts are derived from the masks and not
    saved: a compiled module's state_dict is its kept values, whatever layout
    the cost model picked.

    ``values`` [nnz] holds the kept entries in row-major order (a Parameter; an
    empty buffer when nothing is kept, so no compiled model has an empty
    parameter); ``dense()``
    rebuilds the full tensor (differentiable, zeros at pruned places) and
    ``write_back()`` copies the values into the source module.
    """

    values: torch.Tensor  # a Parameter, or an empty buffer when nothing is kept
    flat_index: torch.Tensor

    def __init__(self, source: MaskedTensor) -> None:
        super().__init__()
        self.name = source.name
        self.shape = tuple(source.mask.shape)
        kept = source.kept_values.clone()
        if kept.numel():
            self.values = nn.Parameter(kept)
        else:
            # Nothing kept (a fully pruned layer or bias): an empty buffer, not a parameter.
            # Every use still sees a [0] tensor of the right dtype and device, but optimisers
            # and torchdiffeq's odeint_adjoint, which cannot flatten a numel-0 parameter
            # ("setStorage ... storage of size 0"), never see it. Kept in state_dict, so the
            # keys are the same whatever was pruned.
            self.register_buffer("values", kept)
        self.full = bool(source.mask.all())
        flat_index = source.mask.flatten().nonzero().squeeze(1)
        self.register_buffer("flat_index", flat_index, persistent=False)
        self._source = [source]  # a list: not a submodule, not in state_dict

    @property
    def source(self) -> MaskedTensor:
        """The masked tensor (and so the module parameter) this was made from."""
        return self._source[0]

    @property
    def nnz(self) -> int:
        return self.values.numel()

    def dense(self) -> torch.Tensor:
        """The full tensor, differentiable w.r.t. ``values``."""
        if self.full:
            return self.values.view(self.shape)
        flat = self.values.new_zeros(math.prod(self.shape))
        return flat.index_put((self.flat_index,), self.values).view(self.shape)

    def write_back(self) -> None:
        self._source[0].write(self.values.detach())

    def extra_repr(self) -> str:
        return f"{self.name}: {self.nnz} kept of shape {list(self.shape)}"


class KeptPool:
    """The KeptTensors of one compiled field, one per source Parameter: tied weights stay tied.

    A module used twice (``nn.Sequential(a, act, a)``), or two modules sharing one
    weight Parameter, give masked tensors with the same ``target``; they get the
    same KeptTensor, so every use reads one kept-values tensor and its gradient is
    the sum over the uses, as in the dense model. Uses of one Parameter under
    different masks have no single set of kept values: CompileError.
    """

    def __init__(self) -> None:
        self._kept: dict[int, KeptTensor] = {}

    def get(self, source: MaskedTensor) -> KeptTensor:
        """The KeptTensor of ``source.target``, made on its first use."""
        kept = self._kept.get(id(source.target))
        if kept is None:
            # The KeptTensor holds ``source`` and so its target: the id stays unique.
            kept = self._kept[id(source.target)] = KeptTensor(source)
            return kept
        first = kept.source
        if first.mask.shape != source.mask.shape or not torch.equal(first.mask, source.mask):
            raise CompileError(
                f"parameters '{first.name}' and '{source.name}' are one Parameter (tied "
                f"weights) but their masks differ ({int(first.mask.sum())} and "
                f"{int(source.mask.sum())} kept of {list(first.mask.shape)} and "
                f"{list(source.mask.shape)}); give both uses the same mask, or untie them"
            )
        return kept

    def targets(self) -> dict[int, str]:
        """id of every compiled source Parameter -> the name its KeptTensor has."""
        return {key: kept.name for key, kept in self._kept.items()}


class CoreMatrix(nn.Module):
    """W[rows][:, cols] of a kept tensor, in a layout, multiplying feature-major inputs.

    Args:
        weight: the layer's kept values: a [n_out, n_in] tensor, or a convolution
            weight [n_out, C_in, k, k] seen as the matrix [n_out, C_in * k * k] whose
            column ci * k * k + ky * k + kx is one tap (``sparsekern.conv``).
        rows, cols: int64 indices of the output rows computed and the input
            columns read (neuron reduction); entries outside them are not in
            the core.
        layout: "dense", "csr" or "blocked".
    """

    sel: torch.Tensor | None  # None: the core holds every kept value
    reduced_index: torch.Tensor  # dense layout
    rowptr: torch.Tensor  # csr and blocked layouts
    col: torch.Tensor
    rowptr_t: torch.Tensor
    col_t: torch.Tensor
    perm: torch.Tensor
    bptr: torch.Tensor  # blocked layout
    bcol: torch.Tensor
    bslot: torch.Tensor

    def __init__(self, weight: KeptTensor, rows: torch.Tensor, cols: torch.Tensor,
                 layout: str) -> None:
        super().__init__()
        if layout not in LAYOUT_CODES:
            raise CompileError(f"{weight.name}: unknown layout {layout!r}")
        n_out, n_in = weight.shape[0], math.prod(weight.shape[1:])
        self.layout = layout
        self.n_rows, self.n_cols = rows.numel(), cols.numel()
        row_pos = torch.full((n_out,), -1, dtype=torch.long, device=rows.device)
        row_pos[rows] = torch.arange(rows.numel(), device=rows.device)
        col_pos = torch.full((n_in,), -1, dtype=torch.long, device=cols.device)
        col_pos[cols] = torch.arange(cols.numel(), device=cols.device)
        r = weight.flat_index // n_in
        c = weight.flat_index % n_in
        rr, cc = row_pos[r], col_pos[c]
        in_core = (rr >= 0) & (cc >= 0)
        sel = in_core.nonzero().squeeze(1)
        # Row-major order of the reduced coordinates equals the original order
        # (the index maps are increasing), so the CSR order is ``sel``'s order.
        identity = sel.numel() == weight.nnz
        self.register_buffer("sel", None if identity else sel, persistent=False)
        self.nnz = sel.numel()
        self.density = self.nnz / (self.n_rows * self.n_cols) if self.n_rows * self.n_cols else 0.0
        self.name = weight.name
        self.dense_view = identity and self.nnz == self.n_rows * self.n_cols
        if layout == "dense":
            reduced_index = rr[in_core] * self.n_cols + cc[in_core]
            self.register_buffer("reduced_index", reduced_index, persistent=False)
        else:
            core_mask = torch.zeros(self.n_rows, self.n_cols, dtype=torch.bool,
                                    device=rows.device)
            core_mask[rr[in_core], cc[in_core]] = True
            p = CSRPattern.from_mask(core_mask)
            for name, t in zip(("rowptr", "col", "rowptr_t", "col_t", "perm"), p.tensors(),
                               strict=True):
                self.register_buffer(name, t, persistent=False)
            if layout == "blocked":
                b = BlockedPattern.from_csr(p)
                for name, t in zip(("bptr", "bcol", "bslot"), b.tensors(), strict=True):
                    self.register_buffer(name, t, persistent=False)

    @property
    def code(self) -> int:
        return LAYOUT_CODES[self.layout]

    def csr_pattern(self) -> CSRPattern | None:
        """The core's CSR pattern (csr and blocked layouts)."""
        if self.layout == "dense":
            return None
        return CSRPattern(self.rowptr, self.col, self.rowptr_t, self.col_t, self.perm)

    def blocked_pattern(self) -> BlockedPattern | None:
        """The core's blocks (blocked layout)."""
        if self.layout != "blocked":
            return None
        return BlockedPattern(self.bptr, self.bcol, self.bslot)

    def index_tensors(self) -> list[torch.Tensor]:
        """This layer's entries of the fused op's constant ``index`` list (none if dense)."""
        csr, blocks = self.csr_pattern(), self.blocked_pattern()
        return ([] if csr is None else csr.tensors()) + ([] if blocks is None else blocks.tensors())

    def core_values(self, values: torch.Tensor) -> torch.Tensor:
        """The core's entries [nnz_core] of a kept-values vector (differentiable)."""
        return values if self.sel is None else values.index_select(0, self.sel)

    def matrix(self, values: torch.Tensor) -> torch.Tensor:
        """The dense [n_rows, n_cols] core (dense layout)."""
        v = self.core_values(values)
        if self.dense_view:
            return v.view(self.n_rows, self.n_cols)
        flat = v.new_zeros(self.n_rows * self.n_cols)
        return flat.index_put((self.reduced_index,), v).view(self.n_rows, self.n_cols)

    def op_value(self, values: torch.Tensor) -> torch.Tensor:
        """This layer's entry of the fused op's ``values``: the dense core matrix, or the
        core's kept values in CSR order (differentiable w.r.t. ``values``)."""
        return self.matrix(values) if self.layout == "dense" else self.core_values(values)

    def program(self, values: torch.Tensor) -> LayerProgram:
        """The core as a fused program layer, its values taken from the kept ``values``."""
        return LayerProgram(self.layout, self.op_value(values), self.csr_pattern(),
                            self.blocked_pattern())

    def matmul(self, values: torch.Tensor, x: torch.Tensor, backend: str) -> torch.Tensor:
        """W_core x for feature-major x [n_cols, N] -> [n_rows, N], differentiable to any order."""
        return program_matmul(self.program(values), x, backend)

    def extra_repr(self) -> str:
        return (f"{self.name}: {self.layout} [{self.n_rows}, {self.n_cols}], nnz={self.nnz} "
                f"({100 * self.density:.1f}%)")


def program_matmul(layer: LayerProgram, x: torch.Tensor, backend: str) -> torch.Tensor:
    """W x of a fused program layer through the registered ops: differentiable to any order.

    Dense: torch's matmul; csr: ``ops.spmm``; blocked: ``ops.spmm_blocked`` (its
    backward runs on the CSR pattern). x: [n_in, N] feature-major.
    """
    if layer.csr is None:
        return layer.values @ x
    if layer.blocks is not None:
        return ops.spmm_blocked(*layer.csr.tensors(), layer.values, *layer.blocks.tensors(), x,
                                backend)
    return ops.spmm(*layer.csr.tensors(), layer.values, x, False, backend)


class SparseLinear(nn.Module):
    """Drop-in for a pruned ``nn.Linear``: x [*, n_in] -> [*, n_out].

    Rows with no kept weight output their bias, columns with no kept weight are
    not read; the rest is a ``CoreMatrix``. Differentiable to any order (w.r.t.
    the input and the kept values), so autograd-based divergences train through it.
    """

    rows: torch.Tensor
    cols: torch.Tensor

    def __init__(self, weight: MaskedTensor, bias: MaskedTensor | None, layout: str,
                 backend: BackendChoice, pool: KeptPool | None = None) -> None:
        super().__init__()
        pool = pool or KeptPool()  # a field's pool ties parameters shared between its layers
        self.weight = pool.get(weight)
        self.bias = None if bias is None else pool.get(bias)
        self.out_features, self.in_features = self.weight.shape
        mask = weight.mask
        rows = mask.any(1).nonzero().squeeze(1)
        cols = mask.any(0).nonzero().squeeze(1)
        self.all_rows = rows.numel() == self.out_features
        self.all_cols = cols.numel() == self.in_features
        self.register_buffer("rows", rows, persistent=False)
        self.register_buffer("cols", cols, persistent=False)
        self.core = CoreMatrix(self.weight, rows, cols, layout)
        self.backend = backend  # the field's choice, read at call time

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"{self.weight.name}: input has {x.shape[-1]} features, expected "
                             f"{self.in_features}")
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        bias = None if self.bias is None else self.bias.dense()
        values = self.weight.values
        if self.core.layout == "dense" and self.all_rows and self.all_cols:
            return F.linear(x2, self.core.matrix(values), bias).reshape(*lead, self.out_features)
        xs = x2 if self.all_cols else x2.index_select(1, self.cols)
        if self.core.layout == "dense":
            y = F.linear(xs, self.core.matrix(values))
        else:
            y = self.core.matmul(values, xs.t(), self.backend.name).t()
        if not self.all_rows:
            y = y.new_zeros(y.shape[0], self.out_features).index_copy(1, self.rows, y)
        if bias is not None:
            y = y + bias
        return y.reshape(*lead, self.out_features)

    def write_back(self) -> None:
        self.weight.write_back()
        if self.bias is not None:
            self.bias.write_back()
