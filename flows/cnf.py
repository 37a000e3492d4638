"""Continuous normalizing flows (FFJORD) and stacks of flow layers.

Convention (FFJORD's): a flow layer maps ``(x, logp) -> (y, logp')`` where the
second slot carries a log-density and changes by -log|det dy/dx|. Starting the
forward direction from zeros, ``log p(x) = log N(z; 0, I) - delta_logp``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from flows.finite import check_finite_rows
from flows.likelihood import standard_normal_logprob
from flows.odefunc import ODEFunc, SolverEngine, odesolve


class Flow(nn.Module):
    """Base for anything with ``forward(x, delta_logp=None, reverse=False)``.

    Gives ``log_prob`` and ``sample`` against a standard normal base density.
    """

    state_shape: tuple[int, ...] | None = None

    def forward(  # pragma: no cover - abstract
        self, x: torch.Tensor, delta_logp: torch.Tensor | None = None, reverse: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        raise NotImplementedError

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """log-density of data under the flow: x [B, ...] -> [B] (nats).

        Raises ValueError, before the solver starts, if rows of x hold NaN or inf.
        """
        check_finite_rows(x, "log_prob input")
        zero = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
        z, delta_logp = self(x, zero)
        return standard_normal_logprob(z) - delta_logp

    @torch.no_grad()
    def sample(
        self,
        n: int | None = None,
        z: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Draw samples by solving the flow backwards from base samples.

        Args:
            n: number of samples (base noise drawn here), or
            z: [n, ...] given base samples (then n may be omitted).

        Returns:
            [n, *state_shape] samples in data space.

        Raises ValueError if rows of a given ``z`` hold NaN or inf.
        """
        if z is None:
            if n is None or n < 1:
                raise ValueError(f"sample needs n >= 1 or a base tensor z, got n={n}")
            if self.state_shape is None:
                raise ValueError(
                    "sample(n) needs the state shape; the vector field has no state_shape, "
                    "so pass base samples z instead"
                )
            p = next(self.parameters(), None)
            kw: dict[str, Any] = {}
            if p is not None:
                kw = {"dtype": p.dtype, "device": p.device}
            z = torch.randn((n, *self.state_shape), generator=generator, **kw)
        elif n is not None and z.shape[0] != n:
            raise ValueError(f"n={n} disagrees with z of batch size {z.shape[0]}")
        check_finite_rows(z, "the base samples z")
        x, _ = self(z, None, reverse=True)
        return x


