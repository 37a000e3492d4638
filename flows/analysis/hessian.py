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

from flows.analysis.settings import ANALYSIS_SETTINGS, check_analysis_arguments
from flows.settings import Setting

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
        on_product: called with ``stage`` after every product (progress bars).

    ``dim`` is the number of kept coordinates; ``products`` counts H v calls;
    ``stage`` is a free label of the current computation, passed to ``on_product``.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[[], torch.Tensor],
        on_product: Callable[[str], None] | None = None,
    ) -> None:
        self.params, self.masks = kept_masks(model)
        if not self.params:
            raise ValueError(f"{type(model).__name__} has no trainable parameters")
        self.loss_fn = loss_fn
        self.on_product = on_product
        self.dim = int(sum(m.sum().item() for m in self.masks))
        self.products = 0
        self.stage = ""

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
        out = [
            (torch.zeros_like(p) if h is None else h.detach()) * m
            for p, h, m in zip(self.params, hv, self.masks, strict=True)
        ]
        if self.on_product is not None:
            self.on_product(self.stage)
        return out


CONDITION_NUMBER_DEFINITION = (
    "|lambda_max| / |lambda_min| with lambda_max and lambda_min the algebraically largest "
    "and smallest eigenvalues of the Hessian over the kept coordinates; the usual 2-norm "
    "condition number when the Hessian is positive definite"
)


@dataclass
class HessianStats:
    """Results of ``analyze_hessian``.

    ``lambda_max``, ``lambda_min`` and ``condition_number`` are means over
    ``repeats`` runs from independent random start vectors and ``*_std`` their
    sample standard deviations (None for a single run); the per-run values are
    in ``*_repeats``. ``trace_stderr`` is the standard error of the Hutchinson
    estimate. ``power_iterations`` and ``lanczos_iterations`` are the most
    products one run used; ``*_converged`` hold when every run met its tolerance.
    ``ritz_values`` are the first run's.
    """

    lambda_max: float
    lambda_max_std: float | None
    lambda_min: float
    lambda_min_std: float | None
    condition_number: float
    condition_number_std: float | None
    spectral_radius: float
    trace: float
    trace_stderr: float
    kept_parameters: int
    repeats: int
    power_iterations: int
    power_converged: bool
    trace_samples: int
    lanczos_iterations: int
    lanczos_converged: bool
    lanczos_residual: float
    lambda_max_repeats: list[float]
    lambda_min_repeats: list[float]
    ritz_values: list[float]

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def power_iteration(
    op: HessianOperator,
    iters: int = 100,
    tol: float = 1e-4,
    generator: torch.Generator | None = None,
    shift: float = 0.0,
) -> tuple[float, int, bool]:
    """The eigenvalue of H farthest from ``shift``, by power iteration on H - shift I.

    With ``shift=0`` that is the eigenvalue of largest magnitude, which is
    negative when H has a negative eigenvalue larger in magnitude than its
    largest positive one; ``largest_eigenvalue`` shifts to get lambda_max.

    Returns (eigenvalue, iterations used, converged): the eigenvalue is the
    Rayleigh quotient v^T H v of the last unit iterate; iteration stops when the
    Rayleigh quotient of H - shift I changes by less than ``tol`` relative
    (``tol=0``: take every iteration).
    """
    ANALYSIS_SETTINGS["power_iters"].check("iters", iters)
    ANALYSIS_SETTINGS["tol"].check("tol", tol)
    g = generator or torch.Generator().manual_seed(0)
    v = op.random(g)
    v = _scale(v, 1 / torch.sqrt(_dot(v, v)))
    lam = 0.0
    for i in range(1, iters + 1):
        hv = op(v)
        if shift:
            hv = _axpy(-shift, v, hv)
        new = _dot(v, hv).item()
        norm = torch.sqrt(_dot(hv, hv))
        if norm == 0:
            return shift, i, True
        v = _scale(hv, 1 / norm)
        if i > 1 and abs(new - lam) <= tol * max(abs(new), 1e-30):
            return new + shift, i, True
        lam = new
    return lam + shift, iters, False


def largest_eigenvalue(
    op: HessianOperator,
    iters: int = 100,
    tol: float = 1e-4,
    generator: torch.Generator | None = None,
) -> tuple[float, float, int, bool]:
    """The algebraically largest eigenvalue lambda_max of H, by (shifted) power iteration.

    Power iteration finds the dominant eigenvalue mu. If mu >= 0 it is
    lambda_max. If mu < 0, every eigenvalue is >= mu, so power iteration on
    H - mu I (spectrum >= 0) converges to lambda_max - mu.

    Returns (lambda_max, |mu| (the spectral radius), products used, converged).
    """
    g = generator or torch.Generator().manual_seed(0)
    mu, n, converged = power_iteration(op, iters, tol, g)
    if mu >= 0:
        return mu, abs(mu), n, converged
    stage = op.stage
    op.stage = f"{stage} shifted".strip()
    lam, n2, converged2 = power_iteration(op, iters, tol, g, shift=mu)
    op.stage = stage
    return lam, abs(mu), n + n2, converged and converged2


