"""One run's own report: results.md (the rows as a table) and the plots under plots/.

Used by ``flows.pipeline`` at the end of a run and by ``flows.report`` across
runs; imports neither.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from flows.checkpoint import write_bytes_atomic, write_text_atomic
from flows.cnf import Flow
from flows.odefunc import exact_divergence
from flows.run_config import RunConfig, as_run_config
from flows.rundir import read_run

# ---------------------------------------------------------------- results.md and plots/


def _save_figure(fig: Any, path: str | Path, dpi: int) -> Path:
    """Write ``fig`` to ``path`` (making its folder) and close it."""
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    _pyplot().close(fig)
    return path


def _pyplot() -> Any:
    """matplotlib.pyplot, headless (figures go to files, never to a window), imported on use."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _unit(config: RunConfig) -> str:
    if config.task == "classification":
        return "cross-entropy"
    return "bits/dim" if config.model.kind == "conv" else "nats"


def run_label(config: RunConfig | Mapping[str, Any]) -> str:
    """A run's title: "gaussians unstructured (PR 30%)"."""
    c = as_run_config(config)
    return f"{c.run.dataset} {c.run.method} (PR {100 * c.prune.prune_ratio:.0f}%)"


def metric_axis(config: RunConfig | Mapping[str, Any]) -> tuple[str, str]:
    """(row field, axis label) of the metric a run's plots show against prune ratio."""
    c = as_run_config(config)
    if c.task == "classification":
        return "test_accuracy", "test accuracy"
    return "test_nll", f"test NLL ({_unit(c)})"


def results_table(rows: Sequence[dict[str, Any]], config: RunConfig | Mapping[str, Any]) -> str:
    """Markdown table of one run's per-cycle rows, with notes below it.

    Args:
        rows: the run's rows (results.json).
        config: the run's configuration (names the unit: nats, bits/dim or
            cross-entropy, and adds accuracy for classification).

    Returns the table, then notes on compiled kernels, ops that ran dense and
    layers that pruning emptied.
    """
    c = as_run_config(config)
    unit = _unit(c)
    acc = c.task == "classification"
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


