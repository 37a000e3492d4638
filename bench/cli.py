"""``python -m bench`` (and ``sparseflow bench``): run the suite, write results, compare.

Options are documented in bench/README.md and by ``python -m bench --help``.
Exit status: 0 on success, 1 when ``--compare`` finds a regression, 2 on a bad option,
130 when interrupted (the cases finished by then are saved).
"""

from __future__ import annotations

import argparse
import datetime
import os
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bench.cases import MASK_KINDS, QUICK_CASES, SHAPES, Case, all_cases, select_cases
from bench.compare import DEFAULT_MARGIN, compare_loaded, has_regressions, summary_line
from bench.machine import machine_info, machine_slug
from bench.metrics import FLOP_COUNTING, METRICS
from bench.providers import Provider, make_providers, resolve_providers
from bench.report import load_results, write_report
from bench.runner import Settings, case_metric_reason, run_benchmark
from bench.timing import TimingConfig

RESULTS_ROOT = Path(__file__).resolve().parent / "results"
QUICK_METRICS = ("f_div", "train_step")
QUICK_PROVIDERS = ("dense_eager", "torch_csr", "sparsekern")
QUICK_BUDGET_S = 0.5
DEFAULT_BUDGET_S = 1.0
DEFAULT_SOLVE_BATCH = 1024
DTYPES = {"float32": torch.float32, "float64": torch.float64}


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The suite's options (shared by ``python -m bench`` and ``sparseflow bench``)."""
    p.add_argument("--quick", action="store_true",
                   help=f"representative subset, about two minutes on 2 CPU cores: cases "
                        f"{', '.join(QUICK_CASES)}; metrics {', '.join(QUICK_METRICS)}; "
                        f"providers {', '.join(QUICK_PROVIDERS)}; budget {QUICK_BUDGET_S} s "
                        "(explicit --cases/--metrics/--providers/--budget override these)")
    p.add_argument("--cases", nargs="+", metavar="PATTERN", default=None,
                   help='case globs over "<shape>/<structure>/<density>", e.g. toy '
                        '"miniboone/unstructured/0.1" "*/structured", or the image cases '
                        'mnist cifar10 (default: all)')
    p.add_argument("--providers", nargs="+", metavar="NAME", default=None,
                   help='provider names, "default" (the main four, sparsekern_native, '
                        'torchode where installed, and each compiled sparsekern backend '
                        'available here) or "all"')
    p.add_argument("--metrics", nargs="+", choices=METRICS, default=None,
                   help="what to measure per case (default: all)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--out", default=None,
                   help="output folder (default bench/results/<machine>[-quick])")
    p.add_argument("--compare", metavar="OLD.json", default=None,
                   help="compare with an earlier results.json; exit 1 on a regression")
    p.add_argument("--margin", type=float, default=DEFAULT_MARGIN,
                   help=f"--compare: relative margin beyond the spread (default {DEFAULT_MARGIN})")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds of timed samples per measurement (default 1, quick 0.5)")
    p.add_argument("--min-repeats", type=int, default=5, help="fewest samples (default 5)")
    p.add_argument("--max-repeats", type=int, default=50, help="most samples (default 50)")
    p.add_argument("--warmup", type=int, default=3,
                   help="warm-up calls before sampling, the first excluded (default 3)")
    p.add_argument("--batch", type=int, default=None,
                   help="override every case's batch (default: the paper's, per shape)")
    p.add_argument("--solve-batch", type=int, default=None,
                   help=f"cap the batch of the flow metrics (solve, train_solve) at N for every "
                        f"shape (default {DEFAULT_SOLVE_BATCH}, the image shapes their own "
                        "cap, 50; 0: the case's batch, e.g. 10000 for BSDS300, 200 for MNIST)")
    p.add_argument("--solve-blocks", type=int, default=None,
                   help="cap the CNF blocks of the solve metric (default: all of the shape's)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--device", default=None, help="cpu or cuda[:i] (default: cuda if available)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--masks", choices=MASK_KINDS, default="random",
                   help="unstructured masks: random, the same kept fraction in every layer "
                        "(default), or global magnitude (flows' pruning; degenerate on "
                        "random-init weights at low density, see bench/cases.py)")
    p.add_argument("--compile-backend", default="inductor",
                   help="torch.compile backend of the torch_compile provider (default inductor)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--list", action="store_true",
                   help="list shapes, cases, providers (with availability) and metrics, then stop")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Sparse Flows benchmark: time per NFE, training step and dopri5 solve of "
                    "pruned flows, sparsekern against dense and sparse peers.")
    add_arguments(parser)
    return parser


