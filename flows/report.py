"""Reports of pipeline runs: markdown tables and figures from results.json."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: figures go to files, never to a window
import matplotlib.pyplot as plt
import torch

from flows.checkpoint import check_output_dir, write_text_atomic
from flows.cnf import Flow
from flows.datasets import TOY_DATASETS
from flows.odefunc import exact_divergence


@torch.no_grad()
def density_grid(
    flow: Flow, lim: float = 4.0, n_grid: int = 100, batch_size: int = 4096
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact-trace density of a 2D flow on a square grid.

    Returns:
        (xx, yy, density), each [n_grid, n_grid]; density = exp(log_prob).
    """
    p = next(flow.parameters())
    axis = torch.linspace(-lim, lim, n_grid, dtype=p.dtype)
    xx, yy = torch.meshgrid(axis, axis, indexing="xy")
    pts = torch.stack([xx.reshape(-1), yy.reshape(-1)], dim=1).to(p.device)
    with exact_divergence(flow):
        logp = torch.cat(
            [flow.log_prob(pts[i : i + batch_size]) for i in range(0, pts.shape[0], batch_size)]
        )
    return xx, yy, logp.exp().reshape(n_grid, n_grid).cpu()


def _unit(config: dict[str, Any]) -> str:
    if config["task"] == "classification":
        return "cross-entropy"
    return "bits/dim" if config["model"]["kind"] == "conv" else "nats"


