"""SparseConfig: the knobs of compile_sparse."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from sparsekern.precision import check_precision, is_reduced

LAYOUTS = ("auto", "dense", "csr", "blocked")
BACKEND_CHOICES = ("auto", "ref", "cpu", "triton", "cuda")
TIERS = ("auto", "fused", "generic")
FALLBACKS = ("error", "eager")
# Element types models and states may hold. bf16/fp16 exist only as the operand precision
# of products (SparseConfig.precision), never as the type of a model.
DTYPES = (torch.float32, torch.float64)
# The default of SparseConfig.backend when set: a process-wide override, e.g. to run the
# whole test suite with one backend forced on a GPU.
BACKEND_ENV = "SPARSEKERN_BACKEND"


def default_backend() -> str:
    """``$SPARSEKERN_BACKEND`` if set (one of ``BACKEND_CHOICES``), else "auto".

    Raises:
        ValueError: the variable is set to something else.
    """
    value = os.environ.get(BACKEND_ENV, "").strip()
    if not value:
        return "auto"
    if value not in BACKEND_CHOICES:
        raise ValueError(f"environment variable {BACKEND_ENV}={value!r} is not a sparsekern "
                         f"backend; expected one of {BACKEND_CHOICES} (or unset it)")
    return value


def check_dtype(dtype: torch.dtype, what: str) -> None:
    """Raise a TypeError naming ``what`` unless ``dtype`` is one the kernels compute in."""
    if dtype not in DTYPES:
        names = " and ".join(str(d).removeprefix("torch.") for d in DTYPES)
        raise TypeError(
            f"{what} is {dtype}; sparsekern models hold {names} only (for bfloat16/float16 "
            f"products keep the model float32 and set SparseConfig(precision='bf16' or "
            f"'fp16')); convert the model with .float() or .double() first"
        )


@contextlib.contextmanager
def cuda_matmul_precision(device: torch.device, allow_tf32: bool) -> Iterator[None]:
    """Run torch's dense products on ``device`` with TF32 exactly as requested (default off).

    cuBLAS products (torch.matmul, ``@``) follow a process-wide flag that user
    code may have switched on; adaptive solvers need exact fp32, so the flag is
    set for the duration and restored. A no-op off CUDA, when the flag already
    has the requested value, and while torch.compile traces (it would break the graph).
    """
    if device.type != "cuda" or compiling():
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


def compiling() -> bool:
    """Whether torch.compile is tracing the current call."""
    is_compiling = getattr(torch.compiler, "is_compiling", None)
    return bool(is_compiling and is_compiling())


@dataclass(frozen=True)
class SparseConfig:
    """How ``compile_sparse`` compiles a vector field.

    Attributes:
        layout: per-layer storage. "auto" measures the candidates on each layer
            (``sparsekern.cost``); "dense" (neuron-reduced dense), "csr" and
            "blocked" force one for every layer.
        backend: kernels. "auto" picks by device: on CPU the C++ extension; on
            CUDA the available GPU backends ("triton", and "cuda" once its
            extension is built), timed on the compiled field when ``autotune``
            is on (fused tier), else Triton first (``sparsekern.field``); with
            none available, "ref" with a warning. "ref" is plain PyTorch (the
            test oracle). Default: ``$SPARSEKERN_BACKEND`` when set, else "auto".
        tier: "auto" fuses recognised MLPs (flows.ODEnet, nn.Sequential chains)
            and compiles anything else generically; "generic" forces the
            generic tier (autograd to any order everywhere); "fused" raises if
            the model is not a recognised MLP.
        fallback: what to do with an op on the state path that the engine
            cannot compile (e.g. a pruned Conv2d): "error" raises naming it,
            "eager" leaves it to PyTorch with a warning.
        reduce_neurons: remove neurons that no output depends on and fold the
            constant output of neurons that depend on no input.
        batch_hint: batch size the "auto" layout is measured at.
        autotune: "auto" measures the candidate layouts (fastest here, but a
            near tie may go either way from run to run); False picks by a
            density rule alone, so the same masks always give the same layouts
            and bit-identical results (the pipeline's resumable runs use this).
        precision: the products' precision (``sparsekern.precision``).
            "ieee" (default): exact float32, whatever torch's global TF32 flag
            says, because adaptive solvers need the accuracy. "tf32": GPU
            kernels and cuBLAS may use TF32 tensor cores for float32 (both
            tiers). "bf16" / "fp16" (the fused tier only):
            product operands rounded to bfloat16 / float16, float32
            accumulation, everything else float32; for float32 models on the
            "triton" backend (tensor cores) or "ref" (the same rounding, for
            testing); "auto" picks those, and the generic tier refuses them.

    Models must hold float32 or float64 parameters (``DTYPES``); reduced
    precision is a property of the products, never of the model.
    """

    layout: str = "auto"
    backend: str = field(default_factory=default_backend)
    tier: str = "auto"
    fallback: str = "error"
    reduce_neurons: bool = True
    batch_hint: int = 1024
    autotune: bool = True
    precision: str = "ieee"

    def __post_init__(self) -> None:
        for name, allowed in (
            ("layout", LAYOUTS),
            ("backend", BACKEND_CHOICES),
            ("tier", TIERS),
            ("fallback", FALLBACKS),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(
                    f"SparseConfig.{name}={getattr(self, name)!r}; expected one of {allowed}"
                )
        check_precision(self.precision, "SparseConfig.precision")
        if is_reduced(self.precision) and self.backend in ("cpu", "cuda"):
            source = (f" (the default from ${BACKEND_ENV})"
                      if os.environ.get(BACKEND_ENV, "").strip() == self.backend else "")
            raise ValueError(
                f"SparseConfig(precision={self.precision!r}, backend={self.backend!r}{source}): "
                f"the {self.backend} kernels compute exact float32 products; "
                f"{self.precision} products run on backend 'triton' (tensor cores) or 'ref' "
                f"(the same rounding, for testing), or leave backend='auto'"
            )
        if self.batch_hint < 1:
            raise ValueError(f"SparseConfig.batch_hint must be >= 1, got {self.batch_hint}")
