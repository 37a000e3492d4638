"""Compiled bare vector fields as the ``func`` of torchdiffeq's odeint and odeint_adjoint.

DESIGN.md: a compiled field "works as the func of torchdiffeq odeint and odeint_adjoint"
with the same NFE. Here the fields are handed to the solver directly (not through
flows.CNF): dopri5 must take the same steps, reach the same final state, and give the
same gradients w.r.t. the initial state and the kept weights as the dense masked model.
"""

from __future__ import annotations

import pytest
import torch
from engine_helpers import (
    DEVICE,
    F32_TOL,
    F64_TOL,
    Counted,
    assert_as_accurate,
    compiled_grads,
    dense_grads,
    randn,
    random_mask,
    rel_err,
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
    assert abs(nfe_fast - nfe) <= 0.02 * nfe
    assert abs(nfe_back_fast - nfe_back) <= 0.02 * max(nfe_back, 1)
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
    # float32 (measured: final state and z0 gradient within 2e-7 of the dense model's).
    assert rel_err(z_fast, z_end) <= 1e-4
    assert rel_err(grads_fast["z0"], grads["z0"]) <= 1e-4
    # Against the same solve in float64 (same steps, so it is this solve's truth), the
    # compiled field is as accurate as the dense float32 one: final state and z0 gradient
    # within max(1e-5, 2x the dense error); the kept-parameter gradients jointly (the vector
    # an optimiser steps along) likewise, and per tensor within 4x. Small parameter
    # gradients carry the float32 adjoint's own error, up to 2e-3 for the dense model, and
    # the compiled one's was measured up to 1.8x the dense one's on a single tensor.
    twin = detached_copy(net).double()
    z64, nfe64, grads64, _ = _solve(twin, z0.double(), adjoint, tol)
    assert nfe64 == nfe
    assert_as_accurate(z_fast, z_end, z64, "final state")
    assert_as_accurate(grads_fast["z0"], grads["z0"], grads64["z0"], "z0")
    names = sorted(set(grads_fast) - {"z0"})
    joint = [torch.cat([d[n].flatten() for n in names]) for d in (grads_fast, grads, grads64)]
    assert_as_accurate(*joint, "all parameter gradients")
    for name in names:
        err, dense_err = rel_err(grads_fast[name], grads64[name]), rel_err(grads[name],
                                                                           grads64[name])
        assert err <= max(F32_TOL, 4 * dense_err), f"{name}: {err:.3g} (dense {dense_err:.3g})"
