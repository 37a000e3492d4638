"""The adjoint method on the native loop (optimise-then-discretise, memory O(1) in steps).

The same augmented system as torchdiffeq's ``odeint_adjoint``, so the same steps
and gradients: backward from each output time to the previous one, the flat
state [a_t | y | a_y | a_params] follows

    d a_t / dt = -a_y . df/dt,   dy/dt = f,   d a_y / dt = -a_y . df/dy,
    d a_params / dt = -a_y . df/dparams,

with the forward solve's state put back at every output time, and the error
norm over (a_t, y, a_y) for ``seminorm``, over every part otherwise.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from sparsekern.solver.plan import Plan, integrate
from sparsekern.solver.rk import SolveStats
from sparsekern.solver.system import FlatSystem


class _Augmented:
    """The augmented backward dynamics of ``system`` as a flat derivative, in the
    backward solve's own time s = -t (it runs backwards: torchdiffeq's reversal).

    ``tensors``: what gets adjoints (the parameters, or a fused field's op
    coordinates: ``FlatSystem.adjoint_tensors``).
    """

    def __init__(self, system: FlatSystem, tensors: Sequence[Tensor]) -> None:
        self.system, self.tensors = system, list(tensors)
        self.n = sum(system.sizes)

    @property
    def count(self):
        """The field's NFE counter (the system's): the device loop counts for it."""
        return self.system.count

    @count.setter
    def count(self, value) -> None:
        self.system.count = value

    def native_solve(self, plan: Plan, aug: Tensor, times: Tensor):
        """The whole backward solve by the system's native loop, where it has one."""
        native = getattr(self.system, "native_adjoint_solve", None)
        return None if native is None else native(plan, aug, times)

    def __call__(self, s, aug: Tensor, out: Tensor | None = None) -> Tensor:
        n = self.n
        t = -s if isinstance(s, Tensor) else -float(s)  # a device loop's times stay tensors
        y, adj = aug[1:1 + n], aug[1 + n:1 + 2 * n]
        f, g_t, g_y, g_p = self.system.vjp(t, y, -adj, self.tensors)
        parts = [aug.new_zeros(1) if g_t is None else g_t.reshape(1), f,
                 torch.zeros_like(y) if g_y is None else g_y]
        parts += [torch.zeros_like(p).reshape(-1) if g is None else g.reshape(-1)
                  for p, g in zip(self.tensors, g_p, strict=True)]
        d = torch.cat(parts)
        if out is None:
            return -d
        return torch.neg(d, out=out)


def adjoint_segments(system: FlatSystem, params: Sequence[Tensor], seminorm: bool
                     ) -> list[tuple[int, int]]:
    """The backward solve's norm slices: a_t, the state's parts, the adjoint's parts,
    and each parameter unless ``seminorm``."""
    n = sum(system.sizes)
    segs = [(0, 1)]
    segs += [(1 + s, k) for s, k in system.segments]
    segs += [(1 + n + s, k) for s, k in system.segments]
    if not seminorm:
        start = 1 + 2 * n
        for p in params:
            segs.append((start, p.numel()))
            start += p.numel()
    return segs


class AdjointSolve(torch.autograd.Function):
    """Forward: the native solve without a graph. Backward: the augmented solves."""

    @staticmethod
    def forward(ctx, system: FlatSystem, plan: Plan, back_plan: Plan, stats: SolveStats,
                report: Callable[[SolveStats], None], t: Tensor, y0: Tensor, *params: Tensor
                ) -> Tensor:
        with torch.no_grad():
            ys, st = integrate(plan, system, y0, t, grad=False)
        stats.add(st)
        stats.path = st.path
        y = torch.stack(ys)
        ctx.system, ctx.back_plan, ctx.report = system, back_plan, report
        ctx.t_grad = t.requires_grad
        ctx.save_for_backward(t, y, *params)
        return y

    @staticmethod
    def backward(ctx, grad_y: Tensor):
        t, y, *params = ctx.saved_tensors
        system: FlatSystem = ctx.system
        n = y.shape[1]
        tensors = system.adjoint_tensors(params)
        stats = SolveStats()
        with torch.no_grad():
            aug_fn = _Augmented(system, tensors)
            sizes = [p.numel() for p in tensors]
            aug = torch.cat([y.new_zeros(1), y[-1], grad_y[-1]]
                            + [y.new_zeros(k) for k in sizes])
            t_vjps = torch.empty_like(t) if ctx.t_grad else None
            for i in range(len(t) - 1, 0, -1):
                if t_vjps is not None:
                    f = system(t[i], y[i])
                    dl = f.reshape(-1).dot(grad_y[i].reshape(-1))
                    aug[0] -= dl
                    t_vjps[i] = dl
                times = torch.stack([-t[i], -t[i - 1]])
                out, st = integrate(ctx.back_plan, aug_fn, aug, times, grad=False)
                stats.add(st)
                stats.path = st.path
                aug = out[-1].clone()
                aug[1:1 + n] = y[i - 1]
                aug[1 + n:1 + 2 * n] += grad_y[i - 1]
            if t_vjps is not None:
                t_vjps[0] = aug[0]
            adj_y = aug[1 + n:1 + 2 * n]
            adj, start = [], 1 + 2 * n
            for x, k in zip(tensors, sizes, strict=True):
                adj.append(aug[start:start + k].view_as(x))
                start += k
        adj_p = system.param_grads(adj, params)
        ctx.report(stats)
        return (None, None, None, None, None, t_vjps, adj_y, *adj_p)
