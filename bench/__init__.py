"""Benchmarks of the Sparse Flows engine against dense and sparse peers.

``python -m bench [--quick] [--cases PATTERN ...] [--providers NAME ...]
[--metrics NAME ...] [--threads N] [--out DIR] [--compare OLD.json]``; from
Python, ``bench.main(argv)``. Modules: ``cases`` (shapes, densities, pruned
models), ``providers`` (dense eager, torch.compile, torch.sparse CSR,
sparsekern), ``metrics`` (what is timed, FLOP counts, roofline), ``timing``,
``runner``, ``report`` (results.json / results.md / plots), ``compare``,
``schema``, ``machine``, ``cli``. See bench/README.md.
"""

from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    """Run the suite with command-line arguments; returns the exit status."""
    from bench.cli import main as cli_main

    return cli_main(argv)


__all__ = ["main"]
