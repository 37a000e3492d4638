"""Analyses that explain why pruning helps: Hessian spectra, decision boundaries, vector fields."""

from flows.analysis.boundary import boundary_distances, robustness_summary
from flows.analysis.hessian import (
    CONDITION_NUMBER_DEFINITION,
    HessianOperator,
    HessianStats,
    LanczosResult,
    analyze_hessian,
    kept_masks,
    lanczos,
    largest_eigenvalue,
)

__all__ = [
    "CONDITION_NUMBER_DEFINITION",
    "HessianOperator",
    "HessianStats",
    "LanczosResult",
    "analyze_hessian",
    "boundary_distances",
    "kept_masks",
    "lanczos",
    "largest_eigenvalue",
    "robustness_summary",
]
