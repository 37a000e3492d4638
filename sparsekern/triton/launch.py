"""How the Triton kernels are launched: device rules, dtypes, exact fp32.

Triton kernels run on CUDA tensors, compiled; on CPU tensors only through
Triton's interpreter, which is chosen when ``@triton.jit`` runs, i.e. when
``TRITON_INTERPRET=1`` is set before triton is first imported (the CPU tests
run in a subprocess with it set). ``check_device`` turns any other case into a
clear error instead of a crash inside the launcher.

Also here: the dtype map and checks shared by the wrappers, how a
``SparseConfig.precision`` reaches ``tl.dot`` (``dot_precision``,
``dot_operands``), and the exact-fp32 rule for the dense products the general
path leaves to cuBLAS.
"""

from __future__ import annotations

import contextlib

import torch
import triton.language as tl

from sparsekern.config import cuda_matmul_precision
from sparsekern.precision import check_precision, cublas_may_use_tf32, is_reduced, uses_tf32
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
    restored (``sparsekern.config.cuda_matmul_precision``). For bf16/fp16 the
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
