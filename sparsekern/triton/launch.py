"""How the Triton kernels are launched: device rules, dtypes, exact fp32.

Triton kernels run on CUDA tensors, compiled; on CPU tensors only through
Triton's interpreter, which is chosen when ``@triton.jit`` runs, i.e. when
``TRITON_INTERPRET=1`` is set before triton is first imported (the CPU tests
run in a subprocess with it set). ``check_device`` turns any other case into a
clear error instead of a crash inside the launcher.

Also here: the dtype map and checks shared by the wrappers (``check_mlp``: the
MLP programs' ``program.check_program`` plus Triton's own dtype and device
rules), how a ``SparseConfig.precision`` reaches ``tl.dot`` (``dot_precision``,
``dot_operands``), the exact-fp32 rule for the dense products the general path
leaves to cuBLAS, and the ahead-of-time signatures, derived from each kernel's
parameters (``aot_variant``, ``AotRule``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import triton.language as tl

from sparsekern.formats import LayerProgram
from sparsekern.precision import (
    check_precision,
    cublas_may_use_tf32,
    cuda_matmul_precision,
    is_reduced,
    uses_tf32,
)
from sparsekern.program import check_program
from sparsekern.triton import interpreting

TL_DTYPES = {torch.float32: tl.float32, torch.float64: tl.float64}
AOT_DTYPES = {torch.float32: "fp32", torch.float64: "fp64"}


def check_device(t: torch.Tensor) -> None:
    """Raise unless Triton kernels can run on ``t``'s device in this process."""
    if t.device.type == "cuda":
        return
    if t.device.type == "cpu" and interpreting():
        return
    raise RuntimeError(
        f"sparsekern triton backend: kernels run on CUDA tensors (got {t.device}); CPU tensors "
        "need TRITON_INTERPRET=1 set before triton is imported"
    )


def check_float(name: str, t: torch.Tensor, dtype: torch.dtype | None = None) -> None:
    """Raise a clear error unless ``t`` is float32/float64 (and ``dtype`` when given)."""
    if t.dtype not in TL_DTYPES:
        raise TypeError(f"sparsekern triton backend supports float32 and float64; {name} is "
                        f"{t.dtype}")
    if dtype is not None and t.dtype != dtype:
        raise TypeError(f"sparsekern triton backend: {name} is {t.dtype}, expected {dtype}")


def check_index(name: str, t: torch.Tensor) -> None:
    if t.dtype != torch.int32 or t.dim() != 1:
        raise TypeError(f"sparsekern triton backend: CSR {name} must be a 1-D int32 tensor, got "
                        f"{t.dtype} of shape {list(t.shape)}")


def check_mlp(x0: torch.Tensor, *args, **backward) -> list[int]:
    """``program.check_program(x0, *args, **backward)`` for a Triton launch: float32 or
    float64 only, on a device the kernels run on. Returns the widths."""
    check_float("x0", x0)
    check_device(x0)
    return check_program(x0, *args, **backward)


def program_widths(x0: torch.Tensor, layers: Sequence[LayerProgram]) -> list[int]:
    """n_0..n_L of a checked program."""
    return [x0.shape[0], *(layer.n_out for layer in layers)]


