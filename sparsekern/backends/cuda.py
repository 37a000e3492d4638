"""The CUDA backend: csrc/cuda (kernels with a C ABI, and their torch binding), built on first use.

Built with ninja through ``torch.utils.cpp_extension.load`` and cached like the
CPU backend (``sparsekern.backends.cpu``): the build directory is keyed by a
hash of the sources, the flags, the torch and CUDA versions and the visible
GPUs' compute capabilities, so an edited kernel or another GPU gets a fresh
build and an unchanged one loads in milliseconds. Needs a CUDA build of torch
and a visible GPU. ``SPARSEKERN_CACHE`` moves the cache (default
~/.cache/sparsekern). The kernels alone (no torch) build with CMakeLists.txt.
"""

from __future__ import annotations

import functools
import hashlib
import sys
import time
from pathlib import Path
from types import ModuleType

import torch

from sparsekern.backends.cpu import cache_dir

CSRC = Path(__file__).resolve().parents[2] / "csrc" / "cuda"
SOURCES = ("binding.cpp", "spmm.cu", "mlp_epilogue.cu", "fused_mlp.cu")
HEADERS = ("sparsekern_cuda.h", "device_common.h")


def compile_flags() -> tuple[list[str], list[str]]:
    """(C++ flags, nvcc flags). No fast-math: results must match the CPU reference."""
    return ["-O3", "-std=c++17"], ["-O3", "-std=c++17", "-lineinfo"]


def _capabilities() -> list[tuple[int, int]]:
    return [torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())]


def _build_key(cflags: list[str], cuda_flags: list[str]) -> str:
    h = hashlib.sha256()
    for name in (*SOURCES, *HEADERS):
        h.update((CSRC / name).read_bytes())
    h.update(" ".join(cflags + cuda_flags).encode())
    h.update(f"{torch.__version__} {torch.version.cuda} {_capabilities()}".encode())
    h.update(sys.version.encode())
    return h.hexdigest()[:16]


@functools.cache
def extension() -> ModuleType:
    """The compiled binding (``spmm``, ``sddmm``, ``mlp_fwd``, ``mlp_bwd``); built on first call.

    Raises:
        RuntimeError: torch has no CUDA, no GPU is visible, the sources are
            missing, or the build fails (the compiler's message is chained).
    """
    if torch.version.cuda is None or not torch.cuda.is_available():
        raise RuntimeError(
            "sparsekern cuda backend needs a CUDA build of torch and a visible GPU (this torch "
            f"is {torch.__version__}, CUDA {torch.version.cuda}, cuda available: "
            f"{torch.cuda.is_available()}); use backend='cpu' or 'ref'"
        )
    from torch.utils.cpp_extension import load

    missing = [s for s in (*SOURCES, *HEADERS) if not (CSRC / s).is_file()]
    if missing:
        raise RuntimeError(
            f"sparsekern cuda backend: sources {missing} not found under {CSRC}; install "
            "sparseflows from a source checkout (pip install -e .) or use backend='ref'"
        )
    cflags, cuda_flags = compile_flags()
    key = _build_key(cflags, cuda_flags)
    build_dir = cache_dir() / f"cuda_{key}"
    build_dir.mkdir(parents=True, exist_ok=True)
    fresh = not any(build_dir.glob("*.so"))
    if fresh:
        print("sparsekern: building the CUDA kernels (first use, a minute or two)...",
              file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    try:
        module = load(
            name=f"sparsekern_cuda_{key}",
            sources=[str(CSRC / s) for s in SOURCES],
            extra_cflags=cflags,
            extra_cuda_cflags=cuda_flags,
            extra_include_paths=[str(CSRC)],
            build_directory=str(build_dir),
            verbose=False,
        )
    except Exception as exc:  # the compiler's own message is in the chained exception
        raise RuntimeError(
            f"sparsekern cuda backend: building the CUDA extension in {build_dir} failed "
            f"({type(exc).__name__}); backend='triton' or 'ref' runs without it"
        ) from exc
    if fresh:
        print(f"sparsekern: CUDA kernels built in {time.perf_counter() - t0:.0f} s "
              f"({build_dir})", file=sys.stderr, flush=True)
    return module


def available() -> bool:
    """Whether the extension builds and loads here (a CUDA torch and a GPU are needed)."""
    try:
        extension()
    except RuntimeError:
        return False
    return True


if __name__ == "__main__":
    print(extension().__file__)
