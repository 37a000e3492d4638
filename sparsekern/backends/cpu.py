"""The CPU backend: the C++ extension in csrc/cpu, built with ninja on first use and cached.

Cached by a hash of the sources, the compiler flags (which carry the CPU's
vector features) and the torch version (``sparsekern.backends.build``).
``make install`` builds it ahead (``python -m sparsekern.backends.cpu``).
"""

from __future__ import annotations

import functools
import platform
from pathlib import Path
from types import ModuleType

import torch

from sparsekern.backends.build import load_extension

CSRC = Path(__file__).resolve().parents[2] / "csrc" / "cpu"
SOURCES = ("sparse_ops.cpp", "fused_mlp.cpp", "bindings.cpp")
HEADERS = ("kernels.h", "../common/mlp_program.h")


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


@functools.cache
def extension() -> ModuleType:
    """The compiled extension module (built on the first call in a fresh cache)."""
    return load_extension(
        "cpu",
        CSRC,
        SOURCES,
        HEADERS,
        cflags=compile_flags(),
        ldflags=["-fopenmp"],
        depends=torch.__version__,
        fallback="'ref'",
    )


def available() -> bool:
    """Whether the extension builds and loads here."""
    try:
        extension()
    except RuntimeError:
        return False
    return True


if __name__ == "__main__":
    print(extension().__file__)
