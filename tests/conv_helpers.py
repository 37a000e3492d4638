"""Helpers of the sparse convolution kernel tests (tests/test_conv_ops.py), for any backend.

A backend's kernels are checked by running ``check_conv_ops`` on ``CONV_CASES`` x
``PRUNED`` x dtypes and ``check_conv_grads`` in float64; a file for another backend
(Triton under TRITON_INTERPRET=1, CUDA) imports these and parametrises over its own
backend name and device.

Accuracy: every op output is a sum of products, compared element-wise against the same
op in float64 on the same (float32-representable) inputs. Whatever order a kernel sums
in, with or without FMA, |fl(sum_i a_i b_i) - sum_i a_i b_i| <= gamma_n sum_i |a_i b_i|,
gamma_n = n u / (1 - n u), n the number of terms and u the unit roundoff (Higham,
Accuracy and Stability of Numerical Algorithms, section 3.1). The float64 truth has the
same bound with u = 2^-53. So the tolerance of each element is
(gamma_n(u_dtype) + gamma_n(u_float64)) times the same op applied to the absolute values
of its operands (``magnitude``): nothing tuned on one machine, valid for any vector width.
A wrong tap, a wrong border or a wrong value is off by the order of the magnitude itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sparsekern import ops
from sparsekern.formats import CSRPattern
from sparsekern.ref import conv2d_ref, conv2d_t_ref, conv2d_wgrad_ref

# Fractions of the taps pruned (1.0: nothing kept, nnz = 0).
PRUNED = (0.0, 0.5, 0.9, 0.99, 1.0)
CONV_DTYPES = (torch.float32, torch.float64)
UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.float64: 2.0**-53}


@dataclass(frozen=True)
class ConvCase:
    """One convolution geometry: channels, square kernel, stride, padding, input size, batch."""

    c_in: int
    c_out: int
    k: int
    stride: int
    padding: int
    h: int
    w: int
    n: int

    @property
    def out_size(self) -> tuple[int, int]:
        s, p, k = self.stride, self.padding, self.k
        return (self.h + 2 * p - k) // s + 1, (self.w + 2 * p - k) // s + 1

    def __str__(self) -> str:
        return (f"ci{self.c_in}-co{self.c_out}-k{self.k}-s{self.stride}-p{self.padding}-"
                f"{self.h}x{self.w}-N{self.n}")


# Odd channel counts, 1 x 1 and 3 x 3 kernels, stride 1 and 2, padding 0 and 1, maps of
# size 1 and odd sizes, batches 0, 1 and a few; one 28 x 28 map; the benchmark's 65 -> 64
# channels on a 7 x 7 map; batches large enough for several chunks of the CPU kernel's
# scratch (and, with few chunks, several blocks of output channels per chunk).
CONV_CASES = (
    ConvCase(1, 1, 1, 1, 0, 1, 1, 1),
    ConvCase(3, 37, 3, 1, 1, 5, 7, 3),
    ConvCase(37, 3, 3, 2, 1, 5, 7, 2),
    ConvCase(59, 37, 3, 1, 0, 7, 5, 1),
    ConvCase(3, 59, 1, 2, 0, 6, 9, 2),
    ConvCase(37, 59, 3, 2, 0, 9, 6, 1),
    ConvCase(1, 3, 3, 1, 1, 1, 1, 4),  # a 1 x 1 map: every tap but the centre is padding
    ConvCase(3, 3, 1, 1, 1, 3, 3, 2),  # 1 x 1 kernel with padding: a zero border ring
    ConvCase(3, 1, 3, 2, 1, 1, 5, 3),  # one row, stride 2
    ConvCase(3, 5, 3, 2, 1, 6, 6, 2),  # stride dividing the padded size (output padding)
    ConvCase(5, 7, 3, 1, 1, 28, 28, 2),
    ConvCase(65, 64, 3, 1, 1, 7, 7, 3),
    ConvCase(65, 64, 3, 1, 1, 7, 7, 40),
    ConvCase(37, 16, 3, 2, 1, 9, 9, 60),
    ConvCase(3, 5, 3, 1, 1, 5, 7, 0),  # empty batch
)

# Small geometries for gradcheck / gradgradcheck (float64) and opcheck.
GRAD_CASES = (
    ConvCase(3, 4, 3, 1, 1, 4, 5, 2),
    ConvCase(2, 3, 3, 2, 1, 5, 4, 2),
    ConvCase(3, 2, 1, 2, 0, 3, 4, 1),
)


def random_conv_pattern(c_out: int, c_in: int, kh: int, kw: int, pruned: float,
                        gen: torch.Generator, dead_out: int | None = 0,
                        dead_in: int | None = 1, device: torch.device | str = "cpu",
                        dtype: torch.dtype = torch.float64
                        ) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """A random pruned weight [c_out, c_in, kh, kw] with about ``pruned`` of its taps removed.

    Output channel ``dead_out`` keeps no tap (an empty CSR row: a dead output channel) and
    input channel ``dead_in`` none of its kh * kw taps (empty columns: a dead input
    channel), each only where there are at least two channels. The values are drawn in
    float64 and cast, so every dtype gets the same numbers.

    Returns:
        (the five int32 index tensors of ``CSRPattern`` of the [c_out, c_in * kh * kw]
        mask, vals [nnz] in CSR order, the dense masked weight [c_out, c_in, kh, kw]).
    """
    taps = kh * kw
    mask = torch.rand(c_out, c_in * taps, generator=gen) >= pruned
    if pruned == 0.0:
        mask[:] = True
    if pruned == 1.0:
        mask[:] = False
    if dead_out is not None and c_out > 1:
        mask[dead_out] = False
    if dead_in is not None and c_in > 1:
        mask[:, dead_in * taps:(dead_in + 1) * taps] = False
    pattern = CSRPattern.from_mask(mask)
    vals = torch.randn(pattern.nnz, generator=gen, dtype=torch.float64)
    weight = pattern.to_dense(vals).view(c_out, c_in, kh, kw)
    return ([t.to(device) for t in pattern.tensors()], vals.to(device, dtype),
            weight.to(device, dtype))


@dataclass
class ConvProblem:
    """A pruned weight with an input x [C_in, N, H, W] and a cotangent g [C_out, N, Ho, Wo]."""

    case: ConvCase
    index: list[torch.Tensor]
    vals: torch.Tensor
    weight: torch.Tensor
    x: torch.Tensor
    g: torch.Tensor

    @property
    def conv_args(self) -> tuple[int, int, int, int]:
        c = self.case
        return c.k, c.k, c.stride, c.padding


def conv_problem(case: ConvCase, pruned: float, dtype: torch.dtype, seed: int = 0,
                 device: torch.device | str = "cpu") -> ConvProblem:
    """Fresh random inputs of ``case`` (drawn in float64, cast to ``dtype``)."""
    gen = torch.Generator().manual_seed(seed)
    index, vals, weight = random_conv_pattern(case.c_out, case.c_in, case.k, case.k, pruned,
                                              gen, device=device, dtype=dtype)
    ho, wo = case.out_size
    x = torch.randn(case.c_in, case.n, case.h, case.w, generator=gen, dtype=torch.float64)
    g = torch.randn(case.c_out, case.n, ho, wo, generator=gen, dtype=torch.float64)
    return ConvProblem(case, index, vals, weight, x.to(device, dtype), g.to(device, dtype))


def gamma(n: int, u: float) -> float:
    """Higham's gamma_n = n u / (1 - n u): the relative bound of an n-term sum of products."""
    assert n * u < 0.5, (n, u)
    return n * u / (1 - n * u)


