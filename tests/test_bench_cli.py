"""The benchmark's command lines end to end: ``python -m bench``, ``--compare``, ``--quick``
and ``sparseflow bench``, on tiny selections.

Every run here measures toy cases at batch 64 with a 20 ms budget and 3 samples, on
one thread: the figures mean nothing, the tests check what the runs write and
return. ``python -m bench --quick`` itself takes about a minute on 2 cores, so
its selection is checked without running it; a run under ``--quick`` with its
cases and budget overridden checks that its metrics and providers reach the run.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench import main as bench_main
from bench.cases import QUICK_CASES, all_cases
from bench.cli import (
    QUICK_BUDGET_S,
    QUICK_METRICS,
    QUICK_PROVIDERS,
    RESULTS_ROOT,
    build_parser,
    output_dir,
    resolve_selection,
)
from bench.metrics import FLOW_METRICS, METRICS
from bench.providers import SOLVER_ONLY, make_providers, resolve_providers
from bench.report import load_results
from bench.schema import ROW_FIELDS, SCHEMA_VERSION

pytestmark = [pytest.mark.slow,
              pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")]

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
CASES = ["toy/unstructured/0.3", "toy/structured/0.3"]
PROVIDERS = ["dense_eager", "torch_csr", "sparsekern"]
# Tiny and steady: toy cases at batch 64, 3 samples of at least 5 ms each, one thread.
TINY = ["--batch", "64", "--budget", "0.02", "--min-repeats", "3", "--max-repeats", "3",
        "--warmup", "1", "--threads", "1", "--no-progress"]
SCALE_DOWN, SCALE_UP = 0.01, 100.0  # far beyond any run-to-run noise
TIME_FIELDS = ("median_ms", "p10_ms", "p90_ms", "per_nfe_ms", "model_ms", "solver_ms")
CASE_BY_NAME = {c.name: c for c in all_cases()}


def _python(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def _scaled(src: Path, dst: Path, factor: float) -> Path:
    """A copy of a results.json with every time multiplied by ``factor``."""
    doc = json.loads(src.read_text())
    for r in doc["rows"]:
        for f in TIME_FIELDS:
            if r[f] is not None:
                r[f] *= factor
    dst.write_text(json.dumps(doc))
    return dst


def _check_row(r: dict) -> None:
    """A row as bench/README.md documents it (every field, sane values)."""
    assert set(r) == set(ROW_FIELDS), set(r) ^ set(ROW_FIELDS)
    what = (r["case"], r["provider"], r["metric"])
    assert r["error"] is None, (*what, r["error"])
    case = CASE_BY_NAME[r["case"]]
    assert (r["shape"], r["structure"], r["density"]) == (
        case.shape.name, case.structure, case.density), what
    assert isinstance(r["density"], float) and 0 < r["kept_fraction"] <= 1
    assert 0 < r["p10_ms"] <= r["median_ms"] <= r["p90_ms"], what
    assert r["repeats"] >= 1 and r["inner"] >= 1 and r["first_ms"] > 0
    assert r["gflops"] > 0 and r["flops"] > 0
    assert r["gflops"] == pytest.approx(r["flops"] / (r["median_ms"] * 1e-3) / 1e9)
    assert r["batch"] == 64 and r["threads"] == 1
    assert (r["dtype"], r["device"]) == ("float32", "cpu")
    if r["metric"] in FLOW_METRICS:
        assert isinstance(r["nfe"], int) and r["nfe"] > 0, what
        evals = r["nfe"] + (r["nfe_backward"] or 0)
        assert r["per_nfe_ms"] == pytest.approx(r["median_ms"] / evals)
        assert r["model_ms"] > 0 and r["solver_ms"] >= 0
        assert r["ode_solver"] and r["atol"] and r["rtol"]
        assert (r["nfe_backward"] is not None) == (r["metric"] == "train_solve"), what
    else:
        assert r["nfe"] is None and r["per_nfe_ms"] is None, what
        assert r["nfe_backward"] is None and r["ode_solver"] is None, what
    if r["metric"] == "roofline":
        assert r["provider"] == "torch.mm" and r["speedup"] is None
    else:
        assert r["speedup"] > 0 and r["roofline_gflops"] > 0
        if r["provider"] == "dense_eager":
            assert r["speedup"] == 1.0 and r["rel_err"] is None
        else:
            assert r["rel_err"] is not None and r["rel_err"] < 1e-3, what


@pytest.fixture(scope="module")
def run_a(tmp_path_factory):
    """``python -m bench`` on two toy cases x three providers x every metric, with plots."""
    out = tmp_path_factory.mktemp("bench_a")
    proc = _python("-m", "bench", "--cases", *CASES, "--providers", *PROVIDERS,
                   "--out", str(out), *TINY)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


def test_python_m_bench_writes_results_json_md_and_plots(run_a):
    out, proc = run_a
    assert f"bench: 2 cases x 3 providers x {len(METRICS)} metrics" in proc.stderr
    doc = json.loads((out / "results.json").read_text())
    assert doc["schema"] == SCHEMA_VERSION and set(doc) == {"schema", "meta", "rows"}
    meta, rows = doc["meta"], doc["rows"]
    assert meta["complete"] is True and meta["duration_s"] > 0
    assert meta["command"].startswith("python -m bench --cases toy/unstructured/0.3")
    opts = meta["options"]
    assert opts["cases"] == CASES and opts["providers"] == PROVIDERS
    assert opts["metrics"] == list(METRICS) and opts["budget_s"] == 0.02
    assert (opts["min_repeats"], opts["max_repeats"], opts["warmup"]) == (3, 3, 1)
    assert opts["threads"] == 1 and opts["batch"] == 64 and opts["quick"] is False
    assert set(meta["providers"]) == set(PROVIDERS) and meta["skipped"] == {}
    assert meta["skipped_metrics"] == {}

    got = [(r["case"], r["provider"], r["metric"]) for r in rows]
    want = {(c, p, m) for c in CASES for p in PROVIDERS for m in METRICS}
    want |= {(c, "torch.mm", "roofline") for c in CASES}
    assert len(got) == len(set(got)) and set(got) == want
    for r in rows:
        _check_row(r)
    for c in CASES:  # every provider's solve took dense_eager's NFE (same noise, same model)
        for metric in FLOW_METRICS:
            nfes = {(r["nfe"], r["nfe_backward"]) for r in rows
                    if r["case"] == c and r["metric"] == metric}
            assert len(nfes) == 1, (c, metric, nfes)

    md = (out / "results.md").read_text()
    assert md.startswith("# Sparse Flows benchmark: ")
    for metric in METRICS:
        section = md.split(f"\n## {metric}: ", 1)[1].split("\n## ", 1)[0]
        for c in CASES:  # a row per case with a ratio for every peer
            line = next(x for x in section.splitlines() if x.startswith(f"| {c} |"))
            assert re.search(r"\| [0-9.]+x \| [0-9.]+x \|$", line), line
    assert "## Checks" in md and "Every provider's outputs agree" in md and "Errors:" not in md

    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == sorted(f"speedup_{m}.png" for m in METRICS)
    for name in pngs:
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, name
        assert f"]({name})" in md  # linked from results.md
    assert not list(out.glob(".*.tmp"))
    assert (out / "results.json").stat().st_mode & 0o044  # readable beyond the owner


def test_compare_flags_a_run_slower_than_the_baseline(run_a, tmp_path, capsys):
    out, _ = run_a
    old = _scaled(out / "results.json", tmp_path / "old_fast.json", SCALE_DOWN)
    new = tmp_path / "new"
    argv = ["--cases", CASES[0], "--metrics", "f_div", "train_step", "--providers",
            "dense_eager", "sparsekern", "--out", str(new), "--no-plots", *TINY]
    assert bench_main([*argv, "--compare", str(old)]) == 1
    stdout = capsys.readouterr().out
    _, rows = load_results(new / "results.json")
    timed = [(r["case"], r["provider"], r["metric"]) for r in rows]
    assert len(timed) == 5  # roofline + 2 providers x 2 metrics
    md = (new / "compare.md").read_text()
    assert md in stdout
    flagged = {tuple(line.split(" | ")[1].split()) for line in md.splitlines()
               if line.startswith("| regression |")}
    assert flagged == set(timed)
    assert f"{len(timed)} regressions, 0 new errors, 0 NFE changes, 0 improvements" in stdout
    assert "roofline) moved beyond noise" in md  # the machine "slowed down" as a whole


def test_compare_flags_nothing_against_a_slower_baseline_or_itself(run_a, tmp_path, capsys):
    out, _ = run_a
    old = _scaled(out / "results.json", tmp_path / "old_slow.json", SCALE_UP)
    new = tmp_path / "new"
    argv = ["--cases", CASES[0], "--metrics", "f_div", "--providers", "dense_eager",
            "sparsekern", "--out", str(new), "--no-plots", *TINY]
    assert bench_main([*argv, "--compare", str(old)]) == 0
    stdout = capsys.readouterr().out
    assert "0 regressions, 0 new errors, 0 NFE changes, 3 improvements" in stdout
    assert "| regression |" not in (new / "compare.md").read_text()

    from bench.compare import main as compare_main

    assert compare_main([str(out / "results.json"), str(out / "results.json")]) == 0
    stdout = capsys.readouterr().out
    assert "No change beyond noise." in stdout and "0 regressions" in stdout


def test_compare_refuses_a_bad_baseline_before_running(tmp_path, capsys):
    out = tmp_path / "out"
    base = ["--cases", CASES[0], "--metrics", "f", "--providers", "dense_eager", "--out",
            str(out), *TINY]
    assert bench_main([*base, "--compare", str(tmp_path / "missing.json")]) == 2
    assert "no such file" in capsys.readouterr().err
    (tmp_path / "bad.json").write_text('{"not": "results"}')
    assert bench_main([*base, "--compare", str(tmp_path / "bad.json")]) == 2
    assert "not a bench results.json" in capsys.readouterr().err
    # The run would overwrite its own baseline (the default --out holds the committed one).
    out.mkdir()
    (out / "results.json").write_text('{"meta": {}, "rows": []}')
    assert bench_main([*base, "--compare", str(out / "results.json")]) == 2
    assert "pass another --out" in capsys.readouterr().err
    assert (out / "results.json").read_text() == '{"meta": {}, "rows": []}'
    assert not (out / "results.md").exists()


def _selection(*argv: str):
    args = build_parser().parse_args(list(argv))
    return resolve_selection(args, CPU, make_providers("inductor"))


def test_quick_selects_the_documented_subset():
    sel = _selection("--quick")
    assert [c.name for c in sel.cases] == list(QUICK_CASES)
    assert sel.metrics == list(QUICK_METRICS) == ["f_div", "train_step"]
    assert sel.providers == list(QUICK_PROVIDERS) == ["dense_eager", "torch_csr", "sparsekern"]
    assert sel.budget_s == QUICK_BUDGET_S == 0.5
    # the subset is the one bench/README.md describes, and every part of it is a real case
    readme = (ROOT / "bench" / "README.md").read_text()
    quick_doc = " ".join(readme.split("\n`--quick` runs the cases ", 1)[1].split("\n\n")[0].split())
    assert re.findall(r"`([a-z_0-9/.]+)`", quick_doc) == [*QUICK_CASES, *QUICK_METRICS,
                                                           *QUICK_PROVIDERS]
    assert set(QUICK_CASES) <= set(CASE_BY_NAME)
    # shapes, structures and densities: dense and sparse toy, MINIBOONE at 90% / 98% / 70%
    assert {c.shape.name for c in sel.cases} == {"toy", "miniboone"}
    assert {c.structure for c in sel.cases} == {"unstructured", "structured"}
    # its default output folder is apart from the full suite's
    args = build_parser().parse_args(["--quick"])
    assert output_dir(args, "m") == RESULTS_ROOT / "m-quick"
    assert output_dir(build_parser().parse_args([]), "m") == RESULTS_ROOT / "m"


def test_explicit_options_override_the_parts_of_quick():
    sel = _selection("--quick", "--cases", "toy", "--budget", "0.1")
    assert {c.name for c in sel.cases} == {c for c in CASE_BY_NAME if c.startswith("toy/")}
    assert sel.budget_s == 0.1 and sel.metrics == list(QUICK_METRICS)
    assert sel.providers == list(QUICK_PROVIDERS)
    sel = _selection("--quick", "--metrics", "solve", "--providers", "sparsekern", "dense_eager")
    assert [c.name for c in sel.cases] == list(QUICK_CASES)
    assert sel.metrics == ["solve"] and sel.providers == ["dense_eager", "sparsekern"]
    # without --quick: everything, the default providers, 1 s
    full = _selection()
    assert len(full.cases) == len(CASE_BY_NAME) == 65 and full.metrics == list(METRICS)
    assert full.providers == resolve_providers(None, CPU, make_providers("inductor"))
    assert full.budget_s == 1.0
    with pytest.raises(ValueError, match="--budget"):
        _selection("--budget", "0")


def test_solver_providers_measure_flow_metrics_only_and_say_so(tmp_path, capsys):
    """sparsekern_native (and torchode, where installed) write rows for the flow metrics
    only; the metrics they skip are in meta["skipped_metrics"], with the reason."""
    out = tmp_path / "solvers"
    providers = ["dense_eager", "sparsekern", "sparsekern_native", "torchode"]
    argv = ["--cases", CASES[0], "--metrics", "f_div", "solve", "train_solve", "--providers",
            *providers, "--out", str(out), "--no-plots", *TINY]
    assert bench_main(argv) == 0
    err = capsys.readouterr().err
    assert f"sparsekern_native does not measure f_div: {SOLVER_ONLY}" in err
    meta, rows = load_results(out / "results.json")
    ran = [p for p in providers if p not in meta["skipped"]]
    assert meta["skipped_metrics"] == {p: {"f_div": SOLVER_ONLY} for p in ran
                                      if p in ("sparsekern_native", "torchode")}
    got = {(r["provider"], r["metric"]) for r in rows if r["metric"] != "roofline"}
    want = {(p, m) for p in ran for m in ("f_div", "solve", "train_solve")}
    want -= {(p, "f_div") for p in ("sparsekern_native", "torchode")}
    assert got == want
    by = {(r["provider"], r["metric"]): r for r in rows}
    for metric in FLOW_METRICS:  # the toy flow has one block: the same steps everywhere
        assert by[("sparsekern", metric)]["ode_solver"] == "torchdiffeq"
        assert by[("sparsekern_native", metric)]["ode_solver"] == "sparsekern.odeint"
        for p in ("sparsekern", "sparsekern_native"):
            assert by[(p, metric)]["nfe"] == by[("dense_eager", metric)]["nfe"]
            assert by[(p, metric)]["rel_err"] < 1e-3
    if "torchode" in ran:
        assert by[("torchode", "solve")]["ode_solver"] == "torchode"
        assert by[("torchode", "solve")]["rel_err"] < 1e-2
    else:
        assert "torchode" in meta["skipped"]["torchode"]
    md = (out / "results.md").read_text()
    assert "### train_solve: NFE of the forward and the backward (adjoint) solves" in md
    assert "Metrics a provider does not measure: sparsekern_native: f_div" in md
    assert "Every provider's outputs agree" in md


def test_sparseflow_bench_passes_its_options_through(run_a, tmp_path):
    """``sparseflow bench`` (``python -m flows bench``): --quick's metrics and providers, the
    explicit options, --out and --compare reach the run, and the exit status comes back."""
    out_a, _ = run_a
    old = _scaled(out_a / "results.json", tmp_path / "old_fast.json", SCALE_DOWN)
    out = tmp_path / "sf"
    proc = _python("-m", "flows", "bench", "--quick", "--cases", CASES[0], "--out", str(out),
                   "--no-plots", "--compare", str(old), *TINY)
    assert proc.returncode == 1, proc.stderr[-3000:]  # the regression's exit status
    assert "bench: 1 cases x 3 providers x 2 metrics on cpu (1 threads)" in proc.stderr
    meta, rows = load_results(out / "results.json")
    assert meta["command"].startswith("sparseflow bench --quick --cases toy/unstructured/0.3")
    opts = meta["options"]
    assert opts["quick"] is True and opts["cases"] == [CASES[0]]
    assert (opts["budget_s"], opts["batch"], opts["threads"]) == (0.02, 64, 1)
    assert (opts["min_repeats"], opts["max_repeats"], opts["warmup"]) == (3, 3, 1)
    got = {(r["provider"], r["metric"]) for r in rows}
    assert got == {(p, m) for p in QUICK_PROVIDERS for m in QUICK_METRICS} | {
        ("torch.mm", "roofline")}
    for r in rows:
        _check_row(r)
    assert not list(out.glob("*.png"))  # --no-plots
    assert "| regression |" in (out / "compare.md").read_text()
    assert "7 regressions" in proc.stdout  # roofline + 3 providers x 2 metrics


def test_gpu_check_script_explains_itself_and_refuses_without_a_gpu(tmp_path):
    script = Path(__file__).resolve().parents[1] / "bench" / "gpu_check.sh"
    usage = subprocess.run(["bash", str(script)], capture_output=True, text=True)
    assert usage.returncode == 2
    for phase in ("versions", "build", "tests", "forced", "bench", "smoke"):
        assert f"bash bench/gpu_check.sh {phase}" in usage.stdout
    assert usage.stdout.rstrip().endswith("The last lines printed are a summary.")
    env = dict(os.environ, OUT=str(tmp_path))
    versions = subprocess.run(["bash", str(script), "versions"], capture_output=True, text=True,
                              env=env)
    assert versions.returncode == 0
    assert f"torch {torch.__version__}" in (tmp_path / "versions.txt").read_text()
    if not torch.cuda.is_available():
        for phase in ("build", "tests", "forced", "bench"):
            run = subprocess.run(["bash", str(script), phase], capture_output=True, text=True,
                                 env=env)
            assert run.returncode == 2 and "no CUDA GPU" in run.stderr, phase


def test_python_m_bench_runs_image_cases_at_a_test_batch(tmp_path):
    """``python -m bench --cases mnist/...`` at batch 2: per-NFE metrics on the dense and the
    structured MNIST case, train_solve on the dense one only (the image shapes' flow
    metrics run on two cases), torch_csr and torchode not applicable (said, no rows)."""
    out = tmp_path / "image"
    cases = ["mnist/unstructured/1", "mnist/structured/0.5"]
    providers = ["dense_eager", "torch_csr", "sparsekern", "sparsekern_native", "torchode"]
    proc = _python("-m", "bench", "--cases", *cases, "--providers", *providers, "--metrics",
                   "f_div", "train_step", "train_solve", "--out", str(out), *TINY,
                   "--batch", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "bench: torch_csr does not run mnist: converts nn.Linear layers only" in proc.stderr
    meta, rows = load_results(out / "results.json")
    ran = [p for p in providers if p not in meta["skipped"]]
    assert "torch_csr" in ran and set(meta["skipped_shapes"]) == {
        p for p in ("torch_csr", "torchode") if p in ran}
    assert set(meta["skipped_case_metrics"]) == {"mnist/structured/0.5"}
    assert "mnist/unstructured/1, mnist/unstructured/0.37 only" in (
        meta["skipped_case_metrics"]["mnist/structured/0.5"]["train_solve"])
    got = {(r["case"], r["provider"], r["metric"]) for r in rows}
    want = {(c, p, m) for c in cases for p in ("dense_eager", "sparsekern")
            for m in ("f_div", "train_step")}
    want |= {(cases[0], p, "train_solve") for p in ("dense_eager", "sparsekern",
                                                     "sparsekern_native")}
    want |= {(c, "torch.conv2d", "roofline") for c in cases}
    assert got == want
    for r in rows:
        assert set(r) == set(ROW_FIELDS)
        assert r["error"] is None, (r["case"], r["provider"], r["metric"], r["error"])
        assert r["batch"] == 2 and r["threads"] == 1 and r["shape"] == "mnist"
        assert 0 < r["p10_ms"] <= r["median_ms"] <= r["p90_ms"]
        if r["provider"] not in ("dense_eager", "torch.conv2d"):
            assert r["rel_err"] < 1e-3 and r["speedup"] > 0
    md = (out / "results.md").read_text()
    assert "| mnist/structured/0.5 | 25.9% | 4.03x |" in md
    assert "## Image-flow speed targets (issue 17" in md
    assert "Shapes a provider does not run (not applicable): torch_csr: mnist" in md
    assert "Metrics not measured on a case: mnist/structured/0.5 train_solve" in md
    assert "Every provider's outputs agree" in md
    assert (out / "speedup_f_div.png").exists()
