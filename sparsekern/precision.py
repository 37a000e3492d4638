"""Product precision: what ``SparseConfig.precision`` means, and its reference rounding.

"ieee" (the default): float32 products are exact IEEE multiply-adds, because
adaptive ODE solvers need the accuracy; torch's global TF32 flag is overridden.

"tf32": GPU kernels may use TF32 tensor-core products for float32 (Triton's
``tl.dot`` input precision "tf32", cuBLAS with TF32 on). A permission, not a
rounding rule: CPUs and float64 compute exactly.

"bf16" / "fp16": the fused MLP program's products take both operands rounded
to bfloat16 / float16 (round to nearest even) and accumulate in float32;
everything else stays float32: the state, the bias and gate terms, the
activations and their derivatives, the divergence sums. A product of two bf16
or two fp16 numbers is exact in float32 away from overflow and underflow (8 + 8
and 11 + 11 significant bits fit in 24), so the results are defined up to the
order of the float32 sums, whichever backend runs them: the Triton fused kernel
on bf16/fp16 tensor cores (dense programs of width <= 256), or any path that
rounds its operands first and multiplies in float32 (``round_operand``: the
Triton general path for CSR, blocked and wide layers, and "ref"). fp16
overflows past 65504. For float32 models only.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Literal, get_args

import torch

Precision = Literal["ieee", "tf32", "bf16", "fp16"]
PRECISIONS: tuple[Precision, ...] = get_args(Precision)
# The reduced precisions and the dtype their product operands are rounded to.
REDUCED = {"bf16": torch.bfloat16, "fp16": torch.float16}


def check_precision(precision: str, what: str = "precision") -> None:
    """Raise a ValueError naming ``what`` unless ``precision`` is one of ``PRECISIONS``."""
    if precision not in PRECISIONS:
        raise ValueError(f"{what}={precision!r}; expected one of {PRECISIONS}")


def is_reduced(precision: str) -> bool:
    """Whether ``precision`` rounds product operands (bf16, fp16)."""
    return precision in REDUCED


def uses_tf32(precision: str) -> bool:
    """Whether GPU float32 products may run on TF32."""
    return precision == "tf32"


def cublas_may_use_tf32(precision: str) -> bool:
    """Whether float32 cuBLAS products may run on TF32 tensor cores for ``precision``.

    For "tf32" because it was asked for; for bf16/fp16 because the operands are
    rounded first and TF32 (10 fraction bits, 8 exponent bits) holds every bf16
    and fp16 value exactly, so the products are the same, only faster.
    """
    return uses_tf32(precision) or is_reduced(precision)


class _RoundOperand(torch.autograd.Function):
    """Round in forward; pass the gradient through unrounded (straight through)."""

    @staticmethod
    def forward(ctx, t: torch.Tensor, low: torch.dtype) -> torch.Tensor:
        return t.to(low).to(t.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


class _RoundCotangent(torch.autograd.Function):
    """The identity in forward; round the gradient in backward (straight through again)."""

    @staticmethod
    def forward(ctx, t: torch.Tensor, low: torch.dtype) -> torch.Tensor:
        ctx.low = low
        return t.view_as(t)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return _RoundOperand.apply(grad, ctx.low), None


def round_operand(t: torch.Tensor, precision: str) -> torch.Tensor:
    """``t`` rounded to the operand precision of a product (bf16/fp16), in ``t``'s dtype.

    The identity for "ieee" and "tf32". Under autograd the gradient passes
    through unrounded: a cast's own backward would round the gradient instead,
    which is not what the program's backward products do (``round_cotangent``).
    """
    low = REDUCED.get(precision)
    return t if low is None else _RoundOperand.apply(t, low)


def round_cotangent(t: torch.Tensor, precision: str) -> torch.Tensor:
    """``t`` unchanged; under autograd its gradient is rounded like a product operand.

    Wrapped around a product's output, it makes autograd's backward products
    (W^T g, g X^T) take the rounded cotangent g as their operand, as the fused
    program's hand-written backward does; with ``round_operand`` on the inputs,
    autograd through ``round_cotangent(round_operand(W) @ round_operand(X))``
    is that backward. The identity for "ieee" and "tf32".
    """
    low = REDUCED.get(precision)
    return t if low is None else _RoundCotangent.apply(t, low)


@contextlib.contextmanager
def cuda_matmul_precision(device: torch.device, allow_tf32: bool) -> Iterator[None]:
    """Run torch's dense products on ``device`` with TF32 exactly as requested (default off).

    cuBLAS products (torch.matmul, ``@``) follow a process-wide flag that user
    code may have switched on; adaptive solvers need exact fp32, so the flag is
    set for the duration and restored. A no-op off CUDA, when the flag already
    has the requested value, and while torch.compile traces (it would break the graph).
    """
    if device.type != "cuda" or torch.compiler.is_compiling():
        yield
        return
    matmul = torch.backends.cuda.matmul
    before = matmul.allow_tf32
    if before == allow_tf32:
        yield
        return
    matmul.allow_tf32 = allow_tf32
    try:
        yield
    finally:
        matmul.allow_tf32 = before