def plot_metric_vs_ratio(
    runs: Sequence[tuple[str, Sequence[dict[str, Any]]]],
    path: str | Path,
    metric: str = "test_nll",
    ylabel: str = "test NLL",
) -> Path:
    """Paper Fig. 4/8: a metric against prune ratio, one line per run.

    Args:
        runs: (label, rows) of each run.
        path: the PNG file to write (its directory is created).
        metric: the row field plotted; ``ylabel`` labels its axis.

    Returns ``path``.
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, rows in runs:
        ax.plot(
            [100 * r["prune_ratio"] for r in rows], [r[metric] for r in rows], "o-", label=label
        )
    ax.set_xlabel("prune ratio (%)")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save_figure(fig, path, dpi=100)


def params_table(rows: Sequence[dict[str, Any]], config: RunConfig | Mapping[str, Any]) -> str:
    """Paper Table 3's columns for one run: test loss and parameters per cycle.

    "params" is the nonzero parameters after the cycle (pruned weights are exact
    zeros, so: what is kept), "of dense" their share of the dense model's
    parameters (the row's ``total_params``; rows written before it existed use
    cycle 0's count).
    """
    c = as_run_config(config)
    metric, label = metric_axis(c)
    dense = next((r["total_params"] for r in rows if "total_params" in r), None)
    if dense is None and rows:
        dense = rows[0]["nonzero_params"]
    lines = [f"| cycle | prune ratio | params | of dense | {label} |", "|---|---|---|---|---|"]
    for r in rows:
        share = f"{100 * r['nonzero_params'] / dense:.1f}%" if dense else ""
        lines.append(f"| {r['cycle']} | {100 * r['prune_ratio']:.1f}% | "
                     f"{r['nonzero_params']:,} | {share} | {r[metric]:.4f} |")
    of = f"; dense model: {dense:,}" if dense else ""
    return f"\nParameters (as in the paper's Table 3{of}):\n\n" + "\n".join(lines) + "\n"


def image_grid(images: torch.Tensor, nrow: int = 8, pad: int = 1) -> torch.Tensor:
    """Tile images [N, C, H, W] (values in [0, 1]) into one [rows, cols, C] picture.

    ``nrow`` images per row, ``pad`` pixels of white between them; NaN becomes 0.
    """
    if images.dim() != 4 or images.shape[0] == 0:
        raise ValueError(f"image_grid takes a non-empty batch [N, C, H, W], got "
                         f"{list(images.shape)}")
    x = torch.nan_to_num(images.detach().float().cpu(), nan=0.0).clamp(0, 1)
    n, c, h, w = x.shape
    cols = min(nrow, n)
    rows = -(-n // cols)
    grid = torch.ones(c, rows * (h + pad) + pad, cols * (w + pad) + pad)
    for k in range(n):
        i, j = divmod(k, cols)
        top, left = pad + i * (h + pad), pad + j * (w + pad)
        grid[:, top : top + h, left : left + w] = x[k]
    return grid.permute(1, 2, 0)


def image_grid_png(images: torch.Tensor, title: str | None = None, nrow: int = 8) -> bytes:
    """PNG bytes of images [N, C, H, W] in [0, 1] as one grid (1 channel grey, 3 RGB)."""
    import io

    plt = _pyplot()
    grid = image_grid(images, nrow).numpy()
    fig, ax = plt.subplots(figsize=(4, 4 * grid.shape[0] / grid.shape[1] + (0.3 if title else 0)))
    if grid.shape[2] == 1:
        ax.imshow(grid[:, :, 0], cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    else:
        ax.imshow(grid, interpolation="nearest")
    ax.set_axis_off()
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    return buf.getvalue()


def plot_image_grid(images: torch.Tensor, path: str | Path, title: str | None = None,
                    nrow: int = 8) -> Path:
    """Write ``image_grid_png`` to ``path`` (atomically, making its folder); returns it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_bytes_atomic(image_grid_png(images, title, nrow), path)


@torch.no_grad()
def sample_images(flow: Flow, n: int = 64, seed: int = 0) -> torch.Tensor:
    """n images from an image flow, [n, C, H, W] with pixels in [0, 1].

    The reverse solve ends in the flow's data space (the logit transform undone),
    the dequantised [0, 1) scale of the training data; values are clamped to
    [0, 1]. The base noise comes from ``seed``, so every cycle of a run shows the
    same base samples.
    """
    x = flow.sample(n, generator=torch.Generator().manual_seed(seed))
    return x.clamp(0, 1)


@torch.no_grad()
def density_grid(
    flow: Flow, lim: float = 4.0, n_grid: int = 100, batch_size: int = 4096
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact-trace density of a 2D flow on the square [-lim, lim]^2.

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


def plot_density_cycles(
    rows: Sequence[dict[str, Any]],
    cycle_model: Callable[[int], Flow],
    points: torch.Tensor,
    path: str | Path,
    n_grid: int = 80,
) -> Path:
    """Paper Fig. 5: learned density (top) and samples (bottom) for every cycle of a 2D run.

    Args:
        rows: the run's rows, one column each.
        cycle_model: the model after a cycle (``flows.pipeline.load_cycle_model``).
        points: data the drawn square must hold (the test split): its half-width
            is 1.15 x their largest coordinate.
        path: the PNG file to write.
        n_grid: grid points per side of each density.

    Returns ``path``.
    """
    plt = _pyplot()
    lim = 1.15 * float(points.abs().max())
    fig, axes = plt.subplots(2, len(rows), figsize=(2.4 * len(rows), 4.8), squeeze=False)
    for j, r in enumerate(rows):
        model = cycle_model(r["cycle"])
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
    return _save_figure(fig, path, dpi=90)


def write_run_report(
    run_dir: str | Path,
    plots: bool = True,
    cycle_model: Callable[[int], Flow] | None = None,
    points: torch.Tensor | None = None,
) -> Path:
    """Write DIR/results.md and, with ``plots``, DIR/plots/*.png for one run.

    Args:
        run_dir: the run directory (its config.json and results.json are read).
        plots: draw the metric against prune ratio (plots/nll_vs_prune_ratio.png).
        cycle_model, points: given both, also the density and samples of every
            cycle (plots/density_per_cycle.png, for 2D density runs); see
            ``plot_density_cycles``. For an image run (model kind "conv"),
            ``cycle_model`` alone: a grid of samples per cycle
            (plots/samples_cycle{k}.png, the same base noise every cycle).

    Image runs also get the parameter table (``params_table``, the paper's
    Table 3), and their metric plot is bits/dim against prune ratio (Fig. 7).

    Returns the path of results.md.
    """
    run_dir = Path(run_dir)
    config, rows = read_run(run_dir)
    c = RunConfig.from_dict(config)
    images = c.model.kind == "conv"
    md = [f"# {run_label(c)}\n", results_table(rows, c)]
    if images:
        md.append(params_table(rows, c))
    if plots:
        metric, ylabel = metric_axis(c)
        plot_metric_vs_ratio(
            [(run_label(c), rows)], run_dir / "plots" / "nll_vs_prune_ratio.png", metric, ylabel
        )
        what = "test bits/dim against prune ratio (Fig. 7)" if images else (
            "metric against prune ratio")
        md.append(f"\n![{what}](plots/nll_vs_prune_ratio.png)\n")
        if cycle_model is not None and points is not None and rows:
            density = run_dir / "plots" / "density_per_cycle.png"
            plot_density_cycles(rows, cycle_model, points, density)
            md.append("\n![density and samples per cycle](plots/density_per_cycle.png)\n")
        elif cycle_model is not None and images and rows:
            md.append("\nSamples per cycle (the same base noise in every cycle):\n")
            for r in rows:
                name = f"samples_cycle{r['cycle']}.png"
                x = sample_images(cycle_model(r["cycle"]))
                plot_image_grid(x, run_dir / "plots" / name,
                                f"cycle {r['cycle']}, PR {100 * r['prune_ratio']:.0f}%, "
                                f"{r['test_nll']:.3f} bits/dim")
                md.append(f"\n![samples after cycle {r['cycle']}](plots/{name})\n")
    return write_text_atomic("".join(md), run_dir / "results.md")
