"""The analyses over the cycles of a pipeline run; figures and JSON go to DIR/analysis/."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: figures go to files, never to a window
import matplotlib.pyplot as plt
import torch
from torch import nn
from tqdm.auto import tqdm

from flows.analysis.boundary import boundary_distances, grid, predict, robustness_summary
from flows.analysis.field import draw_field, mode_centres
from flows.analysis.hessian import analyze_hessian, normalise_to_first
from flows.checkpoint import write_text_atomic
from flows.odefunc import exact_divergence
from flows.pipeline import RunData, Task, load_cycle_model, load_run_data, read_results

MODES = {"gaussians": 6, "gaussianspiral": 10, "8gaussians": 8}
HESSIAN_KEYS = ("lambda_max", "trace", "condition_number")


@contextlib.contextmanager
def _backprop_through_solver(model: nn.Module) -> Iterator[None]:
    """Plain backprop for the duration: Hessian-vector products need a double
    backward, which the adjoint method does not provide."""
    mods = [m for m in model.modules() if hasattr(m, "adjoint")]
    saved = [m.adjoint for m in mods]
    try:
        for m in mods:
            m.adjoint = False
        yield
    finally:
        for m, a in zip(mods, saved, strict=True):
            m.adjoint = a


def _run_setup(run_dir: str | Path) -> tuple[Path, dict[str, Any], list[dict[str, Any]], RunData]:
    run_dir = Path(run_dir)
    rows = read_results(run_dir)
    if not rows:
        raise FileNotFoundError(f"{run_dir} has no finished cycle (results.json missing or empty)")
    config = json.loads((run_dir / "config.json").read_text())
    return run_dir, config, rows, load_run_data(config)


def _write_json(obj: Any, path: Path) -> Path:
    return write_text_atomic(json.dumps(obj, indent=2), path)


def _fixed_loss(
    model: nn.Module, task: Task, data: RunData, n: int, seed: int
) -> Callable[[], torch.Tensor]:
    """The training loss on a fixed batch with fixed noise: one deterministic function."""
    batch = tuple(t[:n] for t in task.train_tensors)
    exact = task.config["task"] == "density" and task.config["eval"]["exact"]

    def loss() -> torch.Tensor:
        torch.manual_seed(seed)
        with exact_divergence(model) if exact else contextlib.nullcontext():
            return task.loss(model, batch)

    return loss


def hessian_over_run(
    run_dir: str | Path,
    samples: int = 512,
    power_iters: int = 50,
    tol: float = 1e-3,
    trace_samples: int = 20,
    lanczos_steps: int = 20,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Hessian eigenanalysis (Table 4) for every cycle of a run.

    The loss is the training loss on the first ``samples`` training points,
    exact trace where the run evaluates with it, fixed noise otherwise.
    Writes analysis/hessian.json, hessian.md and hessian.png.
    """
    run_dir, config, rows, data = _run_setup(run_dir)
    task = Task(config, data)
    out_rows = []
    for r in tqdm(rows, desc="hessian", disable=not progress, dynamic_ncols=True):
        model, _, _ = load_cycle_model(run_dir, r["cycle"], data)
        model.train()
        with _backprop_through_solver(model):
            stats = analyze_hessian(
                model,
                _fixed_loss(model, task, data, samples, seed),
                power_iters,
                tol,
                trace_samples,
                lanczos_steps,
                seed,
            )
        out_rows.append({"cycle": r["cycle"], "prune_ratio": r["prune_ratio"], **stats.as_dict()})
    normalised = normalise_to_first(out_rows, HESSIAN_KEYS)
    result = {
        "settings": {
            "samples": samples,
            "power_iters": power_iters,
            "tol": tol,
            "trace_samples": trace_samples,
            "lanczos_steps": lanczos_steps,
            "seed": seed,
        },
        "rows": out_rows,
        "normalised": [
            {"cycle": r["cycle"], "prune_ratio": r["prune_ratio"], **n}
            for r, n in zip(out_rows, normalised, strict=True)
        ],
    }
    out = run_dir / "analysis"
    _write_json(result, out / "hessian.json")
    lines = [
        "| cycle | prune ratio | kept params | lambda_max | trace (+- s.e.) | lambda_min | kappa "
        "| lambda_max / dense | trace / dense | kappa / dense |",
        "|" + "---|" * 10,
    ]
    for r, n in zip(out_rows, normalised, strict=True):
        lines.append(
            f"| {r['cycle']} | {100 * r['prune_ratio']:.1f}% | {r['kept_parameters']} | "
            f"{r['lambda_max']:.4g} | {r['trace']:.4g} +- {r['trace_stderr']:.2g} | "
            f"{r['lambda_min']:.4g} | {r['condition_number']:.4g} | {n['lambda_max']:.3f} | "
            f"{n['trace']:.3f} | {n['condition_number']:.3f} |"
        )
    write_text_atomic("\n".join(lines) + "\n", out / "hessian.md")
    fig, ax = plt.subplots(figsize=(6, 4))
    ratios = [100 * r["prune_ratio"] for r in out_rows]
    for key in HESSIAN_KEYS:
        ax.plot(ratios, [n[key] for n in normalised], "o-", label=key)
    ax.axhline(1.0, color="0.6", lw=0.8)
    ax.set_xlabel("prune ratio (%)")
    ax.set_ylabel("relative to the unpruned flow")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "hessian.png", dpi=100)
    plt.close(fig)
    return result


