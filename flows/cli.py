"""The ``sparseflow`` command line: train, prune, eval, sample, report, analyze, demo, bench."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn

import torch

from flows.analysis.settings import ANALYSIS_SETTINGS
from flows.checkpoint import PathError, check_output_dir, check_output_file
from flows.presets import PRESETS, load_config_file, parse_assignment
from flows.prune import PRUNE_METHODS, EmptyLayerWarning
from flows.run_config import RUN_DEFAULTS
from flows.settings import CYCLE, SAMPLES, SCHEMA, THREADS, Setting

DEMO_SETTINGS = {"cycles": 4, "iters": 400, "prune_ratio": 0.3}
SAMPLE_SUFFIXES = (".png", ".pt")


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: "sparseflow sample: error: argument -n: expected ..."."""

    def error(self, message: str) -> NoReturn:
        text = " ".join(message.split())
        self.exit(2, f"{self.prog}: error: {text} (see {self.prog} --help)\n")


def _typed(spec: Setting, name: str) -> Any:
    """An argparse ``type`` that parses and range-checks a flag with ``spec``."""

    def parse(text: str) -> Any:
        try:
            return spec.parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    parse.__name__ = name
    return parse


def _setting(key: str) -> Any:
    """The argparse ``type`` of a flag that sets configuration value ``key`` (flows.settings)."""
    return _typed(SCHEMA[key], key)


def _analysis(name: str) -> Any:
    """The argparse ``type`` of an analysis flag (flows.analysis.settings)."""
    return _typed(ANALYSIS_SETTINGS[name], name)


def _add_run_arguments(p: argparse.ArgumentParser, pruning: bool) -> None:
    p.add_argument(
        "--dataset",
        default="gaussians",
        choices=sorted(PRESETS),
        help="dataset; its preset holds the paper's hyperparameters",
    )
    p.add_argument("--out", required=True, help="run directory")
    if pruning:
        # Defaults are None so that a --config file's run settings stand unless a
        # flag is given; the documented defaults come from RUN_DEFAULTS.
        p.add_argument(
            "--method",
            choices=PRUNE_METHODS,
            default=None,
            help=f"pruning method (default: {RUN_DEFAULTS['method']})",
        )
        p.add_argument(
            "--prune-ratio",
            type=_setting("prune.prune_ratio"),
            default=None,
            help="per cycle: fraction of the remaining weights (unstructured) or of the live "
            "neurons of each hidden layer (structured); preset: Table S1-S3",
        )
        p.add_argument(
            "--cycles",
            type=_setting("run.cycles"),
            default=None,
            help=f"prune cycles after the dense warm start (default: {RUN_DEFAULTS['cycles']})",
        )
        p.add_argument(
            "--target-ratio",
            type=_setting("run.target_ratio"),
            default=None,
            help="stop once this overall prune ratio (of weights) is reached (default: none)",
        )
        p.add_argument(
            "--patience",
            type=_setting("run.patience"),
            default=None,
            help="stop after this many cycles without a better validation loss (default: none)",
        )
    p.add_argument(
        "--iters",
        type=_setting("run.iters"),
        default=None,
        help="training iterations per cycle (default: the preset's epochs x --budget)",
    )
    p.add_argument(
        "--budget",
        type=_setting("run.budget"),
        default=None,
        help="scale the preset's epochs per cycle, e.g. 0.1 for a quick look",
    )
    p.add_argument("--seed", type=_setting("run.seed"), default=None)
    p.add_argument("--data-root", default=None, help="directory of the tabular / image files")
    p.add_argument("--dtype", choices=SCHEMA["run.dtype"].choices, default=None)
    p.add_argument(
        "--config", default=None, help="YAML or JSON file of overrides (nested like config.json)"
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one setting, e.g. --set train.lr=1e-3 --set model.hidden=[64,64]",
    )
    p.add_argument(
        "--kernels",
        choices=("compiled", "dense"),
        default=None,
        help="train and evaluate each cycle on sparsekern's compiled kernels (kept values only) "
        "or on the dense masked model (default: compiled)",
    )
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    p.add_argument("--threads", type=_typed(THREADS, "threads"), help="torch CPU threads")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def config_from_args(args: argparse.Namespace, pruning: bool) -> dict[str, Any]:
    """Preset <- --config file <- named flags <- --set assignments."""
    from flows.pipeline import build_config

    overrides: dict[str, Any] = {}
    if args.config:
        overrides = load_config_file(args.config)
    run: dict[str, Any] = {}
    for key in ("iters", "budget", "seed", "data_root", "dtype", "kernels"):
        if getattr(args, key) is not None:
            run[key] = getattr(args, key)
    if pruning:
        for key in ("method", "cycles", "target_ratio", "patience"):
            if getattr(args, key) is not None:
                run[key] = getattr(args, key)
        if args.prune_ratio is not None:
            overrides = merge_free(overrides, {"prune": {"prune_ratio": args.prune_ratio}})
    else:
        run["cycles"] = 0
    overrides = merge_free(overrides, {"run": run})
    for assignment in args.set:
        overrides = merge_free(overrides, parse_assignment(assignment))
    return build_config(args.dataset, overrides)


