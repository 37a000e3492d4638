"""Compiled bare vector fields as the ``func`` of torchdiffeq's odeint and odeint_adjoint.

The contract (docs/design.md): a compiled field works as the func of torchdiffeq odeint and
odeint_adjoint with the same NFE. Here the fields are handed to the solver directly (not through
flows.CNF): dopri5 must take the same steps, reach the same final state, and give the
same gradients w.r.t. the initial state and the kept weights as the dense masked model.
"""

from __future__ import annotations

import pytest
import torch
from engine_helpers import (
    DEVICE,
    F64_TOL,
    Counted,
    assert_as_accurate,
    assert_same_steps,
    compiled_grads,
    dense_grads,
    field_terms,
    randn,
    random_mask,
    rel_err,
    solve_terms,
    step_slack,
)
from torch import nn
from torch.nn.utils import prune as torch_prune
from torchdiffeq import odeint, odeint_adjoint

from flows import ODEnet
from flows.prune import apply_masks_, ensure_masks
from sparsekern import FusedMLP, GenericField, SparseConfig, compile_sparse
from sparsekern.generic import detached_copy

# Solver tolerances per dtype: float32 cannot resolve much below 1e-6.
TOLERANCES = {torch.float32: 1e-5, torch.float64: 1e-8}


class HyperField(nn.Module):
    """A vector field nobody here wrote: torchdyn-style layers with a time gate, pruned with
    torch.nn.utils.prune (weight_orig * weight_mask)."""

    def __init__(self, d: int, hidden: int) -> None:
        super().__init__()
        self.inp = nn.Linear(d, hidden)
        self.gate = nn.Linear(1, hidden)
        self.mid = nn.Linear(hidden, hidden)
        self.out = nn.Linear(hidden, d)

    def forward(self, t, z):
        h = torch.tanh(self.inp(z)) * torch.sigmoid(self.gate(t.reshape(1, 1)))
        return self.out(nn.functional.softplus(self.mid(h)))


def _field(kind: str, dtype: torch.dtype) -> nn.Module:
    """A field with 80% of its weights pruned at random (global magnitude pruning of a fresh
    model would remove its whole small-weight output layer: a constant field)."""
    torch.manual_seed(30)
    if kind == "hyper":
        net = HyperField(3, 37).to(dtype)
        for m in (net.inp, net.mid, net.out):
            torch_prune.random_unstructured(m, "weight", amount=0.8)
    else:
        net = ODEnet(3, (37, 59), time="concatsquash", activation="tanh").to(dtype)
        gen = torch.Generator().manual_seed(30)
        with torch.no_grad():
            for _, m in ensure_masks(net):
                m.weight_mask.copy_(random_mask(*m.weight.shape, 0.2, gen))
        apply_masks_(net)
    return net.to(DEVICE)


def _solve(field, z0, adjoint: bool, tol: float, source=None):
    """Final state, NFE of the solve, gradients of a fixed linear loss (w.r.t. z0 and the
    kept weights) and NFE of the backward. ``source``: the dense field ``field`` compiles."""
    dtype = z0.dtype
    func = Counted(field)
    z0 = z0.clone().requires_grad_()
    ts = torch.tensor([0.0, 1.0], dtype=dtype, device=DEVICE)
    # The adjoint's step control on the state only ("seminorm"): with torchdiffeq's default
    # it also weighs the parameter adjoints, whose RMS differs between a dense weight (with
    # its pruned places) and the kept values, so the backward would take other steps.
    kw = {"adjoint_options": {"norm": "seminorm"}} if adjoint else {}
    solve = odeint_adjoint if adjoint else odeint
    z_end = solve(func, z0, ts, method="dopri5", rtol=tol, atol=tol, **kw)[-1]
    nfe = func.nfe
    weights = randn(z_end.shape, torch.Generator().manual_seed(31), dtype)
    field.zero_grad(set_to_none=True)
    (z_end * weights).sum().backward()
    grads = dense_grads(field) if source is None else compiled_grads(field, source)
    grads["z0"] = z0.grad.detach()
    return z_end.detach(), nfe, grads, func.nfe - nfe