class CNF(Flow):
    """A continuous normalizing flow dz/dt = f(t, z) on [0, T] (FFJORD).

    Args:
        odenet: the vector field f(t, z) (e.g. ``flows.ODEnet``), maps [B, ...] to
            the same shape.
        divergence: "hutchinson" (one probe per sample, drawn once per solve) or
            "exact" (trace with one backward per dimension).
        noise: Hutchinson probe distribution, "gaussian" or "rademacher".
        solver, atol, rtol: torchdiffeq method and tolerances;
            ``solver_options`` is passed through (e.g. step_size).
        adjoint: backpropagate with the adjoint method.
        T: integration end time; ``train_T`` makes it a parameter (learned
            through sqrt(T) so it stays positive, as in FFJORD).

    ``forward(x, delta_logp=None, reverse=False) -> (z, delta_logp)``: x [B, ...];
    without delta_logp only the state is integrated (cheap sampling).
    Counters: ``nfe_forward`` (f evaluations of the last solve) and
    ``nfe_backward`` (f evaluations since then: the adjoint backward pass; zero
    for plain backpropagation, which re-uses the forward graph).
    """

    def __init__(
        self,
        odenet: nn.Module,
        divergence: str = "hutchinson",
        noise: str = "gaussian",
        solver: str = "dopri5",
        atol: float = 1e-5,
        rtol: float = 1e-5,
        adjoint: bool = False,
        T: float = 1.0,
        train_T: bool = False,
        solver_options: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if not T > 0:
            raise ValueError(f"T must be positive, got {T}")
        self.odefunc = ODEFunc(odenet, divergence=divergence, noise=noise)
        self.solver = solver
        self.atol = atol
        self.rtol = rtol
        self.adjoint = adjoint
        self.solver_options = solver_options
        sqrt_T = torch.tensor(math.sqrt(T))
        if train_T:
            self.sqrt_T = nn.Parameter(sqrt_T)
        else:
            self.register_buffer("sqrt_T", sqrt_T)
        self.state_shape = getattr(odenet, "state_shape", None)
        self.nfe_forward = 0
        # Which solver runs a compiled copy of this flow (flows.odefunc.odesolve):
        # "auto" is sparsekern.odeint; "torchdiffeq" keeps torchdiffeq (benchmarks).
        self.solver_engine: SolverEngine = "auto"

    @property
    def odenet(self) -> nn.Module:
        return self.odefunc.odenet

    @property
    def T(self) -> torch.Tensor:
        return self.sqrt_T * self.sqrt_T

    @property
    def nfe_backward(self) -> int:
        return self.odefunc.nfe

    def forward(
        self, x: torch.Tensor, delta_logp: torch.Tensor | None = None, reverse: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        T = self.T.to(dtype=x.dtype, device=x.device)
        times = torch.stack([torch.zeros_like(T), T])
        if reverse:
            times = times.flip(0)
        self.odefunc.reset_nfe()
        if delta_logp is None:
            z = odesolve(self.odefunc, x, times, **self._solve_kwargs())
            out: tuple[torch.Tensor, torch.Tensor | None] = (z, None)
        else:
            if delta_logp.shape != (x.shape[0],):
                raise ValueError(
                    f"delta_logp must have shape [{x.shape[0]}] (one per sample), "
                    f"got {list(delta_logp.shape)}"
                )
            self.odefunc.draw_noise(x)
            out = odesolve(self.odefunc, (x, delta_logp), times, **self._solve_kwargs())
        self.nfe_forward = self.odefunc.nfe
        self.odefunc.reset_nfe()
        return out

    def _solve_kwargs(self) -> dict[str, Any]:
        return {
            "solver": self.solver,
            "atol": self.atol,
            "rtol": self.rtol,
            "adjoint": self.adjoint,
            "options": self.solver_options,
            "engine": self.solver_engine,
        }

    def extra_repr(self) -> str:
        return (
            f"divergence={self.odefunc.divergence!r}, solver={self.solver!r}, atol={self.atol}, "
            f"rtol={self.rtol}, adjoint={self.adjoint}"
        )


class SequentialFlow(Flow):
    """A stack of flow layers (CNF blocks, LogitTransform, ...), FFJORD's SequentialFlow.

    ``forward(x, delta_logp=None, reverse=False)`` runs the layers in order, or in
    reverse order with reverse=True, threading delta_logp through them.
    """

    def __init__(self, layers: Iterable[nn.Module]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)
        if len(self.layers) == 0:
            raise ValueError("SequentialFlow needs at least one layer")
        shapes = [
            s for s in (getattr(m, "state_shape", None) for m in self.layers) if s is not None
        ]
        if any(s != shapes[0] for s in shapes):
            raise ValueError(f"flow layers disagree on the state shape: {shapes}")
        self.state_shape = shapes[0] if shapes else None

    def forward(
        self, x: torch.Tensor, delta_logp: torch.Tensor | None = None, reverse: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        layers = reversed(self.layers) if reverse else self.layers
        for layer in layers:
            x, delta_logp = layer(x, delta_logp, reverse=reverse)
        return x, delta_logp

    @property
    def cnfs(self) -> list[CNF]:
        return [m for m in self.layers if isinstance(m, CNF)]

    @property
    def nfe_forward(self) -> int:
        return sum(c.nfe_forward for c in self.cnfs)

    @property
    def nfe_backward(self) -> int:
        return sum(c.nfe_backward for c in self.cnfs)
