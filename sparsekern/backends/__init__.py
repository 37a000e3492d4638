"""The backend registry: one record per backend, one function that resolves a choice.

Every op of the registry (``sparsekern.ops``) takes a ``backend`` name and gets
its implementation from ``kernel``; ``SparseConfig.backend`` is resolved to such
a name by ``resolve`` (rule) or ``sparsekern.autotune.fastest_backend``
(measurement). What a backend is lives only here:

- "ref": any device, every precision (rounds bf16/fp16 operands itself),
  ``sparsekern.ref``, the oracle;
- "cpu": CPU tensors, exact, the C++ extension (``backends.cpu``, built on first use);
- "triton": CUDA tensors (CPU under ``TRITON_INTERPRET=1``), every precision,
  ``sparsekern.triton``;
- "cuda": CUDA tensors, exact (TF32 for cuBLAS on request), the CUDA extension
  (``backends.cuda``, nvcc).

The choice is not a function of the device alone ("ref" and "cpu" both run on
CPU tensors, "triton" and "cuda" on GPUs, and "auto" may measure which is
faster), so the ops take the backend as an argument rather than registering a
kernel per dispatch key.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Literal

import torch

from sparsekern.precision import PRECISIONS

BackendName = Literal["ref", "cpu", "triton", "cuda"]
BACKENDS: tuple[BackendName, ...] = ("ref", "cpu", "triton", "cuda")
PRECISIONS_EXACT = ("ieee", "tf32")  # tf32 is a permission; exact kernels ignore it

# What backend="auto" tries on a device type, in order, before falling back to "ref".
AUTO_ORDER: dict[str, tuple[BackendName, ...]] = {"cpu": ("cpu",), "cuda": ("triton", "cuda")}
# Device types on which "auto" with autotune measures its candidates (a constant for tests).
MEASURED_DEVICE_TYPES = ("cuda",)


def _ref() -> ModuleType:
    from sparsekern import ref

    return ref


def _cpu() -> ModuleType:
    from sparsekern.backends import cpu

    return cpu


def _cuda() -> ModuleType:
    from sparsekern.backends import cuda

    return cuda


def _triton() -> ModuleType:
    from sparsekern import triton as triton_backend

    return triton_backend


def _ready_always() -> str | None:
    return None


def _cpu_available() -> str | None:
    if _cpu().available():
        return None
    return "the C++ CPU kernels could not be built (no C++ compiler or ninja here)"


def _cpu_ready() -> str | None:
    # Unlike nvcc's minutes, the CPU build (a minute, once per machine, cached) is part of
    # "auto" on a CPU: a build that fails falls back to "ref" with the reason, rather
    # than failing the first call.
    missing = _cpu_available()
    if missing is not None:
        return missing
    try:
        _cpu().extension()
    except Exception as exc:
        return f"the C++ CPU kernels could not be built ({type(exc).__name__}: {exc})"
    return None


def _triton_ready() -> str | None:
    return None if _triton().available() else "triton does not import (or no CUDA device)"


def _cuda_available() -> str | None:
    return None if _cuda().available() else "the CUDA extension cannot be built here"


def _cuda_ready() -> str | None:
    # is_built first: "auto" must never start a minutes-long nvcc build, backend="cuda" does.
    if not _cuda().is_built():
        return "the CUDA extension is not built (backend='cuda' builds it)"
    return _cuda_available()


def _runs_on_triton(device: torch.device) -> bool:
    return device.type == "cuda" or (device.type == "cpu" and _triton().interpreting())


@dataclass(frozen=True)
class Backend:
    """One backend: where it runs, which product precisions it has, how it is loaded.

    Attributes:
        name: the name the ops take.
        device_types: device types whose tensors it runs on (``runs_on`` refines).
        precisions: the ``SparseConfig.precision`` values its MLP kernels implement.
        ready: None when "auto" may pick it here now, else why not (for "cpu" this
            builds the extension on first use; never an nvcc build).
        available: None when it can run here, if need be after a build, else why not
            (defaults to ``ready``).
        load: the module holding its kernels (``spmm``, ``sddmm``, ``mlp_fwd``, ...).
        runs_on: whether it runs on tensors of a device (default: by device type).
        kernel_suffix: appended to op names in ``load()`` ("_ref" for the references).
    """

    name: BackendName
    device_types: tuple[str, ...]
    precisions: tuple[str, ...]
    ready: Callable[[], str | None]
    load: Callable[[], Any]
    runs_on: Callable[[torch.device], bool] | None = None
    kernel_suffix: str = ""
    available: Callable[[], str | None] | None = None

    def unavailable(self, device: torch.device) -> str | None:
        """Why it cannot run on ``device`` here (None: it can), by ``available`` (no build)
        or else ``ready``."""
        if not self.supports(device):
            return f"the {self.name} backend runs on {self.where()}"
        return (self.available or self.ready)()

    def supports(self, device: torch.device) -> bool:
        if self.runs_on is not None:
            return self.runs_on(device)
        return "*" in self.device_types or device.type in self.device_types

    def where(self) -> str:
        if "*" in self.device_types:
            return "tensors on any device"
        if self.name == "triton":
            return "CUDA tensors (CPU tensors only under TRITON_INTERPRET=1)"
        return " or ".join(f"{t.upper()} tensors" for t in self.device_types)


REGISTRY: dict[str, Backend] = {b.name: b for b in (
    Backend("ref", ("*",), PRECISIONS, _ready_always, _ref, kernel_suffix="_ref"),
    Backend("cpu", ("cpu",), PRECISIONS_EXACT, _cpu_ready, lambda: _cpu().extension(),
            available=_cpu_available),
    Backend("triton", ("cuda",), PRECISIONS, _triton_ready, _triton,
            runs_on=_runs_on_triton),
    Backend("cuda", ("cuda",), PRECISIONS_EXACT, _cuda_ready, lambda: _cuda().extension(),
            available=_cuda_available),
)}
# Backends with bf16/fp16 products ("ref" rounds the operands as the kernels do).
REDUCED_BACKENDS = tuple(sorted((name for name, b in REGISTRY.items() if "bf16" in b.precisions),
                               key=lambda name: name == "ref"))


def get(name: str) -> Backend:
    """The record of backend ``name``; ValueError naming the known ones otherwise."""
    if name not in REGISTRY:
        raise ValueError(f"backend={name!r} is not one of {BACKENDS}")
    return REGISTRY[name]


def module(backend: str) -> Any:
    """The module holding ``backend``'s kernels (loading, or building, an extension)."""
    return get(backend).load()


