"""Per-layer layout choice for ``layout="auto"``: measure the candidates, keep the fastest.

A cost model fitted once cannot know how a given machine's BLAS compares with
our CSR kernel at a given shape and density, so the model is the measurement
itself: each candidate layout multiplies the layer's own core pattern with a
batch of ``batch_hint`` columns (state plus one tangent, as the fused tier
does), a few times, and the median wins. Clear cases skip the measurement:
above ``DENSE_ABOVE`` density the dense GEMM wins, below ``CSR_BELOW`` CSR does.
Results are cached per (shape, nnz, batch, dtype, backend) for the process.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

from sparsekern.formats import BlockedPattern, CSRPattern

DENSE_ABOVE = 0.5
CSR_BELOW = 0.05
# Without measuring (autotune=False): the crossover measured on our CPUs, where
# the CSR kernel at 10% density runs about 3x faster than the dense GEMM.
RULE_DENSE_ABOVE = 0.25
REPEATS = 5

_cache: dict[tuple, str] = {}


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


def _kernels(backend: str):
    """The module whose ``spmm`` and ``spmm_blocked`` a backend runs (None for ref)."""
    if backend == "cpu":
        from sparsekern.backends import cpu

        return cpu.extension()
    if backend == "triton":
        from sparsekern import triton as triton_backend

        return triton_backend
    if backend == "cuda":
        from sparsekern.backends import cuda

        return cuda.extension()
    return None


def measure_layouts(mask: torch.Tensor, n_batch: int, dtype: torch.dtype, backend: str) -> (
    dict[str, float]
):
    """Seconds per product W x for each candidate layout of the core ``mask`` [R, C]."""
    device = mask.device
    r, c = mask.shape
    x = torch.randn(c, n_batch, dtype=dtype, device=device)
    w = torch.randn(r, c, dtype=dtype, device=device) * mask
    out = {"dense": median_seconds(lambda: w @ x, device)}
    module = _kernels(backend)
    if module is not None:
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
    key = (r, c, nnz, n_batch, dtype, backend, mask.device.type)
    if key not in _cache:
        times = measure_layouts(mask, n_batch, dtype, backend)
        _cache[key] = min(times, key=times.get)
    return _cache[key]
