"""Reports over several pipeline runs (``sparseflow report``): report.md and one combined plot.

A run's own results.md and plots are written at the end of the run, by
``flows.run_report.write_run_report``; the tables and plots here are the same ones
(``flows.run_report.results_table``, ``params_table`` for image runs,
``plot_metric_vs_ratio``), one section per run.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from flows.checkpoint import check_output_dir, write_text_atomic
from flows.run_config import as_run_config
from flows.run_report import (
    metric_axis,
    params_table,
    plot_metric_vs_ratio,
    results_table,
    run_label,
)
from flows.rundir import read_run


def render_report(run_dirs: Sequence[str | Path], out: str | Path, plots: bool = True) -> Path:
    """One markdown report (and a combined plot) over several runs.

    Args:
        run_dirs: run directories (each with config.json and results.json),
            all read and checked before anything is written.
        out: the report directory (created): report.md and, with ``plots``,
            metric_vs_prune_ratio.png (the first run's metric, every run's line).

    Returns the path of report.md.

    Raises:
        ValueError: no run directory given.
        FileNotFoundError, PathError: a run directory is missing or damaged, or
            ``out`` cannot be written.
    """
    runs = [(Path(d), *read_run(d)) for d in run_dirs]
    if not runs:
        raise ValueError("report needs at least one run directory")
    out = check_output_dir(out, "report directory")
    out.mkdir(parents=True, exist_ok=True)
    md = ["# Sparse Flows report\n"]
    for d, config, rows in runs:
        md += [f"\n## {run_label(config)}\n\n`{d}`\n\n", results_table(rows, config)]
        if as_run_config(config).model.kind == "conv":  # images: the paper's Table 3 columns
            md.append(params_table(rows, config))
    if plots:
        metric, ylabel = metric_axis(runs[0][1])
        plot_metric_vs_ratio(
            [(run_label(c), r) for _, c, r in runs], out / "metric_vs_prune_ratio.png", metric,
            ylabel,
        )
        md.append("\n![metric against prune ratio](metric_vs_prune_ratio.png)\n")
    return write_text_atomic("".join(md), out / "report.md")
