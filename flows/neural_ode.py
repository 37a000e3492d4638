"""Neural ODE blocks and the 2D neural-ODE classifier of the moons experiment."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torchdiffeq import odeint

from flows.finite import check_finite_rows
from flows.odefunc import ODEFunc, odesolve
from flows.odenet import ODEnet


class ODEBlock(nn.Module):
    """z(T) for dz/dt = f(t, z), z(0) = x.

    Args:
        odenet: the vector field f(t, z), [B, ...] -> [B, ...].
        solver, atol, rtol, adjoint, solver_options: as in ``flows.CNF``.
        T: end time.

    ``forward(x)``: [B, ...] -> [B, ...]. Counters ``nfe_forward`` and
    ``nfe_backward`` as in ``flows.CNF``.
    """

    def __init__(
        self,
        odenet: nn.Module,
        solver: str = "dopri5",
        atol: float = 1e-4,
        rtol: float = 1e-4,
        adjoint: bool = True,
        T: float = 1.0,
        solver_options: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if not T > 0:
            raise ValueError(f"T must be positive, got {T}")
        self.odefunc = ODEFunc(odenet)
        self.solver, self.atol, self.rtol, self.adjoint = solver, atol, rtol, adjoint
        self.solver_options = solver_options
        self.T = T
        self.nfe_forward = 0

    @property
    def odenet(self) -> nn.Module:
        return self.odefunc.odenet

    @property
    def nfe_backward(self) -> int:
        return self.odefunc.nfe

    def trajectory(self, x: torch.Tensor, times: torch.Tensor) -> torch.Tensor:
        """States at each of ``times`` (1-D, starting at 0): [len(times), B, ...]."""
        return odeint(
            self.odefunc,
            x,
            times.to(x),
            rtol=self.rtol,
            atol=self.atol,
            method=self.solver,
            options=self.solver_options,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        times = torch.tensor([0.0, self.T], dtype=x.dtype, device=x.device)
        self.odefunc.reset_nfe()
        z = odesolve(
            self.odefunc,
            x,
            times,
            solver=self.solver,
            atol=self.atol,
            rtol=self.rtol,
            adjoint=self.adjoint,
            options=self.solver_options,
        )
        self.nfe_forward = self.odefunc.nfe
        self.odefunc.reset_nfe()
        return z


class ODEClassifier(nn.Module):
    """Neural-ODE classifier for low-dimensional data (the paper's moons model).

    An ODE block with a tanh MLP vector field carries x to z(T); z(T) are the
    logits when ``n_classes == in_dim`` (the paper's 2D setting), otherwise a
    linear read-out maps z(T) to logits.

    Args:
        in_dim: input dimension d.
        n_classes: number of classes.
        hidden: hidden widths of the vector field. Default (128,): Table S1's
            MOON column reads "Layers 2, Hidden Size 128", and "Layers" counts
            linear layers (as for gaussians), so the field is 2-128-2, as in the
            moons preset.
        activation: its nonlinearity (tanh in the paper).
        time: time mode of the vector field (see ``flows.ODEnet``).
        **block_kwargs: solver settings for ``ODEBlock`` (default dopri5,
            atol = rtol = 1e-4, adjoint, as in Table S1).

    ``forward(x)``: [B, d] -> logits [B, n_classes]. ``nfe_forward`` and
    ``nfe_backward`` are the ODE block's counters (see ``ODEBlock``).
    """

    def __init__(
        self,
        in_dim: int = 2,
        n_classes: int = 2,
        hidden: Sequence[int] = (128,),
        activation: str = "tanh",
        time: str = "none",
        **block_kwargs: Any,
    ) -> None:
        super().__init__()
        if n_classes < 2:
            raise ValueError(f"n_classes must be >= 2, got {n_classes}")
        self.block = ODEBlock(
            ODEnet(in_dim, hidden, time=time, activation=activation), **block_kwargs
        )
        self.readout = nn.Identity() if n_classes == in_dim else nn.Linear(in_dim, n_classes)

    @property
    def nfe_forward(self) -> int:
        """f evaluations of the last forward solve (the block's counter)."""
        return self.block.nfe_forward

    @property
    def nfe_backward(self) -> int:
        """f evaluations since the last forward solve: the adjoint backward pass."""
        return self.block.nfe_backward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_finite_rows(x, "classifier input")
        return self.readout(self.block(x))
