"""Vector fields of 2D ODE models: arrows of f(t, z) on a grid (paper Fig. 6 and 9)."""

from __future__ import annotations

import torch
from matplotlib.axes import Axes
from torch import nn

from flows.analysis.boundary import grid


@torch.no_grad()
def field_on_grid(
    odenet: nn.Module, lim: float, n: int = 20, t: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """f(t, z) on an n x n grid over [-lim, lim]^2: (xx, yy, u, v), each [n, n]."""
    p = next(odenet.parameters())
    xx, yy, pts = grid(lim, n, p.dtype)
    f = odenet(torch.tensor(t, dtype=p.dtype), pts.to(p.device)).cpu()
    return xx, yy, f[:, 0].reshape(n, n), f[:, 1].reshape(n, n)


def draw_field(ax: Axes, odenet: nn.Module, lim: float, n: int = 20, t: float = 0.0) -> None:
    """Quiver plot of f(t, .) on ``ax``, arrows scaled to the largest."""
    xx, yy, u, v = field_on_grid(odenet, lim, n, t)
    ax.quiver(xx.numpy(), yy.numpy(), u.numpy(), v.numpy(), color="0.3", alpha=0.8)


def mode_centres(x: torch.Tensor, n_modes: int, seed: int = 0) -> torch.Tensor:
    """Centres of the n_modes clusters of data x [N, 2] (k-means): [n_modes, 2]."""
    from sklearn.cluster import KMeans

    km = KMeans(n_clusters=n_modes, n_init=10, random_state=seed).fit(
        x.detach().cpu().double().numpy()
    )
    return torch.tensor(km.cluster_centers_)
