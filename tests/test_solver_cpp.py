"""rk_solve (csrc/cpu/rk_solve.cpp): a whole adaptive Runge-Kutta solve in C++ that calls
the fused MLP kernel directly, against torchdiffeq.odeint on the same compiled field.

The C++ solve runs torchdiffeq's algorithm (initial step, stages, mixed RMS error norm,
step-size control, interpolation through the output times), so in float64 it takes the
same steps: the same evaluations, the same accepted and rejected steps, and a solution
equal to rounding (the sums over stages and over the state run in another order).

Like test_engine_ops.py, this needs the CPU extension: it is part of the project, and a
failed build fails these tests rather than skipping them.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torchdiffeq import odeint
from torchdiffeq._impl.adaptive_heun import AdaptiveHeunSolver
from torchdiffeq._impl.bosh3 import Bosh3Solver
from torchdiffeq._impl.dopri5 import Dopri5Solver

import sparsekern
from sparsekern import SparseConfig
from sparsekern.backends import cpu

SOLVERS = {"dopri5": Dopri5Solver, "bosh3": Bosh3Solver, "adaptive_heun": AdaptiveHeunSolver}
MODES = ("exact", "hutchinson", "none")  # the log-density by exact trace, by probe, or none
TIMES = (0.0, 0.3, 0.7, 1.0)
# torchdiffeq's defaults (RKAdaptiveStepsizeODESolver.__init__)
SAFETY, IFACTOR, DFACTOR, MAX_STEPS = 0.9, 10.0, 0.2, 2**31 - 1
F64_TOL = 1e-12


@pytest.fixture(scope="module")
def ext():
    return cpu.extension()


def tableau(method: str):
    """rk_solve's (a, c_sol, c_err, c_mid, order) from torchdiffeq's solver class."""
    solver = SOLVERS[method]
    tab = solver.tableau
    s = len(tab.c_sol)
    a = torch.zeros(s - 1, s - 1, dtype=torch.float64)
    for i, row in enumerate(tab.beta):
        a[i, : len(row)] = row
    return a, tab.c_sol.double(), tab.c_error.double(), solver.mid.double(), solver.order


def make_field(d: int = 2, width: int = 64, act=nn.Softplus, weight_scale: float = 1.0,
               dead_col: int | None = None, dtype=torch.float64, seed: int = 0):
    """A compiled MLP field d -> width -> width -> d with about 70% of its weights zero;
    ``dead_col``: that input column of the first layer all zero (cols0 leaves it out)."""
    gen = torch.Generator().manual_seed(seed)
    net = nn.Sequential(nn.Linear(d, width), act(), nn.Linear(width, width), act(),
                        nn.Linear(width, d)).double()
    with torch.no_grad():
        for layer in net:
            if isinstance(layer, nn.Linear):
                keep = torch.rand(layer.weight.shape, generator=gen) > 0.7
                layer.weight.mul_(keep.double() * weight_scale)
        if dead_col is not None:
            net[0].weight[:, dead_col] = 0.0
    field = sparsekern.compile_sparse(net.to(dtype), SparseConfig(backend="cpu"))
    assert type(field).__name__ == "FusedMLP"
    return field


def fused_args(f, z: torch.Tensor, mode: str, noise: torch.Tensor | None):
    """(cols0, tan0, probe, values, index, scales, shifts, layouts, act, exact) of rk_solve,
    built as FusedMLP._run_fused builds its mlp_fwd call."""
    values, scales, shifts = f._op_inputs(None, z, save=False)
    cols0 = torch.empty(0, dtype=torch.long) if f.all_cols0 else f.cols0
    b, n0 = z.shape[0], (f.in_dim if f.all_cols0 else f.cols0.numel())
    empty = z.new_empty(0)
    if mode == "exact":
        eye = torch.eye(f.in_dim, dtype=z.dtype)
        units = eye if f.all_cols0 else eye.index_select(1, f.cols0)
        tan0, probe = units[:, :, None].expand(f.in_dim, n0, b), empty
    elif mode == "none":
        tan0, probe = z.new_empty(0, n0, b), empty
    else:
        probe = noise.t().contiguous()[None]
        tan0 = probe if f.all_cols0 else probe.index_select(1, f.cols0)
    return (cols0, tan0, probe, values, f._index_list(), scales, shifts, f.layouts, f.act_id,
            mode == "exact")


class Counted(nn.Module):
    """torchdiffeq's func on the compiled field: evaluations and steps counted."""

    def __init__(self, f, mode: str, noise: torch.Tensor | None) -> None:
        super().__init__()
        self.f, self.mode, self.noise = f, mode, noise
        self.nfe = self.accepted = self.rejected = 0

    def forward(self, t, state):
        self.nfe += 1
        if self.mode == "none":
            return self.f(state)
        z, _ = state
        dz, div = self.f.forward_and_divergence(t, z, self.noise)
        return dz, -div

    def callback_accept_step(self, t0, y0, dt):
        self.accepted += 1

    def callback_reject_step(self, t0, y0, dt):
        self.rejected += 1


