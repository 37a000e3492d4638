"""The CUDA backend: csrc/cuda (kernels with a C ABI, and their torch binding), built on first use.

Built with ninja and cached like the CPU backend (``sparsekern.backends.build``),
keyed also by the torch and CUDA versions and the visible GPUs' compute
capabilities. Needs a CUDA build of torch and a visible GPU. The kernels alone
(no torch) build with CMakeLists.txt.
"""

from __future__ import annotations

import functools
from pathlib import Path
from types import ModuleType

import torch

from sparsekern.backends.build import build_key, cache_dir, load_extension

CSRC = Path(__file__).resolve().parents[2] / "csrc" / "cuda"
SOURCES = ("binding.cpp", "spmm.cu", "mlp_epilogue.cu", "fused_mlp.cu")
HEADERS = ("sparsekern_cuda.h", "device_common.h", "../common/mlp_program.h")


def compile_flags() -> tuple[list[str], list[str]]:
    """(C++ flags, nvcc flags). No fast-math: results must match the CPU reference."""
    return ["-O3", "-std=c++17"], ["-O3", "-std=c++17", "-lineinfo"]


def _capabilities() -> list[tuple[int, int]]:
    return [torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())]


def _depends() -> str:
    """What the binary depends on besides its sources and flags (part of the cache key)."""
    return f"{torch.__version__} {torch.version.cuda} {_capabilities()}"


def _usable_torch() -> bool:
    return torch.version.cuda is not None and torch.cuda.is_available()


@functools.cache
def extension() -> ModuleType:
    """The compiled binding (``spmm``, ``sddmm``, ``mlp_fwd``, ``mlp_bwd``); built on first call.

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
    cflags, cuda_flags = compile_flags()
    return load_extension(
        "cuda",
        CSRC,
        SOURCES,
        HEADERS,
        cflags=cflags,
        cuda_flags=cuda_flags,
        depends=_depends(),
        fallback="'triton' or 'ref'",
    )


def is_built() -> bool:
    """Whether the extension is loaded or its cached build exists for this torch, CUDA and GPUs.

    Never builds anything (backend="auto" uses this: it must not start an nvcc
    build of minutes); ``extension()`` builds on first use.
    """
    if extension.cache_info().currsize:
        return True
    if not _usable_torch():
        return False
    files = (*SOURCES, *HEADERS)
    if not all((CSRC / f).is_file() for f in files):
        return False
    cflags, cuda_flags = compile_flags()
    key = build_key(CSRC, files, [*cflags, *cuda_flags], _depends())
    return any((cache_dir() / f"cuda_{key}").glob("*.so"))


def available() -> bool:
    """Whether the extension builds and loads here (a CUDA torch and a GPU are needed)."""
    try:
        extension()
    except RuntimeError:
        return False
    return True


if __name__ == "__main__":
    print(extension().__file__)
