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

# DESIGN.md: fp32 within 1e-5 relative, float64 to 1e-12 (issue: 1e-10). Errors are
# measured norm-wise, ||got - ref|| / ||ref||, so that sums with cancellation in
# one entry do not dominate.
RTOL = {torch.float32: 1e-5, torch.float64: 1e-12}
F64_F_TOL = 1e-12  # float64: f itself
F64_TOL = 1e-10  # float64: divergences and every gradient
F32_TOL = 1e-5  # float32: f against the float64 truth; the floor of every other quantity
DENSITIES = (0.0, 0.5, 0.9, 0.99, 1.0)


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


def contract_tol(dtype: torch.dtype, ref_err: float, forward: bool = False) -> float:
    """The engine contract's tolerance on a relative error. float64: F64_F_TOL for f
    (``forward``), F64_TOL for everything else. float32, errors against a float64 truth:
    F32_TOL for f, else max(F32_TOL, 2 x ``ref_err``, the float32 reference's own error)."""
    if dtype == torch.float64:
        return F64_F_TOL if forward else F64_TOL
    return F32_TOL if forward else max(F32_TOL, 2 * ref_err)


def assert_as_accurate(got: torch.Tensor, ref: torch.Tensor, truth: torch.Tensor,
                       what: str = "") -> None:
    """float32 ``got`` is as accurate as the float32 reference ``ref`` it replaces: its error
    against the float64 ``truth`` is at most max(F32_TOL, 2 x the error of ``ref``)."""
    err, ref_err = rel_err(got, truth), rel_err(ref, truth)
    tol = contract_tol(torch.float32, ref_err)
    assert err <= tol, f"{what}: relative error {err:.3g} > {tol:.3g} (reference: {ref_err:.3g})"


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