def solve_both(ext, f, method: str, mode: str, *, batch: int = 16, times=TIMES,
               rtol: float = 1e-6, atol: float = 1e-8, first_step: float | None = None,
               max_num_steps: int = MAX_STEPS, seed: int = 1, z0: torch.Tensor | None = None):
    """torchdiffeq's solve and rk_solve's of the same problem: (reference, counted func,
    rk_solve's (solution, nfe, accepted, rejected, model seconds)), the reference
    flattened to rk_solve's layout (z feature-major, then the log-densities)."""
    dtype = next(f.parameters()).dtype
    d = f.in_dim
    gen = torch.Generator().manual_seed(seed)
    if z0 is None:
        z0 = torch.randn(batch, d, generator=gen, dtype=torch.float64).to(dtype)
    batch = z0.shape[0]
    noise = torch.randn(batch, d, generator=gen, dtype=torch.float64).to(dtype) \
        if mode == "hutchinson" else None
    logp0 = torch.zeros(batch, dtype=dtype)
    t = torch.tensor(times, dtype=torch.float64)
    options = {} if first_step is None else {"first_step": first_step}
    if max_num_steps != MAX_STEPS:
        options["max_num_steps"] = max_num_steps
    func = Counted(f, mode, noise)
    y_ref = (z0, logp0) if mode != "none" else z0
    with torch.no_grad():
        ref = odeint(func, y_ref, t, rtol=rtol, atol=atol, method=method, options=options)
    if mode == "none":
        ref_flat = ref.transpose(1, 2).reshape(len(t), -1)
    else:
        ref_flat = torch.cat([ref[0].transpose(1, 2).reshape(len(t), -1), ref[1]], 1)
    got = rk_solve(ext, f, method, mode, z0, noise, t, rtol=rtol, atol=atol,
                   first_step=first_step, max_num_steps=max_num_steps)
    return ref_flat, func, got


def rk_solve(ext, f, method, mode, z0, noise, t, *, rtol, atol, first_step=None,
             max_num_steps=MAX_STEPS):
    """rk_solve of dz/dt = f(z) (and dlogp/dt = -div f) from z0 over t (either direction)."""
    batch, d = z0.shape
    has_logp = mode != "none"
    y0 = z0.t().reshape(-1)
    if has_logp:
        y0 = torch.cat([y0, torch.zeros(batch, dtype=z0.dtype)])
    reverse = bool(t[0] > t[1])
    solver_t = -t if reverse else t  # torchdiffeq's _check_inputs: negated times, _ReverseFunc
    segments = [0, d * batch, d * batch, batch] if has_logp else [0, d * batch]
    a, c_sol, c_err, c_mid, order = tableau(method)
    return ext.rk_solve(y0.contiguous(), solver_t.contiguous(), -1.0 if reverse else 1.0, a,
                        c_sol, c_err, c_mid, order, rtol, atol,
                        0.0 if first_step is None else first_step, SAFETY, IFACTOR, DFACTOR,
                        max_num_steps, segments, d, batch, has_logp,
                        *fused_args(f, z0, mode, noise))


def assert_same_solve(ref, func, got, tol=F64_TOL):
    sol, nfe, accepted, rejected, model_seconds = got
    assert (nfe, accepted, rejected) == (func.nfe, func.accepted, func.rejected)
    assert model_seconds > 0  # the time inside the field's kernels, reported for the bench
    assert sol.shape == ref.shape and sol.dtype == ref.dtype
    assert torch.equal(sol[0], ref[0])
    err = (sol - ref).abs()
    bound = tol * (1 + ref.abs())
    assert bool((err <= bound).all()), f"max error {err.max().item():.3e}"


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("method", sorted(SOLVERS))
def test_float64_takes_torchdiffeqs_steps(ext, method, mode):
    f = make_field()
    ref, func, got = solve_both(ext, f, method, mode, rtol=1e-5 if method == "adaptive_heun"
                                else 1e-6, atol=1e-7 if method == "adaptive_heun" else 1e-8)
    assert_same_solve(ref, func, got)
    assert got[2] >= 3  # several steps, through several output times


