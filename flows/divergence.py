"""Hutchinson probe vectors and the divergence choices of the method.

The divergences themselves, exact and Hutchinson by autograd, live in the engine
(``sparsekern.divergence``), whose generic tier needs them too.
"""

from __future__ import annotations

import torch

from flows.row_noise import draw

NOISE_KINDS = ("gaussian", "rademacher")
DIVERGENCES = ("hutchinson", "exact")


def sample_noise(like: torch.Tensor, kind: str = "gaussian") -> torch.Tensor:
    """Hutchinson probe vectors with E[e e^T] = I, shaped and typed like ``like``.

    Args:
        like: [B, ...] tensor whose shape, dtype and device the noise takes.
        kind: "gaussian" (standard normal) or "rademacher" (+-1 with equal odds).

    Drawn per sample row inside ``flows.row_noise.per_row_noise`` (training and
    evaluation), from the global RNG elsewhere.
    """
    if kind not in NOISE_KINDS:
        raise ValueError(f"noise={kind!r} is not supported; expected one of {NOISE_KINDS}")
    return draw(like, kind)
