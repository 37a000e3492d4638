"""Right-hand sides f(t, z) of neural ODEs and continuous normalizing flows.

Every linear map on the state path is an ``nn.Linear`` / ``nn.Conv2d`` held in an
attribute named ``linear`` / ``conv`` (or the bare module for ``time="none"``), so
pruning, ``torch.nn.utils.prune`` and the sparse engine find the main weights the
same way for every time mode. The small time-conditioning layers of concatsquash
(``hyper_gate``, ``hyper_bias``) are separate modules on purpose: they are not
prunable weights in the original code.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
from torch import nn

from sparsekern.protocol import ConvNetSpec, ConvSpec, LinearSpec, MLPSpec

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "softplus": nn.Softplus,
    "relu": nn.ReLU,
    "elu": nn.ELU,
    "swish": nn.SiLU,
}
TIME_MODES = ("none", "concat", "concatsquash")


def make_activation(name: str) -> nn.Module:
    """A fresh activation module for ``name`` (one of ``ACTIVATIONS``)."""
    try:
        return ACTIVATIONS[name]()
    except KeyError:
        raise ValueError(
            f"activation={name!r} is not supported; expected one of {sorted(ACTIVATIONS)}"
        ) from None


def _check_time_mode(time: str) -> None:
    if time not in TIME_MODES:
        raise ValueError(f"time={time!r} is not supported; expected one of {TIME_MODES}")


def _check_state_shape(z: torch.Tensor, state_shape: tuple[int, ...], owner: str) -> None:
    if z.dim() != len(state_shape) + 1 or tuple(z.shape[1:]) != tuple(state_shape):
        raise ValueError(
            f"{owner} expects z of shape [B, {', '.join(map(str, state_shape))}], "
            f"got {list(z.shape)}"
        )


# A leaf for torch.fx: the check runs on real tensors and is recorded, not traced,
# so the vector fields stay traceable by sparsekern's generic tier.
torch.fx.wrap("_check_state_shape")


def _time_column(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """t broadcast to a [B, 1] column with like's batch size, dtype and device."""
    t = torch.as_tensor(t, dtype=like.dtype, device=like.device)
    return t.reshape(-1, 1).expand(like.shape[0], 1)