@pytest.mark.parametrize("mode", MODES)
def test_pruned_input_dimension_gathers_cols0(ext, mode):
    # A state dimension no first-layer weight reads: neuron reduction leaves it out of
    # cols0, so every evaluation gathers the read rows of z first.
    f = make_field(d=3, act=nn.Tanh, dead_col=1)
    assert not f.all_cols0 and f.cols0.tolist() == [0, 2]
    ref, func, got = solve_both(ext, f, "dopri5", mode)
    assert_same_solve(ref, func, got)


@pytest.mark.parametrize("mode", ["exact", "none"])
def test_backward_in_time(ext, mode):
    # times [1, 0]: torchdiffeq negates them and the field; rk_solve gets [-1, 0], sign -1.
    f = make_field(act=nn.Tanh)
    ref, func, got = solve_both(ext, f, "dopri5", mode, times=(1.0, 0.6, 0.0))
    assert_same_solve(ref, func, got)


def test_stiff_field_rejects_steps(ext):
    f = make_field(act=nn.Tanh, weight_scale=8.0)
    ref, func, got = solve_both(ext, f, "dopri5", "hutchinson", batch=8)
    assert got[3] > 0
    assert_same_solve(ref, func, got)


@pytest.mark.parametrize("method", ["dopri5", "adaptive_heun"])
def test_given_first_step(ext, method):
    f = make_field()
    ref, func, got = solve_both(ext, f, method, "exact", first_step=0.05, rtol=1e-5, atol=1e-7)
    assert got[1] == func.nfe == 1 + (len(SOLVERS[method].tableau.c_sol) - 1) * (got[2] + got[3])
    assert_same_solve(ref, func, got)


def test_batch_of_one(ext):
    f = make_field()
    ref, func, got = solve_both(ext, f, "bosh3", "hutchinson", batch=1)
    assert_same_solve(ref, func, got)


def test_max_num_steps_raises_like_torchdiffeq(ext):
    f = make_field()
    with pytest.raises(AssertionError, match=r"max_num_steps exceeded \(2>=2\)"):
        solve_both(ext, f, "dopri5", "none", max_num_steps=2, rtol=1e-9, atol=1e-11)
    z0 = torch.randn(4, 2, dtype=torch.float64)
    t = torch.tensor(TIMES, dtype=torch.float64)
    with pytest.raises(RuntimeError, match=r"sparsekern rk_solve: max_num_steps exceeded \(2>=2\)"):
        rk_solve(ext, f, "dopri5", "none", z0, None, t, rtol=1e-9, atol=1e-11, max_num_steps=2)


def test_non_finite_state_and_dt_underflow_raise(ext):
    f = make_field()
    t = torch.tensor([0.0, 1.0], dtype=torch.float64)
    z0 = torch.randn(4, 2, dtype=torch.float64)
    z0[1, 0] = float("inf")
    # A given first step: the step is taken, and the state check refuses it.
    with pytest.raises(RuntimeError, match="sparsekern rk_solve: non-finite values in the state"):
        rk_solve(ext, f, "dopri5", "none", z0, None, t, rtol=1e-6, atol=1e-8, first_step=0.1)
    with pytest.raises(AssertionError, match="non-finite values in state"):
        odeint(lambda t, z: f(z), z0, t, method="dopri5", options={"first_step": 0.1})
    # A chosen first step: it is NaN, torchdiffeq takes min_step = 0, and time cannot advance.
    z0[1, 0] = float("nan")
    with pytest.raises(RuntimeError, match="sparsekern rk_solve: dt underflow"):
        rk_solve(ext, f, "dopri5", "none", z0, None, t, rtol=1e-6, atol=1e-8)
    with pytest.raises(AssertionError, match="underflow in dt"):
        odeint(lambda t, z: f(z), z0, t, method="dopri5")


