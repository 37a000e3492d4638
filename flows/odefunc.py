"""The function a solver integrates, with NFE counting, and the solver call itself."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import Any, Literal

import torch
from torch import nn
from torchdiffeq import odeint, odeint_adjoint

from flows.divergence import DIVERGENCES, NOISE_KINDS, sample_noise
from sparsekern import CompiledField, Dynamics
from sparsekern import odeint as sparsekern_odeint
from sparsekern.divergence import divergence_exact, divergence_hutchinson

ADAPTIVE_SOLVERS = ("dopri5", "dopri8", "bosh3", "fehlberg2", "adaptive_heun")
FIXED_STEP_SOLVERS = ("euler", "midpoint", "rk4", "explicit_adams", "implicit_adams")
SOLVERS = ADAPTIVE_SOLVERS + FIXED_STEP_SOLVERS
SolverEngine = Literal["auto", "torchdiffeq"]


class ODEFunc(nn.Module):
    """Wraps a vector field f(t, z) for torchdiffeq, counting its evaluations.

    Called with a tensor state z it returns f(t, z). Called with a tuple state
    (z, logp) it returns (f(t, z), -div f), the dynamics of a continuous
    normalizing flow; the divergence is exact or Hutchinson with the noise in
    ``self.noise`` (drawn once per solve by ``draw_noise``, as FFJORD does).

    ``nfe`` counts every evaluation since the last ``reset_nfe()``.
    """

    def __init__(
        self, odenet: nn.Module, divergence: str = "hutchinson", noise: str = "gaussian"
    ) -> None:
        super().__init__()
        if divergence not in DIVERGENCES:
            raise ValueError(
                f"divergence={divergence!r} is not supported; expected one of {DIVERGENCES}"
            )
        if noise not in NOISE_KINDS:
            raise ValueError(f"noise={noise!r} is not supported; expected one of {NOISE_KINDS}")
        self.odenet = odenet
        self.divergence = divergence
        self.noise_kind = noise
        self.noise: torch.Tensor | None = None
        self.nfe = 0

    def sparsekern_fields(self) -> tuple[str, ...]:
        """The vector field sparsekern compiles in a copy of this function."""
        return ("odenet",)

    def sparsekern_dynamics(self) -> Dynamics:
        """What this function integrates, for ``sparsekern.odeint``'s native loop."""
        return Dynamics(self.odenet, self.divergence,
                        self.noise if self.divergence == "hutchinson" else None, self._count)

    def _count(self, n: int) -> None:
        self.nfe += n

    def reset_nfe(self) -> None:
        self.nfe = 0

    def draw_noise(self, like: torch.Tensor) -> None:
        """Draw the Hutchinson probe for the next solve (no-op for the exact trace)."""
        self.noise = (
            sample_noise(like, self.noise_kind) if self.divergence == "hutchinson" else None
        )

    def forward(
        self, t: torch.Tensor, state: torch.Tensor | tuple[torch.Tensor, torch.Tensor]
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        self.nfe += 1
        if isinstance(state, torch.Tensor):
            return self.odenet(t, state)
        z = state[0]
        if self.divergence == "hutchinson" and (self.noise is None or self.noise.shape != z.shape):
            got = None if self.noise is None else list(self.noise.shape)
            raise RuntimeError(
                "Hutchinson noise was not drawn for this solve: call draw_noise(z0) "
                f"before integrating (noise shape {got}, state shape {list(z.shape)})"
            )
        fused = getattr(self.odenet, "forward_and_divergence", None)
        if fused is not None:
            # A compiled field (sparsekern) computes f and its divergence in one pass.
            dz, div = fused(t, z, self.noise if self.divergence == "hutchinson" else None)
            return dz, -div
        # Under no_grad (evaluation, odeint_adjoint's forward) the divergence still
        # needs a graph of f, but not a graph of the divergence itself.
        create_graph = torch.is_grad_enabled()
        with torch.enable_grad():
            # Without a graph to extend, z is made a leaf of its own: a state that
            # requires grad but was viewed under no_grad (odeint_adjoint's forward of a
            # later block) has no path back to itself, and its divergence would be zero.
            if not create_graph or not z.requires_grad:
                z = z.detach().requires_grad_(True)
            dz = self.odenet(t, z)
            if self.divergence == "exact":
                div = divergence_exact(dz, z, create_graph=create_graph)
            else:
                div = divergence_hutchinson(dz, z, self.noise, create_graph=create_graph)
        if not create_graph:
            dz, div = dz.detach(), div.detach()
        return dz, -div


def odesolve(
    func: nn.Module,
    y0: Any,
    times: torch.Tensor,
    *,
    solver: str = "dopri5",
    atol: float = 1e-5,
    rtol: float = 1e-5,
    adjoint: bool = False,
    options: dict[str, Any] | None = None,
    engine: SolverEngine = "auto",
) -> Any:
    """Integrate ``func`` from times[0] to times[-1] and return the final state.

    Args:
        func: f(t, y) returning a structure like y (tensor or tuple of tensors).
        y0: initial state, a tensor [B, ...] or a tuple of them.
        times: 1-D tensor of at least two increasing or decreasing times.
        solver: a torchdiffeq method name (``SOLVERS``); fixed-step ones need
            ``options={"step_size": h}``.
        adjoint: backpropagate with the adjoint method (memory O(1) in steps);
            its backward solve controls steps on the seminorm (state and adjoint).
        engine: "auto": ``sparsekern.odeint`` where ``func`` holds a compiled
            vector field (the same steps as torchdiffeq, natively), torchdiffeq
            otherwise; "torchdiffeq": always torchdiffeq (a benchmark's baseline).

    Returns:
        The state at times[-1], structured like y0.
    """
    if solver not in SOLVERS:
        raise ValueError(f"solver={solver!r} is not supported; expected one of {SOLVERS}")
    if solver in FIXED_STEP_SOLVERS and not (options and "step_size" in options):
        raise ValueError(f"fixed-step solver {solver!r} needs options={{'step_size': h}}")
    if adjoint and not isinstance(func, nn.Module):
        raise TypeError("adjoint=True needs func to be an nn.Module (its parameters get adjoints)")
    native = engine == "auto" and isinstance(getattr(func, "odenet", func), CompiledField)
    odeint_fn, adjoint_fn = (
        (sparsekern_odeint, functools.partial(sparsekern_odeint, adjoint=True)) if native
        else (odeint, odeint_adjoint))
    if adjoint:
        # The backward solve's step control measures the state and its adjoint, not
        # the parameters' adjoints (torchdiffeq's seminorm): a pruned model's dense
        # weights carry gradients at pruned places that its compiled twin has no
        # coordinates for, so the default norm would give the two different steps.
        ys = adjoint_fn(func, y0, times, rtol=rtol, atol=atol, method=solver,
                        options=options, adjoint_options={"norm": "seminorm"})
    else:
        ys = odeint_fn(func, y0, times, rtol=rtol, atol=atol, method=solver, options=options)
    if isinstance(ys, tuple):
        return tuple(y[-1] for y in ys)
    return ys[-1]


@contextlib.contextmanager
def exact_divergence(model: nn.Module) -> Iterator[None]:
    """Within the block every ODEFunc of ``model`` uses the exact trace (test NLL, as FFJORD)."""
    funcs = [m for m in model.modules() if isinstance(m, ODEFunc)]
    saved = [f.divergence for f in funcs]
    try:
        for f in funcs:
            f.divergence = "exact"
        yield
    finally:
        for f, d in zip(funcs, saved, strict=True):
            f.divergence = d
