"""sparsekern.odeint against torchdiffeq on the same compiled fields, step by step.

float64: the same evaluation times in the same order (so the same accepted and
rejected steps and NFE), solutions within 1e-12 and gradients within 1e-10, as
the issue asks. float32: the loop sums stages as torchdiffeq does, but the two
may still round differently; NFE within one step's stages.
"""

from __future__ import annotations

import pytest
import torch
import torchdiffeq
from torch import nn

import sparsekern
from flows.cnf import CNF
from flows.odenet import ODEnet
from sparsekern import MaxStepsError, SolveError, SparseConfig, compile_sparse
from sparsekern.solver import TABLEAUS

F64 = torch.float64
ADAPTIVE = ("dopri5", "bosh3", "adaptive_heun")
FIXED = {"rk4": {"step_size": 0.13}, "euler": {"step_size": 0.1}}


def _field(dtype=F64, scale=1.0, seed=0, time="none", backend="ref"):
    torch.manual_seed(seed)
    net = ODEnet(2, [16, 16], time=time, activation="tanh").to(dtype)
    with torch.no_grad():
        for p in net.parameters():
            if p.dim() == 2:
                p.mul_((torch.rand_like(p) > 0.4).to(dtype) * scale)
    return net, compile_sparse(net, SparseConfig(backend=backend))


class _Recording(nn.Module):
    """Calls ``f`` and records every evaluation time (the same for both solvers)."""

    def __init__(self, f):
        super().__init__()
        self.f, self.times = f, []

    def forward(self, t, z):
        self.times.append(float(t))
        return self.f(t, z)


def _record_calls(field):
    """Patch a compiled field so its calls record their times, whichever solver calls."""
    times = []
    fwd, fad = field.forward, field.forward_and_divergence

    def forward(*args):
        times.append(float(args[0]))
        return fwd(*args)

    def forward_and_divergence(t, z, noise=None):
        times.append(float(t))
        return fad(t, z, noise)

    field.forward, field.forward_and_divergence = forward, forward_and_divergence
    return times


def _tol(dtype):
    return 1e-12 if dtype == F64 else 5e-5


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("method", [*ADAPTIVE, *FIXED])
@pytest.mark.parametrize("times", [[0.0, 1.0], [0.0, 0.3, 0.7, 1.0], [1.0, 0.0],
                                   [0.8, 0.5, -0.2], [0.3]])
def test_tensor_state_same_evaluations_as_torchdiffeq(method, times, seed):
    _, f = _field(scale=2.0, time="concat", seed=seed)
    calls = _record_calls(f)
    z = torch.randn(9, 2, dtype=F64) * (1 + seed)
    t = torch.tensor(times, dtype=F64)
    opts = FIXED.get(method)
    with torch.no_grad():
        ref = torchdiffeq.odeint(f, z, t, rtol=1e-6, atol=1e-8, method=method, options=opts)
        ref_calls = list(calls)
        calls.clear()
        out = sparsekern.odeint(f, z, t, rtol=1e-6, atol=1e-8, method=method, options=opts)
    assert calls == ref_calls  # every evaluation at the same time, in the same order
    assert out.shape == (len(times), 9, 2)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    assert f.last_solve.startswith(f"native {method}")
    assert f"{len(ref_calls)} NFE" in f.last_solve


@pytest.mark.parametrize("method", ADAPTIVE)
def test_float32_within_one_step(method):
    _, f = _field(torch.float32, scale=2.0)
    z = torch.randn(33, 2)
    t = torch.tensor([0.0, 0.5, 1.0])
    n = [0]

    def counted(tt, zz):
        n[0] += 1
        return f(tt, zz)

    with torch.no_grad():
        ref = torchdiffeq.odeint(counted, z, t, rtol=1e-5, atol=1e-6, method=method)
        out = sparsekern.odeint(f, z, t, rtol=1e-5, atol=1e-6, method=method)
    nfe = int(f.last_solve.split(": ")[1].split(" NFE")[0])
    assert abs(nfe - n[0]) <= TABLEAUS[method].stages
    # Both solutions are within the tolerances of the truth; so of each other.
    torch.testing.assert_close(out, ref, rtol=1e-3, atol=1e-4)


