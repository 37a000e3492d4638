"""The Python side of ``bash bench/gpu_check.sh smoke``: versions, one solve check, the summary.

``python -m bench.gpu_smoke versions --out versions.json``
    device, driver, torch, CUDA, Triton and the other versions (machine_info and
    nvidia-smi), printed and written as JSON.
``python -m bench.gpu_smoke solve --device cuda --backends triton --out solve.json``
    one dopri5 log-likelihood solve of a pruned CNF (default the toy case at 70%
    pruned, ``toy/unstructured/0.3``), compiled by ``compile_sparse`` with each
    backend, against the dense masked model with the same weights, inputs and
    Hutchinson noise, in float32 and float64. Checks: float64 the same NFE and
    log p within 1e-10 (norm-wise relative); float32 NFE within one dopri5 step
    (6 evaluations) and log p as accurate as the dense float32 model against the
    float64 dense truth: 2 x its error, plus the rounding floor u x the solve's
    sums, plus 10 x the solver tolerance where the steps differ (the engine
    tests' rule, tests/engine_helpers.contract_tol). Exit 1 on a failed
    check. The JSON is rewritten after every solve, so a timeout keeps the rest.
``python -m bench.gpu_smoke bench -- <python -m bench options>``
    ``python -m bench`` that never starts a build of the CUDA extension (its
    provider list asks ``sparsekern.backends.cuda.available()``, which builds it:
    minutes of nvcc); the cuda backend counts as available only once built.
``python -m bench.gpu_smoke summary --dir DIR``
    reads DIR/steps.tsv (written by gpu_check.sh), versions.json, solve-*.json,
    the pytest logs and bench/results.json; writes DIR/smoke.json and
    DIR/smoke.md and prints the markdown. Exit 0 when there is no problem (a
    step failed or killed, a solve check failed, a bench measurement failed or
    is off dense_eager by more than 1e-3 relative), else 1; the problems are listed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

SCHEMA = 1
SOLVE_CASES = ("toy/unstructured/0.3",)
F64_TOL = 1e-10  # tests/engine_helpers.F64_TOL
BENCH_REL_ERR = 1e-3  # bench's own flag for float32 outputs against dense_eager (results.md)
# float32 solves, as tests/engine_helpers states them: one dopri5 step (6 evaluations)
# either way; float32's unit roundoff per term of the solve's sums; 10 solver tolerances
# of discretisation error where the steps differ.
DOPRI5_STEP_NFE = 6
U32 = 2.0**-24
STEP_SLACK_TOLERANCES = 10


# ----------------------------------------------------------------------------- versions


def versions(device: str) -> dict[str, Any]:
    """bench.machine.machine_info plus nvidia-smi's GPU line and what does not import."""
    import importlib

    import torch

    from bench.machine import machine_info

    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        dev = torch.device("cpu")
    info = machine_info(dev)
    info["requested_device"] = device
    info["triton_interpret"] = os.environ.get("TRITON_INTERPRET") == "1"
    info["nvidia_smi"] = None
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            proc = subprocess.run(
                [smi, "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                 "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
            info["nvidia_smi"] = proc.stdout.strip() or proc.stderr.strip()
        except (OSError, subprocess.SubprocessError) as exc:
            info["nvidia_smi"] = f"failed: {exc}"
    missing = {}
    for name in ("triton", "torchdiffeq", "pytest", "hypothesis", "tqdm", "matplotlib", "ninja"):
        try:
            importlib.import_module(name)
        except ImportError as exc:
            missing[name] = str(exc)
    info["missing"] = missing
    info["nvcc"] = shutil.which("nvcc")
    return info


def _cmd_versions(args: argparse.Namespace) -> int:
    info = versions(args.device)
    keys = ("gpu", "gpu_capability", "nvidia_smi", "torch", "cuda", "cuda_available", "triton",
            "triton_interpret", "torchdiffeq", "python", "platform", "cpu_model", "cpu_count",
            "nvcc", "git_commit", "missing")
    for k in keys:
        print(f"{k}: {info.get(k)}")
    if args.out:
        _write_json(Path(args.out), info)
    return 0


# ------------------------------------------------------------------------------- solve


def _rel_err(got, ref) -> float:
    got, ref = got.detach().double().cpu(), ref.detach().double().cpu()
    return (got - ref).norm().item() / max(ref.norm().item(), 1e-30)


def _fix_noise(flow, noise) -> None:
    """Every solve of ``flow`` takes ``noise`` (cast to the state's dtype) as its probe."""
    from flows.odefunc import ODEFunc

    for m in flow.modules():
        if isinstance(m, ODEFunc):
            m.draw_noise = lambda like, m=m: setattr(m, "noise", noise.to(like.dtype))


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def flow_tolerance(flow) -> float:
    """The loosest solver tolerance (atol, rtol) of the CNF blocks in ``flow``."""
    from flows import CNF

    return max(max(m.atol, m.rtol) for m in flow.modules() if isinstance(m, CNF))


def _timed_log_prob(flow, x, device) -> tuple[Any, int, float]:
    """log p(x) under no_grad, its NFE and its wall time in seconds."""
    import torch

    _sync(device)
    t0 = time.perf_counter()
    with torch.no_grad():
        lp = flow.log_prob(x)
    _sync(device)
    return lp, int(flow.nfe_forward), time.perf_counter() - t0


def solve_row(case_name: str, backend: str, dtype_name: str, device_name: str, batch: int,
              seed: int = 0) -> dict[str, Any]:
    """One compiled solve against the dense masked model (see the module docstring)."""
    import torch

    from bench.cases import build_field, build_flow, select_cases
    from sparsekern import SparseConfig, compile_sparse, compiled_fields
    from sparsekern.linear import CoreMatrix

    dtype = {"float32": torch.float32, "float64": torch.float64}[dtype_name]
    device = torch.device(device_name)
    row: dict[str, Any] = {
        "case": case_name, "backend": backend, "dtype": dtype_name, "device": str(device),
        "batch": batch, "nfe_dense": None, "nfe_compiled": None, "nfe_equal": None,
        "nfe_truth": None, "max_abs_dlogp": None, "rel_err": None, "rel_err_truth": None,
        "rel_err_dense_truth": None, "tol": None, "ok": False, "compile_s": None,
        "first_solve_s": None, "solve_ms": None, "dense_solve_ms": None, "backend_used": None,
        "layouts": None, "error": None,
    }
    try:
        (case,) = select_cases([case_name])[:1]
        shape = case.shape
        flow = build_flow(shape, [build_field(case, dtype=dtype, device=device, seed=seed,
                                              block=b) for b in range(shape.blocks)])
        gen = torch.Generator().manual_seed(seed + 1)
        x64 = torch.randn(batch, shape.dim, generator=gen, dtype=torch.float64)
        noise = torch.randn(batch, shape.dim, generator=gen, dtype=torch.float64).to(device)
        x = x64.to(device, dtype)
        _fix_noise(flow, noise)
        t0 = time.perf_counter()
        fast = compile_sparse(flow, SparseConfig(backend=backend, batch_hint=batch))
        row["compile_s"] = time.perf_counter() - t0
        _fix_noise(fast, noise)
        row["layouts"] = [m.layout for m in fast.modules() if isinstance(m, CoreMatrix)]
        used = {f.backend for f in compiled_fields(fast)}
        row["backend_used"] = sorted(used) or None
        lp_fast, nfe_fast, row["first_solve_s"] = _timed_log_prob(fast, x, device)
        lp_fast, nfe_fast2, t_fast = _timed_log_prob(fast, x, device)
        lp, nfe, t_dense = _timed_log_prob(flow, x, device)
        _timed_log_prob(flow, x, device)  # dense, warm
        _, _, t_dense = _timed_log_prob(flow, x, device)
        row.update(nfe_dense=nfe, nfe_compiled=nfe_fast, nfe_equal=nfe_fast == nfe,
                   max_abs_dlogp=(lp_fast.double() - lp.double()).abs().max().item(),
                   rel_err=_rel_err(lp_fast, lp), solve_ms=1e3 * t_fast,
                   dense_solve_ms=1e3 * t_dense)
        if nfe_fast2 != nfe_fast:
            raise RuntimeError(f"two compiled solves took {nfe_fast} and {nfe_fast2} NFE")
        if dtype == torch.float64:
            row["tol"] = F64_TOL
            row["ok"] = bool(nfe_fast == nfe and row["rel_err"] <= F64_TOL)
        else:
            truth_flow = build_flow(shape, [build_field(case, dtype=torch.float64,
                                                        device=device, seed=seed, block=b)
                                            for b in range(shape.blocks)])
            _fix_noise(truth_flow, noise)
            truth, row["nfe_truth"], _ = _timed_log_prob(truth_flow, x64.to(device), device)
            row["rel_err_truth"] = _rel_err(lp_fast, truth)
            row["rel_err_dense_truth"] = _rel_err(lp, truth)
            # The rounding floor: every layer's fan-in per evaluation, once per step.
            fan_ins = sum(m.in_features for m in flow.modules()
                          if isinstance(m, torch.nn.Linear))
            terms = (fan_ins + 1) * -(-nfe // DOPRI5_STEP_NFE)
            steps_differ = nfe_fast != nfe or row["nfe_truth"] != nfe
            slack = STEP_SLACK_TOLERANCES * flow_tolerance(flow) if steps_differ else 0.0
            row["tol"] = 2 * row["rel_err_dense_truth"] + terms * U32 + slack
            row["ok"] = bool(abs(nfe_fast - nfe) <= DOPRI5_STEP_NFE
                             and row["rel_err_truth"] <= row["tol"])
    except Exception as exc:  # a row with the error, the other rows still run
        row["error"] = f"{type(exc).__name__}: {exc}"[:2000]
        row["ok"] = False
    return row


def _solve_line(r: dict[str, Any]) -> str:
    if r["error"]:
        return f"{r['case']} {r['backend']} {r['dtype']}: ERROR {r['error']}"
    err = r["rel_err"] if r["dtype"] == "float64" else r["rel_err_truth"]
    return (f"{r['case']} {r['backend']} {r['dtype']} B={r['batch']}: NFE {r['nfe_compiled']} "
            f"(dense {r['nfe_dense']}), max|dlogp| {r['max_abs_dlogp']:.3g}, rel err {err:.3g} "
            f"<= {r['tol']:.3g}: {'ok' if r['ok'] else 'FAIL'}; compile {r['compile_s']:.2f} s, "
            f"first solve {r['first_solve_s']:.2f} s, solve {r['solve_ms']:.1f} ms "
            f"(dense {r['dense_solve_ms']:.1f} ms), layouts {r['layouts']}")


def _cmd_solve(args: argparse.Namespace) -> int:
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_smoke solve: --device cuda, but torch sees no CUDA device", file=sys.stderr)
        return 2
    doc: dict[str, Any] = {"schema": SCHEMA, "kind": "smoke_solve", "device": args.device,
                           "complete": False, "rows": []}
    out = Path(args.out) if args.out else None
    for case in args.cases:
        for backend in args.backends:
            for dtype in args.dtypes:
                row = solve_row(case, backend, dtype, args.device, args.batch, args.seed)
                doc["rows"].append(row)
                print(_solve_line(row), flush=True)
                if out:
                    _write_json(out, doc)
    doc["complete"] = True
    if out:
        _write_json(out, doc)
    return 0 if all(r["ok"] for r in doc["rows"]) else 1


# ------------------------------------------------------------------------------- bench


def _cmd_bench(argv: Sequence[str]) -> int:
    """``python -m bench`` with the cuda backend available only when already built."""
    from sparsekern.backends import cuda

    original = cuda.available

    def available_if_built() -> bool:
        return cuda.is_built() and original()

    cuda.available = available_if_built  # read by bench.providers at call time
    try:
        from bench.cli import main

        return main(list(argv))
    finally:
        cuda.available = original


# ----------------------------------------------------------------------------- summary

STEP_FIELDS = ("name", "rc", "seconds", "limit_s", "note")
PYTEST_TAIL = re.compile(r"^=+ (.*\b(passed|failed|error|errors|skipped|deselected)\b.*) in "
                         r"([\d.]+)s")
PYTEST_COUNT = re.compile(r"(\d+) (passed|failed|errors?|skipped|deselected|xfailed|xpassed)")


def read_steps(path: Path) -> list[dict[str, Any]]:
    """steps.tsv: name, rc (a number or "skip"), seconds, limit_s, note; one step a line."""
    steps = []
    if not path.is_file():
        return steps
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        parts = (line.split("\t") + [""] * len(STEP_FIELDS))[: len(STEP_FIELDS)]
        step = dict(zip(STEP_FIELDS, parts, strict=True))
        step["rc"] = int(step["rc"]) if step["rc"].lstrip("-").isdigit() else None
        step["seconds"] = float(step["seconds"]) if step["seconds"] else None
        step["limit_s"] = float(step["limit_s"]) if step["limit_s"] else None
        steps.append(step)
    return steps


def pytest_result(log: Path) -> dict[str, Any]:
    """Counts of a pytest log: from its final line, else (killed) from the -v result lines."""
    if not log.is_file():
        return {"counts": {}, "finished": False, "line": "no log"}
    text = log.read_text(errors="replace")
    for line in reversed(text.splitlines()):
        m = PYTEST_TAIL.match(line.strip())
        if m:
            counts = {k.rstrip("s") if k.startswith("error") else k: int(n)
                      for n, k in PYTEST_COUNT.findall(m.group(1))}
            return {"counts": counts, "finished": True, "line": m.group(1) + f" in {m.group(3)}s"}
    counts: dict[str, int] = {}
    for word, key in ((" PASSED", "passed"), (" FAILED", "failed"), (" ERROR", "error"),
                      (" SKIPPED", "skipped")):
        n = sum(1 for line in text.splitlines() if word in line and "::" in line)
        if n:
            counts[key] = n
    done = ", ".join(f"{n} {k}" for k, n in counts.items()) or "no test finished"
    return {"counts": counts, "finished": False, "line": f"stopped before the end: {done}"}


def step_status(step: dict[str, Any]) -> str:
    if step["rc"] is None:
        return "skipped"
    if step["rc"] == 0:
        return "ok"
    if step["rc"] in (124, 137):
        return "timeout"
    return "failed"


def bench_rows(path: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The f_div rows of a bench results.json (no roofline rows), and its meta."""
    if not path.is_file():
        return [], {}
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return [], {}
    rows = [{k: r.get(k) for k in ("case", "provider", "metric", "median_ms", "p10_ms",
                                   "p90_ms", "first_ms", "speedup", "rel_err", "backend",
                                   "layouts", "batch", "error")}
            for r in doc.get("rows", []) if r.get("metric") != "roofline"]
    return rows, doc.get("meta", {})


def _fmt(x: Any, spec: str = ".3g") -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        if math.isnan(x):
            return "nan"
        return format(x, spec)
    return str(x)


def _elapsed(d: Path) -> float | None:
    """Seconds since the phase began (the epoch seconds gpu_check.sh wrote to DIR/started)."""
    try:
        return time.time() - float((d / "started").read_text().strip())
    except (OSError, ValueError):
        return None


def summarize(d: Path) -> dict[str, Any]:
    """smoke.json's content from the files the smoke phase left in ``d``."""
    steps = read_steps(d / "steps.tsv")
    for s in steps:
        s["status"] = step_status(s)
        log = d / f"{s['name']}.log"
        if s["name"].startswith("pytest") and log.is_file():
            s["pytest"] = pytest_result(log)
            if s["status"] == "ok" and not s["pytest"]["counts"].get("passed"):
                s["status"] = "failed"  # nothing ran: a selection that matches nothing
    versions_doc: dict[str, Any] = {}
    if (d / "versions.json").is_file():
        try:
            versions_doc = json.loads((d / "versions.json").read_text())
        except ValueError:
            versions_doc = {}
    solves: list[dict[str, Any]] = []
    for f in sorted(d.glob("solve-*.json")):
        try:
            solves += json.loads(f.read_text()).get("rows", [])
        except ValueError:
            solves.append({"case": f.name, "error": "unreadable JSON", "ok": False})
    rows, meta = bench_rows(d / "bench" / "results.json")
    problems = [f"step {s['name']}: {s['status']}" for s in steps
                if s["status"] not in ("ok", "skipped")]
    problems += [f"solve {r.get('case')} {r.get('backend')} {r.get('dtype')}: "
                 f"{r.get('error') or 'check failed'}" for r in solves if not r.get("ok")]
    for r in rows:
        if r.get("error"):
            problems.append(f"bench {r['case']} {r['provider']}: {r['error']}")
        elif r.get("rel_err") is not None and r["rel_err"] > BENCH_REL_ERR:
            problems.append(f"bench {r['case']} {r['provider']}: rel_err {r['rel_err']:.3g} "
                            f"against dense_eager > {BENCH_REL_ERR:g}")
    if not steps:
        problems.append("no steps.tsv: the phase did not run")
    return {
        "schema": SCHEMA,
        "kind": "gpu_smoke",
        "mode": os.environ.get("SMOKE_DEVICE", "cuda"),
        "written": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "total_s": _elapsed(d),
        "versions": versions_doc,
        "steps": steps,
        "solve": solves,
        "bench": rows,
        "bench_complete": meta.get("complete"),
        "bench_skipped": meta.get("skipped"),
        "problems": problems,
        "ok": not problems,
    }


def to_markdown(doc: dict[str, Any]) -> str:
    v = doc["versions"]
    lines = ["# GPU smoke check", ""]
    lines.append(f"device {v.get('gpu') or 'cpu'} ({v.get('gpu_capability') or '-'}), "
                 f"driver/GPU: {v.get('nvidia_smi') or '-'}; torch {v.get('torch')}, "
                 f"CUDA {v.get('cuda')}, Triton {v.get('triton')}"
                 f"{' (interpreter)' if v.get('triton_interpret') else ''}, torchdiffeq "
                 f"{v.get('torchdiffeq')}, Python {v.get('python')}; commit "
                 f"{v.get('git_commit')}; mode {doc['mode']}; written {doc['written']}")
    if v.get("missing"):
        lines.append(f"missing modules: {', '.join(sorted(v['missing']))}")
    lines += ["", "| step | status | seconds | limit s | detail |",
              "| --- | --- | ---: | ---: | --- |"]
    for s in doc["steps"]:
        detail = s["pytest"]["line"] if "pytest" in s else ""
        detail = "; ".join(x for x in (detail, s["note"]) if x)
        lines.append(f"| {s['name']} | {s['status']} | {_fmt(s['seconds'], '.0f')} | "
                     f"{_fmt(s['limit_s'], '.0f')} | {detail.replace('|', '/')} |")
    if doc["solve"]:
        lines += ["", "Compiled CNF solve (dopri5, log p) against the dense masked model:", "",
                  "| case | backend | dtype | batch | NFE | dense NFE | max abs dlogp | rel err "
                  "| tol | compile s | first solve s | solve ms | dense ms | check |",
                  "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: "
                  "| ---: | ---: | --- |"]
        for r in doc["solve"]:
            err = r.get("rel_err") if r.get("dtype") == "float64" else r.get("rel_err_truth")
            check = "ok" if r.get("ok") else ("ERROR " + r["error"][:80] if r.get("error")
                                              else "FAIL")
            lines.append(
                f"| {r.get('case')} | {r.get('backend')} | {r.get('dtype')} | "
                f"{_fmt(r.get('batch'))} | {_fmt(r.get('nfe_compiled'))} | "
                f"{_fmt(r.get('nfe_dense'))} | {_fmt(r.get('max_abs_dlogp'))} | {_fmt(err)} | "
                f"{_fmt(r.get('tol'))} | {_fmt(r.get('compile_s'), '.2f')} | "
                f"{_fmt(r.get('first_solve_s'), '.2f')} | {_fmt(r.get('solve_ms'), '.1f')} | "
                f"{_fmt(r.get('dense_solve_ms'), '.1f')} | {check.replace('|', '/')} |")
        lines += ["", "(float64: rel err against the dense float64 solve; float32: against "
                  "the dense float64 truth, tol = 2 x the dense float32 error + the rounding "
                  "floor, + 10 solver tolerances where the steps differ.)"]
    if doc["bench"]:
        lines += ["", "f with divergence (f_div), median ms per NFE (speedup against "
                  "dense_eager; first call s):", "",
                  "| case | provider | backend | median ms | speedup | rel err | first s |",
                  "| --- | --- | --- | ---: | ---: | ---: | ---: |"]
        for r in doc["bench"]:
            if r.get("error"):
                lines.append(f"| {r['case']} | {r['provider']} | {_fmt(r.get('backend'))} | "
                             f"error: {str(r['error'])[:80].replace('|', '/')} | | | |")
                continue
            first = r.get("first_ms")
            lines.append(f"| {r['case']} | {r['provider']} | {_fmt(r.get('backend'))} | "
                         f"{_fmt(r.get('median_ms'), '.4g')} | {_fmt(r.get('speedup'), '.2f')} | "
                         f"{_fmt(r.get('rel_err'), '.2g')} | "
                         f"{_fmt(None if first is None else first / 1e3, '.2f')} |")
        if doc.get("bench_complete") is False:
            lines.append("(the bench stopped before its last case)")
        if doc.get("bench_skipped"):
            lines.append("bench skipped: " + "; ".join(f"{k}: {w}" for k, w in
                                                       doc["bench_skipped"].items()))
    if doc["problems"]:
        lines += ["", "Problems:", ""] + [f"- {p}" for p in doc["problems"]]
    lines += ["", f"smoke: {'PASS' if doc['ok'] else 'FAIL'} "
              f"(steps {_fmt(doc['total_s'], '.0f')} s)"]
    return "\n".join(lines) + "\n"


def _cmd_summary(args: argparse.Namespace) -> int:
    d = Path(args.dir)
    doc = summarize(d)
    _write_json(d / "smoke.json", doc)
    text = to_markdown(doc)
    (d / "smoke.md").write_text(text)
    print(text, end="")
    return 0 if doc["ok"] else 1


# -------------------------------------------------------------------------------- main


def _write_json(path: Path, doc: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1, default=str) + "\n")
    tmp.replace(path)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.gpu_smoke",
                                description="The smoke phase of bench/gpu_check.sh.")
    sub = p.add_subparsers(dest="command", required=True)
    v = sub.add_parser("versions", help="device, driver, torch, CUDA, Triton versions")
    v.add_argument("--device", default="cuda")
    v.add_argument("--out", default=None, help="write the JSON here")
    s = sub.add_parser("solve", help="compiled CNF solve against the dense masked model")
    s.add_argument("--device", default="cuda")
    s.add_argument("--backends", nargs="+", default=["triton"])
    s.add_argument("--dtypes", nargs="+", choices=("float32", "float64"),
                   default=["float32", "float64"])
    s.add_argument("--cases", nargs="+", default=list(SOLVE_CASES),
                   help="bench case names (default %(default)s)")
    s.add_argument("--batch", type=int, default=1024)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", default=None, help="write the rows here (JSON)")
    sub.add_parser("bench", help="python -m bench without starting a CUDA build; "
                                 "its options after --")
    m = sub.add_parser("summary", help="smoke.json, smoke.md and the printed table")
    m.add_argument("--dir", required=True)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "bench":
        rest = argv[1:]
        return _cmd_bench(rest[1:] if rest[:1] == ["--"] else rest)
    args = build_parser().parse_args(argv)
    return {"versions": _cmd_versions, "solve": _cmd_solve,
            "summary": _cmd_summary}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
