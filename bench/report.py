"""Writing results: results.json, results.md (ratio tables, targets, checks) and plots.

Every file is written atomically (a temporary file in the same folder, then
``os.replace``), so a reader, or a crash, never sees half a file.
``python -m bench.report results.json [--out DIR]`` regenerates results.md and
the plots from a results.json.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import math
import os
import sys
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from bench.schema import FLOW_METRICS, SCHEMA_VERSION

Row = dict[str, Any]
PLOT_METRICS = ("f", "f_div", "train_step", "solve", "train_solve")
# Relative error beyond which a provider's outputs are flagged (fp32 rounding through
# a few layers and a reduction stays far below; a wrong kernel does not).
REL_ERR_FLAG = {"float32": 1e-3, "float64": 1e-8}
# The same for providers with bf16/fp16 product operands: a few units of their rounding.
REDUCED_REL_ERR = {"bf16": 3e-2, "fp16": 4e-3}
NFE_TOLERANCE = 0.02
# Providers whose solves take other steps by design (torchode: per-sample step sizes):
# their outputs are flagged only past this relative error, and their NFE is not checked.
LOOSE_REL_ERR = {"torchode": 1e-2}
# The image shapes (bench.cases.IMAGE_SHAPES; this module does not import torch).
IMAGE_SHAPES = ("mnist", "cifar10")


# ----------------------------------------------------------------------- file writing


def _file_mode() -> int:
    """The mode a plain ``open(path, "w")`` would give (mkstemp's files are 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.chmod(tmp, _file_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_results_json(path: Path, meta: dict[str, Any], rows: list[Row]) -> None:
    """results.json: {"schema", "meta", "rows"} (``bench.schema``), atomically."""
    doc = {"schema": SCHEMA_VERSION, "meta": meta, "rows": rows}
    atomic_write_text(path, json.dumps(doc, indent=1, default=str) + "\n")


def load_results(path: Path) -> tuple[dict[str, Any], list[Row]]:
    """(meta, rows) of a results.json (a bare list of rows is accepted too)."""
    doc = json.loads(Path(path).read_text(encoding="utf-8"))
    if isinstance(doc, list):
        return {}, doc
    if not isinstance(doc, dict) or "rows" not in doc:
        raise ValueError(f"{path} is not a bench results.json (no 'rows')")
    return doc.get("meta", {}), doc["rows"]


# --------------------------------------------------------------------------- helpers


def _ordered(values: Iterable[Any]) -> list[Any]:
    seen: list[Any] = []
    for v in values:
        if v not in seen:
            seen.append(v)
    return seen


def _fmt_ms(ms: float | None) -> str:
    if ms is None:
        return "-"
    if ms >= 100:
        return f"{ms:.0f}"
    if ms >= 10:
        return f"{ms:.1f}"
    return f"{ms:.3g}"


def _fmt_x(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}x"


def _index(rows: list[Row]) -> dict[tuple[str, str, str], Row]:
    return {(r["case"], r["provider"], r["metric"]): r for r in rows}


def _providers(rows: list[Row]) -> list[str]:
    return _ordered(r["provider"] for r in rows if r["metric"] != "roofline"
                    and r["provider"] != "-")


def _cases(rows: list[Row]) -> list[str]:
    return _ordered(r["case"] for r in rows)


def _case_info(rows: list[Row]) -> dict[str, Row]:
    out: dict[str, Row] = {}
    for r in rows:
        out.setdefault(r["case"], r)
    return out


def _table(header: Sequence[str], body: Sequence[Sequence[Any]], align: str | None = None
           ) -> str:
    align = align or "l" + "r" * (len(header) - 1)
    sep = ["---:" if a == "r" else "---" for a in align]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(sep) + " |"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in body]
    return "\n".join(lines)


# ------------------------------------------------------------------------- sections