def test_stiff_field_rejects_the_same_steps():
    _, f = _field(scale=12.0, seed=3)
    z = 3 * torch.randn(16, 2, dtype=F64)
    t = torch.tensor([0.0, 1.0], dtype=F64)
    rec = _Recording(f)
    with torch.no_grad():
        ref = torchdiffeq.odeint(rec, z, t, rtol=1e-7, atol=1e-9)
        out = sparsekern.odeint(f, z, t, rtol=1e-7, atol=1e-9)
    rejected = int(f.last_solve.split(", ")[-1].split(" rejected")[0])
    assert rejected > 0
    assert f"{len(rec.times)} NFE" in f.last_solve
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


def _flow(time, adjoint, train_T, divergence="hutchinson", seed=0):
    torch.manual_seed(seed)
    net = ODEnet(2, [16, 16], time=time, activation="softplus").double()
    cnf = CNF(net, divergence=divergence, adjoint=adjoint, atol=1e-8, rtol=1e-6, T=0.7,
              train_T=train_T).double()
    with torch.no_grad():
        for p in net.parameters():
            if p.dim() == 2:
                p.mul_((torch.rand_like(p) > 0.5).double())
    return compile_sparse(cnf, SparseConfig(backend="ref"))


def _loss_and_grads(flow, x, engine):
    flow.solver_engine = engine
    torch.manual_seed(1)  # the same Hutchinson noise
    xx = x.clone().requires_grad_(True)
    loss = flow.log_prob(xx).sum()
    grads = torch.autograd.grad(loss, [xx, *flow.parameters()])
    return loss.detach(), grads, flow.nfe_forward, flow.nfe_backward


