"""SparseConfig: the knobs of compile_sparse."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Literal, get_args

import torch

from sparsekern import backends
from sparsekern.precision import Precision, check_precision

Layout = Literal["auto", "dense", "csr", "blocked"]
BackendOption = Literal["auto", "ref", "cpu", "triton", "cuda"]
Tier = Literal["auto", "fused", "generic"]
Fallback = Literal["error", "eager"]
LAYOUTS: tuple[Layout, ...] = get_args(Layout)
BACKEND_CHOICES: tuple[BackendOption, ...] = get_args(BackendOption)
TIERS: tuple[Tier, ...] = get_args(Tier)
FALLBACKS: tuple[Fallback, ...] = get_args(Fallback)
# Element types models and states may hold. bf16/fp16 exist only as the operand precision
# of products (SparseConfig.precision), never as the type of a model.
DTYPES = (torch.float32, torch.float64)
# The default of SparseConfig.backend when set: a process-wide override, e.g. to run the
# whole test suite with one backend forced on a GPU.
BACKEND_ENV = "SPARSEKERN_BACKEND"


def default_backend() -> BackendOption:
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


@dataclass(frozen=True)
class SparseConfig:
    """How ``compile_sparse`` compiles a vector field.

    Attributes:
        layout: per-layer storage. "auto" measures the candidates on each layer
            (``sparsekern.autotune``); "dense" (neuron-reduced dense), "csr" and
            "blocked" force one for every layer.
        backend: kernels: "ref" (plain PyTorch, the test oracle), "cpu", "triton",
            "cuda", or "auto", resolved per device by the backend registry
            (``sparsekern.backends``; docs/design.md §2.9). Default:
            ``$SPARSEKERN_BACKEND`` when set, else "auto".
        tier: "auto" fuses MLPs that describe themselves (``sparsekern.protocol``;
            nn.Sequential chains) and compiles anything else generically; "generic" forces the
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
        precision: the products' precision, "ieee" (default, exact), "tf32",
            "bf16" or "fp16": defined in ``sparsekern.precision`` (docs/design.md §4).

    Models must hold float32 or float64 parameters (``DTYPES``); reduced
    precision is a property of the products, never of the model.
    """

    layout: Layout = "auto"
    backend: BackendOption = field(default_factory=default_backend)
    tier: Tier = "auto"
    fallback: Fallback = "error"
    reduce_neurons: bool = True
    batch_hint: int = 1024
    autotune: bool = True
    precision: Precision = "ieee"

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
        if (self.backend != "auto"
                and self.precision not in backends.get(self.backend).precisions):
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
