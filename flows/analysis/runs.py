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
from flows.analysis.hessian import (
    CONDITION_NUMBER_DEFINITION,
    analyze_hessian,
    normalise_to_first,
)
from flows.analysis.settings import check_analysis_arguments
from flows.checkpoint import check_output_dir, write_text_atomic
from flows.odefunc import ODEFunc, exact_divergence
from flows.pipeline import RunData, Task, load_cycle_model, load_run_data
from flows.rundir import read_results, read_run_config

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
    """The run's directory, config, rows and data, checked before any analysis starts.

    The analysis directory (DIR/analysis) must be writable too.
    """
    run_dir = Path(run_dir)
    config = read_run_config(run_dir)
    rows = read_results(run_dir)
    if not rows:
        raise FileNotFoundError(f"{run_dir} has no finished cycle (results.json missing or empty)")
    check_output_dir(run_dir / "analysis", "analysis directory")
    return run_dir, config, rows, load_run_data(config)


def _write_json(obj: Any, path: Path) -> Path:
    return write_text_atomic(json.dumps(obj, indent=2), path)


def _fixed_loss(
    model: nn.Module, task: Task, data: RunData, n: int, seed: int
) -> Callable[[], torch.Tensor]:
    """The training loss on a fixed batch with fixed noise: one deterministic function.

    The noise (Hutchinson probes, dequantisation) is drawn from the global RNG
    reseeded with ``seed`` inside ``torch.random.fork_rng``, so every call sees
    the same noise and the caller's RNG state is left as it was.
    """
    batch = tuple(t[:n] for t in task.train_tensors)
    exact = task.config["task"] == "density" and task.config["eval"]["exact"]
    cuda = sorted({p.get_device() for p in model.parameters() if p.is_cuda})

    def loss() -> torch.Tensor:
        with torch.random.fork_rng(devices=cuda):
            torch.default_generator.manual_seed(seed)
            for d in cuda:
                torch.cuda.default_generators[d].manual_seed(seed)
            with exact_divergence(model) if exact else contextlib.nullcontext():
                return task.loss(model, batch)

    return loss


def loss_description(task: Task, model: nn.Module) -> str:
    """Which loss ``_fixed_loss`` differentiates, for hessian.json: its unit and trace."""
    if task.classification:
        return "cross-entropy"
    base = "bits/dim, fixed dequantisation noise" if task.images else "nll (nats)"
    funcs = [m for m in model.modules() if isinstance(m, ODEFunc)]
    if task.config["eval"]["exact"] or all(f.divergence == "exact" for f in funcs):
        return f"{base}, exact trace"
    kinds = "/".join(sorted({f.noise_kind for f in funcs}))
    return f"{base}, hutchinson trace ({kinds} probes, fixed seed)"


def _pm(value: float, spread: float | None, fmt: str = ".4g") -> str:
    return f"{value:{fmt}}" if spread is None else f"{value:{fmt}} +- {spread:.2g}"


