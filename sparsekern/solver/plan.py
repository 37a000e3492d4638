"""How a solve runs: its method and step control, read from torchdiffeq-style options.

``make_plan`` accepts what the native loop implements and says, in one line,
why anything else goes to torchdiffeq (``Plan.fallback``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor

from sparsekern.solver.device_loop import integrate_on_device
from sparsekern.solver.rk import Controls, SolveStats, integrate_adaptive, integrate_fixed
from sparsekern.solver.tableau import TABLEAUS, Tableau

# Options the native loop reads (torchdiffeq's names); any other goes to torchdiffeq.
# NATIVE_OPTIONS are the native loop's own (``device_loop``): dropped for torchdiffeq.
NATIVE_OPTIONS = ("sync_every", "cuda_graph")
ADAPTIVE_OPTIONS = ("first_step", "safety", "ifactor", "dfactor", "max_num_steps",
                    *NATIVE_OPTIONS)
FIXED_OPTIONS = ("step_size", "interp")


@dataclass(frozen=True)
class Plan:
    """A native solve's method and controls, or why the solve goes to torchdiffeq.

    ``controls.segments`` (the error norm's slices) is filled per state
    (``with_segments``).
    """

    method: str
    tableau: Tableau | None
    controls: Controls | None = None
    step_size: float | None = None
    fallback: str | None = None
    # The device loop (``device_loop``): steps between the host's looks (None: the
    # host loop, except on CUDA, where 8; 0: the host loop everywhere), and CUDA-graph
    # capture of those steps.
    sync_every: int | None = None
    cuda_graph: bool = False

    def with_segments(self, segments: Sequence[tuple[int, int]]) -> Plan:
        if self.controls is None:
            return self
        return replace(self, controls=replace(self.controls, segments=tuple(segments)))


def _scalar_tol(name: str, tol: Any) -> float | None:
    if isinstance(tol, Tensor):
        if tol.numel() != 1:
            return None
        if tol.requires_grad:
            raise ValueError(f"sparsekern.odeint: {name} cannot require gradient")
        return float(tol)
    if isinstance(tol, (int, float)):
        return float(tol)
    return None


def _positive(name: str, value: Any) -> float:
    v = float(value)
    if not v > 0:
        raise ValueError(f"sparsekern.odeint: options[{name!r}] must be positive, got {value}")
    return v


def make_plan(method: str | None, rtol: Any, atol: Any, options: Mapping[str, Any] | None
              ) -> Plan:
    """The native plan for ``method`` with ``options``, or a Plan whose ``fallback`` says
    why not. ValueError for a step size that is not positive."""
    method = method or "dopri5"
    options = dict(options or {})
    tab = TABLEAUS.get(method)
    if tab is None:
        return Plan(method, None, fallback=f"method {method!r} is not native (native: "
                                           f"{', '.join(TABLEAUS)})")
    if "norm" in options:
        return Plan(method, tab, fallback="a custom error norm is not native")
    known = ADAPTIVE_OPTIONS if tab.adaptive else (*FIXED_OPTIONS, *NATIVE_OPTIONS)
    extra = sorted(set(options) - set(known))
    if extra:
        return Plan(method, tab, fallback=f"option(s) {', '.join(extra)} of {method} are not "
                                          "native")
    if not tab.adaptive:
        if options.get("interp", "linear") != "linear":
            return Plan(method, tab, fallback=f"interp={options['interp']!r} is not native")
        step = options.get("step_size")
        return Plan(method, tab, step_size=None if step is None else _positive("step_size", step))
    r, a = _scalar_tol("rtol", rtol), _scalar_tol("atol", atol)
    if r is None or a is None:
        return Plan(method, tab, fallback="per-component rtol/atol are not native")
    first = options.get("first_step")
    controls = Controls(
        rtol=r, atol=a,
        first_step=None if first is None else _positive("first_step", first),
        safety=float(options.get("safety", 0.9)),
        ifactor=float(options.get("ifactor", 10.0)),
        dfactor=float(options.get("dfactor", 0.2)),
        max_num_steps=int(options.get("max_num_steps", 2**31 - 1)),
    )
    sync = options.get("sync_every")
    if sync is not None and (type(sync) is not int or sync < 0):
        raise ValueError(f"sparsekern.odeint: options['sync_every'] must be an int >= 0 (0: "
                         f"the host loop), got {sync!r}")
    graph = options.get("cuda_graph", False)
    if type(graph) is not bool:
        raise ValueError(f"sparsekern.odeint: options['cuda_graph'] must be True or False, "
                         f"got {graph!r}")
    return Plan(method, tab, controls=controls, sync_every=sync, cuda_graph=graph)


def integrate(plan: Plan, fn, y0: Tensor, times: Tensor, grad: bool
              ) -> tuple[list[Tensor], SolveStats]:
    """Run the loop of ``plan`` (adaptive or fixed-step) on the flat system ``fn``.

    times: increasing solver times (a 1-D tensor; with ``grad`` its entries keep
    their graph). Returns y at every time and the solve's stats.
    """
    assert plan.tableau is not None and plan.fallback is None
    native = getattr(fn, "native_solve", None)
    if native is not None and not grad:
        done = native(plan, y0, times)
        if done is not None:
            return done
    if not plan.tableau.adaptive:
        with torch.set_grad_enabled(grad):
            return integrate_fixed(fn, y0, times, plan.tableau, plan.step_size)
    assert plan.controls is not None
    sync = plan.sync_every if plan.sync_every is not None else (8 if y0.is_cuda else 0)
    if not grad and sync > 0 and hasattr(fn, "count"):
        # The step control on the device: no host sync per step (device_loop). The
        # loop counts the unmasked evaluations itself, so fn must not.
        count, fn.count = fn.count, None
        try:
            with torch.no_grad():
                return integrate_on_device(fn, y0, times, plan.tableau, plan.controls, sync,
                                           plan.cuda_graph, count)
        finally:
            fn.count = count
    ts: Sequence = list(times.unbind(0)) if grad else times.tolist()
    with torch.set_grad_enabled(grad):
        return integrate_adaptive(fn, y0, ts, plan.tableau, plan.controls, grad)
