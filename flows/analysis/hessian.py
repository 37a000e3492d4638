"""Eigenanalysis of the loss Hessian with respect to the kept parameters (paper Sec. 4.4).

Everything is matrix-free: Hessian-vector products by double backward. A
pruned model is analysed as the smaller model it is: every probe vector is
zero at pruned coordinates, and so is every product, so the spectrum is that
of the Hessian restricted to the kept parameters.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn

Vector = list[torch.Tensor]


def kept_masks(model: nn.Module) -> tuple[list[nn.Parameter], Vector]:
    """(parameters, masks): each trainable parameter with a 0/1 mask of its kept entries.

    Masks come from ``weight_mask`` / ``bias_mask`` buffers (``flows.prune``);
    parameters without one are kept whole.
    """
    params, masks = [], []
    owners = {id(p): (m, n) for m in model.modules() for n, p in m.named_parameters(recurse=False)}
    for p in model.parameters():
        if not p.requires_grad:
            continue
        module, name = owners[id(p)]
        mask = getattr(module, f"{name}_mask", None)
        params.append(p)
        masks.append(torch.ones_like(p) if mask is None else mask.to(p).detach())
    return params, masks


def _dot(a: Vector, b: Vector) -> torch.Tensor:
    return sum((x * y).sum() for x, y in zip(a, b, strict=True))


def _scale(a: Vector, s: float | torch.Tensor) -> Vector:
    return [x * s for x in a]


def _axpy(alpha: float | torch.Tensor, x: Vector, y: Vector) -> Vector:
    return [alpha * xi + yi for xi, yi in zip(x, y, strict=True)]


class HessianOperator:
    """v -> H v for the Hessian of ``loss_fn()`` in the kept parameters of ``model``.

    Args:
        model: the module whose parameters the loss depends on.
        loss_fn: () -> scalar loss; it must be deterministic (fixed data and,
            for Hutchinson divergence, fixed noise) so every product sees the
            same function.

    ``dim`` is the number of kept coordinates; ``products`` counts H v calls.
    """

    def __init__(self, model: nn.Module, loss_fn: Callable[[], torch.Tensor]) -> None:
        self.params, self.masks = kept_masks(model)
        if not self.params:
            raise ValueError(f"{type(model).__name__} has no trainable parameters")
        self.loss_fn = loss_fn
        self.dim = int(sum(m.sum().item() for m in self.masks))
        self.products = 0

    def random(self, generator: torch.Generator, kind: str = "gaussian") -> Vector:
        """A random probe, zero at pruned coordinates (Gaussian or Rademacher)."""
        out = []
        for p, m in zip(self.params, self.masks, strict=True):
            if kind == "rademacher":
                r = torch.randint(0, 2, p.shape, generator=generator).to(p) * 2 - 1
            else:
                r = torch.randn(p.shape, generator=generator).to(p)
            out.append(r * m)
        return out

    def __call__(self, v: Vector) -> Vector:
        self.products += 1
        with torch.enable_grad():
            loss = self.loss_fn()
            grads = torch.autograd.grad(loss, self.params, create_graph=True, allow_unused=True)
            grads = [
                torch.zeros_like(p) if g is None else g
                for p, g in zip(self.params, grads, strict=True)
            ]
            gv = _dot(grads, v)
            hv = torch.autograd.grad(gv, self.params, allow_unused=True)
        return [
            (torch.zeros_like(p) if h is None else h.detach()) * m
            for p, h, m in zip(self.params, hv, self.masks, strict=True)
        ]


@dataclass
class HessianStats:
    """Results of ``analyze_hessian``; ``*_stderr`` are standard errors of stochastic estimates."""

    lambda_max: float
    trace: float
    trace_stderr: float
    lambda_min: float
    condition_number: float
    kept_parameters: int
    power_iterations: int
    power_converged: bool
    trace_samples: int
    lanczos_steps: int
    ritz_values: list[float]

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def power_iteration(
    op: HessianOperator,
    iters: int = 100,
    tol: float = 1e-4,
    generator: torch.Generator | None = None,
) -> tuple[float, int, bool]:
    """Eigenvalue of largest magnitude by power iteration.

    Returns (eigenvalue, iterations used, converged): stops when the Rayleigh
    quotient changes by less than ``tol`` relative.
    """
    g = generator or torch.Generator().manual_seed(0)
    v = op.random(g)
    v = _scale(v, 1 / torch.sqrt(_dot(v, v)))
    lam = 0.0
    for i in range(1, iters + 1):
        hv = op(v)
        new = _dot(v, hv).item()
        norm = torch.sqrt(_dot(hv, hv))
        if norm == 0:
            return 0.0, i, True
        v = _scale(hv, 1 / norm)
        if i > 1 and abs(new - lam) <= tol * max(abs(new), 1e-30):
            return new, i, True
        lam = new
    return lam, iters, False


def hutchinson_trace(
    op: HessianOperator, samples: int = 50, generator: torch.Generator | None = None
) -> tuple[float, float]:
    """tr(H) by Hutchinson's estimator with Rademacher probes: (mean, standard error)."""
    if samples < 2:
        raise ValueError(f"trace needs at least 2 samples for an error bar, got {samples}")
    g = generator or torch.Generator().manual_seed(1)
    vals = []
    for _ in range(samples):
        v = op.random(g, "rademacher")
        vals.append(_dot(v, op(v)).item())
    t = torch.tensor(vals, dtype=torch.float64)
    return t.mean().item(), (t.std() / math.sqrt(samples)).item()


