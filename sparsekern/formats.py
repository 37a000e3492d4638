"""Storage formats of a pruned weight matrix: the kept pattern as CSR plus its transpose.

A pruned weight W [R, C] is held as its kept values ``vals`` [nnz] in row-major
order (the order of ``mask.nonzero()``) and a ``CSRPattern``. The pattern stores
the transpose as well (``rowptr_t``, ``col_t``, ``perm``: the CSR of W^T whose
entry j holds ``vals[perm[j]]``), so W^T g, which every backward pass needs,
streams rows like W x does, with no atomics and no re-sorting at run time.

Index tensors are int32: the kernels index with 32 bits and nnz < 2^31.

The fused MLP program's layers (``LayerProgram``: a layout, the values and the
patterns) travel through the ops as (values, index, layouts); ``decode_program``
is the one place Python reads them back (``csrc/common/mlp_program.h`` the C++ one).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

INDEX_DTYPE = torch.int32


@dataclass(frozen=True)
class CSRPattern:
    """The kept positions of a [n_rows, n_cols] matrix, as CSR and CSR-of-transpose.

    Attributes:
        rowptr: [n_rows + 1] int32, row r's entries are rowptr[r]:rowptr[r+1].
        col: [nnz] int32 column of each entry (row-major order).
        rowptr_t: [n_cols + 1] int32, the same for W^T.
        col_t: [nnz] int32, the row of W (column of W^T) of each transposed entry.
        perm: [nnz] int32, position in ``col``/``vals`` of each transposed entry.
    """

    rowptr: torch.Tensor
    col: torch.Tensor
    rowptr_t: torch.Tensor
    col_t: torch.Tensor
    perm: torch.Tensor

    @property
    def shape(self) -> tuple[int, int]:
        return (self.rowptr.numel() - 1, self.rowptr_t.numel() - 1)

    @property
    def nnz(self) -> int:
        return self.col.numel()

    @property
    def density(self) -> float:
        r, c = self.shape
        return self.nnz / (r * c) if r * c else 0.0

    def tensors(self) -> list[torch.Tensor]:
        """The five index tensors, in the order the ops take them."""
        return [self.rowptr, self.col, self.rowptr_t, self.col_t, self.perm]

    def rows(self) -> torch.Tensor:
        """[nnz] int64 row of each entry (COO rows)."""
        counts = (self.rowptr[1:] - self.rowptr[:-1]).long()
        return torch.repeat_interleave(
            torch.arange(self.shape[0], device=self.rowptr.device), counts
        )

    def flat_index(self) -> torch.Tensor:
        """[nnz] int64 position r * n_cols + c of each entry in the dense matrix."""
        return self.rows() * self.shape[1] + self.col.long()

    def to_dense(self, vals: torch.Tensor) -> torch.Tensor:
        """The dense [n_rows, n_cols] matrix with ``vals`` [nnz] at the kept places."""
        if vals.shape != (self.nnz,):
            raise ValueError(f"vals must have shape [{self.nnz}], got {list(vals.shape)}")
        dense = vals.new_zeros(self.shape[0] * self.shape[1])
        dense = dense.index_put((self.flat_index(),), vals)
        return dense.view(self.shape)

    def mask(self) -> torch.Tensor:
        """Bool [n_rows, n_cols], True at the kept places."""
        m = torch.zeros(self.shape[0] * self.shape[1], dtype=torch.bool, device=self.col.device)
        m[self.flat_index()] = True
        return m.view(self.shape)

    @staticmethod
    def from_mask(mask: torch.Tensor) -> CSRPattern:
        """The pattern of a 2-D mask (nonzero = kept)."""
        if mask.dim() != 2:
            raise ValueError(f"a CSR pattern needs a 2-D mask, got shape {list(mask.shape)}")
        n_rows, n_cols = mask.shape
        if max(n_rows, n_cols) >= 2**31 or mask.numel() >= 2**62:
            raise ValueError(f"mask of shape {list(mask.shape)} is too large for int32 indices")
        kept = mask != 0
        rows, cols = kept.nonzero(as_tuple=True)
        if rows.numel() >= 2**31:
            raise ValueError(f"{rows.numel()} kept entries do not fit int32 indices")
        dev = mask.device
        rowptr = torch.zeros(n_rows + 1, dtype=torch.long, device=dev)
        rowptr[1:] = torch.cumsum(kept.sum(1), 0)
        # Transposed order: by column, then row; stable so rows stay ascending.
        order = torch.sort(cols * max(n_rows, 1) + rows, stable=True).indices
        rowptr_t = torch.zeros(n_cols + 1, dtype=torch.long, device=dev)
        rowptr_t[1:] = torch.cumsum(kept.sum(0), 0)
        return CSRPattern(
            rowptr=rowptr.to(INDEX_DTYPE),
            col=cols.to(INDEX_DTYPE),
            rowptr_t=rowptr_t.to(INDEX_DTYPE),
            col_t=rows[order].to(INDEX_DTYPE),
            perm=order.to(INDEX_DTYPE),
        )

    @staticmethod
    def from_tensors(tensors: list[torch.Tensor] | tuple[torch.Tensor, ...]) -> CSRPattern:
        """Inverse of ``tensors()``."""
        if len(tensors) != 5:
            raise ValueError(f"a CSR pattern has 5 index tensors, got {len(tensors)}")
        return CSRPattern(*tensors)

    def validate(self) -> None:
        """Raise ValueError if the index tensors are inconsistent (for hand-built patterns)."""
        n_rows, n_cols = self.shape
        for name, t in zip(("rowptr", "col", "rowptr_t", "col_t", "perm"), self.tensors(),
                           strict=True):
            if t.dtype != INDEX_DTYPE or t.dim() != 1:
                raise ValueError(f"CSR {name} must be a 1-D int32 tensor, got {t.dtype} "
                                 f"of shape {list(t.shape)}")
        nnz = self.nnz
        if int(self.rowptr[0]) != 0 or int(self.rowptr[-1]) != nnz:
            raise ValueError(f"rowptr must run from 0 to nnz={nnz}")
        if int(self.rowptr_t[0]) != 0 or int(self.rowptr_t[-1]) != nnz:
            raise ValueError(f"rowptr_t must run from 0 to nnz={nnz}")
        if self.col_t.numel() != nnz or self.perm.numel() != nnz:
            raise ValueError("col_t and perm must have nnz entries")
        if nnz and (int(self.col.min()) < 0 or int(self.col.max()) >= n_cols):
            raise ValueError(f"col entries must lie in [0, {n_cols})")
        if nnz and (int(self.col_t.min()) < 0 or int(self.col_t.max()) >= n_rows):
            raise ValueError(f"col_t entries must lie in [0, {n_rows})")
        rows = self.rows()
        perm = self.perm.long()
        if nnz and not (
            torch.equal(rows[perm], self.col_t.long())
            and torch.equal(torch.sort(perm).values, torch.arange(nnz, device=perm.device))
        ):
            raise ValueError("perm does not map the transposed entries onto the CSR entries")


BLOCK_ROWS = 4  # rows per block of the blocked layout (kernels assume this value)


@dataclass(frozen=True)
class BlockedPattern:
    """The blocked layout of a CSR pattern: groups of ``BLOCK_ROWS`` rows share a column list.

    Group g holds rows [4g, 4g + 4); its blocks are the columns where any of those
    rows keeps an entry, each block a vertical 4 x 1 strip of values (zero where
    not kept). A product then loads each input row once for four output rows,
    which CSR cannot; the zero fill is the price, so it pays at moderate
    densities. Values stay the CSR ``vals``: ``bslot`` scatters them into the
    block storage ([n_blocks, 4], row-major), and W^T g and the weight gradient
    use the CSR pattern the layout is built from.

    Attributes:
        bptr: [n_groups + 1] int32, group g's blocks are bptr[g]:bptr[g+1].
        bcol: [n_blocks] int32 column of each block.
        bslot: [nnz] int32, where CSR entry k lives in the block storage.
    """

    bptr: torch.Tensor
    bcol: torch.Tensor
    bslot: torch.Tensor

    def tensors(self) -> list[torch.Tensor]:
        return [self.bptr, self.bcol, self.bslot]

    @property
    def n_blocks(self) -> int:
        return self.bcol.numel()

    def block_values(self, vals: torch.Tensor) -> torch.Tensor:
        """[n_blocks, BLOCK_ROWS] block storage of CSR values ``vals`` (zero fill)."""
        out = vals.new_zeros(self.n_blocks * BLOCK_ROWS)
        return out.index_put((self.bslot.long(),), vals).view(self.n_blocks, BLOCK_ROWS)

    def to_dense(self, vals: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
        """The dense matrix from the blocks alone (independent of the CSR pattern)."""
        n_rows, n_cols = shape
        blocks = self.block_values(vals)
        counts = (self.bptr[1:] - self.bptr[:-1]).long()
        group = torch.repeat_interleave(torch.arange(counts.numel(), device=vals.device), counts)
        dense = vals.new_zeros((counts.numel() * BLOCK_ROWS, n_cols))
        for i in range(BLOCK_ROWS):
            dense[group * BLOCK_ROWS + i, self.bcol.long()] = blocks[:, i]
        return dense[:n_rows]

    @staticmethod
    def from_csr(pattern: CSRPattern) -> BlockedPattern:
        n_rows, n_cols = pattern.shape
        rows = pattern.rows()
        col = pattern.col.long()
        n_groups = (n_rows + BLOCK_ROWS - 1) // BLOCK_ROWS
        group = rows // BLOCK_ROWS
        # One block per distinct (group, column), in group-major, column order.
        key = group * max(n_cols, 1) + col
        uniq, inverse = torch.unique(key, sorted=True, return_inverse=True)
        bgroup = uniq // max(n_cols, 1)
        bptr = torch.zeros(n_groups + 1, dtype=torch.long, device=col.device)
        bptr[1:] = torch.cumsum(torch.bincount(bgroup, minlength=n_groups), 0)
        return BlockedPattern(
            bptr=bptr.to(INDEX_DTYPE),
            bcol=(uniq % max(n_cols, 1)).to(INDEX_DTYPE),
            bslot=(inverse * BLOCK_ROWS + rows % BLOCK_ROWS).to(INDEX_DTYPE),
        )


# ----------------------------------------------------------- the fused MLP program

# Layer layouts of the fused MLP program (the op's ``layouts``: one code per layer).
LAYOUT_DENSE = 0
LAYOUT_CSR = 1
LAYOUT_BLOCKED = 2
Layout = Literal["dense", "csr", "blocked"]
LAYOUT_NAMES: dict[int, Layout] = {LAYOUT_DENSE: "dense", LAYOUT_CSR: "csr",
                                   LAYOUT_BLOCKED: "blocked"}
LAYOUT_CODES: dict[Layout, int] = {name: code for code, name in LAYOUT_NAMES.items()}
# The index tensors of a layer in the op's ``index`` list, by layout: none for a dense
# layer, the CSR pattern's five for csr, those five then the blocks' three for blocked.
INDEX_NAMES = ("rowptr", "col", "rowptr_t", "col_t", "perm", "bptr", "bcol", "bslot")
INDEX_COUNTS = {LAYOUT_DENSE: 0, LAYOUT_CSR: 5, LAYOUT_BLOCKED: 8}


class ProgramError(ValueError, RuntimeError):
    """A malformed fused MLP program: a ValueError, and a RuntimeError as torch's op checks
    (``torch._check``, the C++ kernels' ``TORCH_CHECK``) raise."""


class ProgramTypeError(TypeError, RuntimeError):
    """A fused MLP program tensor of the wrong dtype (a TypeError, and a RuntimeError)."""


@dataclass(frozen=True)
class LayerProgram:
    """One layer of the fused MLP program (``sparsekern.ref``): W_l in its layout.

    Attributes:
        layout: "dense", "csr" or "blocked" (``LAYOUT_CODES``).
        values: the only differentiable weight input: the [n_out, n_in] matrix of a
            dense layer, the [nnz] kept values (CSR order) of a csr or blocked one.
        csr: the kept pattern (csr and blocked layers; W^T g and the weight gradient
            of a blocked layer run on it).
        blocks: the blocked layout of ``csr`` (blocked layers), for W x.
    """

    layout: Layout
    values: torch.Tensor
    csr: CSRPattern | None = None
    blocks: BlockedPattern | None = None

    def __post_init__(self) -> None:
        if self.layout not in LAYOUT_CODES:
            raise ProgramError(f"unknown layout {self.layout!r}; expected one of "
                               f"{tuple(LAYOUT_CODES)}")
        if (self.csr is None) != (self.layout == "dense") or (
                (self.blocks is None) != (self.layout != "blocked")):
            raise ProgramError(f"a {self.layout} layer takes "
                               + {"dense": "no pattern", "csr": "a CSR pattern only",
                                  "blocked": "a CSR pattern and its blocks"}[self.layout])

    @property
    def code(self) -> int:
        """The layout's code in the op's ``layouts``."""
        return LAYOUT_CODES[self.layout]

    @property
    def shape(self) -> tuple[int, int]:
        """(n_out, n_in) of W."""
        if self.csr is None:
            return self.values.shape[0], self.values.shape[1]
        return self.csr.shape

    @property
    def n_out(self) -> int:
        return self.shape[0]

    @property
    def n_in(self) -> int:
        return self.shape[1]

    def index(self) -> list[torch.Tensor]:
        """This layer's entries of the op's ``index`` list (``INDEX_NAMES`` order)."""
        if self.csr is None:
            return []
        return self.csr.tensors() + ([] if self.blocks is None else self.blocks.tensors())


def decode_program(values: Sequence[torch.Tensor], index: Sequence[torch.Tensor],
                   layouts: Sequence[int]) -> list[LayerProgram]:
    """The fused ops' (values, index, layouts) as one ``LayerProgram`` per layer.

    Args:
        values: one tensor per layer (``LayerProgram.values``).
        index: the layers' index tensors, concatenated (``INDEX_COUNTS`` per layout).
        layouts: one ``LAYOUT_*`` code per layer.

    Raises:
        ProgramError: an unknown layout code, or counts that do not fit the layouts.
        Shapes, dtypes and devices are ``sparsekern.program.check_program``'s.
    """
    for layer, code in enumerate(layouts):
        if code not in INDEX_COUNTS:
            raise ProgramError(f"layer {layer} has unknown layout code {code!r} "
                               f"({LAYOUT_DENSE} dense, {LAYOUT_CSR} csr, "
                               f"{LAYOUT_BLOCKED} blocked)")
    if len(values) != len(layouts):
        raise ProgramError(f"{len(values)} value tensors for {len(layouts)} layers (values "
                           "has exactly one tensor per layer)")
    expected = sum(INDEX_COUNTS[code] for code in layouts)
    if len(index) != expected:
        raise ProgramError(f"{len(index)} index tensors for layouts {list(layouts)}, expected "
                           f"{expected} (0 per dense, 5 per csr, 8 per blocked layer)")
    out = []
    i = 0
    for code, vals in zip(layouts, values, strict=True):
        if code == LAYOUT_DENSE:
            out.append(LayerProgram("dense", vals))
            continue
        csr = CSRPattern(*index[i:i + 5])
        blocks = BlockedPattern(*index[i + 5:i + 8]) if code == LAYOUT_BLOCKED else None
        out.append(LayerProgram(LAYOUT_NAMES[code], vals, csr, blocks))
        i += INDEX_COUNTS[code]
    return out


def encode_program(layers: list[LayerProgram]) -> tuple[list[torch.Tensor], list[torch.Tensor],
                                                       list[int]]:
    """Inverse of ``decode_program``: (values, index, layouts) for the fused ops."""
    return ([layer.values for layer in layers],
            [t for layer in layers for t in layer.index()],
            [layer.code for layer in layers])
