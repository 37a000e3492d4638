"""Building the engine's C++ and CUDA extensions: ninja on first use, cached by content.

A build directory is named after a hash of the sources, the flags and whatever
else the binary depends on (torch version, CPU features, GPU capabilities), so
an edited kernel or another machine gets a fresh build and an unchanged one
loads in milliseconds. ``SPARSEKERN_CACHE`` moves the cache (default
~/.cache/sparsekern).
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType


def cache_dir() -> Path:
    return Path(os.environ.get("SPARSEKERN_CACHE", Path.home() / ".cache" / "sparsekern"))


def build_key(csrc: Path, files: Sequence[str], flags: Sequence[str], depends: str) -> str:
    """16 hex digits of a hash of ``files`` under ``csrc``, the flags and ``depends``."""
    h = hashlib.sha256()
    for name in files:
        h.update((csrc / name).read_bytes())
    h.update(" ".join(flags).encode())
    h.update(depends.encode())
    h.update(sys.version.encode())
    return h.hexdigest()[:16]


def load_extension(
    kind: str,
    csrc: Path,
    sources: Sequence[str],
    headers: Sequence[str],
    *,
    cflags: list[str],
    depends: str,
    ldflags: Sequence[str] = (),
    cuda_flags: list[str] | None = None,
    fallback: str,
) -> ModuleType:
    """Build (or load the cached) extension ``sparsekern_<kind>_<key>`` from ``csrc``.

    Args:
        kind: "cpu" or "cuda", for the module name, the cache folder and messages.
        sources, headers: file names under ``csrc`` (headers only enter the key).
        cflags, ldflags, cuda_flags: compiler and linker flags.
        depends: what else the binary depends on (versions, hardware), for the key.
        fallback: the backend to suggest when the build is impossible.

    Raises:
        RuntimeError: sources missing (a non-editable install), or the build
            failed (the compiler's message is chained).
    """
    from torch.utils.cpp_extension import load

    missing = [s for s in (*sources, *headers) if not (csrc / s).is_file()]
    if missing:
        raise RuntimeError(
            f"sparsekern {kind} backend: sources {missing} not found under {csrc}; install "
            f"sparseflows from a source checkout (pip install -e .) or use backend={fallback}"
        )
    key = build_key(csrc, (*sources, *headers), [*cflags, *(cuda_flags or [])], depends)
    build_dir = cache_dir() / f"{kind}_{key}"
    build_dir.mkdir(parents=True, exist_ok=True)
    fresh = not any(build_dir.glob("*.so"))
    if fresh:
        print(f"sparsekern: building the {kind.upper()} kernels (first use, a minute or two)...",
              file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    try:
        module = load(
            name=f"sparsekern_{kind}_{key}",
            sources=[str(csrc / s) for s in sources],
            extra_cflags=cflags,
            extra_cuda_cflags=cuda_flags,
            extra_ldflags=list(ldflags),
            extra_include_paths=[str(csrc)],
            build_directory=str(build_dir),
            verbose=False,
        )
    except Exception as exc:  # the compiler's own message is in the chained exception
        raise RuntimeError(
            f"sparsekern {kind} backend: building the extension in {build_dir} failed "
            f"({type(exc).__name__}); backend={fallback} runs without it"
        ) from exc
    if fresh:
        print(f"sparsekern: {kind.upper()} kernels built in {time.perf_counter() - t0:.0f} s "
              f"({build_dir})", file=sys.stderr, flush=True)
    return module
