"""The native evaluation of a time-free fused field inside a solve: no module, no dispatcher.

A solve evaluates the same field with the same weights tens of times. For a
fused MLP that reads no time, the op's inputs (``FusedMLP.op_call``) are built
once per solve and each evaluation is one kernel call (``ops._run_mlp``) on the
flat state, with the Hutchinson probe or the exact trace's unit tangents made
once too. The adjoint's vector-Jacobian products are the fused backward
(``mlp_bwd``: f and the divergence together), and its parameter adjoints are
integrated in the op's own coordinates (the values, scales and shifts of
``OpCall``), mapped to the kept parameters once at the end: that map is linear
and constant, so the result is the same up to rounding, and the seminorm never
measures those coordinates, so the steps are the same.

The C++ loop on CPU (csrc/cpu/rk_solve.cpp) takes the same inputs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from sparsekern import ops
from sparsekern.fused import FusedMLP, OpCall
from sparsekern.protocol import Dynamics
from sparsekern.solver.plan import Plan
from sparsekern.solver.rk import MaxStepsError, SolveError, SolveStats
from sparsekern.solver.system import FlatSystem, dynamics_call


def _solve_error(exc: RuntimeError) -> RuntimeError:
    """The C++ loop's failures as the Python loop's classes (same conditions)."""
    msg = str(exc).split("\n")[0]
    if "max_num_steps exceeded" in msg:
        return MaxStepsError(msg.replace("sparsekern rk_solve", "sparsekern.odeint"))
    if "underflow" in msg or "non-finite" in msg:
        return SolveError(msg.replace("sparsekern rk_solve", "sparsekern.odeint"))
    return exc


def fused_dynamics(dyn: Dynamics, parts: Sequence[Tensor]) -> FusedMLP | None:
    """The fused field of ``dyn`` when the native evaluation applies, else None: a
    time-free FusedMLP, a state z [B, d] (and logp [B]) of its dtype and device."""
    field = dyn.field
    if not (isinstance(field, FusedMLP) and field._time_free):
        return None
    z = parts[0]
    like = field.layers[0].weight.values
    if z.dim() != 2 or z.shape[1] != field.in_dim or (z.dtype, z.device) != (like.dtype,
                                                                            like.device):
        return None
    if len(parts) > 2 or (len(parts) == 2 and parts[1].shape != (z.shape[0],)):
        return None
    if len(parts) == 2 and dyn.divergence == "hutchinson" and (
            dyn.noise is None or dyn.noise.shape != z.shape):
        return None  # the field's own call raises the clear error
    return field


class FusedSystem(FlatSystem):
    """``FlatSystem`` of a time-free fused field: one kernel call per evaluation.

    The flat state is torchdiffeq's (z batch-major [B*d], then logp [B] for a
    flow's tuple state), so the loop and its norm see the same vector.
    """

    def __init__(self, field: FusedMLP, dyn: Dynamics, shapes: Sequence[torch.Size],
                 is_tuple: bool, sign: float, like: Tensor) -> None:
        # The generic call stays for what needs the module (none of this class's paths).
        super().__init__(dynamics_call(dyn), shapes, is_tuple, sign, like.dtype, like.device,
                         dyn.count)
        self.field = field
        self.b, self.d = shapes[0][0], shapes[0][1]
        op = field.op_call(like, graph=False)
        assert op is not None  # fused_dynamics checked that the field is time-free
        self.op: OpCall = op
        self.exact = is_tuple and dyn.divergence == "exact"
        noise = dyn.noise if is_tuple and not self.exact else None
        self.tan0, self.probe = field.tangents(noise, self.exact, self.b, like)
        self._graph: OpCall | None = None

    def _x0(self, y: Tensor) -> Tensor:
        return self.field._gather(y[: self.b * self.d].view(self.b, self.d))

    def _run(self, name: str, *args: object):
        op = self.op
        return ops._run_mlp(name, op.backend, self.device, op.precision, *args)

    def _fwd(self, y: Tensor, save: bool):
        op = self.op
        x0 = self._x0(y)
        f, div, saved = self._run("mlp_fwd", x0, self.tan0, self.probe, op.values, op.index,
                                  op.scales, op.shifts, op.layouts, op.act, self.exact, save)
        return x0, f, div, saved

    def _write(self, f: Tensor, div: Tensor, out: Tensor | None) -> Tensor:
        n = self.b * self.d
        if out is None:
            out = torch.empty(sum(self.sizes), dtype=self.dtype, device=self.device)
        out[:n].view(self.b, self.d).copy_(f.t())
        if self.is_tuple:
            out[n:].copy_(div).neg_()
        if self.sign < 0:
            out.neg_()
        return out

    def __call__(self, t, y: Tensor, out: Tensor | None = None) -> Tensor:
        if self.count is not None:
            self.count(1)
        _, f, div, _ = self._fwd(y, save=False)
        return self._write(f, div, out)

    # -- the whole solve in C++ (csrc/cpu/rk_solve.cpp) ----------------------------
    def native_solve(self, plan: Plan, y0: Tensor, times: Tensor
                     ) -> tuple[list[Tensor], SolveStats] | None:
        """The solve of ``plan`` by the C++ loop, or None where it does not apply
        (another backend, a fixed-step method): then the Python loop runs it.

        The C++ state is z feature-major (the kernel's layout); the loop's own
        flat state is torchdiffeq's, batch-major: converted once each way.
        """
        segs = [(0, self.b * self.d), (self.b * self.d, self.b)] if self.is_tuple else \
            [(0, self.b * self.d)]
        return self._cpp("rk_solve", plan, y0, times, [0], segs)

    def native_adjoint_solve(self, plan: Plan, aug: Tensor, times: Tensor
                             ) -> tuple[list[Tensor], SolveStats] | None:
        """One backward solve of the adjoint's augmented state [a_t | y | a_y | op
        coordinates] (``adjoint._Augmented``) by the C++ loop, or None (Python loop)."""
        if plan.controls is None:
            return None  # a fixed-step method: the Python loop
        n = sum(self.sizes)
        return self._cpp("rk_solve_adjoint", plan, aug, times, [1, 1 + n],
                         plan.controls.segments)

    def _cpp(self, entry: str, plan: Plan, y0: Tensor, times: Tensor, z_at: Sequence[int],
             segments: Sequence[tuple[int, int]]) -> tuple[list[Tensor], SolveStats] | None:
        """Run ``entry`` of csrc/cpu/rk_solve.cpp on the flat vector y0, whose z blocks
        (batch-major, at offsets ``z_at``) it reads feature-major: swapped there and back."""
        tab, ctl = plan.tableau, plan.controls
        if self.op.backend != "cpu" or tab is None or not tab.adaptive or ctl is None:
            return None
        if self.op.cols0 is not None and self.op.cols0.numel() == 0:
            return None  # the first layer reads no state dim; C++ reads empty cols0 as all
        if times.numel() < 2:
            return None  # nothing to step (the Python loop returns y0, as torchdiffeq)
        from sparsekern.backends import cpu

        n, b, d = self.b * self.d, self.b, self.d
        y_fm = y0.clone()
        for at in z_at:
            y_fm[at:at + n].view(d, b).copy_(y0[at:at + n].view(b, d).t())
        coeffs = tab.dense()
        op = self.op
        cols0 = op.cols0 if op.cols0 is not None else torch.empty(0, dtype=torch.long)
        first = -1.0 if ctl.first_step is None else ctl.first_step
        try:
            sol, nfe, accepted, rejected, model_s = getattr(cpu.extension(), entry)(
                y_fm, times.detach().to(torch.float64).cpu().contiguous(), self.sign,
                coeffs["a"], coeffs["b"], coeffs["b_err"], coeffs["b_mid"], tab.order, ctl.rtol,
                ctl.atol,
                first, ctl.safety, ctl.ifactor, ctl.dfactor, ctl.max_num_steps,
                [v for seg in segments for v in seg], d, b, self.is_tuple, cols0, self.tan0,
                self.probe, op.values, op.index, op.scales, op.shifts, op.layouts, op.act,
                self.exact)
        except RuntimeError as exc:
            raise _solve_error(exc) from None
        if self.count is not None:
            self.count(nfe)
        out = sol.clone()
        for at in z_at:
            out[:, at:at + n].view(-1, b, d).copy_(sol[:, at:at + n].view(-1, d, b)
                                                   .transpose(1, 2))
        return list(out.unbind(0)), SolveStats(nfe, accepted, rejected, path="c++",
                                               model_seconds=model_s)

    # -- the adjoint's hooks (FlatSystem's generic versions use autograd) -----------
    def adjoint_tensors(self, params: Sequence[Tensor]) -> list[Tensor]:
        """The op's values, scales and shifts, built with autograd from the kept values."""
        self._graph = self.field.op_call(torch.empty(0, dtype=self.dtype, device=self.device),
                                         graph=True)
        assert self._graph is not None
        return self._graph.tensors

    def vjp(self, t, y: Tensor, cot: Tensor, params: Sequence[Tensor] = ()
            ) -> tuple[Tensor, Tensor | None, Tensor | None, Sequence[Tensor | None]]:
        if self.count is not None:
            self.count(1)
        op = self.op
        n = self.b * self.d
        x0, f, div, saved = self._fwd(y, save=True)
        # The derivative is sign * [f^T | -div]: its cotangent's pull-back to f and div.
        grad_f = cot[:n].view(self.b, self.d).t().contiguous()
        grad_div = (-cot[n:] if self.is_tuple else cot.new_zeros(self.b)).contiguous()
        if self.sign < 0:
            grad_f, grad_div = -grad_f, -grad_div
        g_x0, g_values, g_scales, g_shifts = self._run(
            "mlp_bwd", grad_f, grad_div, x0, self.tan0, self.probe, op.values, op.index,
            op.scales, op.shifts, op.layouts, op.act, self.exact, saved)
        g_y = torch.zeros_like(y)
        g_z = g_y[:n].view(self.b, self.d)
        if op.cols0 is None:
            g_z.copy_(g_x0.t())
        else:
            g_z.index_copy_(1, op.cols0, g_x0.t())
        return self._write(f, div, None), None, g_y, [*g_values, *g_scales, *g_shifts]

    def param_grads(self, adjoints: Sequence[Tensor], params: Sequence[Tensor]
                    ) -> list[Tensor | None]:
        """The kept parameters' gradients from the op coordinates' adjoints."""
        if self._graph is None:
            return [torch.zeros_like(p) for p in params]
        pairs = [(x, g) for x, g in zip(self._graph.tensors, adjoints, strict=True)
                 if x.requires_grad]
        if not pairs or not params:
            return [torch.zeros_like(p) for p in params]
        grads = torch.autograd.grad([x for x, _ in pairs], list(params),
                                    [g for _, g in pairs], allow_unused=True)
        return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads,
                                                                          strict=True)]