def _header(meta: dict[str, Any]) -> list[str]:
    m = meta.get("machine", {})
    opts = meta.get("options", {})
    flags = ", ".join(m.get("cpu_flags") or []) or "-"
    device = m.get("gpu") or f"CPU {m.get('cpu_model', '?')} ({flags})"
    lines = [
        f"# Sparse Flows benchmark: {meta.get('machine_slug', '?')}",
        "",
        f"- Device: {device}; {m.get('cpu_count', '?')} logical CPUs, "
        f"{m.get('threads', '?')} torch threads.",
        f"- Versions: torch {m.get('torch', '?')}, torchdiffeq {m.get('torchdiffeq', '?')}, "
        f"triton {m.get('triton') or '-'}, CUDA {m.get('cuda') or '-'}, python "
        f"{m.get('python', '?')}, sparseflows {m.get('sparsekern', '?')} "
        f"(git {m.get('git_commit') or '?'}).",
        f"- Run: {meta.get('started', '?')}, {meta.get('duration_s', 0):.0f} s, "
        f"`{meta.get('command', '?')}`; dtype {opts.get('dtype', '?')}, masks "
        f"{opts.get('masks', '?')}, seed {opts.get('seed', '?')}.",
        f"- Timing: median over samples after warm-up (budget {opts.get('budget_s', '?')} s "
        f"per measurement, {opts.get('min_repeats', '?')}-{opts.get('max_repeats', '?')} "
        "samples), spread p10-p90.",
        f"- {meta.get('flop_counting', '')}",
    ]
    load = meta.get("loadavg_start")
    cpus = m.get("cpu_count") or 1
    if load is not None:
        end = meta.get("loadavg_end")
        lines.append(f"- Load average (1 min) at start {load:.2f}, at end "
                     f"{float('nan') if end is None else end:.2f}.")
        if max(load, meta.get("loadavg_end") or 0) > 0.5 * cpus:
            lines += ["", f"> **Warning**: the machine was busy (load above {0.5 * cpus:.1f}); "
                          "multi-threaded kernels suffer most from sharing cores, so these "
                          "figures understate them."]
    if not meta.get("complete", True):
        lines += ["", "> **Partial results**: the run has not finished (or was interrupted)."]
    if meta.get("skipped"):
        skipped = "; ".join(f"{k}: {v}" for k, v in meta["skipped"].items())
        lines.append(f"- Providers not available here: {skipped}.")
    if meta.get("skipped_metrics"):
        parts = [f"{p}: {', '.join(ms)} ({'; '.join(dict.fromkeys(ms.values()))})"
                 for p, ms in meta["skipped_metrics"].items()]
        lines.append(f"- Metrics a provider does not measure: {'; '.join(parts)}.")
    if meta.get("skipped_shapes"):
        parts = [f"{p}: {', '.join(ss)} ({'; '.join(dict.fromkeys(ss.values()))})"
                 for p, ss in meta["skipped_shapes"].items()]
        lines.append(f"- Shapes a provider does not run (not applicable): {'; '.join(parts)}.")
    if meta.get("skipped_case_metrics"):
        by_reason: dict[str, list[str]] = {}
        for case, ms in meta["skipped_case_metrics"].items():
            for m, why in ms.items():
                by_reason.setdefault(why, []).append(f"{case} {m}")
        parts = [f"{', '.join(what)} ({why})" for why, what in by_reason.items()]
        lines.append(f"- Metrics not measured on a case: {'; '.join(parts)}.")
    return lines


def _speedup_section(rows: list[Row], metric: str) -> list[str]:
    idx = _index(rows)
    providers = [p for p in _providers(rows) if p != "dense_eager"]
    cases = [c for c in _cases(rows) if (c, "dense_eager", metric) in idx
             or any((c, p, metric) in idx for p in providers)]
    if not cases:
        return []
    info = _case_info(rows)
    per_nfe = {"solve": "whole solve", "train_solve": "whole step"}.get(metric, "per NFE")
    header = ["case", "kept", "FLOP ratio", f"dense_eager ms ({per_nfe}, p10-p90)", *providers]
    body = []
    for c in cases:
        base = idx.get((c, "dense_eager", metric))
        if base and base["median_ms"] is not None:
            base_cell = (f"{_fmt_ms(base['median_ms'])} ({_fmt_ms(base['p10_ms'])}-"
                         f"{_fmt_ms(base['p90_ms'])})")
        else:
            base_cell = "error" if base else "-"
        cells = []
        for p in providers:
            r = idx.get((c, p, metric))
            if r is None:
                cells.append("-")
            elif r["error"]:
                cells.append("error")
            elif r["speedup"] is not None:
                cells.append(_fmt_x(r["speedup"]))
            else:
                cells.append(f"{_fmt_ms(r['median_ms'])} ms")
        kept = info[c].get("kept_fraction")
        body.append([c, "-" if kept is None else f"{100 * kept:.1f}%",
                     _fmt_x(info[c].get("flop_ratio")), base_cell, *cells])
    title = {"f": "f alone", "f_div": "f with Hutchinson divergence",
             "train_step": "training step (f + divergence with graph, backward)",
             "solve": "dopri5 log-likelihood solve",
             "train_solve": "training step of the flow (-log p solve with gradients and "
                            "backward, adjoint)"}[metric]
    return ["", f"## {metric}: {title}", "",
            "Speedup against dense_eager (its median time / the provider's; >1 is faster). "
            "FLOP ratio: dense FLOPs / FLOPs of the reduced network (dead neurons and filters "
            "removed, time-channel taps left out), the speedup a kernel as fast per FLOP as "
            "the dense one would reach.", "", _table(header, body)]