def kernel(name: str, backend: str, device: torch.device) -> Callable[..., Any]:
    """The implementation of op ``name`` in ``backend``, after checking it runs on ``device``."""
    record = get(backend)
    if not record.supports(device):
        raise ValueError(f"backend {backend!r} runs on {record.where()}, got tensors on {device}")
    return getattr(record.load(), name + record.kernel_suffix)


def check_precision_supported(backend: str, precision: str, what: str) -> None:
    """ValueError naming ``what`` unless ``backend``'s kernels have ``precision`` products."""
    if precision not in get(backend).precisions:
        raise ValueError(f"{what}: backend {backend!r} has no {precision} products (exact "
                         f"float32 only); use one of {REDUCED_BACKENDS} or precision='ieee'")


def _readiness(device_type: str, precision: str) -> dict[BackendName, str | None]:
    """Each rule candidate with ``precision`` products: None if ready, else why not."""
    return {name: REGISTRY[name].ready() for name in AUTO_ORDER.get(device_type, ())
            if precision in REGISTRY[name].precisions}


def candidates(device_type: str, precision: str = "ieee") -> list[BackendName]:
    """The backends "auto" may pick on ``device_type`` for ``precision`` now, in rule order.

    Only backends that are ready (``Backend.ready``): on a CPU "cpu" once its
    extension loads (built on first use); on CUDA "triton" when it imports, "cuda"
    once its extension is built or cached (never an nvcc build).
    """
    return [name for name, why in _readiness(device_type, precision).items() if why is None]


_resolved: dict[tuple[str, str], BackendName] = {}


def resolve(choice: str, device: torch.device, precision: str = "ieee") -> str:
    """The backend that runs on ``device`` for a ``SparseConfig.backend`` choice, by rule.

    A named backend is itself. "auto": the first of ``candidates`` (on CPU the
    C++ kernels, on CUDA Triton then the built CUDA extension), else "ref" with
    a warning saying why (correct, not fast). Cached per (device type,
    precision) for the process, so the warning comes once (``clear_cache``).
    """
    if choice != "auto":
        get(choice)
        return choice
    key = (device.type, precision)
    if key not in _resolved:
        # Each candidate's readiness once: a failing CPU build is not tried again for
        # the warning.
        reasons = _readiness(device.type, precision)
        found = [name for name, why in reasons.items() if why is None]
        _resolved[key] = found[0] if found else "ref"
        if not found and device.type in AUTO_ORDER:
            _warn_fallback(device.type, precision, reasons)
    return _resolved[key]


def _warn_fallback(device_type: str, precision: str,
                   reasons: dict[BackendName, str | None]) -> None:
    if not reasons:
        why = (f"precision={precision!r} products have kernels on CUDA (Triton); on "
               f"{device_type} the plain PyTorch reference backend rounds them the same way")
    else:
        listed = "; ".join(f"{n}: {why}" for n, why in reasons.items())
        kind = "GPU" if device_type == "cuda" else device_type.upper()
        why = (f"no {kind} backend for precision={precision!r} is ready ({listed}); "
               f"running the plain PyTorch reference backend")
    warnings.warn(f"sparsekern: {why} (correct, not fast)", stacklevel=4)


def clear_cache() -> None:
    """Forget the rule's cached choices (after availability changed, in tests)."""
    _resolved.clear()


class BackendChoice:
    """The backend a compiled field runs on, one object shared by the field and its layers.

    Layers read ``name`` when they call a kernel, so a change of backend (``.to()``
    to another device, a measured choice) reaches every layer without copying it.
    """

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"BackendChoice({self.name!r})"
