"""Checks that data hold no NaN or inf, made before an ODE solver sees them.

A solver handed a non-finite state fails deep inside ("underflow in dt 0.0")
or returns NaN; these checks name the input and count its bad rows instead.
"""

from __future__ import annotations

import torch


def nonfinite_rows(x: torch.Tensor) -> torch.Tensor:
    """Indices [K] of the rows (first dimension) of ``x`` holding any NaN or inf."""
    if x.dim() == 0:
        x = x.reshape(1)
    return (~torch.isfinite(x.reshape(x.shape[0], -1))).any(1).nonzero().flatten()


def check_finite_rows(x: torch.Tensor, what: str) -> None:
    """Raise ValueError naming ``what`` if any row of ``x`` [N, ...] holds NaN or inf.

    The message counts the bad rows ("log_prob input has 2 of 5 rows with NaN
    or inf (rows 1, 3)"). Integer tensors are always finite.
    """
    if not x.is_floating_point() or x.numel() == 0 or bool(torch.isfinite(x).all()):
        return
    bad = nonfinite_rows(x)
    shown = ", ".join(str(i) for i in bad[:5].tolist()) + (", ..." if bad.numel() > 5 else "")
    raise ValueError(
        f"{what} has {bad.numel()} of {x.shape[0]} rows with NaN or inf (rows {shown}); "
        "expected finite values"
    )
