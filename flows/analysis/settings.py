"""The arguments of the analyses (``sparseflow analyze``): their types and ranges.

One table for the library functions, which check their arguments with it
(raising ``flows.settings.SettingError``, a ValueError), and for the command
line, whose flags parse with it.
"""

from __future__ import annotations

from typing import Any

from flows.settings import SEED_MAX, Setting

ANALYSIS_SETTINGS: dict[str, Setting] = {
    # hessian: training points in the loss
    "samples": Setting("int", ge=1),
    # power iteration: budget, and relative tolerance (0: take every iteration)
    "power_iters": Setting("int", ge=1),
    "tol": Setting("float", ge=0),
    # Hutchinson trace probes: two at least, for a standard error
    "trace_samples": Setting("int", ge=2),
    # Lanczos: two steps at least, or lambda_min is only the start vector's
    # Rayleigh quotient; relative tolerance (0: take every step)
    "lanczos_steps": Setting("int", ge=2),
    "lanczos_tol": Setting("float", ge=0),
    "repeats": Setting("int", ge=1),
    "seed": Setting("int", ge=0, le=SEED_MAX),
    # boundary: search grid points per axis (two at least to span [-lim, lim])
    "n_grid": Setting("int", ge=2),
    "trajectories": Setting("int", ge=0),
    "bisect_steps": Setting("int", ge=1),
    "lim": Setting("float", gt=0),
}


def check_analysis_arguments(**values: Any) -> None:
    """Check each named argument against ``ANALYSIS_SETTINGS`` (SettingError for a bad one)."""
    for name, value in values.items():
        ANALYSIS_SETTINGS[name].check(name, value)
