"""The README's Python examples run as written (docs with runnable examples)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_python_examples():
    assert len(BLOCKS) >= 2


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_python_block_runs(index, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    # The examples show the defaults, not a backend forced for a whole test run.
    monkeypatch.delenv("SPARSEKERN_BACKEND", raising=False)
    # "..." stands for the user's training loop in the examples.
    code = BLOCKS[index].replace("\n...\n", "\n")
    namespace: dict = {}
    exec(compile(code, f"README.md block {index}", "exec"), namespace)
