"""What the loop integrates: a function of a tensor or tuple state, as a flat vector.

torchdiffeq's conventions, which fix the numbers a solve produces: a tuple
state is concatenated (each part flattened, in order), the error norm is the
max over the parts of each part's RMS, and a solve backward in time runs
forward in negated time on the negated derivative (``sign`` -1).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from sparsekern.protocol import Dynamics


class FlatSystem:
    """f(t, y) of a state of ``shapes`` as a flat derivative in solver time.

    Args:
        call: func(t, state) -> derivative structured like state (tensor or tuple).
        shapes: the state's parts (one for a tensor state).
        is_tuple: whether the state is a tuple.
        sign: -1 for a solve backward in time (solver time = -t).
        dtype, device: the state's.
    """

    def __init__(self, call: Callable, shapes: Sequence[torch.Size], is_tuple: bool,
                 sign: float, dtype: torch.dtype, device: torch.device,
                 count: Callable[[int], None] | None = None) -> None:
        self.call, self.shapes, self.is_tuple, self.sign = call, list(shapes), is_tuple, sign
        self.dtype, self.device, self.count = dtype, device, count
        self.sizes = [s.numel() for s in self.shapes]

    @property
    def segments(self) -> list[tuple[int, int]]:
        """(start, length) of each part in the flat state: the mixed norm's slices."""
        out, start = [], 0
        for n in self.sizes:
            out.append((start, n))
            start += n
        return out

    def unflatten(self, y: Tensor, lead: tuple[int, ...] = ()) -> Tensor | tuple[Tensor, ...]:
        """The flat state y [*lead, N] as the user's structure."""
        parts = []
        start = 0
        for shape, n in zip(self.shapes, self.sizes, strict=True):
            parts.append(y[..., start:start + n].view((*lead, *shape)))
            start += n
        return tuple(parts) if self.is_tuple else parts[0]

    def flatten(self, state: Tensor | Sequence[Tensor]) -> Tensor:
        if not self.is_tuple:
            assert isinstance(state, Tensor)
            return state.reshape(-1)
        return torch.cat([s.reshape(-1) for s in state])

    def time(self, t) -> Tensor:
        """The user's time (a 0-dim tensor in the state's dtype) for solver time t."""
        tt = (t.to(self.dtype) if isinstance(t, Tensor)
              else torch.tensor(float(t), dtype=self.dtype, device=self.device))
        return -tt if self.sign < 0 else tt

    def __call__(self, t, y: Tensor, out: Tensor | None = None) -> Tensor:
        if self.count is not None:
            self.count(1)
        f = self.flatten(self.call(self.time(t), self.unflatten(y)))
        if out is None:
            return -f if self.sign < 0 else f
        if self.sign < 0:
            torch.neg(f, out=out)
        else:
            out.copy_(f)
        return out


    # -- the adjoint's hooks (``sparsekern.solver.native.FusedSystem`` has its own) -----
    def adjoint_tensors(self, params: Sequence[Tensor]) -> list[Tensor]:
        """The tensors whose adjoints the backward solve integrates: the parameters."""
        return list(params)

    def vjp(self, t, y: Tensor, cot: Tensor, params: Sequence[Tensor] = ()
            ) -> tuple[Tensor, Tensor | None, Tensor | None, Sequence[Tensor | None]]:
        """(f(t, y), cot . df/dt, cot . df/dy, cot . df/dparams) by autograd.

        t always gets its gradient (torchdiffeq's does, and the adjoint of t enters
        the backward solve's error norm).
        """
        tt = (t.detach().to(self.dtype) if isinstance(t, Tensor)
              else torch.tensor(float(t), dtype=self.dtype, device=self.device))
        with torch.enable_grad():
            tt.requires_grad_(True)
            yy = y.detach().requires_grad_(True)
            f = self(tt, yy)  # through self.time: the gradient is w.r.t. solver time
            g_t, g_y, *g_p = torch.autograd.grad(f, [tt, yy, *params], cot, allow_unused=True)
        return f.detach(), g_t, g_y, g_p

    def param_grads(self, adjoints: Sequence[Tensor], params: Sequence[Tensor]
                    ) -> list[Tensor | None]:
        return list(adjoints)


def dynamics_call(dyn: Dynamics) -> Callable:
    """func(t, state) of a ``Dynamics``: field(t, z), or (field(t, z), -div) for (z, logp)."""
    field: Any = dyn.field
    arity = getattr(field, "arity", 2)

    def call(t: Tensor, state):
        if isinstance(state, Tensor):
            return field(t, state) if arity == 2 else field(state)
        z = state[0]
        noise = dyn.noise if dyn.divergence == "hutchinson" else None
        dz, div = field.forward_and_divergence(t, z, noise)
        return dz, -div

    return call


def parameters_of(func: object) -> list[nn.Parameter]:
    """The parameters the adjoint computes gradients for (torchdiffeq's ``find_parameters``)."""
    if isinstance(func, nn.Module):
        return [p for p in func.parameters() if p.requires_grad]
    return []