def merge_free(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """Merge override dicts without checking keys (checked when applied to the preset)."""
    out = dict(base)
    for k, v in extra.items():
        out[k] = merge_free(out.get(k, {}), v) if isinstance(v, dict) else v
    return out


def _set_threads(threads: int | None) -> None:
    if threads is not None:
        torch.set_num_threads(threads)


def _run(args: argparse.Namespace, pruning: bool) -> list[dict[str, Any]]:
    from flows.distributed import restart_count
    from flows.pipeline import run_pipeline
    from flows.run_report import results_table

    config = config_from_args(args, pruning)
    _set_threads(args.threads)
    # torchrun --max-restarts reruns the same command after a lost rank: it resumes.
    resume = args.resume or restart_count() > 0
    rows = run_pipeline(config, args.out, resume=resume, progress=not args.no_progress)
    print(results_table(rows, config))
    print(f"results: {Path(args.out) / 'results.json'}, report: {Path(args.out) / 'results.md'}")
    return rows


def cmd_eval(args: argparse.Namespace) -> dict[str, Any]:
    from flows.pipeline import Task, load_cycle_model
    from flows.rundir import read_results

    model, config, data = load_cycle_model(args.run, args.cycle)
    cycle = args.cycle if args.cycle is not None else read_results(args.run)[-1]["cycle"]
    if args.exact is not None:
        config["eval"]["exact"] = args.exact
    task = Task(config, data)
    metrics = {split: task.evaluate(model, split) for split in args.splits}
    result = {"run": str(args.run), "cycle": cycle, **metrics}
    print(json.dumps(result, indent=2))
    return result


def cmd_sample(args: argparse.Namespace) -> Path:
    from flows.checkpoint import save_atomic, write_bytes_atomic
    from flows.finite import nonfinite_rows
    from flows.pipeline import load_cycle_model

    out = Path(args.out)
    if out.suffix not in SAMPLE_SUFFIXES:
        raise PathError(
            out,
            f"--out {out} must end in .png (a 2D scatter plot or an image grid) or .pt "
            f"(a tensor file), not {out.suffix or 'no suffix'!r}",
        )
    check_output_file(out, "--out file")
    model, config, data = load_cycle_model(args.run, args.cycle)
    if config["task"] != "density":
        raise ValueError(f"run {args.run} is a {config['task']} run; only density flows sample")
    shape = tuple(data.train.shape[1:])
    images = data.levels is not None
    if out.suffix == ".png" and shape != (2,) and not images:
        raise ValueError(
            f"PNG output is for 2D data or images, but run {args.run} has samples of shape "
            f"{list(shape)}; use a .pt file for other shapes"
        )
    x = model.sample(args.n, generator=torch.Generator().manual_seed(args.seed))
    bad = int(nonfinite_rows(x).numel())
    if bad:
        raise ValueError(
            f"the model of run {args.run} produced {bad} of {args.n} non-finite samples (NaN "
            "or inf) from finite weights and base noise: the reverse solve diverged; nothing "
            f"was written to {out}"
        )
    if out.suffix == ".png" and images:
        from flows.run_report import plot_image_grid

        # Pixels in [0, 1]: the flow's reverse undid the logit transform; clamped.
        plot_image_grid(x.clamp(0, 1), out, nrow=max(1, round(args.n**0.5)))
    elif out.suffix == ".png":
        import io

        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(4, 4))
        ax.scatter(x[:, 0], x[:, 1], s=2, alpha=0.5)
        ax.set_aspect("equal")
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=100)
        plt.close(fig)
        write_bytes_atomic(buf.getvalue(), out)
    else:
        save_atomic(x, out)
    print(f"{args.n} samples -> {out}")
    return out


