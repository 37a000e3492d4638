"""The one exception type every dataset loader raises for a missing or malformed file."""

from __future__ import annotations

from pathlib import Path


class DatasetFileError(ValueError):
    """A dataset file is missing or not in the expected format.

    The message always names the path that was expected and the file format
    the loader reads, so the user knows what to put where.
    """

    def __init__(self, path: str | Path, expected_format: str, problem: str) -> None:
        self.path = Path(path)
        self.expected_format = expected_format
        self.problem = problem
        super().__init__(f"{problem}: {self.path} (expected {expected_format})")