@pytest.mark.parametrize("time", ["none", "concatsquash"])
@pytest.mark.parametrize("adjoint", [False, True])
@pytest.mark.parametrize("train_T", [False, True])
@pytest.mark.parametrize("divergence", ["hutchinson", "exact"])
def test_flow_log_prob_and_gradients_equal_torchdiffeq(time, adjoint, train_T, divergence):
    flow = _flow(time, adjoint, train_T, divergence)
    x = torch.randn(13, 2, dtype=F64)
    ref = _loss_and_grads(flow, x, "torchdiffeq")
    out = _loss_and_grads(flow, x, "auto")
    assert out[2:] == ref[2:]  # NFE forward and backward
    torch.testing.assert_close(out[0], ref[0], rtol=1e-12, atol=1e-12)
    for a, b in zip(out[1], ref[1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    assert flow.odefunc.odenet.last_solve.startswith("native dopri5")


def test_sampling_backward_in_time_equals_torchdiffeq():
    flow = _flow("concatsquash", adjoint=True, train_T=False)
    z = torch.randn(7, 2, dtype=F64)
    flow.solver_engine = "torchdiffeq"
    ref = flow.sample(z=z)
    flow.solver_engine = "auto"
    out = flow.sample(z=z)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


def test_adjoint_default_norm_and_tensor_state():
    _, f = _field(scale=1.5, time="concat")
    z = torch.randn(5, 2, dtype=F64, requires_grad=True)
    t = torch.tensor([0.0, 0.4, 1.0], dtype=F64, requires_grad=True)
    params = list(f.parameters())
    res = []
    for solve in (torchdiffeq.odeint_adjoint, lambda *a, **k: sparsekern.odeint(*a, adjoint=True,
                                                                                 **k)):
        y = solve(f, z, t, rtol=1e-7, atol=1e-9)
        res.append(torch.autograd.grad(y[1:].square().sum(), [z, t, *params]))
    for a, b in zip(*res, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_max_num_steps_is_a_clear_error():
    _, f = _field()
    z = torch.randn(4, 2, dtype=F64)
    t = torch.tensor([0.0, 1.0], dtype=F64)
    with pytest.raises(AssertionError, match="max_num_steps"):
        torchdiffeq.odeint(f, z, t, rtol=1e-9, atol=1e-9, options={"max_num_steps": 2})
    with pytest.raises(MaxStepsError, match=r"max_num_steps exceeded \(2>=2\)"):
        sparsekern.odeint(f, z, t, rtol=1e-9, atol=1e-9, options={"max_num_steps": 2})


def test_non_finite_state_is_a_clear_error():
    _, f = _field()
    z = torch.randn(4, 2, dtype=F64)
    z[1, 0] = float("nan")
    with pytest.raises(SolveError, match="non-finite"):
        sparsekern.odeint(f, z, torch.tensor([0.0, 1.0], dtype=F64))


@pytest.mark.parametrize("method, options, reason", [
    ("midpoint", None, "method 'midpoint' is not native"),
    ("dopri5", {"step_t": torch.tensor([0.5])}, "step_t"),
    ("dopri5", {"norm": lambda x: x.abs().max()}, "custom error norm"),
])
def test_fallback_to_torchdiffeq_names_the_reason(method, options, reason):
    _, f = _field()
    z = torch.randn(4, 2, dtype=F64)
    t = torch.tensor([0.0, 1.0], dtype=F64)
    with torch.no_grad():
        out = sparsekern.odeint(f, z, t, method=method, options=options)
        ref = torchdiffeq.odeint(f, z, t, method=method, options=options)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    assert f.last_solve.startswith("torchdiffeq (") and reason in f.last_solve
    assert reason in f.summary()


def test_uncompiled_function_goes_to_torchdiffeq():
    def func(t, y):
        return -y

    y = sparsekern.odeint(func, torch.ones(3, dtype=F64), torch.tensor([0.0, 1.0], dtype=F64))
    torch.testing.assert_close(y[-1], torch.full((3,), torch.e ** -1, dtype=F64), rtol=1e-6,
                               atol=1e-7)


@pytest.mark.parametrize("y0, t, error, match", [
    (torch.ones(2, 2, dtype=torch.int64), torch.tensor([0.0, 1.0]), TypeError,
     "z is torch.int64"),  # not native: torchdiffeq calls the field, which says so
    ((torch.ones(2, 2), torch.ones(2, 2)), torch.tensor([0.0, 1.0]), ValueError,
     r"\(z \[B, \.\.\.\], logp \[B\]\)"),
    ((torch.ones(2, 2), torch.ones(2), torch.ones(2)), torch.tensor([0.0, 1.0]), ValueError,
     "tuple state"),
    ([torch.ones(2, 2)], torch.tensor([0.0, 1.0]), TypeError, "tensor or a tuple"),
    (torch.ones(2, 2), torch.tensor([[0.0, 1.0]]), ValueError, "1-D floating tensor"),
    (torch.ones(2, 2), torch.tensor([0.0, 1.0, 0.5]), ValueError, "strictly increasing"),
])
def test_bad_input_is_one_clear_error(y0, t, error, match):
    _, f = _field(torch.float32)
    with pytest.raises(error, match=match):
        sparsekern.odeint(f, y0, t)


@pytest.mark.parametrize("divergence", ["hutchinson", "exact"])
@pytest.mark.parametrize("reverse", [False, True])
def test_cpp_loop_on_the_cpu_backend(divergence, reverse):
    """On the C++ kernels a time-free field's whole no-grad solve runs in the C++ loop
    (csrc/cpu/rk_solve.cpp), the adjoint's forward solve too."""
    torch.manual_seed(0)
    net = ODEnet(3, [16, 16], time="none", activation="softplus").double()
    with torch.no_grad():
        for p in net.parameters():
            if p.dim() == 2:
                p.mul_((torch.rand_like(p) > 0.5).double())
        net.layers[0].weight[:, 1] = 0  # a state dim no layer reads: a gather of rows
    flow = CNF(net, divergence=divergence, adjoint=True, atol=1e-8, rtol=1e-6).double()
    comp = compile_sparse(flow, SparseConfig(backend="cpu"))
    field = comp.odefunc.odenet
    assert not field.all_cols0
    x = torch.randn(11, 3, dtype=F64)
    res = {}
    for engine in ("torchdiffeq", "auto"):
        comp.solver_engine = engine
        torch.manual_seed(1)
        with torch.no_grad():
            out = comp.sample(z=x) if reverse else comp.log_prob(x)
        res[engine] = (out, comp.nfe_forward)
    assert res["auto"][1] == res["torchdiffeq"][1]
    torch.testing.assert_close(res["auto"][0], res["torchdiffeq"][0], rtol=1e-12, atol=1e-12)
    assert "(c++ loop)" in field.last_solve
    ref = _loss_and_grads(comp, x, "torchdiffeq")
    out = _loss_and_grads(comp, x, "auto")
    # The adjoint's forward solve and its backward solves.
    assert "(c++ loop)" in field.last_solve.split("; adjoint")[0]
    assert "; adjoint native dopri5 (c++ loop)" in field.last_solve
    assert out[2:] == ref[2:]
    for a, b in zip(out[1], ref[1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("method", list(FIXED))
@pytest.mark.parametrize("backend", ["ref", "cpu"])
def test_fixed_step_adjoint_of_a_fused_field(method, backend):
    """The fused system's adjoint with a fixed-step method (no C++ loop: the Python one)."""
    net, _ = _field()
    flow = CNF(net, adjoint=True, solver=method, solver_options=FIXED[method]).double()
    comp = compile_sparse(flow, SparseConfig(backend=backend))
    x = torch.randn(6, 2, dtype=F64)
    ref = _loss_and_grads(comp, x, "torchdiffeq")
    out = _loss_and_grads(comp, x, "auto")
    assert out[2:] == ref[2:]
    for a, b in zip(out[1], ref[1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("backend", ["ref", "cpu"])
def test_one_output_time_returns_the_initial_state(backend):
    _, f = _field(backend=backend)
    z = torch.randn(4, 2, dtype=F64)
    t = torch.tensor([0.5], dtype=F64)
    with torch.no_grad():
        ref = torchdiffeq.odeint(f, z, t)
        out = sparsekern.odeint(f, z, t)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


def test_hutchinson_without_noise_is_a_clear_error():
    flow = _flow("none", adjoint=False, train_T=False)
    z = torch.randn(4, 2, dtype=F64)
    flow.odefunc.noise = None
    with pytest.raises(RuntimeError, match="Hutchinson noise was not drawn"):
        sparsekern.odeint(flow.odefunc, (z, torch.zeros(4, dtype=F64)),
                          torch.tensor([0.0, 1.0], dtype=F64))


@pytest.mark.parametrize("backend", ["ref", "cpu"])
def test_solver_errors_are_the_same_classes_on_every_loop(backend):
    """The C++ loop's failures raise the Python loop's classes."""
    _, f = _field(backend=backend)
    z = torch.randn(4, 2, dtype=F64)
    t = torch.tensor([0.0, 1.0], dtype=F64)
    with torch.no_grad():
        with pytest.raises(MaxStepsError, match="max_num_steps exceeded"):
            sparsekern.odeint(f, z, t, rtol=1e-9, atol=1e-9, options={"max_num_steps": 2})
        bad = z.clone()
        bad[0, 0] = float("inf")
        with pytest.raises(SolveError, match="non-finite"):
            sparsekern.odeint(f, bad, t, options={"first_step": 0.1})
    assert f.last_solve is None or "torchdiffeq" not in f.last_solve


def test_a_field_that_blows_up_fails_as_torchdiffeq_does():
    """A NaN error estimate gives a NaN step, then an underflow: not endless growth."""
    _, f = _field()
    with torch.no_grad():
        next(f.parameters()).view(-1)[0] = float("nan")  # kept values: no compile check
    z = torch.randn(4, 2, dtype=F64)
    t = torch.tensor([0.0, 1.0], dtype=F64)
    with pytest.raises(AssertionError, match="underflow"):
        torchdiffeq.odeint(f, z, t, options={"first_step": 0.1})
    with pytest.raises(SolveError, match=r"underflow|non-finite"):
        sparsekern.odeint(f, z, t, options={"first_step": 0.1})


@pytest.mark.parametrize("options, match", [({"first_step": 0.0}, "first_step"),
                                            ({"step_size": -0.1}, "step_size")])
def test_step_sizes_must_be_positive(options, match):
    _, f = _field()
    method = "euler" if "step_size" in options else "dopri5"
    with pytest.raises(ValueError, match=match):
        sparsekern.odeint(f, torch.randn(3, 2, dtype=F64), torch.tensor([0.0, 1.0], dtype=F64),
                          method=method, options=options)


def test_event_handling_goes_to_torchdiffeq():
    _, f = _field()
    z = torch.randn(3, 2, dtype=F64)
    t0 = torch.tensor([0.0], dtype=F64)

    def event(t, y):
        return t - 0.25

    with torch.no_grad():
        t_ev, _ = sparsekern.odeint(f, z, torch.cat([t0, t0 + 1]), event_fn=event)
    assert abs(float(t_ev) - 0.25) < 1e-6
    assert "event handling" in f.last_solve


# -- the device loop (step control on the device; CUDA's default) -------------------


@pytest.mark.parametrize("method", ADAPTIVE)
@pytest.mark.parametrize("times", [[0.0, 0.3, 0.7, 1.0], [1.0, 0.0], [0.4],
                                   torch.linspace(0, 1, 41).tolist()])
@pytest.mark.parametrize("sync_every", [1, 3, 8])
def test_device_loop_takes_the_host_loops_steps(method, times, sync_every):
    """Masked steps, outputs and counters on the device: the same evaluations, numbers
    and NFE as the host loop (and so torchdiffeq), whatever the steps between two
    looks; several outputs in one step (41 times); steps that are rejected."""
    _, f = _field(scale=4.0, seed=2, time="concat")
    calls = _record_calls(f)
    z = torch.randn(9, 2, dtype=F64)
    t = torch.tensor(times, dtype=F64)
    rtol = 1e-3 if len(times) > 10 else 1e-6
    with torch.no_grad():
        ref = torchdiffeq.odeint(f, z, t, rtol=rtol, atol=1e-8, method=method)
        ref_calls = list(calls)
        calls.clear()
        out = sparsekern.odeint(f, z, t, rtol=rtol, atol=1e-8, method=method,
                                options={"sync_every": sync_every})
    n_ref = len(ref_calls)
    assert "(device loop)" in f.last_solve and f": {n_ref} NFE," in f.last_solve
    # The same evaluations in the same order; then the masked ones of the last window.
    assert calls[:n_ref] == ref_calls
    assert len(calls) - n_ref < sync_every * (TABLEAUS[method].stages - 1) or len(times) < 2
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


def test_device_loop_rejects_the_host_loops_steps():
    _, f = _field(scale=12.0, seed=3)
    z = 3 * torch.randn(16, 2, dtype=F64)
    t = torch.tensor([0.0, 1.0], dtype=F64)
    with torch.no_grad():
        ref = sparsekern.odeint(f, z, t, rtol=1e-7, atol=1e-9)
        host = f.last_solve
        out = sparsekern.odeint(f, z, t, rtol=1e-7, atol=1e-9, options={"sync_every": 4})
    assert int(host.split(", ")[-1].split(" rejected")[0]) > 0
    assert f.last_solve.split(": ")[1] == host.split(": ")[1]
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


@pytest.mark.parametrize("sync_every", [0, 3])
def test_max_num_steps_counts_per_output_interval(sync_every):
    """More steps in all than max_num_steps, fewer between two output times: a solve,
    as torchdiffeq's (its count restarts at every output time)."""
    _, f = _field(scale=2.0)
    z = torch.randn(5, 2, dtype=F64)
    t = torch.linspace(0, 1, 11, dtype=F64)
    opts = {"max_num_steps": 3}
    with torch.no_grad():
        ref = torchdiffeq.odeint(f, z, t, rtol=1e-8, atol=1e-9, options=opts)
        out = sparsekern.odeint(f, z, t, rtol=1e-8, atol=1e-9,
                                options={**opts, "sync_every": sync_every})
    steps = int(f.last_solve.split(", ")[1].split(" steps")[0])
    assert steps > 3
    assert ("device" in f.last_solve) == (sync_every > 0)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


def test_device_loop_errors_are_the_host_loops():
    _, f = _field()
    z = torch.randn(4, 2, dtype=F64)
    t = torch.tensor([0.0, 1.0], dtype=F64)
    with torch.no_grad():
        with pytest.raises(MaxStepsError, match="max_num_steps exceeded"):
            sparsekern.odeint(f, z, t, rtol=1e-9, atol=1e-9,
                              options={"max_num_steps": 2, "sync_every": 4})
        bad = z.clone()
        bad[0, 0] = float("nan")
        with pytest.raises(SolveError, match="non-finite"):
            sparsekern.odeint(f, bad, t, options={"sync_every": 2})
    for bad in ({"sync_every": -1}, {"sync_every": True}, {"cuda_graph": "yes"}):
        with pytest.raises(ValueError, match=r"sync_every|cuda_graph"):
            sparsekern.odeint(f, z, t, options=bad)


@pytest.mark.parametrize("time", ["none", "concatsquash"])
def test_device_loop_adjoint_equals_torchdiffeq(time):
    """A flow trained on the device loop: the same NFE and gradients as torchdiffeq.
    (flows passes adjoint_options={"norm": "seminorm"}, which, as in torchdiffeq,
    replace the forward's options: its backward solves run the host loop here, the
    device loop on CUDA, where it is the default.)"""
    flow = _flow(time, adjoint=True, train_T=True)
    x = torch.randn(7, 2, dtype=F64)
    ref = _loss_and_grads(flow, x, "torchdiffeq")
    flow.solver_options = {"sync_every": 5}
    out = _loss_and_grads(flow, x, "auto")
    assert flow.odefunc.odenet.last_solve.startswith("native dopri5 (device loop)")
    assert out[2:] == ref[2:]
    for a, b in zip(out[1], ref[1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("seminorm", [False, True])
def test_device_loop_adjoint_backward_solves(seminorm):
    """The adjoint's backward solves on the device loop too (its own options)."""
    _, f = _field(scale=1.5, time="concat")
    z = torch.randn(5, 2, dtype=F64, requires_grad=True)
    t = torch.tensor([0.0, 0.4, 1.0], dtype=F64, requires_grad=True)
    params = list(f.parameters())
    back = {"norm": "seminorm"} if seminorm else {}
    res = []
    for solve, extra in ((torchdiffeq.odeint_adjoint, {}), (sparsekern.odeint, {"sync_every": 3})):
        kw = {"adjoint": True} if solve is sparsekern.odeint else {}
        y = solve(f, z, t, rtol=1e-7, atol=1e-9, options=dict(extra) or None,
                  adjoint_options={**back, **extra}, **kw)
        res.append(torch.autograd.grad(y[1:].square().sum(), [z, t, *params]))
    assert f.last_solve.count("(device loop)") == 2
    for a, b in zip(*res, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("cuda_graph", [False, True])
def test_cuda_solve_keeps_its_step_control_on_the_device(cuda_graph):
    """On CUDA the device loop is the default; with cuda_graph its steps replay as one
    captured graph. The same steps and results as the host loop on the CPU."""
    net, _ = _field(scale=2.0)
    f_cpu = compile_sparse(net, SparseConfig(backend="ref"))
    f_gpu = compile_sparse(net.cuda(), SparseConfig(backend="ref"))  # float64 on any GPU
    z = torch.randn(64, 2, dtype=F64)
    t = torch.tensor([0.0, 0.5, 1.0], dtype=F64)
    with torch.no_grad():
        ref = sparsekern.odeint(f_cpu, z, t, rtol=1e-6, atol=1e-8)
        out = sparsekern.odeint(f_gpu, z.cuda(), t.cuda(), rtol=1e-6, atol=1e-8,
                                options={"cuda_graph": cuda_graph})
    assert ("(device+graph loop)" if cuda_graph else "(device loop)") in f_gpu.last_solve
    assert f_gpu.last_solve.split(": ")[1] == f_cpu.last_solve.split(": ")[1]
    torch.testing.assert_close(out.cpu(), ref, rtol=1e-9, atol=1e-9)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("cuda_graph", [False, True])
def test_cuda_flow_training_step_on_the_device_loop(cuda_graph):
    """A flow's (z, logp) state and its adjoint (several norm parts) on the device loop,
    CUDA graphs too: the same NFE and gradients as torchdiffeq on the GPU."""
    flow = _flow("none", adjoint=True, train_T=False).cuda()
    x = torch.randn(32, 2, dtype=F64, device="cuda")
    ref = _loss_and_grads(flow, x, "torchdiffeq")
    flow.solver_options = {"cuda_graph": cuda_graph}
    out = _loss_and_grads(flow, x, "auto")
    forward, backward = flow.odefunc.odenet.last_solve.split("; adjoint ")
    assert ("(device+graph loop)" if cuda_graph else "(device loop)") in forward
    assert "(device loop)" in backward  # flows' adjoint_options: the default on CUDA
    assert out[2:] == ref[2:]
    for a, b in zip(out[1], ref[1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
