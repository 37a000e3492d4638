"""The CUDA backend: csrc/cuda (kernels with a C ABI, and their torch binding), built on first use.

Built with ninja and cached like the CPU backend (``sparsekern.backends.build``),
keyed also by the torch and CUDA versions and the visible GPUs' compute
capabilities. Needs a CUDA build of torch and a visible GPU. CMakeLists.txt
builds the same extension (and the kernels alone) outside Python.
"""

from __future__ import annotations

import functools
import shutil
from pathlib import Path
from types import ModuleType

import torch

from sparsekern.backends.build import (
    CUDA,
    Build,
    cuda_flags,
    cxx_compiler,
    load_extension,
    ninja_available,
    source_root,
)


def compile_flags() -> tuple[list[str], list[str]]:
    """(C++ flags, nvcc flags). No fast-math: results must match the CPU reference."""
    return cuda_flags()


def _capabilities() -> list[tuple[int, int]]:
    return [torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())]


def _depends() -> str:
    """What the binary depends on besides its sources and flags (part of the cache key)."""
    return f"{torch.__version__} {torch.version.cuda} {_capabilities()}"


def _usable_torch() -> bool:
    return torch.version.cuda is not None and torch.cuda.is_available()


def _nvcc() -> str | None:
    from torch.utils.cpp_extension import CUDA_HOME

    if CUDA_HOME and (Path(CUDA_HOME) / "bin" / "nvcc").exists():
        return str(Path(CUDA_HOME) / "bin" / "nvcc")
    return shutil.which("nvcc")


def build() -> Build:
    """This machine's build of the extension (needs a CUDA torch and a GPU; builds nothing)."""
    cflags, nvcc_flags = compile_flags()
    return Build(CUDA, source_root(), tuple(cflags), _depends(), cuda_flags=tuple(nvcc_flags))


@functools.cache
def extension() -> ModuleType:
    """The compiled binding (``spmm``, ``sddmm``, ``mlp_fwd``, ``mlp_bwd``): loaded or built.

    Raises:
        RuntimeError: torch has no CUDA, no GPU is visible, the sources are
            missing, or the build fails (the compiler's message is chained).
    """
    if not _usable_torch():
        raise RuntimeError(
            "sparsekern cuda backend needs a CUDA build of torch and a visible GPU (this torch "
            f"is {torch.__version__}, CUDA {torch.version.cuda}, cuda available: "
            f"{torch.cuda.is_available()}); use backend='cpu' or 'ref'"
        )
    return load_extension(build(), fallback="'triton' or 'ref'")


def is_built() -> bool:
    """Whether the extension is loaded or cached for this torch, CUDA and GPUs (builds nothing).

    backend="auto" uses this: it must not start an nvcc build of minutes.
    """
    if extension.cache_info().currsize:
        return True
    return _usable_torch() and build().built() is not None


def available() -> bool:
    """Whether it is built or can be: CUDA torch, a GPU, sources, nvcc, C++, ninja (no build)."""
    if is_built():
        return True
    return (_usable_torch() and not build().missing() and _nvcc() is not None
            and cxx_compiler() is not None and ninja_available())


if __name__ == "__main__":
    print(extension().__file__)
