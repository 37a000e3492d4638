"""``sparsekern.odeint``: torchdiffeq's odeint and odeint_adjoint, run natively.

One Runge-Kutta loop (``rk``) reads a Butcher tableau (``tableau.TABLEAUS``:
dopri5, bosh3, adaptive_heun, rk4, euler) and takes the same steps as
torchdiffeq on the same field. It runs compiled fields (``CompiledField``) and
ODE functions that describe their dynamics (``protocol.Dynamics``: a compiled
flow's ODE function). Anything else (another method, an option the loop does not
read, a function it cannot see into) goes to torchdiffeq, and the reason is kept
(``last_solve`` and ``summary()`` of the compiled field). See docs/design.md,
"The native solver".
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from sparsekern.field import CompiledField
from sparsekern.protocol import DescribesDynamics, Dynamics
from sparsekern.solver.adjoint import AdjointSolve, adjoint_segments
from sparsekern.solver.native import FusedSystem, fused_dynamics
from sparsekern.solver.plan import NATIVE_OPTIONS, Plan, integrate, make_plan
from sparsekern.solver.rk import MaxStepsError, SolveError, SolveStats
from sparsekern.solver.system import FlatSystem, dynamics_call, parameters_of
from sparsekern.solver.tableau import TABLEAUS, Method, Tableau

__all__ = ["TABLEAUS", "MaxStepsError", "Method", "SolveError", "SolveStats", "Tableau",
           "odeint"]

State = Tensor | tuple[Tensor, ...]


def _native(func: Any) -> tuple[Callable | None, Dynamics | None, str | None]:
    """(func(t, state) to integrate, its Dynamics or None, why not native or None)."""
    if isinstance(func, CompiledField):
        dyn = Dynamics(func)
        return dynamics_call(dyn), dyn, None
    if isinstance(func, DescribesDynamics):
        dyn = func.sparsekern_dynamics()
        if not isinstance(dyn.field, CompiledField):
            return None, None, (f"{type(func).__name__}'s vector field "
                                f"{type(dyn.field).__name__} is not compiled")
        return dynamics_call(dyn), dyn, None
    return None, None, (f"{type(func).__name__} is neither a compiled field nor an ODE "
                        "function that describes its dynamics (sparsekern_dynamics)")


def _record(dyn: Dynamics | None, func: Any, note: str,
            stats: tuple[SolveStats, ...] = ()) -> None:
    for target in (func, None if dyn is None else dyn.field):
        if isinstance(target, CompiledField):
            target.last_solve, target.last_solve_stats = note, stats


def _check_state(y0: Any) -> tuple[list[Tensor], bool]:
    """The state's parts and whether it is a tuple; TypeError for anything else."""
    if isinstance(y0, Tensor):
        return [y0], False
    if isinstance(y0, tuple) and y0 and all(isinstance(p, Tensor) for p in y0):
        return list(y0), True
    raise TypeError(f"sparsekern.odeint: y0 must be a tensor or a tuple of tensors, got "
                    f"{type(y0).__name__}")


def _state_fallback(parts: Sequence[Tensor], is_tuple: bool) -> str | None:
    """Why the native loop cannot take this state (torchdiffeq may), or None."""
    first = parts[0]
    for p in parts:
        if p.dtype not in (torch.float32, torch.float64):
            return f"a {p.dtype} state is not native (float32 or float64)"
        if (p.dtype, p.device) != (first.dtype, first.device):
            return "a state whose parts differ in dtype or device is not native"
    return None


def _check_dynamics_state(dyn: Dynamics, parts: Sequence[Tensor], is_tuple: bool) -> None:
    """One clear error where the state is not what ``dyn`` integrates: z [B, ...], or
    (z [B, ...], logp [B]) with the Hutchinson probe drawn like z."""
    if not is_tuple:
        return
    if len(parts) != 2 or parts[0].dim() < 1 or parts[1].shape not in (
            (parts[0].shape[0],), (parts[0].shape[0], 1)):
        shapes = ", ".join(str(list(p.shape)) for p in parts)
        raise ValueError(f"sparsekern.odeint: a tuple state is a flow's (z [B, ...], logp [B]); "
                         f"got parts of shapes ({shapes})")
    if dyn.divergence == "hutchinson" and (dyn.noise is None or dyn.noise.shape != parts[0].shape):
        got = None if dyn.noise is None else list(dyn.noise.shape)
        raise RuntimeError("Hutchinson noise was not drawn for this solve: draw it before "
                           f"integrating (noise shape {got}, state shape "
                           f"{list(parts[0].shape)})")


