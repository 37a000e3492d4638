"""Decision boundaries of neural-ODE classifiers and the distance of points to them (Sec. 4.5)."""

from __future__ import annotations

import torch
from torch import nn

from flows.analysis.settings import check_analysis_arguments


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch_size: int = 8192) -> torch.Tensor:
    """Predicted classes [N] of points x [N, d]."""
    return torch.cat(
        [model(x[i : i + batch_size]).argmax(1) for i in range(0, x.shape[0], batch_size)]
    )


def grid(
    lim: float, n: int, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A square grid on [-lim, lim]^2: (xx, yy) each [n, n] and the points [n*n, 2]."""
    axis = torch.linspace(-lim, lim, n, dtype=dtype)
    xx, yy = torch.meshgrid(axis, axis, indexing="xy")
    return xx, yy, torch.stack([xx.reshape(-1), yy.reshape(-1)], 1)


@torch.no_grad()
def boundary_distances(
    model: nn.Module, x: torch.Tensor, lim: float, n_grid: int = 200, bisect_steps: int = 30
) -> torch.Tensor:
    """Distance of each 2D point to the classifier's decision boundary.

    For each point, the nearest grid point of another predicted class gives a
    direction; bisection along that segment finds where the prediction
    changes. The result is within about one grid spacing (2 lim / n_grid) of
    the true distance, and never below it, since the crossing found is a
    boundary point.

    Args:
        model: classifier, [N, 2] -> logits [N, C].
        x: [N, 2] points.
        lim: half-width of the search grid (should cover the data).

    Returns:
        [N] distances; inf where the grid holds no other class.
    """
    if x.dim() != 2 or x.shape[1] != 2:
        raise ValueError(f"boundary_distances works on 2D points [N, 2], got {list(x.shape)}")
    check_analysis_arguments(n_grid=n_grid, bisect_steps=bisect_steps, lim=float(lim))
    _, _, pts = grid(lim, n_grid, x.dtype)
    pts = pts.to(x.device)
    grid_cls = predict(model, pts)
    cls = predict(model, x)
    dist = torch.full((x.shape[0],), float("inf"), dtype=x.dtype, device=x.device)
    target = torch.empty_like(x)
    found = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    for c in cls.unique():
        others = pts[grid_cls != c]
        sel = cls == c
        if others.shape[0] == 0:
            continue
        d = torch.cdist(x[sel], others)
        target[sel] = others[d.argmin(1)]
        found[sel] = True
    if not found.any():
        return dist
    xs, ts, cs = x[found], target[found], cls[found]
    lo = torch.zeros(xs.shape[0], dtype=x.dtype, device=x.device)
    hi = torch.ones_like(lo)
    for _ in range(bisect_steps):
        mid = (lo + hi) / 2
        same = predict(model, xs + mid[:, None] * (ts - xs)) == cs
        lo = torch.where(same, mid, lo)
        hi = torch.where(same, hi, mid)
    dist[found] = hi * (ts - xs).norm(dim=1)
    return dist


def robustness_summary(dist: torch.Tensor) -> dict[str, float]:
    """Mean and 5th percentile of finite boundary distances."""
    finite = dist[torch.isfinite(dist)]
    if finite.numel() == 0:
        return {"mean_distance": float("inf"), "p5_distance": float("inf")}
    return {
        "mean_distance": finite.mean().item(),
        "p5_distance": torch.quantile(finite.double(), 0.05).item(),
    }