def hutchinson_trace(
    op: HessianOperator, samples: int = 50, generator: torch.Generator | None = None
) -> tuple[float, float]:
    """tr(H) by Hutchinson's estimator with Rademacher probes: (mean, standard error)."""
    if not isinstance(samples, int) or samples < 2:
        raise ValueError(f"trace needs at least 2 samples for an error bar, got {samples}")
    g = generator or torch.Generator().manual_seed(1)
    vals = []
    for _ in range(samples):
        v = op.random(g, "rademacher")
        vals.append(_dot(v, op(v)).item())
    t = torch.tensor(vals, dtype=torch.float64)
    return t.mean().item(), (t.std() / math.sqrt(samples)).item()


@dataclass
class LanczosResult:
    """``lanczos``'s answer: Ritz values (ascending), steps taken, convergence of the smallest.

    ``residual`` is beta_k |s_k|, the residual norm ||H y - theta y|| of the
    smallest Ritz pair (theta, y), s its eigenvector of the tridiagonal T_k; H
    has an eigenvalue within ``residual`` of theta.
    """

    ritz_values: list[float]
    iterations: int
    converged: bool
    residual: float


def lanczos(
    op: HessianOperator,
    steps: int = 30,
    generator: torch.Generator | None = None,
    tol: float = 0.0,
) -> LanczosResult:
    """Ritz values of H from at most ``steps`` Lanczos steps with full reorthogonalisation.

    The extreme Ritz values converge first: the smallest approximates
    lambda_min, the largest lambda_max (every Ritz value lies in
    [lambda_min, lambda_max]). After step k the smallest Ritz value theta has
    the residual estimate beta_k |s_k| (``LanczosResult.residual``); iteration
    stops, converged, once it is at most ``tol * |theta|`` (so theta is within a
    relative ``tol`` of an eigenvalue). ``tol=0`` takes every step. It is also
    converged when the Krylov space becomes invariant (beta_k ~ 0) or spans all
    ``op.dim`` kept coordinates: the Ritz values are then eigenvalues.
    """
    Setting("int", ge=1).check("steps", steps)
    ANALYSIS_SETTINGS["lanczos_tol"].check("tol", tol)
    steps = min(steps, op.dim)
    g = generator or torch.Generator().manual_seed(2)
    q = op.random(g)
    q = _scale(q, 1 / torch.sqrt(_dot(q, q)))
    basis: list[Vector] = []
    alphas: list[float] = []
    betas: list[float] = []
    ritz: list[float] = []
    residual = math.inf
    converged = False
    for k in range(1, steps + 1):
        basis.append(q)
        w = op(q)
        alpha = _dot(w, q)
        alphas.append(alpha.item())
        # Full reorthogonalisation: plain Lanczos loses orthogonality in floating
        # point and then reports ghost copies of converged eigenvalues.
        for _ in range(2):
            for b in basis:
                w = _axpy(-_dot(w, b), b, w)
        beta = torch.sqrt(_dot(w, w)).item()
        invariant = beta <= 1e-10 * max(1.0, abs(alphas[-1]))
        t = torch.diag(torch.tensor(alphas, dtype=torch.float64))
        if k > 1:
            off = torch.tensor(betas, dtype=torch.float64)
            t += torch.diag(off, 1) + torch.diag(off, -1)
        theta, s = torch.linalg.eigh(t)
        ritz = theta.tolist()
        residual = 0.0 if invariant else beta * abs(s[-1, 0].item())
        if invariant or k == op.dim or (tol > 0 and residual <= tol * abs(ritz[0])):
            converged = True
            break
        betas.append(beta)
        q = _scale(w, 1 / beta)
    return LanczosResult(ritz, len(alphas), converged, residual)