def _list(device: torch.device, compile_backend: str) -> None:
    registry = make_providers(compile_backend)
    print("shapes:")
    for s in SHAPES.values():
        extra = ""
        if s.is_conv:
            where = ", ".join(f"unstructured/{d:g}" for d in s.flow_densities or ())
            extra = f", {s.noise} noise, " + (
                f"flow metrics on {where} at batch {s.solve_batch} (default)" if where
                else "no flow metrics")
        print(f"  {s.name:10s} {s.label}, batch {s.batch}, atol {s.atol:g} rtol {s.rtol:g}, "
              f"T {s.T:g}{extra}")
    cases = all_cases()
    print(f"cases ({len(cases)}):")
    for c in cases:
        tags = ["quick"] if c.name in QUICK_CASES else []
        if c.shape.is_conv and case_metric_reason(c, "solve") is not None:
            tags.append("no flow metrics")
        print(f"  {c.name}" + (f"   [{'; '.join(tags)}]" if tags else ""))
    print(f"providers (device {device}):")
    defaults = resolve_providers(None, device, registry)
    image = next(s for s in SHAPES.values() if s.is_conv)
    for name, p in registry.items():
        why = p.unavailable(device)
        tag = "default" if name in defaults else ("unavailable: " + why if why else "")
        no_image = p.shape_unavailable(image)
        if no_image and not why:
            tag = (f"{tag}; " if tag else "") + f"not on the image shapes: {no_image}"
        print(f"  {name:20s} {p.description}" + (f"   [{tag}]" if tag else ""))
    print(f"metrics: {', '.join(METRICS)}")


def _loadavg() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


@dataclass(frozen=True)
class Selection:
    """What a run measures (cases x providers x metrics) and its per-measurement budget."""

    cases: list[Case]
    metrics: list[str]
    providers: list[str]
    budget_s: float


def resolve_selection(args: argparse.Namespace, device: torch.device,
                      registry: dict[str, Provider]) -> Selection:
    """The run's selection: ``--quick``'s subset, each part overridden by its explicit option.

    Providers are names in run order, including ones unavailable on ``device``
    (the run skips those and records why).

    Raises:
        ValueError: a case pattern that matches nothing, an unknown provider, a bad budget.
    """
    cases = select_cases(args.cases or (list(QUICK_CASES) if args.quick else None))
    metrics = list(args.metrics or (QUICK_METRICS if args.quick else METRICS))
    names = resolve_providers(args.providers or (list(QUICK_PROVIDERS) if args.quick else None),
                              device, registry)
    budget = args.budget if args.budget is not None else (
        QUICK_BUDGET_S if args.quick else DEFAULT_BUDGET_S)
    if not budget > 0:
        raise ValueError(f"--budget must be positive, got {budget}")
    return Selection(cases, metrics, names, budget)


def output_dir(args: argparse.Namespace, slug: str) -> Path:
    """``--out``, or bench/results/<machine> (``<machine>-quick`` with ``--quick``)."""
    return Path(args.out) if args.out else RESULTS_ROOT / (slug + ("-quick" if args.quick else ""))


def main(argv: Sequence[str] | None = None) -> int:
    """Run the suite; returns the exit status (0 ok, 1 regression found, 2 bad options)."""
    args = build_parser().parse_args(argv)
    shown = sys.argv[1:] if argv is None else list(argv)
    return run(args, ["python", "-m", "bench", *shown])


def run(args: argparse.Namespace, command: list[str] | None = None) -> int:
    """Run from parsed options (``sparseflow bench`` calls this with its own namespace)."""
    if args.threads < 1:
        print("bench: error: --threads must be >= 1", file=sys.stderr)
        return 2
    try:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as exc:
        print(f"bench: error: --device {args.device}: {exc}", file=sys.stderr)
        return 2
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench: error: --device cuda, but torch sees no CUDA device", file=sys.stderr)
        return 2
    threads = torch.get_num_threads()
    try:
        return _run(args, command, device)
    finally:
        torch.set_num_threads(threads)  # bench.main() from Python leaves the caller's setting


