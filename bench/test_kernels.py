"""pytest-benchmark microbenchmarks of the engine's kernels (sparsekern.ops, cpu backend).

Run with ``pytest bench/`` (not part of the default ``pytest`` run, whose
testpaths is tests/). Threads: ``BENCH_THREADS`` (default 2, see conftest.py).
Compare runs with pytest-benchmark's own options, e.g.
``pytest bench/ --benchmark-autosave`` then ``--benchmark-compare``.

Each benchmark records ``gflops`` (on the kept weights) in its extra_info:
spmm 2 nnz N, sddmm 2 nnz N, mlp_fwd 2 K (1 + tangents) B, mlp_bwd twice that.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from sparsekern import ops
from sparsekern.activations import ACT_IDS
from sparsekern.formats import LAYOUT_CSR, LAYOUT_DENSE, CSRPattern

pytest.importorskip("pytest_benchmark")


@pytest.fixture(scope="module", autouse=True)
def _cpu_backend():
    from sparsekern.backends import cpu

    if not cpu.available():
        pytest.skip("the sparsekern C++ CPU extension does not build here")


def _sparse(rows: int, cols: int, density: float, seed: int) -> tuple[CSRPattern, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    mask = torch.rand(rows, cols, generator=gen) < density
    pattern = CSRPattern.from_mask(mask)
    return pattern, torch.randn(pattern.nnz, generator=gen) / cols**0.5


def _record(benchmark, flop: int) -> None:
    stats = getattr(benchmark, "stats", None)
    median = getattr(getattr(stats, "stats", None), "median", None)
    benchmark.extra_info["gflop"] = flop / 1e9
    if median:
        benchmark.extra_info["gflops"] = flop / median / 1e9


# (name, rows, cols, density, batch columns): MINIBOONE's and BSDS300's hidden layers.
SPMM_SHAPES = [
    ("miniboone-860x860-d0.1", 860, 860, 0.1, 2000),
    ("miniboone-860x860-d0.02", 860, 860, 0.02, 2000),
    ("bsds300-1260x1260-d0.05", 1260, 1260, 0.05, 2000),
]


@pytest.mark.parametrize("transpose", [False, True], ids=["Wx", "WTx"])
@pytest.mark.parametrize("shape", SPMM_SHAPES, ids=[s[0] for s in SPMM_SHAPES])
def test_spmm(benchmark, shape, transpose):
    _, rows, cols, density, n = shape
    pattern, vals = _sparse(rows, cols, density, 0)
    x = torch.randn(rows if transpose else cols, n)
    args = (*pattern.tensors(), vals, x, transpose, "cpu")
    with torch.no_grad():
        benchmark(ops.spmm, *args)
    _record(benchmark, 2 * pattern.nnz * n)


@pytest.mark.parametrize("shape", SPMM_SHAPES, ids=[s[0] for s in SPMM_SHAPES])
def test_sddmm(benchmark, shape):
    _, rows, cols, density, n = shape
    pattern, _ = _sparse(rows, cols, density, 1)
    a, b = torch.randn(rows, n), torch.randn(cols, n)
    with torch.no_grad():
        benchmark(ops.sddmm, *pattern.tensors(), a, b, "cpu")
    _record(benchmark, 2 * pattern.nnz * n)


def _chain(widths: list[int], density: float, seed: int
           ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[int], int]:
    """The fused op's values, index and layouts for an MLP; dense layers at density 1."""
    values: list[torch.Tensor] = []
    index: list[torch.Tensor] = []
    layouts: list[int] = []
    kept = 0
    for i, (n_in, n_out) in enumerate(itertools.pairwise(widths)):
        if density >= 1.0:
            w = torch.randn(n_out, n_in, generator=torch.Generator().manual_seed(seed + i))
            values.append(w / n_in**0.5)
            layouts.append(LAYOUT_DENSE)
            kept += w.numel()
        else:
            pattern, vals = _sparse(n_out, n_in, density, seed + i)
            values.append(vals)
            index += pattern.tensors()
            layouts.append(LAYOUT_CSR)
            kept += pattern.nnz
    return values, index, layouts, kept


# (name, widths, activation, density, batch): the toy model dense, MINIBOONE at 10% in CSR.
MLP_SHAPES = [
    ("toy-2-64x3-2-dense", [2, 64, 64, 64, 2], "sigmoid", 1.0, 1024),
    ("miniboone-43-860x2-43-d0.1", [43, 860, 860, 43], "softplus", 0.1, 1000),
]


def _mlp_inputs(shape):
    _, widths, act, density, b = shape
    values, index, layouts, kept = _chain(widths, density, 2)
    gen = torch.Generator().manual_seed(3)
    x0 = torch.randn(widths[0], b, generator=gen)
    noise = torch.randn(1, widths[0], b, generator=gen)
    scales = [torch.empty(0) for _ in layouts]
    shifts = [torch.randn(n, generator=gen) * 0.1 for n in widths[1:]]
    return (x0, noise, noise, values, index, scales, shifts, layouts, ACT_IDS[act]), kept, b


@pytest.mark.parametrize("shape", MLP_SHAPES, ids=[s[0] for s in MLP_SHAPES])
def test_mlp_fwd(benchmark, shape):
    args, kept, b = _mlp_inputs(shape)
    with torch.no_grad():
        benchmark(ops.mlp_fwd, *args, False, False, "cpu")
    _record(benchmark, 4 * kept * b)


@pytest.mark.parametrize("shape", MLP_SHAPES, ids=[s[0] for s in MLP_SHAPES])
def test_mlp_bwd(benchmark, shape):
    args, kept, b = _mlp_inputs(shape)
    x0, tan0, probe, values, index, scales, shifts, layouts, act = args
    with torch.no_grad():
        f, div, saved = ops.mlp_fwd(*args, False, True, "cpu")
        grad_f, grad_div = torch.randn_like(f), torch.randn_like(div)
        benchmark(ops.mlp_bwd, grad_f, grad_div, x0, tan0, probe, values, index, scales,
                  shifts, layouts, act, False, saved, "cpu")
    _record(benchmark, 8 * kept * b)
