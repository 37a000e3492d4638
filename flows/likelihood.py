"""Log-densities and their units: nats for tabular data, bits/dim for images.

Images follow FFJORD: integer pixels are dequantised with uniform noise into
[0, 1], then mapped to the real line by a logit transform whose log-determinant
joins the flow's change in log-density.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from flows.row_noise import draw

LOG_2PI = math.log(2 * math.pi)


def standard_normal_logprob(z: torch.Tensor) -> torch.Tensor:
    """log N(z; 0, I) summed over all non-batch dims: z [B, ...] -> [B]."""
    return (-0.5 * (z.pow(2) + LOG_2PI)).flatten(1).sum(1)


def nll_nats(log_prob: torch.Tensor) -> torch.Tensor:
    """Mean negative log-likelihood in nats: log_prob [B] -> scalar."""
    return -log_prob.mean()


def dequantize(
    x: torch.Tensor, levels: int = 256, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Uniform dequantisation of integer pixels: (x + u) / levels, u ~ U[0, 1).

    Args:
        x: [B, ...] integer-valued pixels in [0, levels - 1].
        levels: number of intensity levels (256 for 8-bit images).

    Returns:
        [B, ...] continuous values in [0, 1).
    """
    if levels < 2:
        raise ValueError(f"levels must be >= 2, got {levels}")
    u = draw(x, "uniform", generator)  # per sample row inside flows.row_noise.per_row_noise
    return (x + u) / levels


def bits_per_dim(log_prob: torch.Tensor, dims: int, levels: int = 256) -> torch.Tensor:
    """Mean bits per dimension of dequantised data, FFJORD's figure for images.

    Args:
        log_prob: [B] log-densities (nats) of data scaled to [0, 1) by ``dequantize``.
        dims: number of dimensions per sample (C * H * W).
        levels: intensity levels; the density on [0, 1) is rescaled to the
            integer grid by log(levels) per dimension.

    Returns:
        scalar: -(mean log_prob / dims - log(levels)) / log(2).
    """
    return -(log_prob.mean() / dims - math.log(levels)) / math.log(2)


class LogitTransform(nn.Module):
    """y = logit(alpha + (1 - 2 alpha) x), a flow layer from [0, 1) to the reals.

    ``forward(x, delta_logp=None, reverse=False) -> (y, delta_logp)``, with the
    same convention as ``CNF``: delta_logp accumulates -log|det dy/dx| so that
    log p(x) = log p(y) - delta_logp. alpha keeps the logit finite at 0 and 1
    (FFJORD uses 1e-6 for MNIST, 0.05 for CIFAR-10).
    """

    def __init__(self, alpha: float = 1e-6) -> None:
        super().__init__()
        if not 0 <= alpha < 0.5:
            raise ValueError(f"alpha must lie in [0, 0.5), got {alpha}")
        self.alpha = alpha

    def forward(
        self, x: torch.Tensor, delta_logp: torch.Tensor | None = None, reverse: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        a = self.alpha
        if reverse:
            s = torch.sigmoid(x)
            y = (s - a) / (1 - 2 * a)
            logdet = -self._logdet(y)
        else:
            s = a + (1 - 2 * a) * x
            y = torch.log(s) - torch.log1p(-s)
            logdet = self._logdet(x)
        if delta_logp is None:
            return y, None
        return y, delta_logp - logdet

    def _logdet(self, x: torch.Tensor) -> torch.Tensor:
        """log|det d logit(s)/dx| for the forward map, per sample [B]."""
        a = self.alpha
        s = a + (1 - 2 * a) * x
        return (math.log(1 - 2 * a) - torch.log(s) - torch.log1p(-s)).flatten(1).sum(1)