def boundary_over_run(
    run_dir: str | Path, n_grid: int = 200, trajectories: int = 40, progress: bool = True
) -> dict[str, Any]:
    """Decision boundary, vector field, trajectories and robustness per cycle of a classifier run.

    Writes analysis/boundary.json and analysis/boundary_cycle_KKK.png.
    """
    run_dir, config, rows, data = _run_setup(run_dir)
    if config["task"] != "classification":
        raise ValueError(
            f"{run_dir} is a {config['task']} run; boundary analysis needs a classifier run"
        )
    lim = 1.2 * float(torch.cat([data.train, data.test]).abs().max())
    out = run_dir / "analysis"
    out.mkdir(parents=True, exist_ok=True)
    result_rows = []
    for r in tqdm(rows, desc="boundary", disable=not progress, dynamic_ncols=True):
        model, _, _ = load_cycle_model(run_dir, r["cycle"], data)
        dist = boundary_distances(model, data.test, lim, n_grid)
        acc = (predict(model, data.test) == data.y_test).double().mean().item()
        row = {
            "cycle": r["cycle"],
            "prune_ratio": r["prune_ratio"],
            "test_accuracy": acc,
            **robustness_summary(dist),
        }
        result_rows.append(row)
        xx, yy, pts = grid(lim, 150, data.test.dtype)
        cls = predict(model, pts).reshape(xx.shape)
        fig, ax = plt.subplots(figsize=(5, 5))
        ax.contourf(
            xx.numpy(),
            yy.numpy(),
            cls.numpy(),
            levels=[-0.5, 0.5, 1.5],
            cmap="coolwarm",
            alpha=0.25,
        )
        ax.contour(xx.numpy(), yy.numpy(), cls.numpy(), levels=[0.5], colors="k", linewidths=1)
        draw_field(ax, model.block.odenet, lim)
        with torch.no_grad():
            traj = model.block.trajectory(
                data.test[:trajectories], torch.linspace(0, model.block.T, 20)
            )
        for i in range(traj.shape[1]):
            ax.plot(traj[:, i, 0], traj[:, i, 1], color="tab:green", lw=0.7, alpha=0.7)
        ax.scatter(
            data.test[:, 0], data.test[:, 1], c=data.y_test, cmap="coolwarm", s=6, edgecolors="none"
        )
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
        ax.set_aspect("equal")
        ax.set_title(
            f"PR {100 * r['prune_ratio']:.0f}%: acc {100 * acc:.1f}%, "
            f"boundary distance mean {row['mean_distance']:.3f}, p5 {row['p5_distance']:.3f}",
            fontsize=8,
        )
        fig.tight_layout()
        fig.savefig(out / f"boundary_cycle_{r['cycle']:03d}.png", dpi=100)
        plt.close(fig)
    result = {"settings": {"n_grid": n_grid, "lim": lim}, "rows": result_rows}
    _write_json(result, out / "boundary.json")
    return result


def field_over_run(run_dir: str | Path, progress: bool = True) -> dict[str, Any]:
    """The learned vector field of a 2D density run, one panel per cycle, data modes marked.

    Writes analysis/field.png and analysis/field.json (the mode centres).
    """
    run_dir, config, rows, data = _run_setup(run_dir)
    if config["task"] != "density" or data.train.shape[1:] != (2,):
        raise ValueError(f"{run_dir} is not a 2D density run; vector fields are drawn for 2D flows")
    lim = 1.15 * float(data.test.abs().max())
    n_modes = MODES.get(config["run"]["dataset"])
    centres = mode_centres(data.train, n_modes) if n_modes else None
    fig, axes = plt.subplots(1, len(rows), figsize=(3.2 * len(rows), 3.4), squeeze=False)
    for ax, r in zip(axes[0], tqdm(rows, desc="field", disable=not progress), strict=True):
        model, _, _ = load_cycle_model(run_dir, r["cycle"], data)
        cnf = next(m for m in model.modules() if hasattr(m, "odefunc"))
        ax.scatter(data.test[:, 0], data.test[:, 1], s=1, alpha=0.2, color="tab:blue")
        draw_field(ax, cnf.odenet, lim)
        if centres is not None:
            ax.scatter(
                centres[:, 0], centres[:, 1], marker="x", s=60, color="tab:red", label="modes"
            )
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(f"PR {100 * r['prune_ratio']:.0f}%", fontsize=9)
    fig.tight_layout()
    out = run_dir / "analysis"
    out.mkdir(parents=True, exist_ok=True)
    fig.savefig(out / "field.png", dpi=100)
    plt.close(fig)
    result = {
        "cycles": [r["cycle"] for r in rows],
        "modes": None if centres is None else centres.tolist(),
    }
    _write_json(result, out / "field.json")
    return result