def assert_within_bound(got: torch.Tensor, truth: torch.Tensor, magnitude: torch.Tensor,
                        terms: int, dtype: torch.dtype, what: str) -> None:
    """|got - truth| <= (gamma_terms(u_dtype) + gamma_terms(u_float64)) * magnitude, element-wise
    (module docstring); where the magnitude is 0, got must be exactly 0."""
    assert got.shape == truth.shape, (f"{what}: shape {list(got.shape)}, expected "
                                      f"{list(truth.shape)}")
    assert got.dtype == dtype, f"{what}: dtype {got.dtype}, expected {dtype}"
    if got.numel() == 0:
        return
    n = max(terms, 1)
    bound = (gamma(n, UNIT_ROUNDOFF[dtype]) + gamma(n, UNIT_ROUNDOFF[torch.float64])) * magnitude
    err = (got.double() - truth).abs()
    excess = err - bound
    worst = int(excess.flatten().argmax())
    assert bool((excess <= 0).all()), (
        f"{what}: error {err.flatten()[worst].item():.3g} at flat index {worst} exceeds the "
        f"rounding bound {bound.flatten()[worst].item():.3g} ({n} terms, magnitude "
        f"{magnitude.flatten()[worst].item():.3g})")


def conv_truths(p: ConvProblem) -> dict[str, tuple[torch.Tensor, torch.Tensor, int]]:
    """Per op: (float64 truth, magnitude, terms) on the problem's own (rounded) inputs."""
    c = p.case
    idx = [t.cpu() for t in p.index]
    vals, x, g = p.vals.double().cpu(), p.x.double().cpu(), p.g.double().cpu()
    args = p.conv_args
    ho, wo = c.out_size
    return {
        "conv2d": (conv2d_ref(*idx, vals, x, c.c_out, *args),
                   conv2d_ref(*idx, vals.abs(), x.abs(), c.c_out, *args), c.c_in * c.k * c.k),
        "conv2d_t": (conv2d_t_ref(*idx, vals, g, c.c_in, c.h, c.w, *args),
                     conv2d_t_ref(*idx, vals.abs(), g.abs(), c.c_in, c.h, c.w, *args),
                     c.c_out * c.k * c.k),
        "conv2d_wgrad": (conv2d_wgrad_ref(*idx, g, x, *args),
                         conv2d_wgrad_ref(*idx, g.abs(), x.abs(), *args), c.n * ho * wo),
    }