class ConcatLinear(nn.Module):
    """Linear layer that sees time as one more input: ``W [x, t] + b``.

    Shapes: x [B, in_features], t scalar -> [B, out_features].
    """

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features + 1, out_features)

    def forward(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.linear(torch.cat([x, _time_column(t, x)], dim=1))


class ConcatSquashLinear(nn.Module):
    """FFJORD's ConcatSquashLinear: ``(W x + b) * sigmoid(a t + c) + d t``.

    The gate and the time bias are small hypernetworks of t (``hyper_gate``,
    ``hyper_bias``); the main map is ``linear``. Shapes: x [B, in_features],
    t scalar -> [B, out_features].
    """

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, out_features)
        self.hyper_gate = nn.Linear(1, out_features)
        self.hyper_bias = nn.Linear(1, out_features, bias=False)

    def forward(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        tt = torch.as_tensor(t, dtype=x.dtype, device=x.device).reshape(1, 1)
        return self.linear(x) * torch.sigmoid(self.hyper_gate(tt)) + self.hyper_bias(tt)


class ODEnet(nn.Module):
    """MLP vector field f(t, z) for d-dimensional states.

    Args:
        in_dim: state dimension d.
        hidden: widths of the hidden layers; the output layer maps back to d.
        time: "none" (autonomous, the paper's toy model), "concat" (t appended to
            each layer's input) or "concatsquash" (FFJORD's gated layer).
        activation: elementwise nonlinearity between layers (see ``ACTIVATIONS``).

    ``forward(t, z)``: t a scalar tensor (ignored when time="none"), z [B, d] ->
    dz/dt [B, d].
    """

    def __init__(
        self,
        in_dim: int,
        hidden: Sequence[int] = (64, 64, 64),
        time: str = "none",
        activation: str = "tanh",
    ) -> None:
        super().__init__()
        _check_time_mode(time)
        if in_dim < 1:
            raise ValueError(f"in_dim must be >= 1, got {in_dim}")
        hidden = tuple(int(h) for h in hidden)
        if any(h < 1 for h in hidden):
            raise ValueError(f"hidden widths must be >= 1, got {hidden}")
        self.in_dim = in_dim
        self.hidden = hidden
        self.time = time
        self.activation = activation
        widths = (in_dim, *hidden, in_dim)
        layer_type = {"none": nn.Linear, "concat": ConcatLinear, "concatsquash": ConcatSquashLinear}
        self.layers = nn.ModuleList(layer_type[time](a, b) for a, b in itertools.pairwise(widths))
        self.acts = nn.ModuleList(make_activation(activation) for _ in hidden)

    @property
    def state_shape(self) -> tuple[int, ...]:
        """Shape of one state without the batch dimension: (d,)."""
        return (self.in_dim,)

    def forward(self, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        _check_state_shape(z, (self.in_dim,), "ODEnet")
        h = z
        for i, layer in enumerate(self.layers):
            h = layer(h) if self.time == "none" else layer(t, h)
            if i < len(self.acts):
                h = self.acts[i](h)
        return h

    def sparsekern_mlp(self) -> MLPSpec | None:
        """This net as an MLP for sparsekern's fused tier (``sparsekern.protocol``).

        None if a layer is not an ``nn.Linear`` / ``ConcatLinear`` /
        ``ConcatSquashLinear`` or the activations are of two types.
        """
        if len({type(a) for a in self.acts}) > 1:
            return None
        layers = []
        for layer in self.layers:
            if isinstance(layer, nn.Linear):
                layers.append(LinearSpec(layer))
            elif isinstance(layer, ConcatLinear):
                layers.append(LinearSpec(layer.linear, "concat"))
            elif isinstance(layer, ConcatSquashLinear):
                layers.append(LinearSpec(layer.linear, "concatsquash",
                                         hyper_gate=layer.hyper_gate,
                                         hyper_bias=layer.hyper_bias))
            else:
                return None
        return MLPSpec(layers, list(self.acts), self.in_dim)

    def extra_repr(self) -> str:
        return f"in_dim={self.in_dim}, hidden={self.hidden}, time={self.time!r}"


class ConcatConv2d(nn.Module):
    """3x3 (by default) convolution with time as one extra constant input channel.

    Shapes: x [B, C_in, H, W], t scalar -> [B, C_out, H, W] (same padding).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3) -> None:
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be odd to keep H and W, got {kernel_size}")
        self.conv = nn.Conv2d(in_channels + 1, out_channels, kernel_size, padding=kernel_size // 2)

    def forward(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        tt = torch.as_tensor(t, dtype=x.dtype, device=x.device)
        tt = tt.reshape(1, 1, 1, 1).expand(x.shape[0], 1, x.shape[2], x.shape[3])
        return self.conv(torch.cat([x, tt], dim=1))


class ConvODEnet(nn.Module):
    """Convolutional vector field for image states, time as an extra channel.

    Args:
        in_shape: (C, H, W) of one state.
        hidden_channels: channels of the hidden convolutions; the last layer maps
            back to C channels.
        activation: elementwise nonlinearity (FFJORD's image models use softplus).
        kernel_size: odd kernel size; padding keeps H and W.

    ``forward(t, z)``: z [B, C, H, W] -> dz/dt [B, C, H, W].
    """

    def __init__(
        self,
        in_shape: Sequence[int],
        hidden_channels: Sequence[int] = (64, 64, 64),
        activation: str = "softplus",
        kernel_size: int = 3,
    ) -> None:
        super().__init__()
        in_shape = tuple(int(s) for s in in_shape)
        if len(in_shape) != 3 or min(in_shape) < 1:
            raise ValueError(f"in_shape must be (C, H, W) with positive sizes, got {in_shape}")
        self.in_shape = in_shape
        channels = (in_shape[0], *hidden_channels, in_shape[0])
        self.layers = nn.ModuleList(
            ConcatConv2d(a, b, kernel_size) for a, b in itertools.pairwise(channels)
        )
        self.acts = nn.ModuleList(make_activation(activation) for _ in hidden_channels)

    @property
    def state_shape(self) -> tuple[int, ...]:
        """Shape of one state without the batch dimension: (C, H, W)."""
        return self.in_shape

    def forward(self, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        _check_state_shape(z, self.in_shape, "ConvODEnet")
        h = z
        for i, layer in enumerate(self.layers):
            h = layer(t, h)
            if i < len(self.acts):
                h = self.acts[i](h)
        return h

    def sparsekern_convnet(self) -> ConvNetSpec:
        """This net for sparsekern's fused tier: concat convolutions, time the last input
        channel (``sparsekern.protocol.ConvNetSpec``)."""
        return ConvNetSpec([ConvSpec(layer.conv, "concat") for layer in self.layers],
                           list(self.acts), self.in_shape[0])