def cmd_report(args: argparse.Namespace) -> Path:
    from flows.report import render_report

    path = render_report(args.runs, args.out)
    print(path.read_text())
    print(f"report: {path}")
    return path


def cmd_demo(args: argparse.Namespace) -> list[list[dict[str, Any]]]:
    """Gaussians, unstructured then structured, sharing one dense warm start.

    Run again on the same ``--out`` with the same settings, the demo resumes:
    a finished demo only re-prints its tables and re-renders the report, an
    interrupted one continues where it stopped. A directory holding a demo
    with other settings is an error (nothing is overwritten).
    """
    from flows.pipeline import build_config, run_pipeline
    from flows.report import render_report
    from flows.run_report import results_table

    out = check_output_dir(args.out, "--out demo directory")
    t0 = time.perf_counter()
    configs = {
        method: build_config(
            "gaussians",
            {
                "run": {
                    "method": method,
                    "cycles": args.cycles,
                    "iters": args.iters,
                    "seed": args.seed,
                },
                "prune": {"prune_ratio": args.prune_ratio},
            },
        )
        for method in PRUNE_METHODS
    }
    # Check every half before running anything, so a mismatch leaves all as it was.
    _set_threads(args.threads)
    earlier = {}
    for method, config in configs.items():
        earlier[method] = _demo_state(out / method, config)
    if all(state == "finished" for state in earlier.values()):
        print(f"{out} holds a finished demo run with these settings; showing its results")
    elif any(state is not None for state in earlier.values()):
        print(f"{out} holds an unfinished demo run with these settings; resuming it")
    all_rows = []
    warm = None
    for method, config in configs.items():
        run_dir = out / method
        rows = run_pipeline(
            config,
            run_dir,
            resume=earlier[method] is not None,
            warm_start=warm,
            progress=not args.no_progress,
        )
        warm = out / "unstructured" / "checkpoints" / "cycle_000.pt"
        print(f"\n## gaussians, {method} pruning\n")
        print(results_table(rows, config))
        all_rows.append(rows)
    report = render_report([out / m for m in PRUNE_METHODS], out)
    print(
        f"report: {report} (per-run plots in {out}/<method>/plots/); "
        f"{time.perf_counter() - t0:.0f} s in all"
    )
    return all_rows


def _demo_state(run_dir: Path, config: dict[str, Any]) -> str | None:
    """None (no run in run_dir), "finished" or "unfinished" for a run with ``config``.

    Raises ValueError if run_dir holds a run with another configuration.
    """
    from flows.checkpoint import read_json
    from flows.rundir import read_results

    path = run_dir / "config.json"
    if not path.exists():
        return None
    if read_json(path, "run configuration") != json.loads(json.dumps(config)):
        raise ValueError(
            f"{run_dir} holds a demo run with other settings (--cycles, --iters, "
            f"--prune-ratio or --seed differ); rerun with its settings, use another --out, "
            f"or remove {run_dir.parent}"
        )
    rows = read_results(run_dir)
    done = rows and (rows[-1]["cycle"] >= config["run"]["cycles"])
    return "finished" if done else "unfinished"


