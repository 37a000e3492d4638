"""The one Runge-Kutta loop: every method of ``tableau.TABLEAUS`` over a flat state.

The algorithm is torchdiffeq's (``rk_common.RKAdaptiveStepsizeODESolver`` and
``solvers.FixedGridODESolver``), step for step: its initial step selection, the
mixed RMS error norm, the step-size controller (safety, ifactor, dfactor), FSAL,
the 4th-order dense output at the requested times, ``max_num_steps`` per output
interval, and its rounding rules: stage times and step sizes in the state's
dtype inside a step, times and step control in float64 across steps. So on the
same field a solve takes the same accepted and rejected steps and the same NFE
(docs/design.md, "The native solver").

The loop runs in *solver time*, increasing; ``system.FlatSystem`` (its
``sign``) negates time for backward solves, as torchdiffeq does.

Two clocks. Without gradients (evaluation, the adjoint's solves) times are
Python floats rounded as torchdiffeq's tensors would be (``_FloatClock``): no
tensor per scalar. With gradients (backpropagation through the steps) times are
0-dim tensors (``_TensorClock``), because torchdiffeq's gradient flows through
the first step size (its initial-step selection is differentiable) and through
the output times (a trained end time): the same graph gives the same gradient.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from sparsekern.solver.tableau import Tableau

# f(t, y) -> dy/dt, flat [N]. t: the stage time, a float (already rounded to the
# state's dtype) or a 0-dim tensor in the state's dtype. ``out`` (no-grad solves
# only): the column of the stage matrix to write the derivative into.
Derivative = Callable[[object, Tensor, Tensor | None], Tensor]


class MaxStepsError(RuntimeError):
    """The solve took ``max_num_steps`` steps between two output times without reaching
    the next (torchdiffeq raises an AssertionError here)."""


class SolveError(RuntimeError):
    """The state became non-finite, or the step size underflowed."""


@dataclass
class SolveStats:
    """What a solve did: function evaluations and steps (accepted and rejected)."""

    nfe: int = 0
    accepted: int = 0
    rejected: int = 0
    path: str = ""  # which loop ran ("python", "c++"), for summaries
    # Seconds inside the field's kernels, where the loop measures them (the C++ loop):
    # the model time of the solve; the rest of its time is the solver's.
    model_seconds: float | None = None

    def add(self, other: SolveStats) -> None:
        self.nfe += other.nfe
        self.accepted += other.accepted
        self.rejected += other.rejected
        if other.model_seconds is not None:
            self.model_seconds = (self.model_seconds or 0.0) + other.model_seconds


@dataclass
class Controls:
    """Step control of adaptive methods (torchdiffeq's option names and defaults)."""

    rtol: float
    atol: float
    first_step: float | None = None
    safety: float = 0.9
    ifactor: float = 10.0
    dfactor: float = 0.2
    max_num_steps: int = 2**31 - 1
    # The error norm: max over these (start, length) slices of the RMS of each
    # (torchdiffeq's mixed norm over a tuple state; one slice for a tensor state).
    segments: Sequence[tuple[int, int]] = field(default_factory=tuple)


def mixed_norm(x: Tensor, segments: Sequence[tuple[int, int]]) -> Tensor:
    """max over segments of sqrt(mean(x[seg]^2)); the whole vector's RMS without segments.

    Python's max, as torchdiffeq's ``_mixed_norm`` takes it: a part is replaced only
    by a greater one, so a NaN in a later part does not win (and one in the first does).
    Its gradient (the initial step's, backpropagating through the steps) reaches the
    winning part only; ``device_loop``'s sync-free ``torch.where`` twin would send
    0 * inf = NaN into a part whose RMS is 0 (an empty layer's), so it is not used here.
    """
    if not segments:
        return x.abs().pow(2).mean().sqrt()
    return max(x.narrow(0, s, n).abs().pow(2).mean().sqrt() for s, n in segments)


def _value(x) -> float:
    """A time or step size as a float, whichever clock holds it."""
    return float(x.detach()) if isinstance(x, Tensor) else float(x)


# -- clocks --------------------------------------------------------------------


class _FloatClock:
    """Times as Python floats (float64 across steps); inside a step numpy scalars of
    the state's dtype, so float32 arithmetic rounds where torchdiffeq's tensors do."""

    def __init__(self, dtype: torch.dtype) -> None:
        self.np = np.float32 if dtype == torch.float32 else np.float64

    def state(self, x):
        """x rounded to the state's dtype (torchdiffeq's ``.to(y.dtype)``)."""
        return self.np(x)

    def before(self, x):
        """The next representable value below x in the state's dtype (Perturb.PREV)."""
        return np.nextafter(self.np(x), self.np(-np.inf))

    def time(self, x) -> float:
        return float(x)




class _TensorClock:
    """Times as 0-dim tensors (float64 across steps), so gradients flow through them."""

    def __init__(self, dtype: torch.dtype, device: torch.device) -> None:
        self.dtype, self.device = dtype, device

    def state(self, x) -> Tensor:
        if isinstance(x, Tensor):
            return x.to(self.dtype)
        return torch.tensor(x, dtype=self.dtype, device=self.device)

    def before(self, x) -> Tensor:
        x = self.state(x)
        with torch.no_grad():
            below = torch.nextafter(x, x - 1)
        return below + (x - x.detach())  # the value below, the gradient of x (torchdiffeq's)

    def time(self, x) -> Tensor:
        if isinstance(x, Tensor):
            return x.to(torch.float64)
        return torch.tensor(x, dtype=torch.float64, device=self.device)


# -- the stages of one step ----------------------------------------------------


class _Stages:
    """The stage derivatives k_0..k_{S-1} of a step and sums over them.

    Stored as torchdiffeq stores them, one column per stage ([N, S]), and summed
    as it sums them (``sum(k * w, dim=-1)``): the error estimate is a difference
    of nearly equal sums, so in float32 another summation order gives another
    error ratio and, near 1, another step decision. Without gradients the columns
    are written in place; with gradients they are a list, stacked per sum.
    """

    def __init__(self, y0: Tensor, stages: int, grad: bool) -> None:
        self.rows: list[Tensor] = []
        self.matrix = None if grad else y0.new_empty(y0.numel(), stages)

    def slot(self, i: int) -> Tensor | None:
        return None if self.matrix is None else self.matrix[:, i]

    def put(self, i: int, k: Tensor) -> None:
        if self.matrix is None:
            del self.rows[i:]
            self.rows.append(k)

    def get(self, i: int) -> Tensor:
        return self.rows[i] if self.matrix is None else self.matrix[:, i]

    def _k(self, n: int) -> Tensor:
        return self.matrix[:, :n] if self.matrix is not None else torch.stack(self.rows[:n], -1)

    def combine(self, y0: Tensor, weights: Tensor, n: int) -> Tensor:
        """y0 + sum_{j<n} k_j * weights[j]."""
        return y0 + torch.sum(self._k(n) * weights[:n], dim=-1)

    def weighted(self, weights: Tensor) -> Tensor:
        """sum_j k_j * weights[j] over all stages."""
        return torch.sum(self._k(len(weights)) * weights, dim=-1)


class _Coefficients:
    """The tableau as tensors in the state's dtype (torchdiffeq rounds them so too)."""

    def __init__(self, tab: Tableau, like: Tensor) -> None:
        d = tab.dense()
        self.a, self.b, self.b_err, self.b_mid = (
            d[k].to(device=like.device, dtype=like.dtype) for k in ("a", "b", "b_err", "b_mid"))
        self.c = tab.c


def _interp_fit(y0: Tensor, y1: Tensor, y_mid: Tensor, f0: Tensor, f1: Tensor, dt
                ) -> list[Tensor]:
    """Coefficients [e, d, c, b, a] of the quartic through y0, y_mid, y1 with slopes f0, f1
    (x in [0, 1] over the step; torchdiffeq's ``_interp_fit``)."""
    a = 2 * dt * (f1 - f0) - 8 * (y1 + y0) + 16 * y_mid
    b = dt * (5 * f0 - 3 * f1) + 18 * y0 + 14 * y1 - 32 * y_mid
    c = dt * (f1 - 4 * f0) - 11 * y0 - 5 * y1 + 16 * y_mid
    return [y0, dt * f0, c, b, a]


def _interp_eval(coeff: list[Tensor], x) -> Tensor:
    """The quartic at x (a 0-dim tensor, or a numpy scalar of the state's dtype: its
    powers round in that dtype, as torchdiffeq's tensor powers do)."""
    total = coeff[0] + _operand(x) * coeff[1]
    power = x
    for c in coeff[2:]:
        power = power * x
        total = total + _operand(power) * c
    return total


def _operand(x):
    """x as a factor of tensor products: a numpy scalar as the Python float of the
    same value (a float32 value is exact in one), which torch multiplies in the
    state's dtype; a tensor as it is."""
    return float(x) if isinstance(x, np.generic) else x


# -- adaptive methods ----------------------------------------------------------


def _initial_step(fn: Derivative, t0, y0: Tensor, f0: Tensor, order: int, ctl: Controls,
                  stats: SolveStats) -> Tensor:
    """torchdiffeq's ``_select_initial_step`` (Hairer, Norsett and Wanner, II.4), in its
    own 0-dim tensors (once per solve), so it rounds, and differentiates, as it does.

    t0: a float or a float64 0-dim tensor. Returns the first step, float64 0-dim.
    """
    t0 = torch.as_tensor(t0, dtype=torch.float64, device=y0.device)
    scale = ctl.atol + torch.abs(y0) * ctl.rtol
    d0 = mixed_norm(y0 / scale, ctl.segments).abs()
    d1 = mixed_norm(f0 / scale, ctl.segments).abs()
    if d0 < 1e-5 or d1 < 1e-5:
        h0 = torch.tensor(1e-6, dtype=y0.dtype, device=y0.device)
    else:
        h0 = 0.01 * d0 / d1
    h0 = h0.abs()
    f1 = fn((t0 + h0).to(y0.dtype), y0 + h0 * f0, None)
    stats.nfe += 1
    d2 = torch.abs(mixed_norm((f1 - f0) / scale, ctl.segments) / h0)
    if d1 <= 1e-15 and d2 <= 1e-15:
        h1 = torch.max(torch.tensor(1e-6, dtype=y0.dtype, device=y0.device), h0 * 1e-3)
    else:
        h1 = (0.01 / max(d1, d2)) ** (1.0 / float(order + 1))
    h1 = h1.abs()
    return torch.min(100 * h0, h1).to(torch.float64)


def _optimal_step(dt: float, ratio: float, ctl: Controls, order: int) -> float:
    """torchdiffeq's ``_optimal_step_size`` in float64 (never differentiated).

    A NaN ratio gives a NaN step, as there: the next step then fails as an underflow.
    """
    if math.isnan(ratio):
        return math.nan
    if ratio == 0:
        return dt * ctl.ifactor
    dfactor = 1.0 if ratio < 1 else ctl.dfactor
    factor = min(ctl.ifactor, max(ctl.safety / ratio ** (1.0 / order), dfactor))
    return dt * factor


def integrate_adaptive(fn: Derivative, y0: Tensor, times: Sequence, tab: Tableau,
                       ctl: Controls, grad: bool) -> tuple[list[Tensor], SolveStats]:
    """Solve y' = fn(t, y) from times[0] with an adaptive tableau; y at every time.

    Args:
        fn: the flat derivative (``Derivative``).
        y0: [N] initial state.
        times: increasing output times (floats, or 0-dim tensors when ``grad``).
        grad: record the graph (backpropagation through the steps).

    Returns:
        ([y(times[0]), y(times[1]), ...], stats).
    """
    clock = _TensorClock(y0.dtype, y0.device) if grad else _FloatClock(y0.dtype)
    co = _Coefficients(tab, y0)
    stats = SolveStats(path="python")
    s = tab.stages
    t = [clock.time(x) for x in times]
    t0 = t[0]
    stages = _Stages(y0, s, grad)
    f0 = fn(clock.state(t0), y0, stages.slot(0))
    stats.nfe += 1
    if ctl.first_step is None:
        h = _initial_step(fn, t0, y0, f0, tab.order - 1, ctl, stats)
        dt = h if grad else float(h)
    else:
        dt = clock.time(ctl.first_step)
    y, f = y0, f0
    t_start, t_end = t0, t0  # the last step's interval
    coeff = [y0] * 5
    out = [y0]
    for next_t in t[1:]:
        n_steps = 0
        while next_t > t_end:
            if n_steps >= ctl.max_num_steps:
                raise MaxStepsError(
                    f"sparsekern.odeint: max_num_steps exceeded ({n_steps}>={ctl.max_num_steps}) "
                    f"before t={_value(next_t):g}; raise options['max_num_steps'] or loosen "
                    "rtol/atol")
            y, f, t_start, t_end, dt, coeff = _step(fn, clock, co, tab, ctl, stages, y, f,
                                                    t_end, dt, coeff, stats)
            n_steps += 1
        x = (next_t - t_start) / (t_end - t_start)
        out.append(_interp_eval(coeff, clock.state(x)))
    return out, stats


def _step(fn, clock, co: _Coefficients, tab: Tableau, ctl: Controls, stages: _Stages,
          y0: Tensor, f0: Tensor, t0, dt, coeff, stats: SolveStats):
    """One adaptive step from t0 (accepted or rejected); torchdiffeq's ``_adaptive_step``."""
    if not bool(torch.isfinite(y0).all()):
        raise SolveError(f"sparsekern.odeint: the state holds non-finite values at "
                         f"t={_value(t0):g}")
    if not math.isfinite(_value(dt)):
        dt = clock.time(0.0)
    t1 = t0 + dt
    if not t1 > t0:
        raise SolveError(f"sparsekern.odeint: the step size underflowed (dt={_value(dt):g} at "
                         f"t={_value(t0):g}); the field may be too stiff for an explicit method")
    s = tab.stages
    # Inside the step, times and the step size are in the state's dtype.
    t0s, dts, t1s = clock.state(t0), clock.state(dt), clock.state(t1)
    h = _operand(dts)  # the step size as tensor products take it
    if stages.matrix is not None and stages.matrix.data_ptr() != f0.data_ptr():
        stages.matrix[:, 0].copy_(f0)
    stages.put(0, f0)
    a_dt = co.a * h
    yi = y0
    for i in range(s - 1):
        ci = tab.c[i]
        # Stages at the step's end are taken just before it, in case f jumps there.
        ti = clock.before(t1s) if ci == 1.0 else clock.state(t0s + clock.state(ci) * dts)
        yi = stages.combine(y0, a_dt[i], i + 1)
        stages.put(i + 1, fn(ti, yi, stages.slot(i + 1)))
        stats.nfe += 1
    y1 = yi if tab.fsal else stages.combine(y0, co.b * h, s)
    err = stages.weighted(co.b_err * h)
    with torch.no_grad():
        tol = ctl.atol + ctl.rtol * torch.max(y0.abs(), y1.abs())
        ratio = float(mixed_norm(err / tol, ctl.segments))
    accept = ratio <= 1
    f1 = stages.get(s - 1)
    dt_next = clock.time(_optimal_step(_value(dt), ratio, ctl, tab.order))
    if accept:
        stats.accepted += 1
        y_mid = stages.combine(y0, co.b_mid * h, s)
        coeff = _interp_fit(y0, y1, y_mid, stages.get(0), f1, h)
        if stages.matrix is not None:
            # f1 is a column of the stage matrix, which the next step overwrites: keep
            # it in column 0, where the next step starts (FSAL).
            stages.matrix[:, 0].copy_(f1)
            f1 = stages.matrix[:, 0]
        return y1, f1, t0, t1, dt_next, coeff
    stats.rejected += 1
    if stages.matrix is not None:
        f0 = stages.matrix[:, 0]
    return y0, f0, t0, t0, dt_next, coeff


# -- fixed-step methods --------------------------------------------------------


def fixed_grid(times: Tensor, step_size: float | None) -> Tensor:
    """torchdiffeq's grid: the output times, or steps of ``step_size`` ending on times[-1]."""
    if step_size is None:
        return times
    start, end = times[0], times[-1]
    n = int(torch.ceil((end - start) / step_size + 1).item())
    grid = torch.arange(0, n, dtype=times.dtype, device=times.device) * step_size + start
    grid[-1] = times[-1]
    return grid


def integrate_fixed(fn: Derivative, y0: Tensor, times: Tensor, tab: Tableau,
                    step_size: float | None) -> tuple[list[Tensor], SolveStats]:
    """Solve with a fixed-step tableau on ``fixed_grid``; outputs by linear interpolation.

    ``times``: increasing 1-D tensor. Returns ([y(times[0]), ...], stats).
    """
    grid = fixed_grid(times, step_size)
    stats = SolveStats(path="python")
    a = [torch.tensor(row, dtype=torch.float64) for row in tab.a]
    b = torch.tensor(tab.b, dtype=torch.float64)
    out = [y0]
    j = 1
    y = y0
    for t0, t1 in itertools.pairwise(grid.unbind(0)):
        dt = t1 - t0
        k = [fn(t0.to(y0.dtype), y, None)]
        for i, ci in enumerate(tab.c):
            ti = t1 if ci == 1.0 else t0 + ci * dt
            yi = y + sum(kj * (float(w) * dt).to(y0.dtype) for kj, w in zip(k, a[i], strict=True))
            k.append(fn(ti.to(y0.dtype), yi, None))
        stats.nfe += len(k)
        stats.accepted += 1
        y1 = y + sum(kj * (float(w) * dt).to(y0.dtype) for kj, w in zip(k, b, strict=True))
        while j < len(times) and t1 >= times[j]:
            tj = times[j]
            if tj == t0:
                out.append(y)
            elif tj == t1:
                out.append(y1)
            else:
                out.append(y + (tj - t0) / (t1 - t0) * (y1 - y))
            j += 1
        y = y1
    return out, stats
