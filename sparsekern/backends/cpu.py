"""The CPU backend: the C++ extension in csrc/cpu, built with ninja on first use and cached.

The build directory is keyed by a hash of the sources, the compiler flags, the
torch version and the CPU's vector features, so an edited kernel or another
machine gets a fresh build, and an unchanged one loads in milliseconds.
``make install`` builds it ahead (``python -m sparsekern.backends.cpu``).
Set ``SPARSEKERN_CACHE`` to move the cache (default ~/.cache/sparsekern).
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import sys
import time
from pathlib import Path
from types import ModuleType

import torch

CSRC = Path(__file__).resolve().parents[2] / "csrc" / "cpu"
SOURCES = ("sparse_ops.cpp", "fused_mlp.cpp", "bindings.cpp")


def _cpu_features() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def compile_flags() -> list[str]:
    """C++ flags: OpenMP (at::parallel_for), and AVX2/FMA vectors where the CPU has them."""
    flags = ["-O3", "-fopenmp", "-std=c++17"]
    if platform.machine() in ("x86_64", "AMD64") and {"avx2", "fma"} <= _cpu_features():
        # ATen's Vectorized<T> picks its AVX2 implementation (8 floats, Sleef math) from these.
        flags += ["-mavx2", "-mfma", "-DCPU_CAPABILITY_AVX2", "-DCPU_CAPABILITY=AVX2"]
    return flags


def _build_key(flags: list[str]) -> str:
    h = hashlib.sha256()
    for name in (*SOURCES, "kernels.h"):
        h.update((CSRC / name).read_bytes())
    h.update(" ".join(flags).encode())
    h.update(torch.__version__.encode())
    h.update(sys.version.encode())
    return h.hexdigest()[:16]


def cache_dir() -> Path:
    return Path(os.environ.get("SPARSEKERN_CACHE", Path.home() / ".cache" / "sparsekern"))


@functools.cache
def extension() -> ModuleType:
    """The compiled extension module (built on the first call in a fresh cache)."""
    from torch.utils.cpp_extension import load

    missing = [s for s in (*SOURCES, "kernels.h") if not (CSRC / s).is_file()]
    if missing:
        raise RuntimeError(
            f"sparsekern cpu backend: C++ sources {missing} not found under {CSRC}; install "
            "sparseflows from a source checkout (pip install -e .) or use backend='ref'"
        )
    flags = compile_flags()
    key = _build_key(flags)
    build_dir = cache_dir() / f"cpu_{key}"
    build_dir.mkdir(parents=True, exist_ok=True)
    fresh = not any(build_dir.glob("*.so"))
    if fresh:
        print("sparsekern: building the CPU kernels (first use, about a minute)...",
              file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    try:
        module = load(
            name=f"sparsekern_cpu_{key}",
            sources=[str(CSRC / s) for s in SOURCES],
            extra_cflags=flags,
            extra_ldflags=["-fopenmp"],
            extra_include_paths=[str(CSRC)],
            build_directory=str(build_dir),
            verbose=False,
        )
    except Exception as exc:  # the compiler's own message is in the chained exception
        raise RuntimeError(
            f"sparsekern cpu backend: building the C++ extension in {build_dir} failed "
            f"({type(exc).__name__}); backend='ref' runs without it"
        ) from exc
    if fresh:
        print(f"sparsekern: CPU kernels built in {time.perf_counter() - t0:.0f} s "
              f"({build_dir})", file=sys.stderr, flush=True)
    return module


def available() -> bool:
    """Whether the extension builds and loads here."""
    try:
        extension()
    except RuntimeError:
        return False
    return True


if __name__ == "__main__":
    print(extension().__file__)