def _check_times(t: Any, like: Tensor) -> tuple[Tensor, bool]:
    if not isinstance(t, Tensor) or not t.is_floating_point() or t.dim() != 1 or len(t) < 1:
        what = f"a {t.dim()}-D {t.dtype} tensor" if isinstance(t, Tensor) else type(t).__name__
        raise ValueError(f"sparsekern.odeint: t must be a 1-D floating tensor of output times, "
                         f"got {what}")
    if t.device != like.device:
        t = t.to(like.device)
    reverse = len(t) > 1 and bool(t[0] > t[1])
    ts = -t if reverse else t
    if len(ts) > 1 and not bool((ts[1:] > ts[:-1]).all()):
        raise ValueError(f"sparsekern.odeint: t must be strictly increasing or decreasing, got "
                         f"{t.detach().cpu().tolist()}")
    return ts, reverse


def _needs_graph(func: Any, y0: Sequence[Tensor], t: Tensor) -> bool:
    if not torch.is_grad_enabled():
        return False
    return (t.requires_grad or any(p.requires_grad for p in y0)
            or any(p.requires_grad for p in parameters_of(func)))


def _back_plan(method: str | None, rtol: Any, atol: Any, options: dict[str, Any] | None,
               adjoint_method: str | None, adjoint_rtol: Any, adjoint_atol: Any,
               adjoint_options: dict[str, Any] | None) -> tuple[Plan, bool]:
    """The backward solve's plan and whether it uses the seminorm (torchdiffeq's defaults)."""
    a_method = adjoint_method or method
    if a_method != method and options is not None and adjoint_options is None:
        raise ValueError("sparsekern.odeint: with adjoint_method != method the backward "
                         "solve's options cannot be taken from options; pass adjoint_options "
                         "too (as torchdiffeq requires)")
    if adjoint_options is None:
        adjoint_options = {k: v for k, v in (options or {}).items() if k != "norm"}
    adjoint_options = dict(adjoint_options)
    norm = adjoint_options.pop("norm", None)
    back = make_plan(a_method, rtol if adjoint_rtol is None else adjoint_rtol,
                     atol if adjoint_atol is None else adjoint_atol, adjoint_options)
    if norm not in (None, "seminorm"):
        back = Plan(back.method, back.tableau, fallback="a custom adjoint norm is not native")
    return back, norm == "seminorm"


