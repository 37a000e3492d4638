"""FFJORD's multiscale image flow (Grathwohl et al. 2019, App. B.1), the model of Table 3.

The image is taken through several scales. On every scale a stack of CNF blocks
transforms the state; on all but the last a squeeze (space-to-depth, factor 2)
and a second stack follow, and then half of the channels leave the flow: they
are part of the base variable z from there on, and only the other half goes on
to the next, coarser scale. The first scale starts with a logit transform that
takes dequantised pixels from [0, 1) to the real line.

Scales: as many as the image can be halved while both sides are at least 4
(``n_scales``): MNIST's 28 x 28 gives 3, CIFAR-10's 32 x 32 gives 4, the 8 x 8
digits 2. Scale i works on (c_i, h_i, w_i), scale 0 on the data's shape, and
``c_{i+1}, h_{i+1}, w_{i+1} = 2 c_i, h_i / 2, w_i / 2``:

    scale i < last:  [logit on scale 0] -> blocks on (c, h, w) -> squeeze ->
                     blocks on (4c, h/2, w/2) -> keep x[:, :2c], factor out x[:, 2c:]
    last scale:      blocks on (c, h, w)

z is the factored parts and the last scale's output, each flattened per sample,
concatenated in scale order: [B, C*H*W]. The reverse direction (sampling) splits
z the same way and undoes every step from the last scale back. Every layer is
volume preserving except the logit transform and the CNFs, so
``log p(x) = log N(z; 0, I) - delta_logp`` with the same ``delta_logp`` as the
layers' sum (the squeeze and the split have log-determinant 0).

With FFJORD's settings (``--dims 64,64,64 --num_blocks 2 --layer_type concat``),
each vector field is a ``ConvODEnet`` of four 3 x 3 concat convolutions
c -> 64 -> 64 -> 64 -> c (time an input channel): ``1162 c + 75648`` weights and
biases, one trained end time per CNF besides (``dense_parameter_count``).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from typing import Any, cast

import torch
from torch import nn

from flows.cnf import CNF, Flow
from flows.likelihood import LogitTransform
from flows.odenet import ConvODEnet

MIN_SIDE = 4  # a scale needs both sides at least this long (FFJORD's rule)


def n_scales(height: int, width: int) -> int:
    """How many scales an image of height x width gets: halvings while both sides are >= 4."""
    n = 0
    while height >= MIN_SIDE and width >= MIN_SIDE:
        n += 1
        height //= 2
        width //= 2
    return n


def squeeze2d(x: torch.Tensor, factor: int = 2) -> torch.Tensor:
    """Space-to-depth: [B, C, H, W] -> [B, C * factor^2, H / factor, W / factor].

    Each factor x factor patch of a channel becomes factor^2 channels, in FFJORD's
    SqueezeLayer order: output channel ``c * factor^2 + i * factor + j`` holds the
    pixels at row offset i and column offset j of input channel c.
    """
    b, c, h, w = x.shape
    if h % factor or w % factor:
        raise ValueError(
            f"squeeze by {factor} needs a height and width divisible by {factor}, "
            f"got {h} x {w}"
        )
    x = x.reshape(b, c, h // factor, factor, w // factor, factor)
    return x.permute(0, 1, 3, 5, 2, 4).reshape(b, c * factor * factor, h // factor, w // factor)


def unsqueeze2d(x: torch.Tensor, factor: int = 2) -> torch.Tensor:
    """Depth-to-space, the inverse of ``squeeze2d``."""
    b, c, h, w = x.shape
    if c % (factor * factor):
        raise ValueError(f"unsqueeze by {factor} needs channels divisible by {factor**2}, got {c}")
    x = x.reshape(b, c // (factor * factor), factor, factor, h, w)
    return x.permute(0, 1, 4, 2, 5, 3).reshape(b, c // (factor * factor), h * factor, w * factor)


class Squeeze(nn.Module):
    """The squeeze as a flow layer: a permutation of the pixels, so log-determinant 0.

    ``forward(x, delta_logp=None, reverse=False) -> (y, delta_logp)``, delta_logp
    passed through unchanged.
    """

    def __init__(self, factor: int = 2) -> None:
        super().__init__()
        if factor < 1:
            raise ValueError(f"squeeze factor must be >= 1, got {factor}")
        self.factor = factor

    def forward(
        self, x: torch.Tensor, delta_logp: torch.Tensor | None = None, reverse: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        y = unsqueeze2d(x, self.factor) if reverse else squeeze2d(x, self.factor)
        return y, delta_logp

    def extra_repr(self) -> str:
        return f"factor={self.factor}"


def scale_shapes(shape: Sequence[int]) -> list[tuple[int, int, int]]:
    """The (c, h, w) each scale of the multiscale flow starts from, for data of ``shape``.

    Raises ValueError, naming the shape and what is wrong, if it is not (C, H, W)
    with positive sizes, if a side is below 4 (not even one scale), or if a
    scale that squeezes has an odd side.
    """
    dims = tuple(int(s) for s in shape)
    if len(dims) != 3 or min(dims) < 1:
        raise ValueError(
            f"the multiscale flow takes images of shape (C, H, W) with positive sizes, "
            f"got {tuple(shape)}"
        )
    c, h, w = dims
    n = n_scales(h, w)
    if n == 0:
        raise ValueError(
            f"an image of {h} x {w} is too small for one scale of the multiscale flow: "
            f"both sides must be at least {MIN_SIDE}"
        )
    shapes = []
    for i in range(n):
        if i < n - 1 and (h % 2 or w % 2):
            raise ValueError(
                f"the multiscale flow squeezes scale {i} of image shape {dims}, which is "
                f"{c} x {h} x {w}; a squeeze needs even sides (crop or pad the images)"
            )
        shapes.append((c, h, w))
        c, h, w = 2 * c, h // 2, w // 2
    return shapes


def odenet_parameter_count(channels: int, hidden: Sequence[int] = (64, 64, 64),
                           kernel_size: int = 3) -> int:
    """Weights and biases of one ``ConvODEnet`` on ``channels`` channels (concat convolutions).

    Each layer a -> b holds ``b (a + 1) k^2`` weights (the + 1 is the time channel)
    and b biases; with FFJORD's 64, 64, 64 and 3 x 3 that is ``1162 c + 75648``.
    """
    widths = (channels, *hidden, channels)
    k2 = kernel_size * kernel_size
    return sum(b * (a + 1) * k2 + b for a, b in itertools.pairwise(widths))


def dense_parameter_count(shape: Sequence[int], hidden: Sequence[int] = (64, 64, 64),
                          blocks: int = 2, kernel_size: int = 3, train_T: bool = True) -> int:
    """Parameters of the dense ``MultiscaleFlow`` for data of ``shape``, counted on paper.

    The sum of ``odenet_parameter_count`` over every CNF's vector field, plus one
    trained end time (sqrt T) per CNF with ``train_T``. MNIST (1, 28, 28):
    800,646 (Table 3: 801K); CIFAR-10 (3, 32, 32): 1,358,882 (Table 3: 1.36M).
    """
    shapes = scale_shapes(shape)
    total = 0
    for i, (c, _, _) in enumerate(shapes):
        stacks = (c, 4 * c) if i < len(shapes) - 1 else (c,)
        for channels in stacks:
            total += blocks * (odenet_parameter_count(channels, hidden, kernel_size) + train_T)
    return total


class MultiscaleFlow(Flow):
    """FFJORD's multiscale CNF for images (``--multiscale True``), see the module docstring.

    Args:
        shape: (C, H, W) of one image.
        hidden_channels: hidden convolution channels of every vector field.
        blocks: CNF blocks per stack (two stacks per scale but the last; FFJORD's
            ``--num_blocks``).
        alpha: the logit transform's alpha at the start (None: no logit
            transform, the flow then works on the data as given).
        activation, kernel_size: of every ``ConvODEnet``.
        cnf_kwargs: passed to every ``CNF`` (divergence, noise, solver, atol, rtol,
            adjoint, T, train_T, solver_options).

    ``forward(x, delta_logp=None, reverse=False) -> (out, delta_logp)``: forward
    takes x [B, C, H, W] (or [B, C*H*W]) to z [B, C*H*W]; reverse takes z
    [B, C*H*W] (or [B, C, H, W]) to x [B, C, H, W]. ``state_shape`` is (C, H, W),
    so ``sample(n)`` draws base noise of that shape. An empty batch maps to an
    empty batch without a solve. ``cnfs`` lists the CNF blocks in forward order;
    ``nfe_forward`` / ``nfe_backward`` are their sums.

    Raises ValueError naming the shape if the images are too small for one scale
    (a side below 4) or a scale that squeezes has an odd side; ``forward`` raises
    ValueError for a batch of another shape.
    """

    def __init__(
        self,
        shape: Sequence[int],
        hidden_channels: Sequence[int] = (64, 64, 64),
        blocks: int = 2,
        alpha: float | None = 1e-6,
        activation: str = "softplus",
        kernel_size: int = 3,
        cnf_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        shapes = scale_shapes(shape)
        if blocks < 1:
            raise ValueError(f"blocks (CNFs per stack) must be >= 1, got {blocks}")
        hidden = tuple(int(h) for h in hidden_channels)
        if not hidden or min(hidden) < 1:
            raise ValueError(f"hidden_channels must be positive channel counts, got {hidden}")
        kw = dict(cnf_kwargs or {})

        def stack(s: tuple[int, int, int]) -> list[nn.Module]:
            return [CNF(ConvODEnet(s, hidden, activation, kernel_size), **kw)
                    for _ in range(blocks)]

        scales = []
        for i, (c, h, w) in enumerate(shapes):
            layers: list[nn.Module] = []
            if i == 0 and alpha is not None:
                layers.append(LogitTransform(alpha))
            layers += stack((c, h, w))
            if i < len(shapes) - 1:
                layers += [Squeeze(2), *stack((4 * c, h // 2, w // 2))]
            scales.append(nn.ModuleList(layers))
        self.scales = nn.ModuleList(scales)
        self.image_shape = shapes[0]
        self.state_shape = shapes[0]
        self.scale_shapes = shapes
        # What each scale contributes to z: half of its squeezed channels, or (last) all.
        self.z_shapes = [(2 * c, h // 2, w // 2) for c, h, w in shapes[:-1]] + [shapes[-1]]
        self.dim = math.prod(self.state_shape)

    @property
    def cnfs(self) -> list[CNF]:
        """The CNF blocks, in forward order."""
        return [m for scale in self._scale_layers() for m in scale if isinstance(m, CNF)]

    def _scale_layers(self) -> list[list[nn.Module]]:
        """The layers of each scale, in forward order."""
        return [list(cast(nn.ModuleList, scale)) for scale in self.scales]

    @property
    def nfe_forward(self) -> int:
        return sum(c.nfe_forward for c in self.cnfs)

    @property
    def nfe_backward(self) -> int:
        return sum(c.nfe_backward for c in self.cnfs)

    def _as_batch(self, x: torch.Tensor, image: bool) -> torch.Tensor:
        """x as [B, C, H, W] (image) or [B, D], from either form; else a ValueError."""
        c, h, w = self.image_shape
        if x.dim() == 4 and tuple(x.shape[1:]) == self.image_shape:
            return x if image else x.reshape(x.shape[0], self.dim)
        if x.dim() == 2 and x.shape[1] == self.dim:
            return x.reshape(x.shape[0], c, h, w) if image else x
        raise ValueError(
            f"MultiscaleFlow expects a batch of shape [B, {c}, {h}, {w}] or [B, {self.dim}], "
            f"got {list(x.shape)}"
        )

    def forward(
        self, x: torch.Tensor, delta_logp: torch.Tensor | None = None, reverse: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if x.shape[0] == 0:  # an empty batch maps to an empty batch (no solver runs)
            return self._as_batch(x, image=reverse), delta_logp
        if reverse:
            return self._generate(self._as_batch(x, image=False), delta_logp)
        h = self._as_batch(x, image=True)
        last = len(self.scales) - 1
        parts = []
        for i, scale in enumerate(self._scale_layers()):
            for layer in scale:
                h, delta_logp = layer(h, delta_logp)
            if i < last:
                d = h.shape[1] // 2
                h, out = h[:, :d], h[:, d:]
            else:
                out = h
            parts.append(out.reshape(out.shape[0], -1))
        return torch.cat(parts, dim=1), delta_logp

    def _generate(
        self, z: torch.Tensor, delta_logp: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        sizes = [math.prod(s) for s in self.z_shapes]
        parts = [p.reshape(z.shape[0], *s)
                 for p, s in zip(z.split(sizes, dim=1), self.z_shapes, strict=True)]
        h = parts[-1]
        scales = self._scale_layers()
        for i in range(len(scales) - 1, -1, -1):
            if i < len(scales) - 1:
                h = torch.cat([h, parts[i]], dim=1)
            for layer in reversed(scales[i]):
                h, delta_logp = layer(h, delta_logp, reverse=True)
        return h, delta_logp

    def extra_repr(self) -> str:
        return f"shape={self.state_shape}, scales={len(self.scales)}"
