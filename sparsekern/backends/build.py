"""Building the engine's C++ and CUDA extensions: ninja on first use, cached by content.

The sources are C++ under ``csrc/`` of a checkout, shipped in a wheel as
``sparsekern/_csrc`` (setup.py); ``source_root`` finds either. A build
directory is named after a hash of the sources (by their path relative to that
root, so an installed copy and the checkout share builds), the flags and
whatever else the binary depends on (torch version, CPU features, GPU
capabilities): an edited kernel or another machine gets a fresh build, an
unchanged one loads in milliseconds. ``SPARSEKERN_CACHE`` moves the cache
(default ~/.cache/sparsekern).

This file imports nothing but the standard library at module level (torch only
inside the functions that build or load), so CMakeLists.txt runs it as a
script (``python build.py cmake``) to read the same source lists and flags.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import platform
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

PACKAGE_DIR = Path(__file__).resolve().parents[1]
INSTALLED_CSRC = PACKAGE_DIR / "_csrc"  # a wheel's copy of csrc/ (setup.py package_dir)
CHECKOUT_CSRC = PACKAGE_DIR.parent / "csrc"  # an editable install or a source checkout
COMMON = "common"  # headers both extensions include (the fused program's decode and loops)


def source_root() -> Path:
    """The C++/CUDA source tree: ``sparsekern/_csrc`` when installed, else the checkout's csrc/."""
    for root in (INSTALLED_CSRC, CHECKOUT_CSRC):
        if (root / COMMON).is_dir():
            return root
    return INSTALLED_CSRC


@dataclass(frozen=True)
class Spec:
    """What one extension is built from: its folder under the source root and its sources."""

    kind: str  # "cpu" or "cuda": the module name, the cache folder and messages
    folder: str
    sources: tuple[str, ...]  # compiled, relative to the folder

    def paths(self, root: Path) -> tuple[list[Path], list[Path]]:
        """(sources, headers): the headers are every .h of the folder and of common/."""
        sources = [root / self.folder / s for s in self.sources]
        headers = sorted(p for d in (self.folder, COMMON) for p in (root / d).glob("*.h"))
        return sources, headers


CPU = Spec("cpu", "cpu", ("sparse_ops.cpp", "sparse_conv.cpp", "fused_mlp.cpp", "rk_solve.cpp",
                         "bindings.cpp"))
CUDA = Spec("cuda", "cuda", ("binding.cpp", "spmm.cu", "sparse_conv.cu", "mlp_epilogue.cu",
                            "fused_mlp.cu"))


def _cpu_features() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def cpu_flags() -> list[str]:
    """C++ flags of the CPU extension: OpenMP, and AVX2/FMA vectors where the CPU has them."""
    flags = ["-O3", "-fopenmp", "-std=c++17"]
    if platform.machine() in ("x86_64", "AMD64") and {"avx2", "fma"} <= _cpu_features():
        # ATen's Vectorized<T> picks its AVX2 implementation (8 floats, Sleef math) from these.
        flags += ["-mavx2", "-mfma", "-DCPU_CAPABILITY_AVX2", "-DCPU_CAPABILITY=AVX2"]
    return flags


CPU_LDFLAGS = ("-fopenmp",)


def cuda_flags() -> tuple[list[str], list[str]]:
    """(C++ flags, nvcc flags) of the CUDA extension. No fast-math: results must match ref."""
    return ["-O3", "-std=c++17"], ["-O3", "-std=c++17", "-lineinfo"]


def cache_dir() -> Path:
    return Path(os.environ.get("SPARSEKERN_CACHE", Path.home() / ".cache" / "sparsekern"))


def build_key(root: Path, files: Sequence[Path], flags: Sequence[str], depends: str) -> str:
    """16 hex digits of a hash of ``files`` (names relative to ``root``, and contents),
    the flags, ``depends`` and the Python version."""
    h = hashlib.sha256()
    for path in files:
        h.update(path.relative_to(root).as_posix().encode() + b"\0")
        h.update(path.read_bytes())
    h.update(" ".join(flags).encode())
    h.update(depends.encode())
    h.update(sys.version.encode())
    return h.hexdigest()[:16]


def cxx_compiler() -> str | None:
    """The C++ compiler torch.utils.cpp_extension would call ($CXX, else c++), if present."""
    return shutil.which(os.environ.get("CXX", "c++"))


def ninja_available() -> bool:
    return shutil.which("ninja") is not None


