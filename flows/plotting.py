"""Figures for 2D flows: data, learned density and samples side by side."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: figures go to files, never to a window
import matplotlib.pyplot as plt
import torch

from flows.cnf import Flow
from flows.train import exact_divergence


@torch.no_grad()
def density_grid(
    flow: Flow, lim: float = 4.0, n_grid: int = 100, batch_size: int = 4096
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact-trace density of a 2D flow on a square grid.

    Returns:
        (xx, yy, density), each [n_grid, n_grid]; density = exp(log_prob).
    """
    p = next(flow.parameters())
    axis = torch.linspace(-lim, lim, n_grid, dtype=p.dtype)
    xx, yy = torch.meshgrid(axis, axis, indexing="xy")
    pts = torch.stack([xx.reshape(-1), yy.reshape(-1)], dim=1).to(p.device)
    with exact_divergence(flow):
        logp = torch.cat(
            [flow.log_prob(pts[i : i + batch_size]) for i in range(0, pts.shape[0], batch_size)]
        )
    return xx, yy, logp.exp().reshape(n_grid, n_grid).cpu()


def plot_density_2d(
    flow: Flow,
    data: torch.Tensor,
    path: str | Path,
    lim: float = 4.0,
    n_grid: int = 100,
    n_samples: int = 2000,
    title: str = "",
) -> Path:
    """Save a three-panel PNG: data [N, 2], the model density, and model samples.

    Returns the path written.
    """
    if data.dim() != 2 or data.shape[1] != 2:
        raise ValueError(f"plot_density_2d needs 2D data [N, 2], got {list(data.shape)}")
    xx, yy, dens = density_grid(flow, lim, n_grid)
    samples = flow.sample(n_samples).cpu()
    fig, axes = plt.subplots(1, 3, figsize=(12, 4))
    d = data[:n_samples].cpu()
    axes[0].scatter(d[:, 0], d[:, 1], s=2, alpha=0.5)
    axes[0].set_title("data")
    axes[1].pcolormesh(xx.numpy(), yy.numpy(), dens.numpy(), shading="auto", cmap="viridis")
    axes[1].set_title("model density")
    axes[2].scatter(samples[:, 0], samples[:, 1], s=2, alpha=0.5, color="tab:orange")
    axes[2].set_title("model samples")
    for ax in axes:
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