def _gflops_section(rows: list[Row], metric: str) -> list[str]:
    idx = _index(rows)
    providers = _providers(rows)
    cases = [c for c in _cases(rows) if any((c, p, metric) in idx for p in providers)]
    if not cases:
        return []
    header = ["case", "roofline GFLOP/s", *providers]
    body = []
    roofs = {r["case"]: r for r in rows if r["metric"] == "roofline"}
    for c in cases:
        roof = roofs.get(c)
        cells = []
        for p in providers:
            r = idx.get((c, p, metric))
            if r is None or r["gflops"] is None:
                cells.append("-")
            elif r["roofline_fraction"] is not None:
                cells.append(f"{r['gflops']:.1f} ({100 * r['roofline_fraction']:.0f}%)")
            else:
                cells.append(f"{r['gflops']:.1f}")
        roof_cell = f"{roof['gflops']:.1f}" if roof and roof["gflops"] else "-"
        body.append([c, roof_cell, *cells])
    lines = ["", f"### {metric}: GFLOP/s on the kept weights (fraction of the roofline)", ""]
    if any(info.get("shape") in IMAGE_SHAPES for c, info in _case_info(rows).items()
           if c in cases):
        lines += ["Roofline: torch.mm on the dense layer shapes; for the image shapes "
                  "(convolutions, FLOPs per output pixel) F.conv2d on the dense convolutions "
                  "at the same batch, so their fraction is of the dense convolution rate.", ""]
    return [*lines, _table(header, body)]


def _solve_section(rows: list[Row], metric: str = "solve") -> list[str]:
    solves = [r for r in rows if r["metric"] == metric]
    if not solves:
        return []
    train = metric == "train_solve"
    header = ["case", "provider", "solver", "batch", "NFE", *(["NFE bwd"] if train else []),
              "ms", "per NFE ms", "model ms", "solver ms", "solver share", "speedup",
              "rel err " + ("loss, grads" if train else "log p")]
    body = []
    for r in solves:
        solver = r.get("ode_solver") or "-"
        if r["error"]:
            body.append([r["case"], r["provider"], solver, r["batch"], "-",
                         *(["-"] if train else []), "error", *["-"] * 6])
            continue
        share = (r["solver_ms"] / r["median_ms"]) if (
            r["median_ms"] and r["solver_ms"] is not None) else None
        back = r.get("nfe_backward")
        body.append([
            r["case"], r["provider"], solver, r["batch"], r["nfe"],
            *(["-" if back is None else back] if train else []), _fmt_ms(r["median_ms"]),
            _fmt_ms(r["per_nfe_ms"]), _fmt_ms(r["model_ms"]), _fmt_ms(r["solver_ms"]),
            "-" if share is None else f"{100 * share:.0f}%", _fmt_x(r["speedup"]),
            "-" if r["rel_err"] is None else f"{r['rel_err']:.1e}",
        ])
    what = "NFE of the forward and the backward (adjoint) solves, and" if train else "NFE and"
    notes = [r for r in solves if r.get("solve_note")]
    lines = ["", f"### {metric}: {what} the split of solver time and model time", "",
             "Model time is spent inside the vector field (its evaluations: ODEFunc calls, or "
             "the compiled field's under sparsekern.odeint); solver time is the rest (step "
             "control, tableau sums, host syncs"
             + ("; in a training step also the adjoint's vector-Jacobian products and the "
                "backward" if train else "") + "); '-' where sparsekern.odeint evaluates the "
             "field without a module call (a time-free field, its C++ loop). torchode steps "
             "every sample on its own: its NFE counts batched calls of the field, and its "
             f"outputs are checked loosely (relative {LOOSE_REL_ERR['torchode']:g}).", "",
             _table(header, body, "lll" + "r" * (len(header) - 3))]
    if notes:
        lines += ["", "Solver notes (last solve):", ""]
        lines += [f"- {r['case']} {r['provider']}: {r['solve_note']}" for r in notes]
    return lines