def run_conv_ops(p: ConvProblem, backend: str) -> dict[str, torch.Tensor]:
    """The three ops of ``backend`` on the problem (through ``sparsekern.ops``)."""
    c = p.case
    args = p.conv_args
    return {
        "conv2d": ops.conv2d(*p.index, p.vals, p.x, c.c_out, *args, backend),
        "conv2d_t": ops.conv2d_t(*p.index, p.vals, p.g, c.c_in, c.h, c.w, *args, backend),
        "conv2d_wgrad": ops.conv2d_wgrad(*p.index, p.g, p.x, *args, backend),
    }


def check_conv_ops(backend: str, case: ConvCase, pruned: float, dtype: torch.dtype,
                   seed: int = 0, device: torch.device | str = "cpu") -> None:
    """All three ops of ``backend`` against the float64 truth within the rounding bound,
    with the shapes, dtype, device and contiguity of the op contract."""
    p = conv_problem(case, pruned, dtype, seed, device)
    got = run_conv_ops(p, backend)
    for name, (truth, magnitude, terms) in conv_truths(p).items():
        out = got[name]
        assert out.device == p.x.device, f"{name}: on {out.device}, expected {p.x.device}"
        assert out.is_contiguous(), f"{name}: not contiguous"
        assert_within_bound(out.cpu(), truth, magnitude, terms, dtype, f"{backend} {name} {case}")


def grad_inputs(case: ConvCase, pruned: float = 0.5, seed: int = 0,
                device: torch.device | str = "cpu") -> ConvProblem:
    """A float64 problem whose vals, x and g require grad (for gradcheck)."""
    p = conv_problem(case, pruned, torch.float64, seed, device)
    for t in (p.vals, p.x, p.g):
        t.requires_grad_()
    return p


def conv_functions(p: ConvProblem, backend: str) -> dict[str, tuple]:
    """Per op: (function of its differentiable inputs, those inputs), for gradcheck."""
    c, idx, args = p.case, p.index, p.conv_args
    return {
        "conv2d": (lambda v, x: ops.conv2d(*idx, v, x, c.c_out, *args, backend), (p.vals, p.x)),
        "conv2d_t": (lambda v, g: ops.conv2d_t(*idx, v, g, c.c_in, c.h, c.w, *args, backend),
                     (p.vals, p.g)),
        "conv2d_wgrad": (lambda g, x: ops.conv2d_wgrad(*idx, g, x, *args, backend),
                         (p.g, p.x)),
    }


def check_conv_grads(backend: str, case: ConvCase, device: torch.device | str = "cpu") -> None:
    """gradcheck and gradgradcheck (float64) of all three ops: their backwards are made of
    each other, so this checks every op's adjoint relations to second order."""
    p = grad_inputs(case, device=device)
    for name, (fn, inputs) in conv_functions(p, backend).items():
        assert torch.autograd.gradcheck(fn, inputs), f"{backend} {name} {case}: gradcheck"
        assert torch.autograd.gradgradcheck(fn, inputs), f"{backend} {name} {case}: gradgradcheck"


def check_conv_opcheck(backend: str, case: ConvCase, device: torch.device | str = "cpu") -> None:
    """``torch.library.opcheck`` (schema, fake, autograd registration, AOT dispatch)."""
    p = grad_inputs(case, device=device)
    c, args = p.case, p.conv_args
    torch.library.opcheck(ops.conv2d, (*p.index, p.vals, p.x, c.c_out, *args, backend))
    torch.library.opcheck(ops.conv2d_t,
                          (*p.index, p.vals, p.g, c.c_in, c.h, c.w, *args, backend))
    torch.library.opcheck(ops.conv2d_wgrad, (*p.index, p.g, p.x, *args, backend))
