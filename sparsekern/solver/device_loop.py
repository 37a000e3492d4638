"""The adaptive loop with its step control on the device: no host sync per step.

On a GPU the host loop (``rk.integrate_adaptive``) reads every error ratio back
to decide the step: a synchronisation per step, which on small fields costs more
than the step. Here acceptance, the next step size, the output interpolation and
the counters are tensors on the state's device, updated in place; the host looks
at them every ``sync_every`` steps (have all output times been passed? did a
check fail?). Steps after the last output time are masked: they evaluate the
field (and are not counted) but change nothing, so the steps, NFE and results are
the host loop's, which are torchdiffeq's. On CUDA, ``sync_every`` steps are
captured once as a CUDA graph and replayed (``graph=True``): every buffer the
step touches is persistent for that.

The same algorithm as ``rk.integrate_adaptive`` (one loop in two execution
styles, as the C++ loop is a third): the initial step is the host loop's
(``rk._initial_step``, one sync per solve).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from sparsekern.solver.rk import (
    Controls,
    MaxStepsError,
    SolveError,
    SolveStats,
    _Coefficients,
    _initial_step,
    _interp_eval,
    _interp_fit,
)
from sparsekern.solver.tableau import Tableau

F64 = torch.float64


class _DeviceState:
    """Everything a step reads and writes, as persistent tensors on the device."""

    def __init__(self, y0: Tensor, times: Tensor, f0: Tensor, dt: Tensor, stages: int) -> None:
        dev = y0.device
        n = y0.numel()
        self.times = times.to(F64)
        self.y = y0.clone()
        self.k = y0.new_empty(n, stages)
        self.k[:, 0] = f0
        self.t = self.times[0].clone()  # the end of the last accepted step
        self.dt = dt.to(F64).reshape(()).clone()
        self.out = y0.new_empty(len(times), n)
        self.out[0] = y0
        self.nfe = torch.zeros((), dtype=torch.int64, device=dev)
        self.accepted = torch.zeros((), dtype=torch.int64, device=dev)
        self.rejected = torch.zeros((), dtype=torch.int64, device=dev)
        self.since_output = torch.zeros((), dtype=torch.int64, device=dev)  # per interval
        self.too_many = torch.zeros((), dtype=torch.bool, device=dev)
        self.nonfinite = torch.zeros((), dtype=torch.bool, device=dev)
        self.underflow = torch.zeros((), dtype=torch.bool, device=dev)


def _norm(x: Tensor, segments) -> Tensor:
    """``rk.mixed_norm`` without a host sync: Python's max over the parts (a part is
    replaced only by a greater one) as ``torch.where``. Never differentiated here
    (the device loop runs without gradients), unlike the host loop's."""
    if not segments:
        return x.abs().pow(2).mean().sqrt()
    (start, n), *rest = segments
    m = x.narrow(0, start, n).abs().pow(2).mean().sqrt()
    for start, n in rest:
        r = x.narrow(0, start, n).abs().pow(2).mean().sqrt()
        m = torch.where(r > m, r, m)
    return m


def _step(fn: Callable, s: _DeviceState, co: _Coefficients, tab: Tableau, ctl: Controls) -> None:
    """One masked adaptive step, in place (torchdiffeq's ``_adaptive_step``).

    Once a check has failed every later step is masked, so the first failure is the
    one reported, as the host loop raises it.
    """
    dtype = s.y.dtype
    active = (s.t < s.times[-1]) & ~(s.too_many | s.nonfinite | s.underflow)
    s.too_many |= active & (s.since_output >= ctl.max_num_steps)
    active = active & ~s.too_many
    s.nonfinite |= active & ~torch.isfinite(s.y).all()
    active = active & ~s.nonfinite
    dt = torch.where(torch.isfinite(s.dt), s.dt, torch.zeros_like(s.dt))
    t0, t1 = s.t, s.t + dt
    s.underflow |= active & ~(t1 > t0)
    active = active & ~s.underflow
    t0s, dts, t1s = t0.to(dtype), dt.to(dtype), t1.to(dtype)
    a_dt = co.a * dts
    yi = s.y
    for i, ci in enumerate(tab.c):
        # Stages at the step's end are taken just before it (torchdiffeq's Perturb.PREV).
        ti = torch.nextafter(t1s, t1s - 1) if ci == 1.0 else t0s + ci * dts
        yi = s.y + torch.sum(s.k[:, : i + 1] * a_dt[i, : i + 1], dim=-1)
        s.k[:, i + 1] = fn(ti, yi, None)
    y1 = yi if tab.fsal else s.y + torch.sum(s.k * (co.b * dts), dim=-1)
    err = torch.sum(s.k * (co.b_err * dts), dim=-1)
    tol = ctl.atol + ctl.rtol * torch.max(s.y.abs(), y1.abs())
    ratio = _norm(err / tol, ctl.segments).to(F64)
    accept = active & (ratio <= 1)
    # torchdiffeq's _optimal_step_size, NaN in NaN out.
    dfactor = torch.where(ratio < 1, torch.ones_like(ratio), torch.full_like(ratio, ctl.dfactor))
    # Tensors as torchdiffeq has them: torch computes `float / tensor` as a reciprocal
    # times the float, and `tensor ** 0.5` as a square root, each an ulp off at times.
    safety = torch.full_like(ratio, ctl.safety)
    exponent = torch.full_like(ratio, float(tab.order)).reciprocal()
    factor = torch.minimum(torch.full_like(ratio, ctl.ifactor),
                           torch.maximum(safety / ratio ** exponent, dfactor))
    factor = torch.where(ratio == 0, torch.full_like(ratio, ctl.ifactor), factor)
    # Output times this step passes: interpolated from it, as torchdiffeq's _advance.
    y_mid = s.y + torch.sum(s.k * (co.b_mid * dts), dim=-1)
    coeff = _interp_fit(s.y, y1, y_mid, s.k[:, 0], s.k[:, -1], dts)
    hit = accept & (s.times > t0) & (s.times <= t1)
    x = ((s.times - t0) / (t1 - t0)).to(dtype)[:, None]  # every output time at once
    s.out.copy_(torch.where(hit[:, None], _interp_eval(coeff, x), s.out))
    s.y.copy_(torch.where(accept, y1, s.y))
    s.k[:, 0] = torch.where(accept, s.k[:, -1], s.k[:, 0])
    s.t.copy_(torch.where(accept, t1, s.t))
    s.dt.copy_(torch.where(active, dt * factor, s.dt))
    s.nfe += active.to(torch.int64) * (tab.stages - 1)
    s.accepted += accept.to(torch.int64)
    s.rejected += (active & ~accept).to(torch.int64)
    s.since_output.copy_(torch.where(hit.any(), torch.zeros_like(s.since_output),
                                     s.since_output + active.to(torch.int64)))