def _mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (None for fewer than two finite values)."""
    t = torch.tensor(values, dtype=torch.float64)
    if len(values) < 2 or not torch.isfinite(t).all():
        return t.mean().item(), None
    return t.mean().item(), t.std().item()


def analyze_hessian(
    model: nn.Module,
    loss_fn: Callable[[], torch.Tensor],
    power_iters: int = 100,
    tol: float = 1e-4,
    trace_samples: int = 50,
    lanczos_steps: int = 30,
    seed: int = 0,
    *,
    lanczos_tol: float = 0.0,
    repeats: int = 1,
    on_product: Callable[[str], None] | None = None,
) -> HessianStats:
    """Largest and smallest eigenvalue, condition number and trace of the loss Hessian.

    Args:
        model: the model; only its kept coordinates are probed.
        loss_fn: () -> deterministic scalar loss of the model.
        power_iters, tol: power-iteration budget and relative tolerance.
        trace_samples: Rademacher probes for the trace (error bar: standard error).
        lanczos_steps, lanczos_tol: Lanczos budget and relative tolerance on the
            smallest Ritz value's residual (0: take every step; see ``lanczos``).
        seed: seeds all probes.
        repeats: runs of power iteration and Lanczos from independent start
            vectors (seeds ``seed + 1000 r``); with two or more, ``*_std`` give
            their spread as error bars.
        on_product: called with the current stage after every Hessian-vector product.

    lambda_max is the larger of the (shifted, see ``largest_eigenvalue``)
    power-iteration estimate and Lanczos' largest Ritz value: both are Rayleigh
    quotients, hence lower bounds on the true lambda_max, so the larger is the
    better. lambda_min is Lanczos' smallest Ritz value. The condition number is
    ``CONDITION_NUMBER_DEFINITION``: for an indefinite Hessian (common for a
    trained flow) it compares the curvature scales at the two ends of the
    spectrum rather than being the 2-norm condition number.
    """
    check_analysis_arguments(
        power_iters=power_iters,
        tol=tol,
        trace_samples=trace_samples,
        lanczos_steps=lanczos_steps,
        seed=seed,
        lanczos_tol=lanczos_tol,
        repeats=repeats,
    )
    op = HessianOperator(model, loss_fn, on_product)
    if op.dim == 0:
        raise ValueError("every parameter is pruned: the Hessian has no kept coordinates")
    lam_maxs, lam_mins, conds, radii = [], [], [], []
    power_n, lanczos_n, residual = 0, 0, 0.0
    power_ok = lanczos_ok = True
    first_ritz: list[float] = []
    for r in range(repeats):
        tag = f" {r + 1}/{repeats}" if repeats > 1 else ""
        op.stage = "power" + tag
        lam_max, radius, n_iter, converged = largest_eigenvalue(
            op, power_iters, tol, torch.Generator().manual_seed(seed + 1000 * r)
        )
        op.stage = "lanczos" + tag
        lz = lanczos(
            op, lanczos_steps, torch.Generator().manual_seed(seed + 2 + 1000 * r), lanczos_tol
        )
        lam_max = max(lam_max, lz.ritz_values[-1])
        lam_min = lz.ritz_values[0]
        lam_maxs.append(lam_max)
        lam_mins.append(lam_min)
        conds.append(abs(lam_max) / abs(lam_min) if lam_min != 0 else math.inf)
        radii.append(max(radius, abs(lam_max), abs(lam_min)))
        power_n, power_ok = max(power_n, n_iter), power_ok and converged
        lanczos_n, lanczos_ok = max(lanczos_n, lz.iterations), lanczos_ok and lz.converged
        residual = max(residual, lz.residual)
        first_ritz = first_ritz or lz.ritz_values
    op.stage = "trace"
    trace, trace_se = hutchinson_trace(op, trace_samples, torch.Generator().manual_seed(seed + 1))
    lam_max_mean, lam_max_std = _mean_std(lam_maxs)
    lam_min_mean, lam_min_std = _mean_std(lam_mins)
    cond_mean, cond_std = _mean_std(conds)
    return HessianStats(
        lambda_max=lam_max_mean,
        lambda_max_std=lam_max_std,
        lambda_min=lam_min_mean,
        lambda_min_std=lam_min_std,
        condition_number=cond_mean,
        condition_number_std=cond_std,
        spectral_radius=max(radii),
        trace=trace,
        trace_stderr=trace_se,
        kept_parameters=op.dim,
        repeats=repeats,
        power_iterations=power_n,
        power_converged=power_ok,
        trace_samples=trace_samples,
        lanczos_iterations=lanczos_n,
        lanczos_converged=lanczos_ok,
        lanczos_residual=residual,
        lambda_max_repeats=lam_maxs,
        lambda_min_repeats=lam_mins,
        ritz_values=first_ritz,
    )


def normalise_to_first(
    rows: Sequence[dict[str, float]], keys: Sequence[str]
) -> list[dict[str, float]]:
    """Table 4's format: each value divided by the first row's (the unpruned flow)."""
    base = rows[0]
    return [
        {k: (r[k] / base[k] if base[k] not in (0, 0.0) else math.nan) for k in keys} for r in rows
    ]