def cmd_analyze(args: argparse.Namespace) -> dict[str, Any]:
    from flows.analysis import runs

    progress = not args.no_progress
    if args.kind == "hessian":
        result = runs.hessian_over_run(
            args.run,
            samples=args.samples,
            power_iters=args.power_iters,
            tol=args.tol,
            trace_samples=args.trace_samples,
            lanczos_steps=args.lanczos_steps,
            seed=args.seed,
            progress=progress,
            lanczos_tol=args.lanczos_tol,
            repeats=args.repeats,
        )
        print((Path(args.run) / "analysis" / "hessian.md").read_text())
    elif args.kind == "boundary":
        result = runs.boundary_over_run(args.run, n_grid=args.grid, progress=progress)
        for r in result["rows"]:
            print(
                f"cycle {r['cycle']}: prune ratio {100 * r['prune_ratio']:.1f}%, "
                f"test accuracy {100 * r['test_accuracy']:.1f}%, boundary distance "
                f"mean {r['mean_distance']:.4f}, 5th percentile {r['p5_distance']:.4f}"
            )
    else:
        result = runs.field_over_run(args.run, progress=progress)
    print(f"figures and JSON in {Path(args.run) / 'analysis'}")
    return result


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="sparseflow", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a dense model (the pipeline's warm start only)")
    _add_run_arguments(p, pruning=False)
    p = sub.add_parser(
        "prune", help="train, then prune and retrain for several cycles (Algorithm 1)"
    )
    _add_run_arguments(p, pruning=True)

    p = sub.add_parser("eval", help="evaluate a run's checkpoint")
    p.add_argument("--run", required=True, help="run directory")
    p.add_argument("--cycle", type=_typed(CYCLE, "cycle"), help="cycle (default: the last)")
    p.add_argument("--splits", nargs="+", default=["test"], choices=("train", "val", "test"))
    p.add_argument(
        "--exact",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="exact trace (default: as configured)",
    )

    p = sub.add_parser("sample", help="draw samples from a run's density flow")
    p.add_argument("--run", required=True)
    p.add_argument("--cycle", type=_typed(CYCLE, "cycle"), help="cycle (default: the last)")
    p.add_argument("-n", type=_typed(SAMPLES, "n"), default=1000, help="number of samples")
    p.add_argument("--seed", type=_setting("run.seed"), default=0)
    p.add_argument(
        "--out", required=True,
        help=".png (2D scatter, or an image grid for image runs) or .pt (tensor) file",
    )

    p = sub.add_parser("report", help="markdown table and plots over one or more runs")
    p.add_argument("runs", nargs="+", help="run directories")
    p.add_argument("--out", required=True, help="report directory")

    p = sub.add_parser(
        "analyze", help="Hessian, decision-boundary or vector-field analysis of a run"
    )
    p.add_argument("kind", choices=("hessian", "boundary", "field"))
    p.add_argument("--run", required=True, help="run directory (from prune/train)")
    p.add_argument(
        "--samples", type=_analysis("samples"), default=512,
        help="hessian: training points in the loss",
    )
    p.add_argument(
        "--power-iters", type=_analysis("power_iters"), default=50,
        help="hessian: power-iteration budget",
    )
    p.add_argument(
        "--tol",
        type=_analysis("tol"),
        default=1e-3,
        help="hessian: power-iteration relative tolerance (0: take every iteration)",
    )
    p.add_argument(
        "--trace-samples", type=_analysis("trace_samples"), default=20,
        help="hessian: Hutchinson probes (>= 2)",
    )
    p.add_argument(
        "--lanczos-steps",
        type=_analysis("lanczos_steps"),
        default=20,
        help="hessian: Lanczos step budget (lambda_min; >= 2)",
    )
    p.add_argument(
        "--lanczos-tol",
        type=_analysis("lanczos_tol"),
        default=1e-3,
        help="hessian: stop Lanczos when the smallest Ritz value's residual is below "
        "this times its magnitude (0: take every step)",
    )
    p.add_argument(
        "--repeats",
        type=_analysis("repeats"),
        default=3,
        help="hessian: power-iteration and Lanczos runs from independent start vectors, "
        "for lambda_max / lambda_min / kappa error bars (mean +- sd; 1: none)",
    )
    p.add_argument("--seed", type=_analysis("seed"), default=0)
    p.add_argument(
        "--grid", type=_analysis("n_grid"), default=200,
        help="boundary: search grid size per axis (>= 2)",
    )
    p.add_argument("--no-progress", action="store_true")

    p = sub.add_parser("demo", help="the main job: gaussians, unstructured and structured pruning")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--cycles", type=_setting("run.cycles"), default=DEMO_SETTINGS["cycles"])
    p.add_argument(
        "--iters", type=_setting("run.iters"), default=DEMO_SETTINGS["iters"],
        help="iterations per cycle",
    )
    p.add_argument(
        "--prune-ratio", type=_setting("prune.prune_ratio"), default=DEMO_SETTINGS["prune_ratio"]
    )
    p.add_argument("--seed", type=_setting("run.seed"), default=0)
    p.add_argument(
        "--resume",
        action="store_true",
        help="accepted for compatibility: the demo always resumes a run with the same "
        "settings in --out (a finished one is only shown again)",
    )
    p.add_argument("--threads", type=_typed(THREADS, "threads"), help="torch CPU threads")
    p.add_argument("--no-progress", action="store_true")
    from bench.cli import add_arguments as add_bench_arguments

    add_bench_arguments(
        sub.add_parser("bench", help="benchmark suite: engine against peers (bench/README.md)")
    )
    return parser


def error_line(e: BaseException) -> str:
    """One line for an error: its message (lines joined), an OSError's path and reason."""
    if isinstance(e, OSError) and e.filename is not None and e.strerror:
        target = f"{e.filename} -> {e.filename2}" if e.filename2 else str(e.filename)
        return f"{target}: {e.strerror}"
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return "; ".join(lines) or type(e).__name__


# The project's own warnings, shown on the command line as one line each (no source line).
CLI_WARNINGS = (EmptyLayerWarning,)


@contextmanager
def _one_line_warnings(command: str) -> Iterator[None]:
    """Show CLI_WARNINGS as ``sparseflow COMMAND: warning: ...``; others as Python does."""
    shown = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, CLI_WARNINGS):
            print(f"sparseflow {command}: warning: {message}", file=file or sys.stderr)
        else:
            shown(message, category, filename, lineno, file, line)

    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = shown