@pytest.mark.parametrize("adjoint", [False, True], ids=["odeint", "odeint_adjoint"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", ["fused", "generic", "hyper"])
def test_compiled_field_as_the_func_of_odeint(kind, dtype, adjoint):
    net = _field(kind, dtype)
    tier = "generic" if kind == "generic" else "auto"
    fast = compile_sparse(net, SparseConfig(tier=tier))
    assert isinstance(fast, FusedMLP if kind == "fused" else GenericField)
    z0 = randn((37, 3), torch.Generator().manual_seed(32), dtype)
    tol = TOLERANCES[dtype]
    z_end, nfe, grads, nfe_back = _solve(net, z0, adjoint, tol)
    z_fast, nfe_fast, grads_fast, nfe_back_fast = _solve(fast, z0, adjoint, tol, source=net)
    assert nfe > 12  # a real adaptive solve, not a single step
    assert_same_steps(nfe_fast, nfe, dtype, "forward solve")
    assert_same_steps(nfe_back_fast, nfe_back, dtype, "adjoint backward solve")
    assert (nfe_back > 0) == adjoint
    # Every tensor with a nonzero gradient in the dense model has one in the compiled one.
    assert {n for n, g in grads.items() if g.abs().sum() > 0} <= set(grads_fast)
    assert len(grads_fast) >= 7  # z0 and at least the three weight matrices
    if dtype == torch.float64:
        # Measured: final state within 3e-15, gradients within 2e-12.
        assert rel_err(z_fast, z_end) <= F64_TOL
        for name, g in grads_fast.items():
            assert rel_err(g, grads[name]) <= F64_TOL, name
        return
    # float32, against the same solve of the same field in float64. Its forward takes the
    # same steps (one either way allowed), so it is the truth of the forward; the float32
    # adjoint's backward solve takes other steps than the float64 one (measured 26 against
    # 20 evaluations), so the gradients' errors against it hold the float32 backward's
    # discretisation error, which the dense float32 model shares when it takes the same
    # steps. Bound: contract_tol (2 x the dense model's error plus the rounding floor of
    # the solve's sums), plus step_slack where the compiled solve took other steps.
    twin = detached_copy(net).double()
    z64, nfe64, grads64, _ = _solve(twin, z0.double(), adjoint, tol)
    assert_same_steps(nfe, nfe64, dtype, "float32 against float64 forward")
    terms = solve_terms(field_terms(net, z0.shape[0]), nfe + nfe_back)
    slack = (max(step_slack(nfe_fast, nfe, tol), step_slack(nfe_back_fast, nfe_back, tol))
             + step_slack(nfe, nfe64, tol))
    assert_as_accurate(z_fast, z_end, z64, terms, "final state", slack)
    assert_as_accurate(grads_fast["z0"], grads["z0"], grads64["z0"], terms, "z0", slack)
    # The kept-parameter gradients jointly (the vector an optimiser steps along). This also
    # bounds each tensor, in absolute terms, by the whole gradient's noise level: rounding
    # errors of the adjoint state enter every tensor's gradient integral, so a small tensor
    # (whose integral cancels) carries an error of the whole gradient's size, not of its
    # own, and its relative error is one draw of that noise (measured on an AMD EPYC: 4.9e-3
    # generic against 1.1e-3 dense on a tensor whose norm is 0.2% of the whole gradient's).
    # float64 checks every tensor to 1e-10 on its own.
    names = sorted(set(grads_fast) - {"z0"})
    joint = [torch.cat([d[n].flatten() for n in names]) for d in (grads_fast, grads, grads64)]
    assert_as_accurate(*joint, terms, "all parameter gradients", slack)
