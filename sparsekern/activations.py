"""Elementwise activations of the fused tier, with first and second derivatives.

The fused kernels need sigma(a), sigma'(a) (the JVP and the backward) and
sigma''(a) (the backward of the JVP). Each is written to agree with PyTorch's
own module and its autograd formulas, including the places where they depart
from the textbook function: softplus is the identity above a=20 (derivatives 1
and 0 there; torch zeroes sigma'' already at a=20), relu'(0) = 0, elu''(0) = 0.

Activation ids are shared with the C++, Triton and CUDA kernels (``ACT_IDS``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F

ACT_IDS: dict[str, int] = {
    "identity": 0,
    "tanh": 1,
    "sigmoid": 2,
    "softplus": 3,
    "relu": 4,
    "elu": 5,
    "swish": 6,
}
SOFTPLUS_THRESHOLD = 20.0  # torch.nn.Softplus default (beta = 1)

ACT_FNS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "identity": lambda a: a,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "softplus": F.softplus,
    "relu": torch.relu,
    "elu": F.elu,
    "swish": F.silu,
}


def activation_name(module: nn.Module) -> str | None:
    """The fused-tier name of an activation module, or None if it has no fused kernel.

    Only the default parameterisations are fused (Softplus(beta=1, threshold=20),
    ELU(alpha=1)); others run on the generic tier.
    """
    if isinstance(module, nn.Identity):
        return "identity"
    if isinstance(module, nn.Tanh):
        return "tanh"
    if isinstance(module, nn.Sigmoid):
        return "sigmoid"
    if isinstance(module, nn.Softplus):
        ok = module.beta == 1 and module.threshold == SOFTPLUS_THRESHOLD
        return "softplus" if ok else None
    if isinstance(module, nn.ReLU):
        return "relu"
    if isinstance(module, nn.ELU):
        return "elu" if module.alpha == 1.0 else None
    if isinstance(module, nn.SiLU):
        return "swish"
    return None


def act_and_slope(a: torch.Tensor, act: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(sigma(a), sigma'(a)): ``act_ref``'s first two, without computing sigma''.

    The forward pass of a program needs only these two; for the common activations
    they take fewer passes over ``a`` than ``act_ref`` (one elementwise op less each
    on an image batch is milliseconds).
    """
    if act == ACT_IDS["softplus"]:
        return F.softplus(a), torch.sigmoid(a).masked_fill_(a > SOFTPLUS_THRESHOLD, 1.0)
    if act == ACT_IDS["tanh"]:
        h = torch.tanh(a)
        return h, 1 - h * h
    if act == ACT_IDS["sigmoid"]:
        h = torch.sigmoid(a)
        return h, h * (1 - h)
    h, d1, _ = act_ref(a, act)
    return h, d1


def act_ref(a: torch.Tensor, act: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sigma(a), sigma'(a), sigma''(a)) for activation id ``act``, elementwise.

    Args:
        a: pre-activations, any shape.
        act: one of ``ACT_IDS.values()``.

    Returns:
        Three tensors shaped like ``a``.
    """
    if act == ACT_IDS["identity"]:
        return a, torch.ones_like(a), torch.zeros_like(a)
    if act == ACT_IDS["tanh"]:
        h = torch.tanh(a)
        d1 = 1 - h * h
        return h, d1, -2 * h * d1
    if act == ACT_IDS["sigmoid"]:
        h = torch.sigmoid(a)
        d1 = h * (1 - h)
        return h, d1, d1 * (1 - 2 * h)
    if act == ACT_IDS["softplus"]:
        linear = a > SOFTPLUS_THRESHOLD
        s = torch.sigmoid(a)
        h = F.softplus(a)
        d1 = torch.where(linear, torch.ones_like(a), s)
        # torch's double backward zeroes sigma'' from the threshold on (a >= 20),
        # while its first derivative switches only above it.
        d2 = torch.where(a < SOFTPLUS_THRESHOLD, s * (1 - s), torch.zeros_like(a))
        return h, d1, d2
    if act == ACT_IDS["relu"]:
        pos = a > 0
        return torch.relu(a), pos.to(a.dtype), torch.zeros_like(a)
    if act == ACT_IDS["elu"]:
        pos = a > 0
        e = torch.exp(torch.clamp(a, max=0))
        h = F.elu(a)
        # sigma''(0) = 0, as torch's double backward has it.
        d2 = torch.where(a < 0, e, torch.zeros_like(a))
        return h, torch.where(pos, torch.ones_like(a), e), d2
    if act == ACT_IDS["swish"]:
        s = torch.sigmoid(a)
        d1 = s * (1 + a * (1 - s))
        return F.silu(a), d1, s * (1 - s) * (2 + a * (1 - 2 * s))
    raise ValueError(f"unknown activation id {act}; expected one of {ACT_IDS}")