def odeint(
    func: Callable[..., Any],
    y0: State,
    t: Tensor,
    *,
    rtol: float = 1e-7,
    atol: float = 1e-9,
    method: Method | str | None = None,
    options: dict[str, Any] | None = None,
    adjoint: bool = False,
    adjoint_rtol: float | None = None,
    adjoint_atol: float | None = None,
    adjoint_method: Method | str | None = None,
    adjoint_options: dict[str, Any] | None = None,
    adjoint_params: Sequence[Tensor] | None = None,
    event_fn: Callable[..., Tensor] | None = None,
) -> State | tuple[Tensor, State]:
    """Solve dy/dt = func(t, y) at the times ``t``: torchdiffeq's ``odeint`` (and, with
    ``adjoint=True``, ``odeint_adjoint``), arguments and results alike.

    Args:
        func: a compiled field (``compile_sparse`` of a vector field) or an ODE
            function with ``sparsekern_dynamics()`` (a compiled flow's); anything
            else is solved by torchdiffeq.
        y0: the state at t[0]: a tensor [B, ...], or a tuple of them (a flow's
            (z [B, d], logp [B])).
        t: [T] output times, increasing or decreasing (a solve backward in time).
        rtol, atol: error tolerances (scalars natively).
        method: "dopri5" (default), "bosh3", "adaptive_heun", or the fixed-step
            "rk4" and "euler" (``options={"step_size": h}``, else steps on t).
        options: torchdiffeq's options: first_step, safety, ifactor, dfactor,
            max_num_steps; step_size for fixed steps. The native loop's own:
            sync_every (int: keep the step control on the device, the host looking
            every that many steps; the default on CUDA is 8, elsewhere, or with 0,
            the host loop) and cuda_graph (bool: capture those steps once as a CUDA
            graph).
        adjoint: gradients by the adjoint method (a backward solve) instead of
            backpropagation through the steps.
        adjoint_rtol, adjoint_atol, adjoint_method, adjoint_options: the
            backward solve's (default: the forward's); ``{"norm": "seminorm"}``
            measures its error on the state and its adjoint only.
        adjoint_params: the tensors that get adjoints (default: func's parameters).
        event_fn: torchdiffeq's event handling (solved by torchdiffeq; it then
            returns (event time, solution)).

    Returns:
        y at every time: [T, B, ...], or a tuple of them for a tuple y0.

    Raises:
        MaxStepsError: ``max_num_steps`` steps without reaching the next time.
        SolveError: a non-finite state or an underflowing step size.
    """
    parts, is_tuple = _check_state(y0)
    call, dyn, reason = _native(func)
    plan = make_plan(method, rtol, atol, options)
    back: Plan | None = None
    seminorm = False
    if adjoint:
        back, seminorm = _back_plan(method, rtol, atol, options, adjoint_method, adjoint_rtol,
                                    adjoint_atol, adjoint_options)
    reason = (reason or plan.fallback or (back.fallback if back is not None else None)
              or _state_fallback(parts, is_tuple)
              or ("event handling is not native" if event_fn is not None else None))
    if reason is not None:
        _record(dyn, func, f"torchdiffeq ({reason})")
        return _torchdiffeq(func, y0, t, rtol, atol, method, options, adjoint, adjoint_rtol,
                            adjoint_atol, adjoint_method, adjoint_options, adjoint_params,
                            event_fn)
    assert call is not None and dyn is not None
    _check_dynamics_state(dyn, parts, is_tuple)
    like = parts[0]
    ts, reverse = _check_times(t, like)
    shapes, sign = [p.shape for p in parts], -1.0 if reverse else 1.0
    graph = not adjoint and _needs_graph(func, parts, ts)
    # The fused system's adjoint integrates op coordinates, which only the seminorm
    # leaves unmeasured; without gradients no backward solve runs.
    generic_back = adjoint and not seminorm and torch.is_grad_enabled()
    fused = None if graph or generic_back else fused_dynamics(dyn, parts)
    if fused is not None:
        # One kernel call per evaluation (sparsekern.solver.native).
        system: FlatSystem = FusedSystem(fused, dyn, shapes, is_tuple, sign, like)
    else:
        system = FlatSystem(call, shapes, is_tuple, sign, like.dtype, like.device, dyn.count)
    plan = plan.with_segments(system.segments)
    flat = system.flatten(parts if is_tuple else parts[0])
    stats = SolveStats()
    if adjoint:
        assert back is not None
        params = [p for p in (parameters_of(func) if adjoint_params is None
                              else adjoint_params) if p.requires_grad]
        back_plan = back.with_segments(adjoint_segments(system, params, seminorm))
        forward = stats

        def report(back_stats: SolveStats) -> None:
            _record(dyn, func, f"{_describe(plan, forward)}; adjoint "
                               f"{_describe(back_plan, back_stats)}", (forward, back_stats))

        y = AdjointSolve.apply(system, plan, back_plan, stats, report, ts, flat, *params)
    else:
        ys, stats = integrate(plan, system, flat, ts, graph)
        y = torch.stack(ys)
    _record(dyn, func, _describe(plan, stats), (stats,))
    return system.unflatten(y, (len(t),))


def _describe(plan: Plan, stats: SolveStats) -> str:
    return (f"native {plan.method} ({stats.path} loop): {stats.nfe} NFE, {stats.accepted} "
            f"steps, {stats.rejected} rejected")


def _torchdiffeq(func, y0, t, rtol, atol, method, options, adjoint, adjoint_rtol, adjoint_atol,
                 adjoint_method, adjoint_options, adjoint_params, event_fn):
    import torchdiffeq  # type: ignore[import-untyped]

    # The native loop's own options mean nothing to torchdiffeq.
    if options is not None:
        options = {k: v for k, v in options.items() if k not in NATIVE_OPTIONS}
    if adjoint_options is not None:
        adjoint_options = {k: v for k, v in adjoint_options.items() if k not in NATIVE_OPTIONS}
    if not adjoint:
        return torchdiffeq.odeint(func, y0, t, rtol=rtol, atol=atol, method=method,
                                  options=options, event_fn=event_fn)
    return torchdiffeq.odeint_adjoint(
        func, y0, t, rtol=rtol, atol=atol, method=method, options=options, event_fn=event_fn,
        adjoint_rtol=adjoint_rtol, adjoint_atol=adjoint_atol, adjoint_method=adjoint_method,
        adjoint_options=adjoint_options, adjoint_params=adjoint_params)