def integrate_on_device(fn: Callable, y0: Tensor, times: Tensor, tab: Tableau, ctl: Controls,
                        sync_every: int = 8, graph: bool = False,
                        count: Callable[[int], None] | None = None
                        ) -> tuple[list[Tensor], SolveStats]:
    """``rk.integrate_adaptive`` (no gradients) with the step control on the device.

    Args:
        fn: the flat derivative (``rk.Derivative``), called with 0-dim tensor times;
            it must not count its own calls (the loop counts the unmasked ones).
        y0: [N] initial state. times: increasing output times (a 1-D tensor).
        sync_every: steps between two looks of the host at the loop's state.
        graph: capture those steps once as a CUDA graph and replay it (CUDA only).
        count: told the number of counted evaluations at the end, also when the
            solve fails (the field's NFE counter).

    Returns:
        ([y(times[0]), ...], stats), the same as the host loop's.
    """
    co = _Coefficients(tab, y0)
    times = times.to(device=y0.device, dtype=F64)
    stats = SolveStats(path="device")
    f0 = fn(times[0].to(y0.dtype), y0, None)
    if ctl.first_step is None:
        dt = _initial_step(fn, times[0], y0, f0, tab.order - 1, ctl, stats)
    else:
        dt = torch.tensor(ctl.first_step, dtype=F64, device=y0.device)
    s = _DeviceState(y0, times, f0, dt, tab.stages)
    s.nfe += 1 + stats.nfe
    try:
        return _run(fn, s, co, tab, ctl, sync_every, graph, stats)
    finally:
        if count is not None:
            count(int(s.nfe))


def _run(fn: Callable, s: _DeviceState, co: _Coefficients, tab: Tableau, ctl: Controls,
         sync_every: int, graph: bool, stats: SolveStats) -> tuple[list[Tensor], SolveStats]:
    """The windows of ``sync_every`` steps, each followed by one look of the host."""

    def steps() -> None:
        for _ in range(sync_every):
            _step(fn, s, co, tab, ctl)

    done = len(s.times) < 2
    replay = steps
    if graph and s.y.is_cuda and not done:
        captured = _capture(steps, s.y.device)
        if captured is None:
            stats.path = "device, graph capture failed"
        else:
            replay, stats.path = captured, "device+graph"
    while not done:
        replay()
        # The one read-back per sync_every steps.
        done, too_many, nonfinite, underflow = (bool(v) for v in torch.stack([
            s.t >= s.times[-1], s.too_many, s.nonfinite, s.underflow]).tolist())
        if too_many:
            raise MaxStepsError(f"sparsekern.odeint: max_num_steps exceeded "
                                f"({ctl.max_num_steps}>={ctl.max_num_steps}) between two "
                                "output times; raise options['max_num_steps'] or loosen "
                                "rtol/atol")
        if nonfinite:
            raise SolveError("sparsekern.odeint: the state holds non-finite values")
        if underflow:
            raise SolveError("sparsekern.odeint: the step size underflowed; the field may be "
                             "too stiff for an explicit method")
    stats.nfe, stats.accepted, stats.rejected = (int(v) for v in torch.stack(
        [s.nfe, s.accepted, s.rejected]).tolist())
    return list(s.out.unbind(0)), stats


def _capture(steps: Callable[[], None], device: torch.device) -> Callable[[], None] | None:
    """``steps`` recorded once as a CUDA graph on ``device``; calling the result replays
    it. None if the field cannot be captured (a host sync inside it, say): then the
    steps run eagerly.

    The warm-up (on a side stream, as capture requires) is a real first window of
    steps; the loop's state is persistent and every step masked, so the replays
    carry on from it.
    """
    with torch.cuda.device(device):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            steps()
        torch.cuda.current_stream().wait_stream(side)
        g = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(g):
                steps()
        except RuntimeError:
            return None

    def replay() -> None:
        with torch.cuda.device(device):
            g.replay()

    return replay