def target_checks(rows: list[Row]) -> list[dict[str, Any]]:
    """The speed targets of the engine issue (#5) that these rows can decide.

    Returns:
        One dict per decidable target: target, case, measured (text), needed
        (text), met (bool). All on metric f_div, provider "sparsekern".
    """
    idx = _index(rows)
    checks: list[dict[str, Any]] = []

    def get(case: str, provider: str = "sparsekern") -> Row | None:
        r = idx.get((case, provider, "f_div"))
        return r if r and not r["error"] and r["median_ms"] else None

    for shape in ("miniboone", "bsds300"):
        r, csr = get(f"{shape}/unstructured/0.1"), get(f"{shape}/unstructured/0.1", "torch_csr")
        if r and r["speedup"] is not None:
            checks.append({"target": "unstructured 90%: >= 6x dense eager",
                           "case": r["case"], "measured": _fmt_x(r["speedup"]),
                           "needed": ">= 6.00x", "met": r["speedup"] >= 6})
        if r and csr:
            ratio = csr["median_ms"] / r["median_ms"]
            checks.append({"target": "unstructured 90%: faster than torch.sparse CSR",
                           "case": r["case"], "measured": f"{ratio:.2f}x torch_csr",
                           "needed": "> 1x", "met": ratio > 1})
        r = get(f"{shape}/unstructured/0.02")
        if r and r["speedup"] is not None:
            checks.append({"target": "unstructured 98%: >= 20x dense eager", "case": r["case"],
                           "measured": _fmt_x(r["speedup"]), "needed": ">= 20.00x",
                           "met": r["speedup"] >= 20})
    for case in _cases(rows):
        if not case.endswith("/structured/0.3"):
            continue
        r = get(case)
        if r and r["speedup"] is not None:
            flop_ratio = r["dense_weights"] / max(r["kept_weights"], 1)
            need = 0.8 * flop_ratio
            checks.append({"target": "structured 70%: >= 0.8 x FLOP ratio", "case": case,
                           "measured": _fmt_x(r["speedup"]),
                           "needed": f">= {need:.2f}x (FLOP ratio {flop_ratio:.2f})",
                           "met": r["speedup"] >= need})
    r = get("toy/unstructured/1")
    if r and r["roofline_fraction"] is not None:
        checks.append({"target": "toy dense: >= 80% of the dense matmul rate", "case": r["case"],
                       "measured": f"{100 * r['roofline_fraction']:.0f}%", "needed": ">= 80%",
                       "met": r["roofline_fraction"] >= 0.8})
    r = get("toy/unstructured/0.3")
    if r and r["speedup"] is not None:
        checks.append({"target": "toy 70% unstructured: >= 3x dense eager", "case": r["case"],
                       "measured": _fmt_x(r["speedup"]), "needed": ">= 3.00x",
                       "met": r["speedup"] >= 3})
    return checks