def results_table(rows: Sequence[dict[str, Any]], config: dict[str, Any]) -> str:
    """Markdown table of per-cycle rows (one run)."""
    unit = _unit(config)
    acc = config["task"] == "classification"
    head = [
        "cycle",
        "prune ratio",
        "kept",
        "nonzero params",
        f"train ({unit})",
        f"val ({unit})",
        f"test ({unit})",
    ]
    if acc:
        head.append("test acc.")
    head += ["NFE fwd", "NFE bwd", "seconds"]
    timed = any("speedup" in r for r in rows)
    if timed:
        head += ["step dense (ms)", "step compiled (ms)", "speedup"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [
            str(r["cycle"]),
            f"{100 * r['prune_ratio']:.1f}%",
            f"{r['kept_fraction']:.3f}",
            str(r["nonzero_params"]),
            f"{r['train_nll']:.4f}",
            f"{r['val_nll']:.4f}",
            f"{r['test_nll']:.4f}",
        ]
        if acc:
            cells.append(f"{100 * r['test_accuracy']:.1f}%")
        cells += [str(int(r["nfe_forward"])), str(int(r["nfe_backward"])), f"{r['seconds']:.1f}"]
        if timed:
            cells += (
                [f"{1e3 * r['step_seconds_dense']:.1f}", f"{1e3 * r['step_seconds_compiled']:.1f}",
                 f"{r['speedup']:.2f}x"]
                if "speedup" in r else ["", "", ""]
            )
        lines.append("| " + " | ".join(cells) + " |")
    notes = sorted({op for r in rows for op in r.get("not_compiled", [])})
    kernels = {r.get("kernels", "dense") for r in rows}
    text = "\n".join(lines) + "\n"
    if "compiled" in kernels:
        text += (
            "\nTrained and evaluated on sparsekern's compiled kernels; the step times are a "
            "training step (forward and backward) of the dense masked model and of the compiled "
            "one on the same batches, measured in this run.\n"
        )
    if notes:
        text += "\nNot compiled (ran dense through PyTorch): " + ", ".join(notes) + ".\n"
    emptied: dict[str, int] = {}  # layer -> the first cycle it was empty in
    for r in rows:
        for name in r.get("empty_layers", []):
            emptied.setdefault(name, r["cycle"])
    if emptied:
        text += ("\nEmpty layers (every weight pruned; they pass on their bias alone): "
                 + ", ".join(f"{name} from cycle {c}" for name, c in emptied.items()) + ".\n")
    return text


def _label(config: dict[str, Any]) -> str:
    run = config["run"]
    return f"{run['dataset']} {run['method']} (PR {100 * config['prune']['prune_ratio']:.0f}%)"


def plot_metric_vs_ratio(
    runs: Sequence[tuple[str, Sequence[dict[str, Any]]]],
    path: str | Path,
    metric: str = "test_nll",
    ylabel: str = "test NLL",
) -> Path:
    """Paper Fig. 4/8: a metric against prune ratio, one line per run (label, rows)."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, rows in runs:
        ax.plot(
            [100 * r["prune_ratio"] for r in rows], [r[metric] for r in rows], "o-", label=label
        )
    ax.set_xlabel("prune ratio (%)")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_density_cycles(run_dir: str | Path, path: str | Path, n_grid: int = 80) -> Path:
    """Paper Fig. 5: learned density (top) and samples (bottom) for every cycle of a 2D run."""
    from flows.pipeline import load_cycle_model, read_results

    rows = read_results(run_dir)
    _, _, data = load_cycle_model(run_dir, rows[0]["cycle"])
    lim = 1.15 * float(data.test.abs().max())
    fig, axes = plt.subplots(2, len(rows), figsize=(2.4 * len(rows), 4.8), squeeze=False)
    for j, r in enumerate(rows):
        model, _, _ = load_cycle_model(run_dir, r["cycle"], data)
        xx, yy, dens = density_grid(model, lim, n_grid)
        samples = model.sample(1000, generator=torch.Generator().manual_seed(0)).cpu()
        axes[0, j].pcolormesh(xx.numpy(), yy.numpy(), dens.numpy(), shading="auto", cmap="viridis")
        axes[0, j].set_title(
            f"PR {100 * r['prune_ratio']:.0f}%\nNLL {r['test_nll']:.3f}", fontsize=9
        )
        axes[1, j].scatter(samples[:, 0], samples[:, 1], s=1, alpha=0.5, color="tab:orange")
        for ax in axes[:, j]:
            ax.set_xlim(-lim, lim)
            ax.set_ylim(-lim, lim)
            ax.set_aspect("equal")
            ax.set_xticks([])
            ax.set_yticks([])
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _load_run(run_dir: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(config, rows) of a run directory, both checked (``flows.pipeline.read_run_config``)."""
    from flows.pipeline import read_results, read_run_config

    res_path = run_dir / "results.json"
    if not res_path.exists():
        raise FileNotFoundError(
            f"{run_dir} is not a run directory (needs config.json and results.json): "
            f"{res_path} not found"
        )
    return read_run_config(run_dir), read_results(run_dir)


def _metric_plot_args(config: dict[str, Any]) -> tuple[str, str]:
    if config["task"] == "classification":
        return "test_accuracy", "test accuracy"
    return "test_nll", f"test NLL ({_unit(config)})"


def write_run_report(run_dir: str | Path, plots: bool = True) -> Path:
    """Write DIR/results.md and DIR/plots/*.png for one run; returns results.md."""
    run_dir = Path(run_dir)
    config, rows = _load_run(run_dir)
    md = [f"# {_label(config)}\n", results_table(rows, config)]
    if plots:
        metric, ylabel = _metric_plot_args(config)
        plot_metric_vs_ratio(
            [(_label(config), rows)], run_dir / "plots" / "nll_vs_prune_ratio.png", metric, ylabel
        )
        md.append("\n![metric against prune ratio](plots/nll_vs_prune_ratio.png)\n")
        if config["task"] == "density" and config["run"]["dataset"] in TOY_DATASETS and rows:
            plot_density_cycles(run_dir, run_dir / "plots" / "density_per_cycle.png")
            md.append("\n![density and samples per cycle](plots/density_per_cycle.png)\n")
    return write_text_atomic("".join(md), run_dir / "results.md")


def render_report(run_dirs: Sequence[str | Path], out: str | Path, plots: bool = True) -> Path:
    """One markdown report (and a combined plot) over several runs; returns report.md."""
    runs = [(Path(d), *_load_run(Path(d))) for d in run_dirs]
    if not runs:
        raise ValueError("report needs at least one run directory")
    out = check_output_dir(out, "report directory")
    out.mkdir(parents=True, exist_ok=True)
    md = ["# Sparse Flows report\n"]
    for d, config, rows in runs:
        md += [f"\n## {_label(config)}\n\n`{d}`\n\n", results_table(rows, config)]
    if plots:
        metric, ylabel = _metric_plot_args(runs[0][1])
        plot_metric_vs_ratio(
            [(_label(c), r) for _, c, r in runs], out / "metric_vs_prune_ratio.png", metric, ylabel
        )
        md.append("\n![metric against prune ratio](metric_vs_prune_ratio.png)\n")
    return write_text_atomic("".join(md), out / "report.md")
