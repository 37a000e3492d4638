"""Analyses that explain why pruning helps: Hessian spectra, decision boundaries, vector fields."""

from flows.analysis.boundary import boundary_distances, robustness_summary
from flows.analysis.hessian import HessianOperator, HessianStats, analyze_hessian, kept_masks

__all__ = [
    "HessianOperator",
    "HessianStats",
    "analyze_hessian",
    "boundary_distances",
    "kept_masks",
    "robustness_summary",
]
