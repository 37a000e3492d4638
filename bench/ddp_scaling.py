"""Data-parallel scaling: training-step throughput on 1 and N processes under torchrun.

``python -m bench.ddp_scaling`` times ``flows.train.fit`` (the loop the
pipeline trains with: per-row Hutchinson noise, DDP's gradient all-reduce, the
ranks' loss and NFE gathered every step) on a pruned, compiled tabular flow
(bench.cases shapes, default ``power`` at 80% pruned), three ways:

- ``plain``: one process without torchrun, with every core (what a user has
  without torchrun);
- ``torchrun-N``: N ranks (gloo on CPU, NCCL with one GPU per rank), the
  global batch split over them, the cores shared out (cores / N threads each).

Throughput is global samples per second of a training step (forward, backward
through the adjoint, optimiser step), the median over the timed steps after
warm-up. Scaling efficiency is throughput on N / (N x throughput of plain).
On a 2-core CPU the cores are shared, so expect about 0.5: the figure shows
what the all-reduce and the per-step gathers cost beside the work.

Writes ``<out>/<machine>/ddp/ddp_scaling.json`` and ``ddp_scaling.md`` with the
machine and versions (bench.machine).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.ddp_scaling",
                                description=__doc__.split("\n")[0])
    p.add_argument("--shape", default="power",
                   help="a tabular shape of bench.cases (default: power)")
    p.add_argument("--density", type=float, default=0.2,
                   help="kept fraction of weights (default: 0.2)")
    p.add_argument("--batch", type=int, default=1000, help="global batch (default: 1000)")
    p.add_argument("--steps", type=int, default=10, help="timed steps (default: 10)")
    p.add_argument("--warmup", type=int, default=3, help="untimed first steps (default: 3)")
    p.add_argument("--procs", default="2",
                   help="process counts under torchrun, e.g. 1,2 (default: 2)")
    p.add_argument("--solver", choices=("rk4", "dopri5"), default="rk4",
                   help="rk4 with a fixed step (the same work on every shard; default) or dopri5 "
                        "at the shape's tolerances (NFE then depends on the shard)")
    p.add_argument("--step-size", type=float, default=0.125, help="rk4's step (default: 0.125)")
    p.add_argument("--out", default="bench/results", help="results root (default: bench/results)")
    p.add_argument("--timeout", type=float, default=1200, help="seconds per configuration")
    p.add_argument("--worker", metavar="JSON", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    from bench.cases import SHAPES

    tabular = [name for name, shape in SHAPES.items() if shape.image is None]
    if args.shape not in tabular:
        p.error(f"--shape {args.shape!r}: expected a tabular shape, one of {', '.join(tabular)}")
    if args.batch < 1 or args.steps < 1 or args.warmup < 0:
        p.error("--batch and --steps must be >= 1 and --warmup >= 0")
    try:
        args.procs = [int(n) for n in args.procs.split(",")]
    except ValueError:
        p.error(f"--procs {args.procs!r}: expected comma-separated process counts, e.g. 1,2")
    if any(n < 1 for n in args.procs) or any(args.batch % n for n in args.procs):
        p.error(f"--batch {args.batch} must divide by every process count in {args.procs}")
    return args


def _flow(args: argparse.Namespace) -> torch.nn.Module:
    """The compiled flow of the shape at the density (bench.cases' fields, this solver)."""
    from bench.cases import SHAPES, Case, build_field
    from flows.cnf import CNF, SequentialFlow
    from flows.engine import compile_for_training

    shape = SHAPES[args.shape]
    case = Case(shape, "unstructured", args.density)
    options = {"step_size": args.step_size} if args.solver == "rk4" else None
    cnfs = [CNF(build_field(case, block=b), divergence="hutchinson", noise=shape.noise,
                solver=args.solver, atol=shape.atol, rtol=shape.rtol, T=shape.T,
                adjoint=shape.adjoint, solver_options=options)
            for b in range(shape.blocks)]
    flow = cnfs[0] if len(cnfs) == 1 else SequentialFlow(cnfs)
    return compile_for_training(flow)[0]


def _work(args: argparse.Namespace) -> None:
    """One process of a configuration (under torchrun or not); rank 0 writes the JSON."""
    from flows import distributed
    from flows.train import TrainConfig, density_loss, fit

    world = distributed.init_from_env()
    try:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world.size))
        from bench.cases import SHAPES

        x = torch.randn(max(args.batch * 4, 4096), SHAPES[args.shape].dim,
                        generator=torch.Generator().manual_seed(0))
        flow = _flow(args).to(world.device)
        iters = args.warmup + args.steps
        config = TrainConfig(iters=iters, batch_size=args.batch, lr=1e-4, eval_every=iters,
                             checkpoint_every=iters)
        history = fit(flow, density_loss, (x.to(world.device),), config, progress=False)
        timed = history[args.warmup:]
        # A step's time is the slowest rank's: the others wait for it in the all-reduce.
        seconds = statistics.median(r.get("seconds_max", r["seconds"]) for r in timed)
        if world.main:
            Path(args.worker).write_text(json.dumps({
                "processes": world.size,
                "threads_per_process": torch.get_num_threads(),
                "step_seconds": seconds,
                "samples_per_second": args.batch / seconds,
                "nfe_forward": statistics.mean(r["nfe_forward"] for r in timed),
                "nfe_backward": statistics.mean(r["nfe_backward"] for r in timed),
                "device": str(world.device),
            }))
    finally:
        distributed.shutdown()


