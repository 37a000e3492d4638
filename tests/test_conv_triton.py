"""The Triton convolution kernels (``sparsekern.triton.k_conv``) against ``sparsekern.ref``.

As in ``tests/test_triton_kernels.py``: Triton picks interpreted or compiled kernels
when ``@triton.jit`` runs, so the ordinary run (TRITON_INTERPRET unset) compiles
the three kernels ahead of time for sm_80 and sm_90 here and runs the
``*Interpreted`` classes in a child pytest with TRITON_INTERPRET=1 set from its
start (``test_interpreted_cases_pass``). The parent never sets the variable.

Tolerances follow from the arithmetic, not from a measurement: every output is a
sum of at most T products (T = C_in kh kw kept taps for conv2d, C_out kh kw for its
adjoint, N Ho Wo output places for the weight gradient), so in any summation order
|got - exact| <= gamma_T * mag with gamma_T = T u / (1 - T u), u the unit roundoff
of the dtype and mag the same operation on the absolute values (Higham, Accuracy
and Stability of Numerical Algorithms, 2nd ed., §3.1). The reference is float64 on
the same (exactly representable) inputs and obeys the same bound with u = 2^-53,
so the check is elementwise: |got - ref| <= (gamma_T(u) + gamma_T(2^-53)) * mag.
A wrong tap, border or channel gives errors of the order of mag itself.
"""

from __future__ import annotations

import inspect
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sparsekern.formats import CSRPattern
from sparsekern.ref import conv2d_ref, conv2d_t_ref, conv2d_wgrad_ref


