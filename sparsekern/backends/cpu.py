"""The CPU backend: the C++ extension in csrc/cpu, built with ninja on first use and cached.

Cached by a hash of the sources, the compiler flags (which carry the CPU's
vector features) and the torch version (``sparsekern.backends.build``); the
sources are the checkout's csrc/ or an installed wheel's sparsekern/_csrc.
``make install`` builds it ahead (``python -m sparsekern.backends.cpu``).
"""

from __future__ import annotations

import functools
from types import ModuleType

import torch

from sparsekern.backends.build import (
    CPU,
    CPU_LDFLAGS,
    Build,
    cpu_flags,
    cxx_compiler,
    load_extension,
    ninja_available,
    source_root,
)


def compile_flags() -> list[str]:
    """C++ flags: OpenMP (at::parallel_for), and AVX2/FMA vectors where the CPU has them."""
    return cpu_flags()


def build() -> Build:
    """This machine's build of the extension: sources, flags and cache folder (builds nothing)."""
    return Build(CPU, source_root(), tuple(compile_flags()), torch.__version__, CPU_LDFLAGS)


@functools.cache
def extension() -> ModuleType:
    """The compiled extension module: loaded from the cache, or built there first."""
    return load_extension(build(), fallback="'ref'")


def is_built() -> bool:
    """Whether the extension is loaded or a cached build of these sources exists (no build)."""
    return extension.cache_info().currsize > 0 or build().built() is not None


def available() -> bool:
    """Whether the extension is built or can be here: sources, a C++ compiler, ninja (no build)."""
    if is_built():
        return True
    return not build().missing() and cxx_compiler() is not None and ninja_available()


if __name__ == "__main__":
    print(extension().__file__)