def image_target_checks(rows: list[Row]) -> list[dict[str, Any]]:
    """The image-flow speed targets of issue 17 that these rows can decide.

    Per image shape, f with divergence per NFE against dense_eager: unstructured 80%
    pruned >= 2x, 95% >= 4x; structured (half the filters) >= 0.8 x the FLOP ratio
    (the row's ``flop_ratio``: dense FLOPs / those of the reduced convolutions); and
    MNIST at 63% pruned (the paper's best): the whole training step (train_solve) and
    the per-NFE training step (train_step) faster than dense. Every sparsekern
    provider measured is checked (sparsekern, and sparsekern_native for train_solve).

    Returns:
        One dict per decidable target, as ``target_checks`` (plus "provider").
    """
    idx = _index(rows)
    checks: list[dict[str, Any]] = []

    def get(case: str, provider: str, metric: str = "f_div") -> Row | None:
        r = idx.get((case, provider, metric))
        ok = r and not r["error"] and r["median_ms"] and r["speedup"] is not None
        return r if ok else None

    for shape in IMAGE_SHAPES:
        for density, pruned, need in (("0.2", 80, 2.0), ("0.05", 95, 4.0)):
            r = get(f"{shape}/unstructured/{density}", "sparsekern")
            if r:
                checks.append({"target": f"unstructured {pruned}%: f_div >= {need:g}x dense",
                               "case": r["case"], "provider": "sparsekern",
                               "measured": _fmt_x(r["speedup"]), "needed": f">= {need:.2f}x",
                               "met": r["speedup"] >= need})
        r = get(f"{shape}/structured/0.5", "sparsekern")
        if r and r.get("flop_ratio"):
            need = 0.8 * r["flop_ratio"]
            checks.append({"target": "structured 50% of filters: f_div >= 0.8 x FLOP ratio",
                           "case": r["case"], "provider": "sparsekern",
                           "measured": _fmt_x(r["speedup"]),
                           "needed": f">= {need:.2f}x (FLOP ratio {r['flop_ratio']:.2f})",
                           "met": r["speedup"] >= need})
    for metric, what in (("train_solve", "whole training step"),
                         ("train_step", "training step per NFE")):
        for provider in ("sparsekern", "sparsekern_native"):
            r = get("mnist/unstructured/0.37", provider, metric)
            if r:
                checks.append({"target": f"mnist 63%: {what} ({metric}) faster than dense",
                               "case": r["case"], "provider": provider,
                               "measured": _fmt_x(r["speedup"]), "needed": "> 1.00x",
                               "met": r["speedup"] > 1})
    return checks


def _targets_section(rows: list[Row]) -> list[str]:
    lines: list[str] = []
    checks = target_checks(rows)
    if checks:
        body = [[c["target"], c["case"], c["measured"], c["needed"],
                 "yes" if c["met"] else "**no**"] for c in checks]
        lines += ["", "## Engine speed targets (issue 5; f with divergence, sparsekern)", "",
                  _table(["target", "case", "measured", "needed", "met"], body, "lllll")]
    image = image_target_checks(rows)
    if image:
        body = [[c["target"], c["case"], c["provider"], c["measured"], c["needed"],
                 "yes" if c["met"] else "**no**"] for c in image]
        lines += ["", "## Image-flow speed targets (issue 17; against dense_eager, PyTorch's "
                      "own convolutions)", "",
                  _table(["target", "case", "provider", "measured", "needed", "met"], body,
                         "llllll")]
    return lines


def consistency_problems(rows: list[Row]) -> list[str]:
    """Rows whose outputs disagree with dense_eager's, or whose solve NFE differs by > 2%.

    torchode (``LOOSE_REL_ERR``): outputs flagged only past its looser bound, NFE not
    compared (its per-sample steps are not torchdiffeq's).
    """
    problems = []
    idx = _index(rows)
    for r in rows:
        if r["error"] or r["metric"] == "roofline":
            continue
        reduced = REDUCED_REL_ERR.get(r.get("precision") or "ieee")
        loose = LOOSE_REL_ERR.get(r["provider"])
        tol = reduced or loose or REL_ERR_FLAG.get(r.get("dtype") or "float32", 1e-3)
        if r["rel_err"] is not None and r["rel_err"] > tol:
            problems.append(f"{r['case']} {r['provider']} {r['metric']}: outputs differ from "
                            f"dense_eager by {r['rel_err']:.2e} (relative)")
        # Rounded products change the step sizes an adaptive solve takes, legitimately.
        metric = r["metric"]
        if metric in FLOW_METRICS and r["provider"] != "dense_eager" and not (
                reduced or loose):
            base = idx.get((r["case"], "dense_eager", metric))
            for field, what in (("nfe", "NFE"), ("nfe_backward", "backward NFE")):
                b, n = (base or {}).get(field), r.get(field)
                if b and n is not None and abs(n - b) > NFE_TOLERANCE * b:
                    problems.append(f"{r['case']} {r['provider']} {metric}: {what} {n} "
                                    f"against dense_eager's {b}")
    return problems