@pytest.mark.parametrize("mode", ["hutchinson", "none"])
@pytest.mark.parametrize("method", ["dopri5", "bosh3"])
def test_float32_follows_torchdiffeq(ext, method, mode):
    f = make_field(dtype=torch.float32)
    rtol, atol = 1e-4, 1e-6
    batch = 16
    ref, func, (sol, _, accepted, _, _) = solve_both(ext, f, method, mode, batch=batch,
                                                  rtol=rtol, atol=atol)
    assert sol.dtype == torch.float32
    assert abs(accepted - func.accepted) <= 1
    # Both solutions are within their solver's global error of the true one: at most the
    # sum of the local errors of the accepted steps, and a step is accepted when the RMS
    # norm of error / (atol + rtol |y|) is at most 1, so each entry's local error is at
    # most sqrt(n) (atol + rtol |y|) for a norm segment of n entries.
    n = max(func.accepted, accepted)
    bound = 2 * n * math.sqrt(f.in_dim * batch) * (atol + rtol * ref.abs().max())
    assert (sol - ref).abs().max().item() <= bound.item()


def test_inputs_are_checked(ext):
    f = make_field()
    z0 = torch.randn(4, 2, dtype=torch.float64)
    t = torch.tensor(TIMES, dtype=torch.float64)
    a, c_sol, c_err, c_mid, order = tableau("dopri5")
    good = dict(y0=z0.t().reshape(-1).contiguous(), times=t, sign=1.0, a=a, c_sol=c_sol,
                c_err=c_err, c_mid=c_mid, segments=[0, 8])

    def call(**change):
        args = {**good, **change}
        return ext.rk_solve(args["y0"], args["times"], args["sign"], args["a"], args["c_sol"],
                            args["c_err"], args["c_mid"], order, 1e-6, 1e-8, 0.0, SAFETY,
                            IFACTOR, DFACTOR, MAX_STEPS, args["segments"], 2, 4, False,
                            *fused_args(f, z0, "none", None))

    assert call()[0].shape == (len(TIMES), 8)
    cases = [
        (dict(y0=good["y0"][:7]), "y0 has 7 entries, expected d\\*B = 8"),
        (dict(y0=good["y0"].float()), "values\\[0\\] is Double, y0 Float"),
        (dict(times=t.float()), "times must be a 1-D float64"),
        (dict(times=t.flip(0)), "times must be strictly increasing"),
        (dict(times=t[:1]), "at least 2"),
        (dict(sign=0.5), "sign must be"),
        (dict(a=a[:-1]), "a must be \\[S-1, S-1\\]"),
        (dict(c_err=c_err[:-1]), "c_err and c_mid"),
        (dict(segments=[0, 9]), "norm segment 0"),
        (dict(segments=[0]), "segments must be"),
    ]
    for change, message in cases:
        with pytest.raises(RuntimeError, match=message):
            call(**change)


# -- rk_solve_adjoint: the adjoint's backward solve of one interval -------------------


def op_sizes(values, scales, shifts) -> list[int]:
    return [x.numel() for x in (*values, *scales, *shifts)]


def z_blocks(n: int):
    """The z blocks of y and a_y in the flat augmented state [a_t | y | a_y | params]."""
    return (1, 1 + n)


def _swap_z(aug: torch.Tensor, rows: int, cols: int, n: int) -> torch.Tensor:
    """aug with the z blocks of y and a_y, read as [rows, cols], transposed."""
    out = aug.clone()
    for s in z_blocks(n):
        block = aug[..., s:s + rows * cols].unflatten(-1, (rows, cols))
        out[..., s:s + rows * cols] = block.transpose(-1, -2).flatten(-2)
    return out


def aug_to_feature_major(aug: torch.Tensor, d: int, b: int, n: int) -> torch.Tensor:
    """rk_solve_adjoint's layout (z feature-major in y and a_y) from torchdiffeq's."""
    return _swap_z(aug, b, d, n)


def aug_to_batch_major(aug: torch.Tensor, d: int, b: int, n: int) -> torch.Tensor:
    return _swap_z(aug, d, b, n)


def seminorm(segments):
    """torchdiffeq's mixed RMS norm over the given (start, length) slices only."""
    def norm(x):
        return max(x[s:s + k].abs().pow(2).mean().sqrt() for s, k in segments)
    return norm