def _launch(args: argparse.Namespace, argv: list[str], nproc: int | None) -> dict[str, Any]:
    """Run one configuration in fresh processes: plain (None) or torchrun with ``nproc``."""
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        worker = ["-m", "bench.ddp_scaling", *argv, "--worker", str(result)]
        cmd = [sys.executable, *worker] if nproc is None else [
            sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc-per-node={nproc}", *worker]
        env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // (nproc or 1)))}
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=env)
        if p.returncode != 0 or not result.exists():
            raise SystemExit(f"bench.ddp_scaling: {' '.join(cmd)} failed (exit {p.returncode}):\n"
                             f"{p.stderr[-3000:]}")
        return json.loads(result.read_text())


def _markdown(report: dict[str, Any]) -> str:
    m, s = report["machine"], report["settings"]
    lines = [
        "# Data-parallel scaling of a training step (`python -m bench.ddp_scaling`)",
        "",
        f"{s['shape']} flow, {100 * (1 - s['density']):.0f}% pruned (compiled), global batch "
        f"{s['batch']}, {s['solver']}, median of {s['steps']} steps after {s['warmup']}.",
        f"Machine: {m['cpu_model']} ({m['cpu_count']} cores), {m.get('gpu') or 'no GPU'}; "
        f"torch {m['torch']}, CUDA {m['cuda']}, Triton {m['triton']}, Python {m['python']}, "
        f"commit {m['git_commit']}.",
        "",
        "| run | processes | threads each | step (s) | samples/s | NFE fwd | NFE bwd "
        "| efficiency |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in report["runs"]:
        lines.append(
            f"| {r['run']} | {r['processes']} | {r['threads_per_process']} | "
            f"{r['step_seconds']:.4f} | {r['samples_per_second']:.0f} | {r['nfe_forward']:.1f} | "
            f"{r['nfe_backward']:.1f} | {r['efficiency']:.2f} |")
    lines += ["", "efficiency = samples/s on N processes / (N x samples/s of the plain "
              "one-process run)."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = _parse(argv)
    if args.worker:
        _work(args)
        return 0
    from bench.machine import machine_info, machine_slug

    passed = ["--shape", args.shape, "--density", str(args.density), "--batch", str(args.batch),
              "--steps", str(args.steps), "--warmup", str(args.warmup), "--solver", args.solver,
              "--step-size", str(args.step_size), "--procs", "1"]
    plain = {"run": "plain", **_launch(args, passed, None)}
    runs = [plain, *({"run": f"torchrun-{n}", **_launch(args, passed, n)} for n in args.procs)]
    for r in runs:
        r["efficiency"] = r["samples_per_second"] / (r["processes"] * plain["samples_per_second"])
        print(f"{r['run']:>12}: {r['samples_per_second']:9.0f} samples/s, "
              f"efficiency {r['efficiency']:.2f}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    info = machine_info(device)
    info["threads"] = os.cpu_count()
    report = {"machine": info, "settings": {k: v for k, v in vars(args).items()
                                             if k not in ("worker", "out", "timeout")},
              "runs": runs}
    out = Path(args.out) / machine_slug(info) / "ddp"
    out.mkdir(parents=True, exist_ok=True)
    (out / "ddp_scaling.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "ddp_scaling.md").write_text(_markdown(report))
    print(f"written: {out / 'ddp_scaling.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
