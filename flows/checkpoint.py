"""Files of a run: atomic writes, checked reads, and checks of output paths.

A killed run never leaves a half-written checkpoint or result: every file is
written to a temporary file in the same directory, then renamed over the
target. Temporary files are named ``.NAME.sparseflow-PID-XXXX.tmp``; one left
by a process that was killed mid-write is removed by the next atomic write
into that directory (``remove_stale_temp_files``).

Reading is checked too: a missing, truncated or malformed checkpoint or JSON
file raises a ``PathError`` (a ValueError) whose one-line message names the
path and what was expected.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, Any

import torch

TEMP_TAG = ".sparseflow-"
_TEMP_NAME = re.compile(r"^\..+\.sparseflow-(\d+)-\w+\.tmp$")


class PathError(ValueError):
    """A file or directory a command reads or writes is missing, damaged or of the wrong kind.

    ``path`` is the path at fault; the message names it and says what was expected.
    """

    def __init__(self, path: str | Path, message: str) -> None:
        self.path = Path(path)
        super().__init__(message)


class CheckpointError(PathError):
    """A checkpoint is unreadable, truncated, corrupt, or does not fit the run's model."""


def _first_line(e: BaseException) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return lines[0] if lines else type(e).__name__


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid() or os.name != "posix":
        return True  # ours, or no way to tell: keep it
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists, owned by someone else
    return True


def stale_temp_files(directory: str | Path) -> list[Path]:
    """Temporary files of atomic writes in ``directory`` whose writing process is gone."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    stale = []
    for p in directory.iterdir():
        m = _TEMP_NAME.match(p.name)
        if m and p.is_file() and not _pid_alive(int(m.group(1))):
            stale.append(p)
    return sorted(stale)


def remove_stale_temp_files(directory: str | Path) -> list[Path]:
    """Remove the temporary files that killed writers left in ``directory``; returns them."""
    removed = []
    for p in stale_temp_files(directory):
        try:
            p.unlink()
            removed.append(p)
        except FileNotFoundError:
            pass  # another process cleaned it first
    return removed


def _write_atomic(path: str | Path, mode: str, write: Callable[[IO[Any]], None]) -> Path:
    """Write through a temporary file in the same directory, then rename over ``path``.

    The rename is atomic on POSIX file systems, so readers see either the old
    file or the complete new one. Stale temporary files of killed writers in
    the directory are removed first.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_files(path.parent)
    fd, tmp = tempfile.mkstemp(
        prefix=f".{path.name}{TEMP_TAG}{os.getpid()}-", suffix=".tmp", dir=path.parent
    )
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def save_atomic(obj: Any, path: str | Path) -> Path:
    """torch.save ``obj`` to ``path`` atomically. Returns the path written."""
    return _write_atomic(path, "wb", lambda f: torch.save(obj, f))


def write_text_atomic(text: str, path: str | Path) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically. Returns the path written."""
    return _write_atomic(path, "w", lambda f: f.write(text))


def write_bytes_atomic(data: bytes, path: str | Path) -> Path:
    """Write ``data`` to ``path`` atomically. Returns the path written."""
    return _write_atomic(path, "wb", lambda f: f.write(data))


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint written by ``save_atomic``.

    Raises:
        FileNotFoundError: nothing at ``path``.
        CheckpointError: ``path`` is a directory, unreadable, truncated or
            corrupt, or holds no checkpoint (a dict); the message names it.
    """
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(path, f"checkpoint {path} is a directory; expected a .pt file")
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except OSError as e:
        problem = e.strerror or _first_line(e)
        raise CheckpointError(path, f"checkpoint {path} cannot be read: {problem}") from None
    except Exception as e:
        raise CheckpointError(
            path,
            f"checkpoint {path} is truncated or corrupt (torch.load: {_first_line(e)}); "
            "expected a complete checkpoint written by sparseflow",
        ) from None
    if not isinstance(obj, dict):
        raise CheckpointError(
            path, f"{path} holds a {type(obj).__name__}, not a sparseflow checkpoint (a dict)"
        )
    return obj


def check_finite_state(state_dict: Mapping[str, Any], path: str | Path) -> None:
    """Raise CheckpointError if a floating tensor of ``state_dict`` (from ``path``) has NaN/inf."""
    bad = [
        name
        for name, t in state_dict.items()
        if isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(t.isfinite().all())
    ]
    if bad:
        shown = ", ".join(bad[:4]) + (", ..." if len(bad) > 4 else "")
        raise CheckpointError(
            path,
            f"checkpoint {path} has non-finite weights (NaN or inf) in {len(bad)} tensors "
            f"({shown}); expected finite weights (the run diverged or the file is damaged)",
        )


def read_json(path: str | Path, what: str) -> Any:
    """The JSON content of ``path`` (``what`` names it in errors, e.g. "results file").

    Raises:
        FileNotFoundError: nothing at ``path``.
        PathError: a directory, unreadable, or not valid (e.g. truncated) JSON.
    """
    path = Path(path)
    if path.is_dir():
        raise PathError(path, f"{what} {path} is a directory; expected a JSON file")
    if not path.exists():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise PathError(path, f"{what} {path} cannot be read: {_first_line(e)}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise PathError(
            path, f"{what} {path} is truncated or not valid JSON ({e}); expected a JSON file"
        ) from None


def _check_creatable(path: Path, target: str) -> None:
    """``target`` (a description naming the final path) can be created at or below ``path``."""
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise PathError(
            existing, f"{existing} is not a directory, so {target} cannot be created below it"
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        raise PathError(existing, f"{existing} is not writable, so {target} cannot be written")


def check_output_dir(path: str | Path, what: str = "output directory") -> Path:
    """Check, without creating anything, that ``path`` is or can become a writable directory.

    Raises PathError naming the path at fault: ``path`` is a file, an existing
    ancestor is a file (so ``path`` cannot be created), or the directory it
    would be written in is not writable.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise PathError(path, f"{what} {path} is a file, not a directory; expected a directory")
    _check_creatable(path, f"{what} {path}")
    return path


def check_output_file(path: str | Path, what: str = "output file") -> Path:
    """Check, without writing, that ``path`` can be written as a file (see ``check_output_dir``)."""
    path = Path(path)
    if path.is_dir():
        raise PathError(path, f"{what} {path} is a directory; expected a file path")
    _check_creatable(path.parent, f"{what} {path}")
    if path.exists() and not os.access(path, os.W_OK):
        raise PathError(path, f"{what} {path} exists and is not writable")
    return path
