"""Shared helpers of the engine tests: tolerances, random masks, device and backends."""

from __future__ import annotations

import os

import torch
from torch import nn

from sparsekern.linear import KeptTensor


# The device the engine tests build their tensors and models on: "cpu" unless the
# environment says otherwise (SPARSEKERN_TEST_DEVICE=cuda on a GPU machine).
class Counted(nn.Module):
    """func(t, z) for torchdiffeq that counts its evaluations (``nfe``)."""

    def __init__(self, field: nn.Module) -> None:
        super().__init__()
        self.field = field
        self.nfe = 0

    def forward(self, t, z):
        self.nfe += 1
        return self.field(t, z)


DEVICE = torch.device(os.environ.get("SPARSEKERN_TEST_DEVICE", "cpu"))

# The contract (docs/design.md, sections 3 and 5): float64 f within 1e-12 and everything
# else within 1e-10 of the dense masked model; float32 by the rule below. Errors are
# measured norm-wise, ||got - ref|| / ||ref||, so that sums with cancellation in
# one entry do not dominate.
RTOL = {torch.float32: 1e-5, torch.float64: 1e-12}
F64_F_TOL = 1e-12  # float64: f itself
F64_TOL = 1e-10  # float64: divergences and every gradient
F32_TOL = 1e-5  # float32: the contract's bound on f against the float64 truth
DENSITIES = (0.0, 0.5, 0.9, 0.99, 1.0)

# float32's unit roundoff: the largest relative error of one rounding to nearest.
U32 = 2.0**-24


def rounding_floor(terms: int) -> float:
    """The float32 rounding floor of a result whose longest chain of dependent sums adds
    ``terms`` terms in all: terms x u, the worst-case relative error of a recursive sum of
    that many terms (Higham, Accuracy and Stability of Numerical Algorithms, eq. 4.4),
    whatever order or kernel the machine's BLAS sums in."""
    return terms * U32


def program_terms(fan_ins: list[int], batch: int, tangents: int = 1) -> int:
    """``rounding_floor``'s terms for one evaluation of an MLP with its divergence and its
    gradients: every layer's fan-in along the forward (and, transposed, the backward) path,
    the batch (summed into every weight gradient) and the tangents (summed into a trace)."""
    return 2 * sum(fan_ins) + batch + tangents


def field_terms(net: nn.Module, batch: int, tangents: int = 1) -> int:
    """``program_terms`` of a field's linear layers."""
    fan_ins = [m.in_features for m in net.modules() if isinstance(m, nn.Linear)]
    return program_terms(fan_ins, batch, tangents)


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    got, ref = got.detach().double().cpu(), ref.detach().double().cpu()
    assert got.shape == ref.shape, (got.shape, ref.shape)
    scale = max(ref.norm().item(), 1e-30)
    return (got - ref).norm().item() / scale


def assert_close(got: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, factor: float = 1.0,
                 what: str = "") -> None:
    tol = RTOL[dtype] * factor
    err = rel_err(got, ref)
    assert err <= tol, f"{what}: relative error {err:.3g} > {tol:.1g}"


def contract_tol(dtype: torch.dtype, ref_err: float, terms: int, forward: bool = False) -> float:
    """The engine contract's tolerance on a relative error. float64: F64_F_TOL for f
    (``forward``), F64_TOL for everything else. float32, errors against a float64 truth:
    as accurate as the float32 reference ``ref_err`` it replaces, 2 x its error plus the
    rounding floor of ``terms`` sums (``rounding_floor``); for f also at least the
    contract's F32_TOL. The factor 2: two float32 computations of the same quantity that
    sum in other orders (a sparse kernel, a BLAS) have errors of the same size, not equal
    ones; the floor covers a reference that happens to round better than its bound."""
    if dtype == torch.float64:
        return F64_F_TOL if forward else F64_TOL
    bound = 2 * ref_err + rounding_floor(terms)
    return max(F32_TOL, bound) if forward else bound


def assert_as_accurate(got: torch.Tensor, ref: torch.Tensor, truth: torch.Tensor, terms: int,
                       what: str = "", slack: float = 0.0) -> None:
    """float32 ``got`` is as accurate as the float32 reference ``ref`` it replaces: its error
    against the float64 ``truth`` is within ``contract_tol`` of the reference's, plus
    ``slack`` (``step_slack``: solves that took other steps)."""
    err, ref_err = rel_err(got, truth), rel_err(ref, truth)
    tol = contract_tol(torch.float32, ref_err, terms) + slack
    assert err <= tol, f"{what}: relative error {err:.3g} > {tol:.3g} (reference: {ref_err:.3g})"