def hessian_over_run(
    run_dir: str | Path,
    samples: int = 512,
    power_iters: int = 50,
    tol: float = 1e-3,
    trace_samples: int = 20,
    lanczos_steps: int = 20,
    seed: int = 0,
    progress: bool = True,
    lanczos_tol: float = 1e-3,
    repeats: int = 3,
) -> dict[str, Any]:
    """Hessian eigenanalysis (Table 4) for every cycle of a run.

    The loss is the training loss on the first ``samples`` training points (all
    of them if there are fewer; hessian.json's "samples_used" says how many),
    with the exact trace where the run evaluates with it (then the Hessian is
    that of the exact NLL, not of the Hutchinson estimate the run trained on),
    with fixed Hutchinson noise otherwise; hessian.json's "loss" says which.
    ``repeats`` runs of power iteration and Lanczos from independent start
    vectors give lambda_max, lambda_min and the condition number as mean +- sd;
    ``lanczos_tol`` stops Lanczos early (see ``flows.analysis.hessian.lanczos``).
    Writes analysis/hessian.json, hessian.md and hessian.png. The arguments
    are checked (``flows.analysis.settings``) before the run is read.
    """
    check_analysis_arguments(
        samples=samples,
        power_iters=power_iters,
        tol=tol,
        trace_samples=trace_samples,
        lanczos_steps=lanczos_steps,
        seed=seed,
        lanczos_tol=lanczos_tol,
        repeats=repeats,
    )
    run_dir, config, rows, data = _run_setup(run_dir)
    task = Task(config, data)
    out_rows = []
    loss_kind = ""
    budget = repeats * (power_iters + lanczos_steps) + trace_samples
    cycles = tqdm(rows, desc="hessian", disable=not progress, dynamic_ncols=True)
    for r in cycles:
        with torch.random.fork_rng(devices=[]):  # building the model draws initial weights
            model, _, _ = load_cycle_model(run_dir, r["cycle"], data)
        model.train()
        loss_kind = loss_kind or loss_description(task, model)
        products = tqdm(
            total=budget,
            desc=f"cycle {r['cycle']}: H v",
            disable=not progress,
            dynamic_ncols=True,
            leave=False,
            position=1,
        )

        def step(stage: str, bar: tqdm = products) -> None:
            bar.set_postfix_str(stage, refresh=False)
            bar.update(1)

        with _backprop_through_solver(model), products:
            stats = analyze_hessian(
                model,
                _fixed_loss(model, task, data, samples, seed),
                power_iters,
                tol,
                trace_samples,
                lanczos_steps,
                seed,
                lanczos_tol=lanczos_tol,
                repeats=repeats,
                on_product=step,
            )
            products.total = products.n  # the budget was nominal (early stops, shifts)
            products.refresh()
        out_rows.append({"cycle": r["cycle"], "prune_ratio": r["prune_ratio"], **stats.as_dict()})
    normalised = normalise_to_first(out_rows, HESSIAN_KEYS)
    result = {
        "loss": loss_kind,
        "condition_number": CONDITION_NUMBER_DEFINITION,
        "settings": {
            "samples": samples,
            "samples_used": min(samples, data.train.shape[0]),
            "power_iters": power_iters,
            "tol": tol,
            "trace_samples": trace_samples,
            "lanczos_steps": lanczos_steps,
            "lanczos_tol": lanczos_tol,
            "repeats": repeats,
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
    spread = f"+- sd over {repeats} start vectors" if repeats > 1 else "single start vector"
    lines = [
        f"Loss: {loss_kind}; {result['settings']['samples_used']} training points. "
        "lambda_max, lambda_min, kappa: "
        f"{spread}; trace: +- standard error ({trace_samples} probes). "
        f"kappa = {CONDITION_NUMBER_DEFINITION}.",
        "",
        "| cycle | prune ratio | kept params | lambda_max | trace | lambda_min | kappa "
        "| lambda_max / dense | trace / dense | kappa / dense | converged (power, Lanczos) |",
        "|" + "---|" * 11,
    ]
    for r, n in zip(out_rows, normalised, strict=True):
        lines.append(
            f"| {r['cycle']} | {100 * r['prune_ratio']:.1f}% | {r['kept_parameters']} | "
            f"{_pm(r['lambda_max'], r['lambda_max_std'])} | "
            f"{_pm(r['trace'], r['trace_stderr'])} | "
            f"{_pm(r['lambda_min'], r['lambda_min_std'])} | "
            f"{_pm(r['condition_number'], r['condition_number_std'])} | "
            f"{n['lambda_max']:.3f} | {n['trace']:.3f} | {n['condition_number']:.3f} | "
            f"{'yes' if r['power_converged'] else 'no'} ({r['power_iterations']}), "
            f"{'yes' if r['lanczos_converged'] else 'no'} ({r['lanczos_iterations']}) |"
        )
    write_text_atomic("\n".join(lines) + "\n", out / "hessian.md")
    fig, ax = plt.subplots(figsize=(6, 4))
    ratios = [100 * r["prune_ratio"] for r in out_rows]
    spreads = {
        "lambda_max": "lambda_max_std",
        "trace": "trace_stderr",
        "condition_number": "condition_number_std",
    }
    for key in HESSIAN_KEYS:
        base = abs(out_rows[0][key]) or 1.0
        err = [(r[spreads[key]] or 0.0) / base for r in out_rows]
        ax.errorbar(ratios, [n[key] for n in normalised], yerr=err, fmt="o-", capsize=3, label=key)
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

    Writes analysis/boundary.json and analysis/boundary_cycle_KKK.png. ``n_grid``
    (search grid points per axis, >= 2) and ``trajectories`` (>= 0) are checked
    before the run is read.
    """
    check_analysis_arguments(n_grid=n_grid, trajectories=trajectories)
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