def _ci() -> bool:
    """Whether this runs in CI ($CI set to anything but "", 0, false or no)."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


try:
    import triton  # noqa: F401
except ImportError as exc:
    if _ci():
        pytest.fail(f"CI is set (CI={os.environ['CI']!r}) but triton does not import ({exc}): "
                    "the Triton convolution kernels' checks cannot run; install it with "
                    "pip install -e .[dev]", pytrace=False)
    pytest.skip(f"triton is not installed ({exc}); pip install -e .[dev]",
                allow_module_level=True)

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
ROOT = Path(__file__).resolve().parents[1]
DTYPES = (torch.float32, torch.float64)
DENSITIES = (0.0, 0.5, 0.9, 1.0)
UNIT_ROUNDOFF = {torch.float32: 2.0 ** -24, torch.float64: 2.0 ** -53}

# (C_in, C_out, k, stride, padding, N, H, W): odd channel counts, 1x1 and 3x3,
# stride 1 and 2, padding 0 and 1, batch 0, 1 and 2, odd non-square maps.
SHAPES = (
    (1, 1, 1, 1, 0, 1, 5, 4),
    (3, 37, 3, 1, 1, 1, 6, 5),
    (5, 3, 3, 2, 1, 1, 7, 6),
    (3, 3, 3, 2, 0, 2, 9, 8),
    (37, 1, 1, 2, 0, 1, 5, 5),
    (1, 37, 1, 1, 0, 2, 3, 5),
    (3, 5, 3, 1, 1, 0, 5, 5),
)


def _interpreter_numpy_fix() -> None:
    """Triton <= 3.6's interpreter calls int() on 1-element arrays, an error since NumPy 2.4
    (triton-lang/triton#9171); the one-line fix of #9172, as tests/test_triton_kernels.py
    applies it, where the installed interpreter still has the old code."""
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor
    if "int(self.handle.data)" not in inspect.getsource(original):
        return

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    interpreter._patch_lang_tensor = patched


if INTERPRETED:
    _interpreter_numpy_fix()


def conv_pattern(c_out: int, c_in: int, k: int, density: float, seed: int) -> CSRPattern:
    """A random [C_out, C_in k k] tap mask with an empty row (an output channel with no
    kept tap) and an empty input channel (all its k k tap columns), where the shape allows."""
    gen = torch.Generator().manual_seed(seed)
    mask = torch.rand(c_out, c_in * k * k, generator=gen) < density
    if density == 1.0:
        mask[:] = True
    if c_out > 2 and c_in > 2:
        mask[c_out // 2] = False
        mask[:, (c_in // 3) * k * k:(c_in // 3 + 1) * k * k] = False
    return CSRPattern.from_mask(mask)


def randn(*shape: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)


def gamma(terms: int, dtype: torch.dtype) -> float:
    """gamma_T = T u / (1 - T u): the bound of a sum of T rounded products, any order."""
    tu = max(terms, 1) * UNIT_ROUNDOFF[dtype]
    return tu / (1 - tu)


def assert_within_rounding(got: torch.Tensor, exact: torch.Tensor, mag: torch.Tensor,
                           terms: int, what: str) -> None:
    """Shape, dtype, contiguity, finiteness, and |got - exact| <= the bound above."""
    assert got.shape == exact.shape, f"{what}: shape {list(got.shape)} != {list(exact.shape)}"
    assert got.is_contiguous(), f"{what}: not contiguous"
    assert torch.isfinite(got).all(), f"{what}: not finite"
    bound = (gamma(terms, got.dtype) + gamma(terms, torch.float64)) * mag
    excess = (got.double() - exact).abs() - bound
    worst = int(excess.argmax()) if excess.numel() else 0
    assert excess.numel() == 0 or excess.max() <= 0, (
        f"{what}: |got - ref| = {(got.double() - exact).abs().flatten()[worst]:.3g} at "
        f"{worst} exceeds the rounding bound {bound.flatten()[worst]:.3g} (T = {terms})")


def storages(tensors) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in tensors if t.numel()}


def check_case(shape, density, dtype, seed=0, config=None, wconfig=None) -> None:
    """The three kernels on one random case, against the float64 references."""
    from sparsekern.triton import k_conv

    c_in, c_out, k, s, p, n, h, w = shape
    pat = conv_pattern(c_out, c_in, k, density, seed)
    idx = pat.tensors()
    ho, wo = (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1
    vals = randn(pat.nnz, dtype=dtype, seed=seed + 1)
    x = randn(c_in, n, h, w, dtype=dtype, seed=seed + 2)
    g = randn(c_out, n, ho, wo, dtype=dtype, seed=seed + 3)
    v64, x64, g64 = vals.double(), x.double(), g.double()
    conv = (k, k, s, p)
    kw = {} if config is None else {"config": config}
    wkw = {} if wconfig is None else {"config": wconfig}

    y = k_conv.conv2d(*idx, vals, x, c_out, *conv, **kw)
    assert y.dtype == dtype and y.shape == (c_out, n, ho, wo)
    assert_within_rounding(y, conv2d_ref(*idx, v64, x64, c_out, *conv),
                           conv2d_ref(*idx, v64.abs(), x64.abs(), c_out, *conv),
                           c_in * k * k, f"conv2d {shape}")
    gx = k_conv.conv2d_t(*idx, vals, g, c_in, h, w, *conv, **kw)
    assert gx.dtype == dtype
    assert_within_rounding(gx, conv2d_t_ref(*idx, v64, g64, c_in, h, w, *conv),
                           conv2d_t_ref(*idx, v64.abs(), g64.abs(), c_in, h, w, *conv),
                           c_out * k * k, f"conv2d_t {shape}")
    gw = k_conv.conv2d_wgrad(*idx, g, x, *conv, **wkw)
    assert gw.dtype == dtype
    assert_within_rounding(gw, conv2d_wgrad_ref(*idx, g64, x64, *conv),
                           conv2d_wgrad_ref(*idx, g64.abs(), x64.abs(), *conv),
                           n * ho * wo, f"conv2d_wgrad {shape}")
    assert not storages([y, gx, gw]) & storages([vals, x, g])


@pytest.fixture
def nan_outputs(monkeypatch):
    """Fresh outputs start as NaN (torch.empty, Tensor.new_empty), so that a place no
    program writes cannot pass for a zero left in recycled memory."""
    empty, new_empty = torch.empty, torch.Tensor.new_empty

    def nan_empty(*args, **kwargs):
        t = empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    def nan_new_empty(self, *args, **kwargs):
        t = new_empty(self, *args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", nan_empty)
    monkeypatch.setattr(torch.Tensor, "new_empty", nan_new_empty)


# ------------------------------------------------------------ interpreted cases


class TestConvInterpreted:
    """k_conv under the interpreter, against the references."""

    __test__ = INTERPRETED

    @pytest.mark.parametrize("dtype", DTYPES)
    @pytest.mark.parametrize("density", DENSITIES)
    @pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
    def test_kernels_match_ref(self, shape, density, dtype, nan_outputs):
        check_case(shape, density, dtype, seed=int(10 * density))

    @pytest.mark.parametrize("dtype", DTYPES)
    def test_gpu_tiling_several_programs_chunks_and_splits(self, dtype, nan_outputs):
        # The interpreter normally runs one wide program per channel; the GPU's
        # launch shapes (several position tiles, a partial last one, rows longer than
        # BLOCK_K, the weight gradient's positions split into partial sums) here.
        check_case((3, 5, 3, 2, 1, 2, 7, 6), 0.9, dtype, seed=3, config=(8, 16),
                   wconfig=(16, 16, 3))
        check_case((3, 4, 3, 1, 1, 1, 6, 5), 1.0, dtype, seed=4, config=(16, 16),
                   wconfig=(16, 16, 2))

    def test_stride_larger_than_the_kernel_and_wide_padding(self, nan_outputs):
        # Stride 3 over a 2x2 kernel skips input places (zero in the adjoint there);
        # padding 2 > k // 2 gives output places that read padding only.
        check_case((3, 4, 2, 3, 0, 1, 8, 7), 1.0, torch.float64, seed=5)
        check_case((3, 4, 3, 1, 2, 1, 4, 5), 0.5, torch.float64, seed=6)
        check_case((2, 3, 3, 2, 1, 1, 1, 1), 1.0, torch.float64, seed=7)  # 1x1 maps

    def test_pruned_channels_are_never_read(self):
        from sparsekern.triton import k_conv

        # Input channel 1 and output channel 0 have no kept tap: NaN there must not
        # reach the result (a masked-out tap read as 0 * NaN would).
        mask = torch.ones(3, 3 * 9, dtype=torch.bool)
        mask[:, 9:18] = False
        mask[0] = False
        pat = CSRPattern.from_mask(mask)
        vals = randn(pat.nnz, dtype=torch.float64, seed=8)
        x = randn(3, 2, 5, 6, dtype=torch.float64, seed=9)
        g = randn(3, 2, 5, 6, dtype=torch.float64, seed=10)
        x[1], g[0] = float("nan"), float("nan")
        x0, g0 = x.nan_to_num(0.0), g.nan_to_num(0.0)
        y = k_conv.conv2d(*pat.tensors(), vals, x, 3, 3, 3, 1, 1)
        assert torch.equal(y[0], torch.zeros_like(y[0]))
        torch.testing.assert_close(y, conv2d_ref(*pat.tensors(), vals, x0, 3, 3, 3, 1, 1))
        gx = k_conv.conv2d_t(*pat.tensors(), vals, g, 3, 5, 6, 3, 3, 1, 1)
        assert torch.equal(gx[1], torch.zeros_like(gx[1]))
        torch.testing.assert_close(gx, conv2d_t_ref(*pat.tensors(), vals, g0, 3, 5, 6, 3, 3, 1,
                                                    1))
        # The weight gradient reads g of every kept row and x of every kept column only.
        gw = k_conv.conv2d_wgrad(*pat.tensors(), g, x, 3, 3, 1, 1)
        torch.testing.assert_close(gw, conv2d_wgrad_ref(*pat.tensors(), g0, x0, 3, 3, 1, 1))

    def test_empty_outputs(self):
        from sparsekern.triton import k_conv

        pat = conv_pattern(4, 3, 3, 0.5, seed=11)
        vals = randn(pat.nnz, dtype=torch.float32, seed=12)
        x, g = torch.randn(3, 0, 5, 5), torch.randn(4, 0, 5, 5)
        assert k_conv.conv2d(*pat.tensors(), vals, x, 4, 3, 3, 1, 1).shape == (4, 0, 5, 5)
        assert k_conv.conv2d_t(*pat.tensors(), vals, g, 3, 5, 5, 3, 3, 1, 1).shape == (3, 0, 5, 5)
        gw = k_conv.conv2d_wgrad(*pat.tensors(), g, x, 3, 3, 1, 1)
        assert gw.shape == (pat.nnz,) and not gw.any()
        # No output channel at all, and no kept tap.
        none = CSRPattern.from_mask(torch.zeros(0, 27, dtype=torch.bool))
        x = torch.randn(3, 1, 4, 4)
        assert k_conv.conv2d(*none.tensors(), torch.empty(0), x, 0, 3, 3, 1, 1).shape == (
            0, 1, 4, 4)
        assert not k_conv.conv2d_t(*none.tensors(), torch.empty(0), torch.empty(0, 1, 4, 4), 3,
                                   4, 4, 3, 3, 1, 1).any()

    def test_bad_inputs_raise_clear_errors(self):
        from sparsekern import triton as tk

        pat = conv_pattern(4, 3, 3, 0.5, seed=13)
        idx = pat.tensors()
        vals, x = torch.randn(pat.nnz), torch.randn(3, 2, 5, 5)
        with pytest.raises(TypeError, match="float32 and float64"):
            tk.conv2d(*idx, vals.half(), x.half(), 4, 3, 3, 1, 1)
        with pytest.raises(TypeError, match=r"vals is torch\.float64"):
            tk.conv2d(*idx, vals.double(), x, 4, 3, 3, 1, 1)
        with pytest.raises(TypeError, match="int32"):
            tk.conv2d(idx[0].long(), *idx[1:], vals, x, 4, 3, 3, 1, 1)
        with pytest.raises(ValueError, match=r"x has shape \[2, 2, 5, 5\], expected \[3, 2,"):
            tk.conv2d(*idx, vals, x[:2], 4, 3, 3, 1, 1)
        with pytest.raises(ValueError, match="expected C_out \\+ 1 = 6"):
            tk.conv2d(*idx, vals, x, 5, 3, 3, 1, 1)
        with pytest.raises(ValueError, match="must be 4-D"):
            tk.conv2d(*idx, vals, x[0], 4, 3, 3, 1, 1)
        with pytest.raises(ValueError, match="output size 0 x 0"):
            tk.conv2d(*idx, vals, torch.randn(3, 2, 2, 2), 4, 3, 3, 1, 0)
        with pytest.raises(ValueError, match="stride must be >= 1"):
            tk.conv2d(*idx, vals, x, 4, 3, 3, 0, 1)
        with pytest.raises(ValueError, match="expected C_in \\* 2 \\* 2 \\+ 1"):
            tk.conv2d(*idx, vals, x, 4, 2, 2, 1, 1)
        with pytest.raises(ValueError, match=r"g has shape \[4, 2, 4, 4\], expected \[4, 2,"):
            tk.conv2d_t(*idx, vals, torch.randn(4, 2, 4, 4), 3, 5, 5, 3, 3, 1, 1)
        with pytest.raises(ValueError, match="expected C_in \\* 3 \\* 3 \\+ 1 = 19"):
            tk.conv2d_t(*idx, vals, torch.randn(4, 2, 5, 5), 2, 5, 5, 3, 3, 1, 1)
        with pytest.raises(TypeError, match=r"g is torch\.float64"):
            tk.conv2d_wgrad(*idx, torch.randn(4, 2, 5, 5).double(), x, 3, 3, 1, 1)
        with pytest.raises(ValueError, match=r"g has shape \[4, 1, 5, 5\]"):
            tk.conv2d_wgrad(*idx, torch.randn(4, 1, 5, 5), x, 3, 3, 1, 1)


class TestConvRegistryInterpreted:
    """The Triton backend through the op registry (``sparsekern.ops``): opcheck (schema,
    fakes, autograd registration) and a float64 gradcheck, whose backward runs the other
    two Triton kernels. (Second derivatives are the registry's, tested with the ops.)"""

    __test__ = INTERPRETED

    def test_conv_ops_pass_opcheck_and_gradcheck(self):
        from sparsekern import ops

        pat = conv_pattern(3, 2, 3, 0.6, seed=14)
        vals = randn(pat.nnz, dtype=torch.float64, seed=15).requires_grad_()
        x = randn(2, 2, 5, 4, dtype=torch.float64, seed=16).requires_grad_()
        g = randn(3, 2, 3, 2, dtype=torch.float64, seed=17).requires_grad_()
        conv = (3, 3, 2, 1)
        torch.library.opcheck(ops.conv2d, (*pat.tensors(), vals, x, 3, *conv, "triton"))
        torch.library.opcheck(ops.conv2d_t, (*pat.tensors(), vals, g, 2, 5, 4, *conv, "triton"))
        torch.library.opcheck(ops.conv2d_wgrad, (*pat.tensors(), g, x, *conv, "triton"))
        # Each numerical derivative is a kernel call per input element: a smaller problem.
        q = conv_pattern(2, 1, 3, 0.5, seed=18)
        v = vals.detach()[:q.nnz].clone().requires_grad_()
        a = x.detach()[:1, :1, :3, :3].clone().requires_grad_()

        def f(v, a):
            return ops.conv2d(*q.tensors(), v, a, 2, 3, 3, 1, 1, "triton")

        assert torch.autograd.gradcheck(f, (v, a))


# ------------------------------------------------------------------ parent process


def test_public_signatures_match_the_references():
    from sparsekern import ref
    from sparsekern import triton as tk

    for name in ("conv2d", "conv2d_t", "conv2d_wgrad"):
        assert name in tk.__all__
        ours = list(inspect.signature(getattr(tk, name)).parameters)
        theirs = list(inspect.signature(getattr(ref, f"{name}_ref")).parameters)
        assert ours == theirs, name


def test_cpu_tensors_without_the_interpreter_get_a_clear_error():
    from sparsekern import triton as tk

    pat = conv_pattern(4, 3, 3, 0.5, seed=1)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        tk.conv2d(*pat.tensors(), torch.randn(pat.nnz), torch.randn(3, 1, 5, 5), 4, 3, 3, 1, 1)


test_cpu_tensors_without_the_interpreter_get_a_clear_error.__test__ = not INTERPRETED

@pytest.fixture(scope="module")
def interpreter_run(tmp_path_factory):
    """A child pytest running the *Interpreted classes with TRITON_INTERPRET=1 (set before
    triton is imported, which this process has done)."""
    log = tmp_path_factory.mktemp("interpreter") / "pytest.log"
    env = dict(os.environ, TRITON_INTERPRET="1")
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pytest", str(Path(__file__)), "-q", "-p", "no:cacheprovider",
             "--durations=5", "-k", "Interpreted"],
            cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
        )
    yield proc, log
    if proc.poll() is None:
        proc.kill()
        proc.wait()


# Ahead-of-time compiles of these kernels: tests/test_triton_kernels.py (aot_variants).


def test_interpreted_cases_pass(interpreter_run):
    """Every *Interpreted case passes in the child process (its output is shown on failure)."""
    proc, log = interpreter_run
    proc.wait(timeout=900)
    out = log.read_text()
    assert proc.returncode == 0, out[-6000:]
    passed = re.search(r"(\d+) passed", out)
    assert passed and int(passed.group(1)) >= 50, out[-3000:]
    assert "skipped" not in out.splitlines()[-1], out[-3000:]


test_interpreted_cases_pass.__test__ = not INTERPRETED
