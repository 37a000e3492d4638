"""Butcher tableaux: every solver ``sparsekern.odeint`` runs is one entry of ``TABLEAUS``.

A method is data, not a loop: the one Runge-Kutta loop (``sparsekern.solver.rk``,
and its C++ twin csrc/cpu/rk_solve.cpp) reads the stage times ``c``, the stage
matrix ``a``, the solution weights ``b`` and, for adaptive methods, the error
weights ``b_err`` (``b`` minus the embedded lower-order weights) and the
midpoint weights ``b_mid`` of the dense-output polynomial. The coefficients are
the published ones, in the same form torchdiffeq stores them, so a solve takes
the same steps as torchdiffeq's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

Method = Literal["dopri5", "bosh3", "adaptive_heun", "rk4", "euler"]


@dataclass(frozen=True)
class Tableau:
    """An explicit Runge-Kutta method with S stages.

    Attributes:
        order: the order of the solution (the step-size controller's exponent is
            1/order; initial-step selection uses order - 1).
        c: [S - 1] times of stages 1..S-1 as fractions of the step (stage 0 is at t0).
        a: S - 1 rows; row i holds stage i+1's weights over stages 0..i.
        b: [S] weights of the solution.
        b_err: [S] weights of the error estimate (adaptive methods), else None.
        b_mid: [S] weights of the state at mid-step, for the 4th-order dense
            output (adaptive methods), else None.
    """

    order: int
    c: tuple[float, ...]
    a: tuple[tuple[float, ...], ...]
    b: tuple[float, ...]
    b_err: tuple[float, ...] | None = None
    b_mid: tuple[float, ...] | None = None

    @property
    def stages(self) -> int:
        return len(self.b)

    @property
    def adaptive(self) -> bool:
        return self.b_err is not None

    @property
    def fsal(self) -> bool:
        """First same as last: the last stage is the solution, so y1 needs no extra sum."""
        return bool(self.a) and self.b[-1] == 0 and tuple(self.b[:-1]) == tuple(self.a[-1])

    def dense(self, dtype: torch.dtype = torch.float64) -> dict[str, torch.Tensor]:
        """The tableau as tensors of ``dtype`` (``a`` zero-padded to [S-1, S-1]): C++ reads
        float64, the Python loop the state's dtype."""
        s = self.stages
        a = torch.zeros(s - 1, s - 1, dtype=dtype)
        for i, row in enumerate(self.a):
            a[i, : len(row)] = torch.tensor(row, dtype=dtype)
        zeros = (0.0,) * s
        return {
            "a": a,
            "b": torch.tensor(self.b, dtype=dtype),
            "b_err": torch.tensor(self.b_err or zeros, dtype=dtype),
            "b_mid": torch.tensor(self.b_mid or zeros, dtype=dtype),
        }


# Dormand-Prince 5(4), with Shampine's midpoint weights for the dense output.
_DOPRI5 = Tableau(
    order=5,
    c=(1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0),
    a=(
        (1 / 5,),
        (3 / 40, 9 / 40),
        (44 / 45, -56 / 15, 32 / 9),
        (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
        (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
        (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84),
    ),
    b=(35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84, 0.0),
    b_err=(
        35 / 384 - 1951 / 21600,
        0.0,
        500 / 1113 - 22642 / 50085,
        125 / 192 - 451 / 720,
        -2187 / 6784 - -12231 / 42400,
        11 / 84 - 649 / 6300,
        -1.0 / 60.0,
    ),
    b_mid=(
        6025192743 / 30085553152 / 2,
        0.0,
        51252292925 / 65400821598 / 2,
        -2691868925 / 45128329728 / 2,
        187940372067 / 1594534317056 / 2,
        -1776094331 / 19743644256 / 2,
        11237099 / 235043384 / 2,
    ),
)

# Bogacki-Shampine 3(2).
_BOSH3 = Tableau(
    order=3,
    c=(1 / 2, 3 / 4, 1.0),
    a=((1 / 2,), (0.0, 3 / 4), (2 / 9, 1 / 3, 4 / 9)),
    b=(2 / 9, 1 / 3, 4 / 9, 0.0),
    b_err=(2 / 9 - 7 / 24, 1 / 3 - 1 / 4, 4 / 9 - 1 / 3, -1 / 8),
    b_mid=(0.0, 0.5, 0.0, 0.0),
)

# Heun's method with the Euler step as its error estimate, 2(1).
_ADAPTIVE_HEUN = Tableau(
    order=2,
    c=(1.0,),
    a=((1.0,),),
    b=(0.5, 0.5),
    b_err=(0.5, -0.5),
    b_mid=(0.5, 0.0),
)

# Kutta's 3/8 rule (torchdiffeq's "rk4" takes this variant, rk4_alt_step_func).
_RK4 = Tableau(
    order=4,
    c=(1 / 3, 2 / 3, 1.0),
    a=((1 / 3,), (-1 / 3, 1.0), (1.0, -1.0, 1.0)),
    b=(1 / 8, 3 / 8, 3 / 8, 1 / 8),
)

_EULER = Tableau(order=1, c=(), a=(), b=(1.0,))

TABLEAUS: dict[str, Tableau] = {
    "dopri5": _DOPRI5,
    "bosh3": _BOSH3,
    "adaptive_heun": _ADAPTIVE_HEUN,
    "rk4": _RK4,
    "euler": _EULER,
}