def _run(args: argparse.Namespace, command: list[str] | None, device: torch.device) -> int:
    torch.set_num_threads(args.threads)
    if args.list:
        _list(device, args.compile_backend)
        return 0
    registry = make_providers(args.compile_backend)
    old: tuple[dict[str, Any], list[dict[str, Any]]] | None = None
    try:
        sel = resolve_selection(args, device, registry)
        timing = TimingConfig(budget_s=sel.budget_s, warmup=args.warmup,
                              min_repeats=args.min_repeats, max_repeats=args.max_repeats)
        explicit = args.solve_batch is not None
        if explicit and args.solve_batch < 0:
            raise ValueError(f"--solve-batch must be >= 0, got {args.solve_batch}")
        settings = Settings(metrics=list(sel.metrics), timing=timing, dtype=DTYPES[args.dtype],
                            device=device, seed=args.seed, masks=args.masks, batch=args.batch,
                            solve_batch=(args.solve_batch or None) if explicit
                            else DEFAULT_SOLVE_BATCH,
                            shape_solve_batch=not explicit, solve_blocks=args.solve_blocks)
    except ValueError as exc:
        print(f"bench: error: {exc}", file=sys.stderr)
        return 2
    cases, metrics, names, budget = sel.cases, sel.metrics, sel.providers, sel.budget_s
    skipped = {n: registry[n].unavailable(device, settings.dtype) for n in names}
    skipped = {n: why for n, why in skipped.items() if why}
    providers: list[Provider] = [registry[n] for n in names if n not in skipped]
    for n, why in skipped.items():
        print(f"bench: skipping {n}: {why}", file=sys.stderr)
    skipped_metrics: dict[str, dict[str, str]] = {}
    for p in providers:
        left = {m: why for m in metrics if (why := p.metric_unavailable(m))}
        if left:
            skipped_metrics[p.name] = left
            print(f"bench: {p.name} does not measure {', '.join(left)}: "
                  f"{'; '.join(dict.fromkeys(left.values()))}", file=sys.stderr)
    shapes = list(dict.fromkeys(c.shape for c in cases))
    skipped_shapes: dict[str, dict[str, str]] = {}
    for p in providers:
        left = {s.name: why for s in shapes if (why := p.shape_unavailable(s))}
        if left:
            skipped_shapes[p.name] = left
            print(f"bench: {p.name} does not run {', '.join(left)}: "
                  f"{'; '.join(dict.fromkeys(left.values()))}", file=sys.stderr)
    skipped_case_metrics: dict[str, dict[str, str]] = {}
    for c in cases:
        left = {m: why for m in metrics if (why := case_metric_reason(c, m))}
        if left:
            skipped_case_metrics[c.name] = left
    if skipped_case_metrics:
        reasons = {why for left in skipped_case_metrics.values() for why in left.values()}
        print(f"bench: {len(skipped_case_metrics)} case(s) do not measure every selected "
              f"metric: {'; '.join(sorted(reasons))}", file=sys.stderr)

    info = machine_info(device)
    slug = machine_slug(info)
    out = output_dir(args, slug)
    if args.compare:
        # Read the baseline now: a bad file must not cost a whole run, and the run must not
        # overwrite the file it is compared with (the default --out holds the committed one).
        try:
            if Path(args.compare).resolve() == (out / "results.json").resolve():
                raise ValueError(f"--compare {args.compare} is the results.json this run "
                                 "writes; pass another --out")
            old = load_results(Path(args.compare))
        except FileNotFoundError:
            print(f"bench: error: --compare {args.compare}: no such file", file=sys.stderr)
            return 2
        except (OSError, ValueError) as exc:  # json.JSONDecodeError is a ValueError
            print(f"bench: error: --compare {args.compare}: {exc}", file=sys.stderr)
            return 2
    meta: dict[str, Any] = {
        "machine": info,
        "machine_slug": slug,
        "command": shlex.join(command or ["python", "-m", "bench"]),
        "options": {
            "quick": args.quick, "cases": [c.name for c in cases], "providers": names,
            "metrics": list(metrics), "threads": args.threads, "budget_s": budget,
            "min_repeats": args.min_repeats, "max_repeats": args.max_repeats,
            "warmup": args.warmup, "batch": args.batch, "solve_batch": args.solve_batch,
            "solve_blocks": args.solve_blocks, "dtype": args.dtype, "device": str(device),
            "seed": args.seed, "masks": args.masks, "compile_backend": args.compile_backend,
        },
        "providers": {p.name: p.description for p in providers},
        "skipped": skipped,
        "skipped_metrics": skipped_metrics,
        "skipped_shapes": skipped_shapes,
        "skipped_case_metrics": skipped_case_metrics,
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "duration_s": 0.0,
        "complete": False,
        "flop_counting": FLOP_COUNTING,
        "loadavg_start": _loadavg(),
        "loadavg_end": None,
    }
    t0 = time.perf_counter()

    def save(rows: list[dict[str, Any]], plots: bool = False) -> None:
        meta["duration_s"] = time.perf_counter() - t0
        meta["loadavg_end"] = _loadavg()
        write_report(out, meta, rows, plots=plots)

    print(f"bench: {len(cases)} cases x {len(providers)} providers x {len(metrics)} metrics "
          f"on {device} ({args.threads} threads) -> {out}", file=sys.stderr)
    try:
        rows = run_benchmark(cases, providers, settings, progress=not args.no_progress,
                             on_case=save)
    except KeyboardInterrupt:
        print(f"bench: interrupted; the cases finished so far are in {out / 'results.json'} "
              '("complete": false)', file=sys.stderr)
        return 130
    meta["complete"] = True
    save(rows, plots=not args.no_plots)
    print(f"bench: wrote {out / 'results.json'} and {out / 'results.md'} "
          f"in {meta['duration_s']:.0f} s", file=sys.stderr)
    errors = [r for r in rows if r.get("error")]
    if errors:
        print(f"bench: {len(errors)} measurement(s) failed; see the Checks section of "
              "results.md", file=sys.stderr)
    if old is not None:
        changes, text = compare_loaded(old, (meta, rows), args.margin, out / "compare.md")
        print(text, end="")
        print(summary_line(changes))
        return 1 if has_regressions(changes) else 0
    return 0