def _checks_section(rows: list[Row]) -> list[str]:
    problems = consistency_problems(rows)
    errors = [f"{r['case']} {r['provider']} {r['metric']}: {r['error']}" for r in rows
              if r["error"]]
    lines = ["", "## Checks", ""]
    if problems:
        lines += [f"- {p}" for p in problems]
    else:
        lines.append("- Every provider's outputs agree with dense_eager's on the same inputs, "
                     "and every solve has dense_eager's NFE (within 2%; torchode: outputs "
                     "within its loose bound, NFE not compared).")
    if errors:
        lines += ["", "Errors:", ""] + [f"- {e}" for e in errors]
    return lines


def render_markdown(meta: dict[str, Any], rows: list[Row], plots: Sequence[str] = ()) -> str:
    """results.md: header, targets, per-metric ratio and GFLOP/s tables, solve splits, checks."""
    lines = _header(meta)
    lines += _targets_section(rows)
    metrics = _ordered(r["metric"] for r in rows if r["metric"] in PLOT_METRICS)
    for metric in metrics:
        lines += _speedup_section(rows, metric)
        if metric in FLOW_METRICS:
            lines += _solve_section(rows, metric)
        lines += _gflops_section(rows, metric)
    lines += _checks_section(rows)
    if plots:
        lines += ["", "## Plots", ""]
        lines += [f"![{Path(p).stem}]({Path(p).name})" for p in plots]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------- plots