class AugmentedRef(nn.Module):
    """torchdiffeq.odeint_adjoint's augmented_dynamics on the flat state (batch-major z), in
    forward time: [0 | F(y) | -a_y . dF/dy | -a_y . dF/dparams] by autograd through
    sparsekern.ops.mlp_fwd, F = sign * [f | -div] the forward system's derivative, the
    parameters the op's values, scales and shifts. odeint over decreasing times reverses it."""

    def __init__(self, args, sign: float, d: int, b: int, has_logp: bool) -> None:
        super().__init__()
        cols0, self.tan0, self.probe, values, self.index, scales, shifts, self.layouts, \
            self.act, self.exact = args
        self.cols0 = cols0 if cols0.numel() else None
        self.params = [x.detach() for x in (*values, *scales, *shifts)]
        self.n_values, self.n_scales = len(values), len(scales)
        self.sign, self.d, self.b, self.has_logp = sign, d, b, has_logp
        self.n = d * b + (b if has_logp else 0)
        self.nfe = self.accepted = self.rejected = 0

    def forward(self, t, aug):
        self.nfe += 1
        n, d, b = self.n, self.d, self.b
        y, adj = aug[1:1 + n], aug[1 + n:1 + 2 * n]
        with torch.enable_grad():
            z = y[:d * b].view(b, d).detach().requires_grad_()
            params = [x.clone().requires_grad_() for x in self.params]
            values = params[:self.n_values]
            scales = params[self.n_values:self.n_values + self.n_scales]
            shifts = params[self.n_values + self.n_scales:]
            x0 = z.t() if self.cols0 is None else z.t().index_select(0, self.cols0)
            f, div, _ = sparsekern.ops.mlp_fwd(x0.contiguous(), self.tan0, self.probe, values,
                                               self.index, scales, shifts, self.layouts,
                                               self.act, self.exact, True, "cpu")
            parts = [f.t().reshape(-1), -div] if self.has_logp else [f.t().reshape(-1)]
            dy = self.sign * torch.cat(parts)
            grads = torch.autograd.grad(dy, [z, *params], -adj, allow_unused=True)
        g = [torch.zeros_like(x) if gx is None else gx
             for x, gx in zip([z, *params], grads, strict=True)]
        g_y = torch.cat([g[0].reshape(-1), aug.new_zeros(n - d * b)])
        return torch.cat([aug.new_zeros(1), dy.detach(), g_y, *(x.reshape(-1) for x in g[1:])])

    def callback_accept_step(self, t0, y0, dt):
        self.accepted += 1

    def callback_reject_step(self, t0, y0, dt):
        self.rejected += 1


def adjoint_problem(f, mode: str, *, batch: int = 8, seed: int = 3):
    """A random augmented state (batch-major, as torchdiffeq's) and rk_solve's field args."""
    dtype = next(f.parameters()).dtype
    d = f.in_dim
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(batch, d, generator=gen, dtype=torch.float64).to(dtype)
    noise = torch.randn(batch, d, generator=gen, dtype=torch.float64).to(dtype) \
        if mode == "hutchinson" else None
    has_logp = mode != "none"
    args = fused_args(f, z, mode, noise)
    n = d * batch + (batch if has_logp else 0)
    p = sum(op_sizes(args[3], args[5], args[6]))
    y = torch.cat([z.reshape(-1), torch.randn(batch, generator=gen, dtype=torch.float64)
                   .to(dtype)]) if has_logp else z.reshape(-1)
    rest = torch.randn(1 + n + p, generator=gen, dtype=torch.float64).to(dtype)
    aug = torch.cat([rest[:1], y, rest[1:1 + n], 0.1 * rest[1 + n:]])
    return aug, args, noise, n


def adjoint_segments(d: int, b: int, has_logp: bool) -> list[tuple[int, int]]:
    """The seminorm's slices: a_t, the state's parts, the adjoint's parts."""
    n = d * b + (b if has_logp else 0)
    parts = [(0, d * b), (d * b, b)] if has_logp else [(0, d * b)]
    return [(0, 1)] + [(1 + s, k) for s, k in parts] + [(1 + n + s, k) for s, k in parts]