# Evaluations of one dopri5 step (six stages; the seventh is the next step's first).
DOPRI5_STEP_NFE = 6
# A solve that takes other steps than its reference has another discretisation error: each
# step's local error is held below the solver tolerance, and a changed step moves the ones
# after it, so its result may differ by several tolerances; 10 is the stated allowance.
STEP_SLACK_TOLERANCES = 10


def assert_same_steps(nfe: int, nfe_ref: int, dtype: torch.dtype, what: str = "") -> None:
    """Solver evaluations of a solve against its reference's: equal in float64; in float32
    within one dopri5 step either way (rounding can tip one step's error estimate across the
    tolerance, on one machine's kernels and not another's)."""
    allowed = 0 if dtype == torch.float64 else DOPRI5_STEP_NFE
    assert abs(nfe - nfe_ref) <= allowed, (
        f"{what}: {nfe} evaluations against {nfe_ref} (allowed difference {allowed})")


def step_slack(nfe: int, nfe_ref: int, tol: float) -> float:
    """The extra relative error allowed to a solve whose evaluations differ from its
    reference's: 0 for the same steps, else STEP_SLACK_TOLERANCES x the solver tolerance."""
    return 0.0 if nfe == nfe_ref else STEP_SLACK_TOLERANCES * tol


def solve_terms(terms: int, nfe: int) -> int:
    """``rounding_floor``'s terms for a solve: one evaluation's ``terms`` (``field_terms``)
    for each step, whose update sums its stages' rounded results into the state."""
    return terms * -(-nfe // DOPRI5_STEP_NFE)


def randn(shape, gen: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    """Standard normal numbers drawn in float64 on the CPU (the same values whatever the
    dtype and device), cast to ``dtype`` on DEVICE."""
    return torch.randn(tuple(shape), generator=gen, dtype=torch.float64).to(DEVICE, dtype)


def random_mask(rows: int, cols: int, density: float, gen: torch.Generator,
                empty_row: int | None = None, empty_col: int | None = None) -> torch.Tensor:
    mask = torch.rand(rows, cols, generator=gen) < density
    if density == 1.0:
        mask[:] = True
    if empty_row is not None and rows > 1:
        mask[empty_row] = False
    if empty_col is not None and cols > 1:
        mask[:, empty_col] = False
    return mask


def masked_grad(model: nn.Module, name: str) -> torch.Tensor:
    """The gradient of a dense model's parameter ``name`` at its kept places only (zero where
    pruned: where its ``*_mask`` is zero or, without a mask, where a weight matrix is zero)."""
    p = model.get_parameter(name)
    grad = p.grad if p.grad is not None else torch.zeros_like(p)
    owner = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
    attr = name.rpartition(".")[2].removesuffix("_orig")
    m = getattr(owner, f"{attr}_mask", None)
    if m is not None:
        return grad * m
    if p.dim() >= 2:
        return grad * (p != 0)
    return grad


def dense_grads(model: nn.Module) -> dict[str, torch.Tensor]:
    """``masked_grad`` of every parameter of a dense model, by name."""
    return {name: masked_grad(model, name).detach() for name, _ in model.named_parameters()}


def compiled_grads(fast: nn.Module, source: nn.Module) -> dict[str, torch.Tensor]:
    """The gradient of every kept tensor of a compiled field that received one, scattered to
    the dense shape and named as the source's parameter (``weight`` or ``weight_orig``)."""
    params = dict(source.named_parameters())
    out = {}
    for m in fast.modules():
        if isinstance(m, KeptTensor) and m.values.grad is not None:
            g = m.values.grad.new_zeros(m.shape).flatten()
            g[m.flat_index] = m.values.grad
            name = m.name if m.name in params else m.name + "_orig"
            assert name in params, f"compiled tensor {m.name} has no source parameter"
            out[name] = g.view(m.shape).detach()
    # The generic tier leaves parameters off the state path (a time gate, a hypernetwork)
    # dense, under their source names.
    module = getattr(fast, "module", None)
    if isinstance(module, nn.Module):
        for name, p in module.named_parameters():
            if name in params and p.grad is not None:
                out[name] = p.grad.detach()
    return out


# The C++ extension is part of the project: CI builds it, and a failed build fails
# the tests rather than skipping them. The GPU backends run on CUDA tensors only.
BACKENDS = ("ref", "cpu") if DEVICE.type == "cpu" else ("ref", "triton", "cuda")
FAST_BACKENDS = tuple(b for b in BACKENDS if b != "ref")