def plot_speedups(rows: list[Row], out_dir: Path) -> list[Path]:
    """One PNG per metric: speedup against dense eager vs kept fraction, a panel per shape.

    Unstructured cases are solid lines, structured dashed; the dotted grey line
    is the FLOP ratio (1 / kept fraction), what a perfect sparse kernel would get.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    written = []
    providers = [p for p in _providers(rows) if p != "dense_eager"]
    colors = {p: f"C{i}" for i, p in enumerate(providers)}
    for metric in PLOT_METRICS:
        mrows = [r for r in rows if r["metric"] == metric and r["speedup"] is not None
                 and r["provider"] != "dense_eager"]
        if not mrows:
            continue
        shapes = _ordered(r["shape"] for r in mrows)
        ncols = min(3, len(shapes))
        nrows = math.ceil(len(shapes) / ncols)
        fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.4 * nrows),
                                 squeeze=False)
        for ax, shape in zip(axes.flat, shapes, strict=False):
            srows = [r for r in mrows if r["shape"] == shape]
            for p in providers:
                for structure, style in (("unstructured", "-"), ("structured", "--")):
                    pts = sorted((r["kept_fraction"], r["speedup"]) for r in srows
                                 if r["provider"] == p and r["structure"] == structure)
                    if pts:
                        xs, ys = zip(*pts, strict=True)
                        label = p if structure == "unstructured" else None
                        ax.plot(xs, ys, style, marker="o", ms=3, color=colors[p], label=label)
            fracs = sorted({r["kept_fraction"] for r in srows})
            ax.plot(fracs, [1 / f for f in fracs], ":", color="grey", label="FLOP ratio")
            ax.axhline(1.0, color="black", lw=0.8)
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xticks(fracs)
            ax.yaxis.set_major_locator(ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
            for axis in (ax.xaxis, ax.yaxis):
                axis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:.2g}"))
                axis.set_minor_formatter(ticker.NullFormatter())
            ax.tick_params(axis="x", labelsize=7, labelrotation=45)
            ax.set_title(f"{shape} ({srows[0]['shape_label']})", fontsize=8)
            ax.set_xlabel("kept fraction of weights")
            ax.set_ylabel("speedup vs dense eager")
            ax.grid(True, which="both", alpha=0.3)
        for ax in list(axes.flat)[len(shapes):]:
            ax.set_visible(False)
        handles, labels = axes.flat[0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 5), fontsize=8)
        fig.suptitle(f"{metric}: speedup vs dense eager (solid: unstructured, "
                     "dashed: structured)", fontsize=10)
        fig.tight_layout(rect=(0, 0.08, 1, 0.95))
        path = out_dir / f"speedup_{metric}.png"
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=out_dir)
        os.close(fd)
        try:
            fig.savefig(tmp, format="png", dpi=110)
            os.chmod(tmp, _file_mode())
            os.replace(tmp, path)
        finally:
            Path(tmp).unlink(missing_ok=True)
            plt.close(fig)
        written.append(path)
    return written


# The cases of the project README's performance table (the full grid is in results.md):
# every shape dense, at 90% and 98% unstructured sparsity and 70% of the neurons pruned,
# plus the toy at 70% unstructured (the paper's best toy ratio).
README_CASES = ("*/unstructured/1", "toy/unstructured/0.3", "*/unstructured/0.1",
                "*/unstructured/0.02", "*/structured/0.3")


def readme_table(meta: dict[str, Any], rows: list[Row], metric: str = "f_div",
                 cases: Sequence[str] | None = README_CASES) -> str:
    """A compact markdown block for the project README: sparsekern on ``metric`` per case.

    Columns: dense eager time, sparsekern's speedup against it, against torch_csr and
    torch_compile, and sparsekern's fraction of the roofline; a line above names the
    machine, versions, threads and dtype the figures come from. ``cases``: fnmatch
    patterns over case names (default ``README_CASES``; None: every case), in the
    rows' order. tests/test_bench.py checks that README.md holds exactly this block.
    """
    m = meta.get("machine", {})
    idx = _index(rows)
    device = m.get("gpu") or f"{m.get('cpu_model', '?')} CPU"
    lines = [f"Measured on {device}, {m.get('threads', '?')} threads, torch {m.get('torch', '?')}"
             f", {meta.get('options', {}).get('dtype', '?')}, {meta.get('started', '?')[:10]} "
             f"(`{meta.get('command', 'python -m bench')}`; metric {metric}, per NFE).", ""]
    body = []
    for c in _cases(rows):
        if cases is not None and not any(fnmatch.fnmatchcase(c, pat) for pat in cases):
            continue
        r = idx.get((c, "sparsekern", metric))
        base = idx.get((c, "dense_eager", metric))
        if not r or r["error"] or not r["median_ms"]:
            continue

        def versus(peer: str, r: Row = r, c: str = c) -> str:
            p = idx.get((c, peer, metric))
            ok = p and not p["error"] and p["median_ms"]
            return _fmt_x(p["median_ms"] / r["median_ms"]) if ok else "-"

        frac = r["roofline_fraction"]
        body.append([c, f"{100 * r['kept_fraction']:.1f}%",
                     _fmt_ms(base["median_ms"]) if base and base["median_ms"] else "-",
                     _fmt_ms(r["median_ms"]), _fmt_x(r["speedup"]), versus("torch_csr"),
                     versus("torch_compile"), "-" if frac is None else f"{100 * frac:.0f}%"])
    header = ["case", "kept", "dense eager ms", "sparsekern ms", "vs dense eager",
              "vs torch_csr", "vs torch_compile", "of roofline"]
    return "\n".join(lines) + "\n" + _table(header, body) + "\n"


def write_report(out_dir: Path, meta: dict[str, Any], rows: list[Row],
                 plots: bool = True) -> dict[str, Any]:
    """results.json, results.md and (with ``plots``) speedup_<metric>.png in ``out_dir``.

    Returns:
        {"json": path, "md": path, "plots": [paths]}: what was written.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_results_json(out_dir / "results.json", meta, rows)
    pngs = plot_speedups(rows, out_dir) if plots else []
    atomic_write_text(out_dir / "results.md", render_markdown(meta, rows, [str(p) for p in pngs]))
    return {"json": out_dir / "results.json", "md": out_dir / "results.md", "plots": pngs}


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m bench.report results.json [--out DIR] [--no-plots] [--readme ...]``."""
    parser = argparse.ArgumentParser(prog="python -m bench.report",
                                     description="regenerate results.md and plots")
    parser.add_argument("results", help="a results.json")
    parser.add_argument("--out", default=None, help="folder (default: the results' folder)")
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument("--readme", action="store_true",
                        help="print the compact table for the project README and stop")
    parser.add_argument("--readme-cases", nargs="+", metavar="PATTERN",
                        default=list(README_CASES),
                        help="--readme: case globs to include (default: "
                             f"{' '.join(README_CASES)}; '*' for every case)")
    args = parser.parse_args(argv)
    meta, rows = load_results(Path(args.results))
    if args.readme:
        print(readme_table(meta, rows, cases=args.readme_cases), end="")
        return 0
    out = Path(args.out) if args.out else Path(args.results).parent
    out.mkdir(parents=True, exist_ok=True)
    pngs = [] if args.no_plots else plot_speedups(rows, out)
    atomic_write_text(out / "results.md", render_markdown(meta, rows, [str(p) for p in pngs]))
    print(f"wrote {out / 'results.md'}" + (f" and {len(pngs)} plots" if pngs else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
