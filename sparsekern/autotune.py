"""Choices made by measurement: each layer's layout, and a field's GPU backend.

Layouts (``layout="auto"``, ``choose_layout``).

A cost model fitted once cannot know how a given machine's BLAS compares with
our CSR kernel at a given shape and density, so the model is the measurement
itself: each candidate layout multiplies the layer's own core pattern with a
batch of ``batch_hint`` columns (state plus one tangent, as the fused tier
does), a few times, and the median wins. Clear cases skip the measurement:
above ``DENSE_ABOVE`` density the dense GEMM wins, below ``CSR_BELOW`` CSR does.
Results are cached per (shape, nnz, batch, dtype, backend) for the process.

Backends (``backend="auto"`` on CUDA with ``autotune``, ``fastest_backend``):
each candidate runs the field's own ``forward_and_divergence`` once timed; the
fastest is cached per (device, field structure, candidates, batch).

Both kinds of result live in one process-wide table, ``MEASURED``.
"""

from __future__ import annotations

import statistics
import time
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from sparsekern.formats import BlockedPattern, CSRPattern

if TYPE_CHECKING:
    from sparsekern.field import CompiledField

DENSE_ABOVE = 0.5
CSR_BELOW = 0.05
# Without measuring (autotune=False): the crossover measured on our CPUs, where
# the CSR kernel at 10% density runs about 3x faster than the dense GEMM.
RULE_DENSE_ABOVE = 0.25
REPEATS = 5

# ("layout", ...) or ("backend", ...) -> the choice measured fastest, for the process.
MEASURED: dict[tuple, str] = {}


def median_seconds(fn: Callable[[], object], device: torch.device) -> float:
    """Median seconds of ``fn()`` over ``REPEATS`` runs after one warm-up (device-synchronised)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    fn()
    sync()
    times = []
    for _ in range(REPEATS):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure_layouts(mask: torch.Tensor, n_batch: int, dtype: torch.dtype, backend: str) -> (
    dict[str, float]
):
    """Seconds per product W x for each candidate layout of the core ``mask`` [R, C]."""
    device = mask.device
    r, c = mask.shape
    x = torch.randn(c, n_batch, dtype=dtype, device=device)
    w = torch.randn(r, c, dtype=dtype, device=device) * mask
    out = {"dense": median_seconds(lambda: w @ x, device)}
    if backend != "ref":
        from sparsekern.backends import module as backend_module

        module = backend_module(backend)
        p = CSRPattern.from_mask(mask)
        b = BlockedPattern.from_csr(p)
        vals = w[mask]
        out["csr"] = median_seconds(lambda: module.spmm(*p.tensors(), vals, x, False), device)
        out["blocked"] = median_seconds(
            lambda: module.spmm_blocked(*p.tensors(), vals, *b.tensors(), x), device
        )
    return out


def choose_layout(mask: torch.Tensor, n_batch: int, dtype: torch.dtype, backend: str,
                  measure: bool = True) -> str:
    """"dense", "csr" or "blocked" for a core of kept places ``mask`` [R, C], ``n_batch`` columns.

    ``measure=False`` decides by density alone (``RULE_DENSE_ABOVE``): deterministic.
    """
    r, c = mask.shape
    nnz = int(mask.sum())
    density = nnz / (r * c) if r * c else 1.0
    if r * c == 0 or density >= DENSE_ABOVE:
        return "dense"
    if density <= CSR_BELOW:
        return "csr"
    if backend == "ref" or not measure:
        return "dense" if density >= RULE_DENSE_ABOVE else "csr"
    key = ("layout", r, c, nnz, n_batch, dtype, backend, mask.device.type)
    if key not in MEASURED:
        times = measure_layouts(mask, n_batch, dtype, backend)
        MEASURED[key] = min(times, key=times.__getitem__)
    return MEASURED[key]


def fastest_backend(field: CompiledField, candidates: tuple[str, ...], key: tuple,
                    device: torch.device) -> str | None:
    """The fastest of ``candidates`` for ``field``'s ``forward_and_divergence``, measured once.

    Args:
        field: the compiled field; its ``_sample_call(batch, generator)`` gives
            (t, z, noise) at ``config.batch_hint`` (None: nothing to measure).
        candidates: backend names that run on ``device``.
        key: what the choice depends on (``field._backend_key()``).

    Returns:
        The measured (or cached) choice, or None when the field has no sample
        input. A backend that fails is left out with a warning; the field is
        left on the choice.
    """
    cache_key = ("backend", str(device), key, candidates, field.config.batch_hint)
    if cache_key not in MEASURED:
        gen = torch.Generator(device=device).manual_seed(0)
        sample = field._sample_call(field.config.batch_hint, gen)
        if sample is None:
            return None
        rule = field.backend
        times: dict[str, float] = {}
        with torch.no_grad():
            for backend in candidates:
                field._set_backend(backend)
                try:
                    times[backend] = median_seconds(
                        lambda: field.forward_and_divergence(*sample), device)
                except Exception as exc:
                    warnings.warn(f"sparsekern: backend {backend!r} failed on "
                                  f"{type(field.source).__name__} while choosing the fastest "
                                  f"GPU backend ({type(exc).__name__}: {exc}); left out",
                                  stacklevel=3)
        MEASURED[cache_key] = min(times, key=times.__getitem__) if times else rule
    return MEASURED[cache_key]
