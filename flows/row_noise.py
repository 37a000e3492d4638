"""Random draws tied to the row of a sample in its global batch, not to the process.

Training and evaluation draw noise per sample: Hutchinson probes
(``flows.divergence.sample_noise``) and the dequantisation of images
(``flows.likelihood.dequantize``). Inside ``per_row_noise(seed, rows, total)``
the k-th draw of a batch is row ``rows`` of one [total, ...] draw from a
generator seeded by (seed, k). A sample therefore gets the same noise whether
one process holds the whole batch or ``torchrun`` splits it over several ranks
(``flows.distributed``), and whatever the evaluation's batching: results do not
depend on the number of processes. Outside the block draws use the global RNG.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import torch

NoiseKind = Literal["gaussian", "rademacher", "uniform"]


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers, the same in every process (no Python hash salt)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


@dataclass
class _Rows:
    seed: int
    start: int
    stop: int
    total: int
    draws: int = 0


_active: list[_Rows] = []


@contextlib.contextmanager
def per_row_noise(seed: int, rows: slice, total: int) -> Iterator[None]:
    """Within the block, draws for a batch of rows ``rows`` of a global batch of ``total``.

    Args:
        seed: the batch's seed (e.g. ``mix_seed(run_seed, cycle, step)``).
        rows: the rows this process holds, ``slice(start, stop)`` with
            0 <= start <= stop <= total.
        total: rows of the global batch.
    """
    start, stop = rows.start or 0, rows.stop if rows.stop is not None else total
    if not 0 <= start <= stop <= total:
        raise ValueError(f"rows {start}:{stop} are not inside a batch of {total}")
    _active.append(_Rows(seed, start, stop, total))
    try:
        yield
    finally:
        _active.pop()


def _sample(
    shape: tuple[int, ...], kind: NoiseKind, like: torch.Tensor, generator: torch.Generator | None
) -> torch.Tensor:
    kw = {"dtype": like.dtype, "device": like.device, "generator": generator}
    if kind == "gaussian":
        return torch.randn(shape, **kw)
    if kind == "uniform":
        return torch.rand(shape, **kw)
    if kind == "rademacher":
        return torch.randint(0, 2, shape, **kw).mul_(2).sub_(1)
    raise ValueError(f"noise={kind!r} is not supported; expected gaussian, rademacher or uniform")


def draw(
    like: torch.Tensor, kind: NoiseKind, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Noise shaped and typed like ``like`` [B, ...]: per row inside ``per_row_noise``.

    An explicit ``generator`` is used as given (the caller fixed the stream);
    otherwise inside ``per_row_noise`` B must be the block's number of rows.
    """
    shape = tuple(like.shape)
    if generator is not None or not _active:
        return _sample(shape, kind, like, generator)
    rows = _active[-1]
    if shape[0] != rows.stop - rows.start:
        raise ValueError(
            f"a per-row draw for {shape[0]} samples inside a block of rows "
            f"{rows.start}:{rows.stop} (of {rows.total}); the batch and its rows disagree"
        )
    gen = torch.Generator(device=like.device).manual_seed(mix_seed(rows.seed, rows.draws))
    rows.draws += 1
    # The whole global batch is drawn so that row i's value does not depend on
    # which rows this process holds; a draw is cheap beside one solve.
    return _sample((rows.total, *shape[1:]), kind, like, gen)[rows.start : rows.stop]