def lanczos(
    op: HessianOperator, steps: int = 30, generator: torch.Generator | None = None
) -> list[float]:
    """Ritz values of H from ``steps`` Lanczos steps with full reorthogonalisation.

    The extreme Ritz values converge first: the smallest approximates
    lambda_min, the largest lambda_max. Returns them sorted ascending.
    """
    steps = min(steps, op.dim)
    g = generator or torch.Generator().manual_seed(2)
    q = op.random(g)
    q = _scale(q, 1 / torch.sqrt(_dot(q, q)))
    basis: list[Vector] = []
    alphas, betas = [], []
    for _ in range(steps):
        basis.append(q)
        w = op(q)
        alpha = _dot(w, q)
        alphas.append(alpha.item())
        # Full reorthogonalisation: plain Lanczos loses orthogonality in floating
        # point and then reports ghost copies of converged eigenvalues.
        for _ in range(2):
            for b in basis:
                w = _axpy(-_dot(w, b), b, w)
        beta = torch.sqrt(_dot(w, w))
        if beta.item() <= 1e-10 * max(1.0, abs(alphas[-1])):
            break
        betas.append(beta.item())
        q = _scale(w, 1 / beta)
    k = len(alphas)
    t = torch.diag(torch.tensor(alphas, dtype=torch.float64))
    if k > 1:
        off = torch.tensor(betas[: k - 1], dtype=torch.float64)
        t += torch.diag(off, 1) + torch.diag(off, -1)
    return torch.linalg.eigvalsh(t).tolist()


def analyze_hessian(
    model: nn.Module,
    loss_fn: Callable[[], torch.Tensor],
    power_iters: int = 100,
    tol: float = 1e-4,
    trace_samples: int = 50,
    lanczos_steps: int = 30,
    seed: int = 0,
) -> HessianStats:
    """Largest eigenvalue, trace, smallest eigenvalue and condition number of the loss Hessian.

    Args:
        model: the model; only its kept coordinates are probed.
        loss_fn: () -> deterministic scalar loss of the model.
        power_iters, tol: power-iteration budget and relative tolerance.
        trace_samples: Rademacher probes for the trace (error bar: standard error).
        lanczos_steps: Lanczos steps for the smallest eigenvalue.
        seed: seeds all probes.

    The condition number is |lambda_max| / |lambda_min| with lambda_min the
    algebraically smallest eigenvalue (Lanczos' lowest Ritz value): for a
    positive definite Hessian the usual kappa; the Hessian of a trained flow is
    often slightly indefinite, and then it compares the curvature scales.
    """
    op = HessianOperator(model, loss_fn)
    lam_max, n_iter, converged = power_iteration(
        op, power_iters, tol, torch.Generator().manual_seed(seed)
    )
    trace, trace_se = hutchinson_trace(op, trace_samples, torch.Generator().manual_seed(seed + 1))
    ritz = lanczos(op, lanczos_steps, torch.Generator().manual_seed(seed + 2))
    lam_min = min(ritz)
    cond = abs(lam_max) / abs(lam_min) if lam_min != 0 else math.inf
    return HessianStats(
        lambda_max=lam_max,
        trace=trace,
        trace_stderr=trace_se,
        lambda_min=lam_min,
        condition_number=cond,
        kept_parameters=op.dim,
        power_iterations=n_iter,
        power_converged=converged,
        trace_samples=trace_samples,
        lanczos_steps=len(ritz),
        ritz_values=ritz,
    )


def normalise_to_first(
    rows: Sequence[dict[str, float]], keys: Sequence[str]
) -> list[dict[str, float]]:
    """Table 4's format: each value divided by the first row's (the unpruned flow)."""
    base = rows[0]
    return [
        {k: (r[k] / base[k] if base[k] not in (0, 0.0) else math.nan) for k in keys} for r in rows
    ]
