"""Storage formats of a pruned weight matrix: the kept pattern as CSR plus its transpose.

A pruned weight W [R, C] is held as its kept values ``vals`` [nnz] in row-major
order (the order of ``mask.nonzero()``) and a ``CSRPattern``. The pattern stores
the transpose as well (``rowptr_t``, ``col_t``, ``perm``: the CSR of W^T whose
entry j holds ``vals[perm[j]]``), so W^T g, which every backward pass needs,
streams rows like W x does, with no atomics and no re-sorting at run time.

Index tensors are int32: the kernels index with 32 bits and nnz < 2^31.
"""

from __future__ import annotations

from dataclasses import dataclass

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


# Layer layouts of the fused MLP program. A dense layer contributes one tensor
# (its [n_out, n_in] matrix) to the op's flat ``weights`` list, a CSR layer six
# (the five pattern tensors, then its values).
LAYOUT_DENSE = 0
LAYOUT_CSR = 1
LAYOUT_NAMES = {LAYOUT_DENSE: "dense", LAYOUT_CSR: "csr"}
_TENSORS_PER_LAYOUT = {LAYOUT_DENSE: 1, LAYOUT_CSR: 6}


def split_weights(
    weights: list[torch.Tensor], layouts: list[int]
) -> list[torch.Tensor | tuple[CSRPattern, torch.Tensor]]:
    """Per layer: the dense matrix, or (pattern, vals) for a CSR layer.

    Args:
        weights: the flat list the fused ops take (see ``LAYOUT_*``).
        layouts: one ``LAYOUT_*`` code per layer.
    """
    out: list[torch.Tensor | tuple[CSRPattern, torch.Tensor]] = []
    i = 0
    for layer, code in enumerate(layouts):
        if code not in _TENSORS_PER_LAYOUT:
            raise ValueError(f"layer {layer}: unknown layout code {code}")
        n = _TENSORS_PER_LAYOUT[code]
        chunk = weights[i : i + n]
        if len(chunk) != n:
            raise ValueError(f"weights list ends inside layer {layer} ({len(weights)} tensors)")
        out.append(chunk[0] if code == LAYOUT_DENSE else (CSRPattern(*chunk[:5]), chunk[5]))
        i += n
    if i != len(weights):
        raise ValueError(f"weights list has {len(weights) - i} tensors beyond the last layer")
    return out


def layer_out_features(layer: torch.Tensor | tuple[CSRPattern, torch.Tensor]) -> int:
    return layer.shape[0] if isinstance(layer, torch.Tensor) else layer[0].shape[0]