@dataclass(frozen=True)
class Build:
    """One extension for this machine: its sources, flags and cache folder (nothing built)."""

    spec: Spec
    root: Path
    cflags: tuple[str, ...]
    depends: str
    ldflags: tuple[str, ...] = ()
    cuda_flags: tuple[str, ...] | None = None

    @property
    def sources(self) -> list[Path]:
        return self.spec.paths(self.root)[0]

    def missing(self) -> list[str]:
        """Source files that are not there (a copy without its C++)."""
        return [str(p) for p in self.sources if not p.is_file()]

    def key(self) -> str:
        sources, headers = self.spec.paths(self.root)
        flags = [*self.cflags, *(self.cuda_flags or ())]
        return build_key(self.root, [*sources, *headers], flags, self.depends)

    def name(self) -> str:
        return f"sparsekern_{self.spec.kind}_{self.key()}"

    def directory(self) -> Path:
        return cache_dir() / f"{self.spec.kind}_{self.key()}"

    def built(self) -> Path | None:
        """The cached binary of exactly these sources and flags, if one exists (reads only)."""
        if self.missing():
            return None
        so = self.directory() / f"{self.name()}.so"
        return so if so.is_file() else None


def _import_binary(name: str, so: Path) -> ModuleType:
    import torch  # noqa: F401  (the binary links torch's libraries, loaded by importing it)

    spec = importlib.util.spec_from_file_location(name, so)
    assert spec is not None and spec.loader is not None, so
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_extension(build: Build, *, fallback: str) -> ModuleType:
    """Load the cached extension ``sparsekern_<kind>_<key>``, or build it first.

    A cached binary of the same key was built from the same sources and flags,
    wherever they lay then (checkout or installed copy): it is imported as it is.

    Args:
        build: what to build (``Build``).
        fallback: the backend to suggest when the build is impossible.

    Raises:
        RuntimeError: sources missing, or the build failed (the compiler's
            message is chained).
    """
    kind = build.spec.kind
    missing = build.missing()
    if missing:
        raise RuntimeError(
            f"sparsekern {kind} backend: sources {missing} not found (looked under "
            f"{INSTALLED_CSRC} and {CHECKOUT_CSRC}); reinstall sparseflows with its package "
            f"data or use backend={fallback}"
        )
    name, build_dir = build.name(), build.directory()
    so = build.built()
    if so is not None:
        try:
            return _import_binary(name, so)
        except ImportError:  # a binary left broken by an interrupted build: build again
            pass
    from torch.utils.cpp_extension import load

    build_dir.mkdir(parents=True, exist_ok=True)
    print(f"sparsekern: building the {kind.upper()} kernels (first use, a minute or two)...",
          file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    try:
        module = load(
            name=name,
            sources=[str(p) for p in build.sources],
            extra_cflags=list(build.cflags),
            extra_cuda_cflags=list(build.cuda_flags) if build.cuda_flags is not None else None,
            extra_ldflags=list(build.ldflags),
            extra_include_paths=[str(build.root / build.spec.folder)],
            build_directory=str(build_dir),
            verbose=False,
        )
    except Exception as exc:  # the compiler's own message is in the chained exception
        raise RuntimeError(
            f"sparsekern {kind} backend: building the extension in {build_dir} failed "
            f"({type(exc).__name__}); backend={fallback} runs without it"
        ) from exc
    print(f"sparsekern: {kind.upper()} kernels built in {time.perf_counter() - t0:.0f} s "
          f"({build_dir})", file=sys.stderr, flush=True)
    return module


def cmake_variables() -> str:
    """The source lists and flags as CMake ``set()`` lines (CMakeLists.txt includes them)."""

    def cmake_list(items: Sequence[str]) -> str:
        return '"' + ";".join(items) + '"'

    cxx, nvcc = cuda_flags()
    lines = {
        "SK_CPU_SOURCES": [f"{CPU.folder}/{s}" for s in CPU.sources],
        "SK_CPU_FLAGS": cpu_flags(),
        "SK_CPU_LDFLAGS": list(CPU_LDFLAGS),
        "SK_CUDA_CU_SOURCES": [f"{CUDA.folder}/{s}" for s in CUDA.sources if s.endswith(".cu")],
        "SK_CUDA_CXX_SOURCES": [f"{CUDA.folder}/{s}" for s in CUDA.sources
                                if not s.endswith(".cu")],
        "SK_CUDA_CXX_FLAGS": cxx,
        "SK_CUDA_NVCC_FLAGS": nvcc,
    }
    return "".join(f"set({k} {cmake_list(v)})\n" for k, v in lines.items())


if __name__ == "__main__":
    if sys.argv[1:] == ["cmake"]:
        print(cmake_variables(), end="")
    else:
        sys.exit(f"usage: {sys.argv[0]} cmake  (prints the source lists and flags for CMake)")