def rk_solve_adjoint(ext, method, aug_fm, args, d, b, has_logp, sign, s_times, *, rtol, atol,
                     first_step=None, max_num_steps=MAX_STEPS, segments=None):
    a, c_sol, c_err, c_mid, order = tableau(method)
    segs = adjoint_segments(d, b, has_logp) if segments is None else segments
    return ext.rk_solve_adjoint(aug_fm, s_times, sign, a, c_sol, c_err, c_mid, order, rtol, atol,
                                0.0 if first_step is None else first_step, SAFETY, IFACTOR,
                                DFACTOR, max_num_steps, [v for seg in segs for v in seg], d, b,
                                has_logp, *args)


def adjoint_both(ext, f, method: str, mode: str, sign: float, *, batch: int = 8,
                 interval=(0.2, 1.0), rtol: float = 1e-6, atol: float = 1e-8):
    """torchdiffeq's backward solve of the augmented system from t1 to t0 (solver time of the
    forward system) and rk_solve_adjoint's over s = -t: (reference in rk_solve_adjoint's
    layout, its counted func, rk_solve_adjoint's result, the batch-major aug0)."""
    d, has_logp = f.in_dim, mode != "none"
    aug, args, _, n = adjoint_problem(f, mode, batch=batch)
    t0, t1 = interval
    func = AugmentedRef(args, sign, d, batch, has_logp)
    ref = odeint(func, aug, torch.tensor([t1, t0], dtype=torch.float64), rtol=rtol, atol=atol,
                 method=method, options={"norm": seminorm(adjoint_segments(d, batch, has_logp))})
    s_times = torch.tensor([-t1, -t0], dtype=torch.float64)
    got = rk_solve_adjoint(ext, method, aug_to_feature_major(aug, d, batch, n).contiguous(), args,
                           d, batch, has_logp, sign, s_times, rtol=rtol, atol=atol)
    return aug_to_feature_major(ref, d, batch, n), func, got, aug


@pytest.mark.parametrize("sign", [1.0, -1.0])
@pytest.mark.parametrize("mode", MODES)
def test_adjoint_takes_torchdiffeqs_steps(ext, mode, sign):
    f = make_field()
    ref, func, got, _ = adjoint_both(ext, f, "dopri5", mode, sign)
    assert_same_solve(ref, func, got)
    assert got[2] >= 3
    # what the augmented dynamics leave alone: a_t (the field reads no time)
    assert got[0][-1, 0] == ref[0, 0]


@pytest.mark.parametrize("method", ["bosh3", "adaptive_heun"])
def test_adjoint_other_tableaus(ext, method):
    f = make_field(act=nn.Tanh)
    rtol, atol = (1e-5, 1e-7) if method == "adaptive_heun" else (1e-6, 1e-8)
    ref, func, got, _ = adjoint_both(ext, f, method, "hutchinson", -1.0, rtol=rtol, atol=atol)
    assert_same_solve(ref, func, got)


@pytest.mark.parametrize("sign", [1.0, -1.0])
@pytest.mark.parametrize("mode", MODES)
def test_adjoint_pruned_input_dimension(ext, mode, sign):
    # cols0 = [0, 2]: the adjoint of the unread dimension 1 gets no pull-back
    f = make_field(d=3, act=nn.Tanh, dead_col=1)
    assert not f.all_cols0 and f.cols0.tolist() == [0, 2]
    ref, func, got, aug = adjoint_both(ext, f, "dopri5", mode, sign)
    assert_same_solve(ref, func, got)
    b, n = 8, 3 * 8 + (8 if mode != "none" else 0)
    a_y0 = aug_to_feature_major(aug, 3, b, n)[1 + n:1 + n + 3 * b].view(3, b)
    assert torch.equal(got[0][-1, 1 + n:1 + n + 3 * b].view(3, b)[1], a_y0[1])


def test_adjoint_stiff_field_rejects_steps(ext):
    f = make_field(act=nn.Tanh, weight_scale=8.0)
    ref, func, got, _ = adjoint_both(ext, f, "dopri5", "exact", 1.0, batch=4)
    assert got[3] > 0
    assert_same_solve(ref, func, got)