# Commands that run data-parallel under torchrun (flows.distributed).
DISTRIBUTED_COMMANDS = ("train", "prune", "demo")


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; 0 on success, 2 (one line on stderr) for bad input or a file problem.

    Bad settings, flags and files (``ValueError``: ``SettingError``,
    ``PathError``, ``CheckpointError``, ``DatasetFileError``) and OSErrors
    (a path that cannot be read or written) end in one line naming what is
    wrong, never a traceback. Under torchrun (``train``, ``prune``, ``demo``)
    the line names the rank, only rank 0 prints results, and a rank that
    loses its peers or disagrees with them ends with one line and exit code 1.
    """
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # argparse: --help (0) or a one-line usage error (2)
        return e.code if isinstance(e.code, int) else 2
    from flows import distributed

    where, clean = "", True
    try:
        if args.command in DISTRIBUTED_COMMANDS:
            world = distributed.init_from_env()
            if world.initialised:
                where = f" (rank {world.rank} of {world.size})"
                distributed.stop_on_sigterm()
            if not world.main:
                sys.stdout = open(os.devnull, "w")  # rank 0 alone prints the results
        with _one_line_warnings(args.command):
            if args.command in ("train", "prune"):
                _run(args, pruning=args.command == "prune")
            elif args.command == "eval":
                cmd_eval(args)
            elif args.command == "sample":
                cmd_sample(args)
            elif args.command == "report":
                cmd_report(args)
            elif args.command == "analyze":
                cmd_analyze(args)
            elif args.command == "demo":
                cmd_demo(args)
            elif args.command == "bench":
                from bench.cli import run as run_bench

                return run_bench(args, ["sparseflow", *(sys.argv[1:] if argv is None else argv)])
    except (ValueError, OSError) as e:
        print(f"sparseflow {args.command}: error{where}: {error_line(e)}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        if isinstance(e, distributed.RankMismatchError):
            print(f"sparseflow {args.command}: error{where}: {error_line(e)}", file=sys.stderr)
            return 1
        if isinstance(e, distributed.StoppedByLauncher):
            reason = str(e)
        elif distributed.lost_peer(e):
            world = distributed.current()
            other = f"rank {1 - world.rank}" if world.size == 2 else "another rank"
            reason = f"lost contact with {other} ({error_line(e)})"
        else:
            raise
        clean = False
        print(
            f"sparseflow {args.command}: error{where}: {reason}; torchrun's report names the "
            "rank that failed. Nothing finished is lost: rerun with --resume (any number of "
            "processes), or let torchrun --max-restarts resume it",
            file=sys.stderr,
        )
        return 1
    finally:
        distributed.shutdown(clean)
    return 0


if __name__ == "__main__":
    sys.exit(main())