def empty_batch(x0: torch.Tensor, widths: list[int], save: bool
                ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """mlp_fwd's outputs for B = 0 (no launch: a grid must not be empty)."""
    saved = [x0.new_empty((n, 0)) for n in (*widths[1:], *widths[1:-1])] if save else []
    return x0.new_empty((widths[-1], 0)), x0.new_empty((0,)), saved


def dot_precision(dtype: torch.dtype, precision: str) -> str:
    """``tl.dot``'s input_precision for float32 operands: IEEE unless TF32 was asked for.

    The spelling ``input_precision="ieee"`` is accepted by Triton 3.0 through 3.9
    (``allow_tf32=`` is deprecated); it is ignored for float64 and for the
    bf16/fp16 operands of ``dot_operands``.
    """
    check_precision(precision)
    return "tf32" if uses_tf32(precision) and dtype == torch.float32 else "ieee"


# dot_operands codes: what the fused kernels round tl.dot's operands to.
LOWP_NONE, LOWP_BF16, LOWP_FP16, LOWP_BF16_EMULATED = 0, 1, 2, 3


def dot_operands(dtype: torch.dtype, precision: str, compiled: bool | None = None) -> int:
    """The fused kernels' ``LOWP`` constexpr: the type ``tl.dot``'s operands are cast to.

    bf16 and fp16 (float32 inputs only) cast to tensor-core types. ``compiled``:
    for a GPU build (default: unless this process interprets). Interpreted, bf16
    is rounded in float32 bits instead (``LOWP_BF16_EMULATED``):
    its bf16 cast truncates and its dot multiplies the raw 16-bit patterns, while
    fp16 it computes correctly. The products are the same either way (exact in
    float32), so only the order of the float32 sums differs.
    """
    check_precision(precision)
    if not is_reduced(precision):
        return LOWP_NONE
    if dtype != torch.float32:
        raise TypeError(f"sparsekern triton backend: precision={precision!r} rounds float32 "
                        f"products; the program is {dtype}")
    if precision == "fp16":
        return LOWP_FP16
    compiled = not interpreting() if compiled is None else compiled
    return LOWP_BF16 if compiled else LOWP_BF16_EMULATED


def cublas_fp32(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Run torch.matmul on ``device`` with TF32 as ``precision`` allows (default off).

    Adaptive ODE solvers need the exact fp32 products; torch's global flag might
    have been switched on by user code, so it is set for the duration and
    restored (``sparsekern.precision.cuda_matmul_precision``). For bf16/fp16 the
    caller rounds the operands (``sparsekern.precision.round_operand``) and
    TF32 is on (``cublas_may_use_tf32``).
    """
    return cuda_matmul_precision(device, cublas_may_use_tf32(precision))


def next_pow2(n: int, lo: int = 1, hi: int | None = None) -> int:
    """The smallest power of two >= n, clamped to [lo, hi]."""
    p = 1 << max(int(n) - 1, 0).bit_length()
    p = max(p, lo)
    return p if hi is None else min(p, hi)


def search_iters(n: int) -> int:
    """Iterations of a fixed-length binary search over n + 1 candidates."""
    return max(int(n), 1).bit_length() + 1


# ------------------------------------------------------------------ ahead of time

# (kernel, signature, constexprs) of one ahead-of-time build. The kernel is a
# ``@triton.jit`` function (triton ships no type stubs, so it is Any to mypy).
AotVariant = tuple[Any, dict[str, str], dict[str, object]]


@dataclass(frozen=True)
class AotRule:
    """How a kernel's runtime parameters are typed for an ahead-of-time build.

    Constexprs are the kernel's own (``tl.constexpr`` annotations); ``ints`` are its
    i32 scalars, ``index`` its int32 pointers, ``table`` its int64 pointers, and
    every other parameter points to the launch's float dtype.
    """

    ints: tuple[str, ...]
    index: tuple[str, ...] = ()
    table: tuple[str, ...] = ()


def aot_signature(kernel, dtype: torch.dtype, rule: AotRule) -> dict[str, str]:
    """The signature Triton's ``ASTSource`` takes, from the kernel's parameters in order."""
    params = {p.name: p for p in kernel.params}
    named = (*rule.ints, *rule.index, *rule.table)
    bad = [n for n in named if n not in params or params[n].is_constexpr]
    if bad:
        raise ValueError(f"{kernel.__name__}: the AOT rule types {bad}, which are not runtime "
                         "parameters of the kernel")
    kinds = {**dict.fromkeys(rule.ints, "i32"), **dict.fromkeys(rule.index, "*i32"),
             **dict.fromkeys(rule.table, "*i64")}
    fp = f"*{AOT_DTYPES[dtype]}"
    return {p.name: "constexpr" if p.is_constexpr else kinds.get(p.name, fp)
            for p in kernel.params}


def aot_variant(kernel, dtype: torch.dtype, rule: AotRule, **constexprs: object
                ) -> AotVariant:
    """(kernel, signature, constexprs) of one ahead-of-time build; every constexpr of the
    kernel gets a value, and only those."""
    expected = {p.name for p in kernel.params if p.is_constexpr}
    if set(constexprs) != expected:
        raise ValueError(f"{kernel.__name__}: constexprs {sorted(expected)} expected, got "
                         f"{sorted(constexprs)}")
    return kernel, aot_signature(kernel, dtype, rule), constexprs