@pytest.mark.parametrize("mode", ["exact", "hutchinson"])
def test_adjoint_equals_the_python_loop(ext, mode):
    # _Augmented over FusedSystem (sparsekern/solver/adjoint.py, native.py) in the Python
    # loop: the same steps, the same result to rounding.
    from sparsekern.protocol import Dynamics
    from sparsekern.solver.adjoint import _Augmented
    from sparsekern.solver.native import FusedSystem
    from sparsekern.solver.rk import Controls, integrate_adaptive
    from sparsekern.solver.tableau import TABLEAUS

    f = make_field(d=3, act=nn.Softplus, dead_col=2)
    b, d, sign = 8, 3, -1.0
    aug, args, noise, n = adjoint_problem(f, mode, batch=b)
    like = f.layers[0].weight.values.detach()
    system = FusedSystem(f, Dynamics(f, divergence=mode, noise=noise),
                         [torch.Size([b, d]), torch.Size([b])], True, sign, like)
    segs = adjoint_segments(d, b, True)
    ctl = Controls(rtol=1e-6, atol=1e-8, segments=tuple(segs))
    t0, t1 = 0.0, 0.8
    with torch.no_grad():
        ys, stats = integrate_adaptive(_Augmented(system, system.op.tensors), aug, [-t1, -t0],
                                       TABLEAUS["dopri5"], ctl, grad=False)
    sol, nfe, accepted, rejected, _ = rk_solve_adjoint(
        ext, "dopri5", aug_to_feature_major(aug, d, b, n).contiguous(), args, d, b, True, sign,
        torch.tensor([-t1, -t0], dtype=torch.float64), rtol=1e-6, atol=1e-8)
    assert (nfe, accepted, rejected) == (stats.nfe, stats.accepted, stats.rejected)
    ref = aug_to_feature_major(torch.stack(ys), d, b, n)
    assert torch.equal(sol[0], ref[0])
    assert bool(((sol - ref).abs() <= F64_TOL * (1 + ref.abs())).all())


def test_adjoint_float32_follows_torchdiffeq(ext):
    f = make_field(dtype=torch.float32)
    rtol, atol = 1e-4, 1e-6
    ref, func, (sol, _, accepted, _, _), _ = adjoint_both(ext, f, "dopri5", "hutchinson", 1.0,
                                                       rtol=rtol, atol=atol)
    assert sol.dtype == torch.float32
    assert abs(accepted - func.accepted) <= 1
    # within the global error bound of test_float32_follows_torchdiffeq, on the largest part
    n = max(func.accepted, accepted)
    bound = 2 * n * math.sqrt(sol.shape[1]) * (atol + rtol * ref.abs().max())
    assert (sol - ref).abs().max().item() <= bound.item()


def test_adjoint_inputs_are_checked(ext):
    f = make_field()
    d, b = 2, 4
    aug, args, _, n = adjoint_problem(f, "none", batch=b)
    aug = aug_to_feature_major(aug, d, b, n).contiguous()
    p = aug.numel() - 1 - 2 * n
    t = torch.tensor([-1.0, 0.0], dtype=torch.float64)

    def call(aug=aug, times=t, sign=1.0, segments=None, has_logp=False, max_num_steps=MAX_STEPS,
             args=args):
        return rk_solve_adjoint(ext, "dopri5", aug, args, d, b, has_logp, sign, times,
                                rtol=1e-6, atol=1e-8, segments=segments,
                                max_num_steps=max_num_steps)

    assert call()[0].shape == (2, 1 + 2 * n + p)
    bad_args = list(args)
    bad_args[0] = torch.tensor([0, 5])
    cases = [
        (dict(aug=aug[:-1]), f"aug0 has {aug.numel() - 1} entries, expected 1 \\+ 2N \\+ P = "
                             f"{aug.numel()}"),
        (dict(has_logp=True), "aug0 has .* entries, expected 1 \\+ 2N \\+ P"),
        (dict(aug=aug.float()), "values\\[0\\] is Double, aug0 Float"),
        (dict(aug=aug[None]), "aug0 must be a contiguous 1-D tensor"),
        (dict(aug=aug.to(torch.int64)), "aug0 must be float32 or float64"),
        (dict(times=t.flip(0)), "times must be strictly increasing"),
        (dict(sign=0.0), "sign must be"),
        (dict(segments=[(0, aug.numel() + 1)]), "norm segment 0"),
        (dict(args=bad_args), "cols0\\[1\\] = 5 is not a state dimension"),
        (dict(max_num_steps=1), "sparsekern rk_solve_adjoint: max_num_steps exceeded \\(1>=1\\)"),
    ]
    for change, message in cases:
        with pytest.raises(RuntimeError, match=message):
            call(**change)
