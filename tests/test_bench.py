"""The benchmark harness (bench/) itself, on a tiny model: rows, schema, compare, report.

The timings here mean nothing (tiny shapes, tiny budget); the tests check that
every provider and metric runs, that the rows hold the schema's fields with
sane values, that providers agree on outputs and on the solve's NFE, that
compare flags a regression but not noise, and that the report is written.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from bench import main as bench_main
from bench.cases import QUICK_CASES, SHAPES, Case, Shape, all_cases, build_field, kept_weights
from bench.cases import select_cases as select
from bench.compare import classify, compare_rows, has_regressions
from bench.metrics import METRICS
from bench.providers import make_providers, resolve_providers
from bench.report import consistency_problems, load_results, readme_table, write_report
from bench.report import main as report_main
from bench.runner import Settings, run_benchmark
from bench.schema import ROW_FIELDS
from bench.timing import TimingConfig, measure

# torch.compile's tracing (torch internals) warns that torch.jit.script is deprecated.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")

TINY = Shape("tiny", 3, (12, 12), "softplus", "concatsquash", 2, 8, 1e-4, 1e-3, 0.5)
CPU = torch.device("cpu")


STRUCTURED_PROVIDERS = ["dense_eager", "torch_csr", "sparsekern"]


@pytest.fixture(scope="module")
def tiny_rows():
    """Every available provider x every metric on a tiny pruned flow (and a structured one
    on the main providers), tiny budget, one thread (tiny work on a shared machine)."""
    registry = make_providers(compile_backend="aot_eager")  # dynamo tracing, no C++ codegen
    names = [n for n in resolve_providers(["all"], CPU, registry)
             if registry[n].unavailable(CPU) is None]
    settings = Settings(metrics=list(METRICS),
                        timing=TimingConfig(budget_s=0.01, warmup=1, min_repeats=3,
                                            max_repeats=3, min_sample_s=1e-4))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rows = run_benchmark([Case(TINY, "unstructured", 0.4)], [registry[n] for n in names],
                             settings, progress=False)
        rows += run_benchmark([Case(TINY, "structured", 0.5)],
                              [registry[n] for n in STRUCTURED_PROVIDERS], settings,
                              progress=False)
    finally:
        torch.set_num_threads(threads)
    return names, rows


def test_every_provider_and_metric_gives_a_sane_row(tiny_rows):
    names, rows = tiny_rows
    assert {"dense_eager", "torch_compile", "torch_csr", "sparsekern", "sparsekern_ref"} <= set(
        names)
    for r in rows:
        assert set(r) == set(ROW_FIELDS), set(r) ^ set(ROW_FIELDS)
        assert r["error"] is None, (r["case"], r["provider"], r["metric"], r["error"])
        assert 0 < r["p10_ms"] <= r["median_ms"] <= r["p90_ms"]
        assert r["gflops"] > 0 and r["flops"] > 0 and r["roofline_gflops"] > 0
        assert math.isclose(r["roofline_fraction"], r["gflops"] / r["roofline_gflops"])
        assert r["batch"] == TINY.batch and r["dtype"] == "float32" and r["threads"] == 1
        assert r["shape"] == "tiny" and r["case"].startswith("tiny/")
    for case, provs in (("tiny/unstructured/0.4", names),
                        ("tiny/structured/0.5", STRUCTURED_PROVIDERS)):
        got = {(r["provider"], r["metric"]) for r in rows if r["case"] == case}
        assert got == {(p, m) for p in provs for m in METRICS} | {("torch.mm", "roofline")}
    json.dumps(rows)  # JSON-ready


def test_providers_agree_on_outputs_and_solve_nfe(tiny_rows):
    _, rows = tiny_rows
    assert consistency_problems(rows) == []
    for case in ("tiny/unstructured/0.4", "tiny/structured/0.5"):
        solves = [r for r in rows if r["case"] == case and r["metric"] == "solve"]
        base = next(r["nfe"] for r in solves if r["provider"] == "dense_eager")
        assert base > 0
        for r in solves:
            assert abs(r["nfe"] - base) <= 0.02 * base, (r["provider"], r["nfe"], base)
            assert r["model_ms"] > 0 and r["solver_ms"] >= 0
            assert r["model_ms"] + r["solver_ms"] == pytest.approx(r["median_ms"], rel=0.5)
        for r in rows:
            if r["case"] == case and r["provider"] != "dense_eager" and r["metric"] != "roofline":
                assert r["rel_err"] is not None and r["rel_err"] < 1e-3, r
                assert r["speedup"] > 0


def test_flop_counts_follow_the_documented_convention(tiny_rows):
    _, rows = tiny_rows
    r = {(x["case"], x["provider"], x["metric"]): x for x in rows}
    k = r[("tiny/unstructured/0.4", "sparsekern", "f")]["kept_weights"]
    b = TINY.batch
    assert k == sum(round(0.4 * o * i) for o, i in TINY.layer_shapes)  # random masks
    for metric, per in (("f", 2), ("f_div", 4), ("train_step", 12)):
        assert r[("tiny/unstructured/0.4", "sparsekern", metric)]["flops"] == per * k * b
    solve = r[("tiny/unstructured/0.4", "sparsekern", "solve")]
    assert solve["flops"] == 4 * b * k * solve["nfe"]  # both blocks keep k weights


def test_cases_prune_to_the_requested_density():
    for density in (0.5, 0.1, 0.02):
        net = build_field(Case(SHAPES["miniboone"], "unstructured", density), masks="magnitude")
        assert kept_weights(net) == round(density * SHAPES["miniboone"].dense_weights)
        rnd = build_field(Case(TINY, "unstructured", density))
        assert kept_weights(rnd) == sum(round(density * o * i) for o, i in TINY.layer_shapes)
        for layer, (o, i) in zip(rnd.layers, TINY.layer_shapes, strict=True):
            assert int(layer.linear.weight_mask.sum()) == round(density * o * i)
    net = build_field(Case(TINY, "structured", 0.5))
    hidden = [m for m in net.layers[:-1]]
    assert all(int(h.linear.weight_mask.any(1).sum()) == 6 for h in hidden)


def test_case_selection():
    assert {c.name for c in select(list(QUICK_CASES))} == set(QUICK_CASES)
    assert all(c.shape.name == "toy" for c in select(["toy"]))
    assert all(c.structure == "structured" for c in select(["*/structured"]))
    assert "toy/unstructured/0.3" in {c.name for c in all_cases()}
    with pytest.raises(ValueError, match="matches no case"):
        select(["nosuchshape"])


def _row(median, p10, p90, **kw):
    row = dict.fromkeys(ROW_FIELDS)
    row.update(case="c", provider="p", metric="f_div", batch=8, dtype="float32", device="cpu",
               threads=2, median_ms=median, p10_ms=p10, p90_ms=p90)
    row.update(kw)
    return row


def test_compare_flags_a_regression_and_not_noise():
    old = _row(10.0, 9.5, 10.5)
    assert classify(old, _row(13.0, 12.5, 13.6)) == "regression"
    assert classify(old, _row(10.4, 9.6, 11.2)) is None  # noise: inside the old spread
    assert classify(old, _row(11.0, 9.9, 12.5)) is None  # old median inside the new spread
    assert classify(old, _row(7.0, 6.8, 7.3)) == "improvement"
    changes = compare_rows([old], [_row(13.0, 12.5, 13.6)])
    assert [c.kind for c in changes] == ["regression"] and has_regressions(changes)
    assert not has_regressions(compare_rows([old], [_row(10.2, 9.7, 10.9)]))
    nfe = compare_rows([_row(10, 9, 11, metric="solve", nfe=100)],
                       [_row(10, 9, 11, metric="solve", nfe=110)])
    assert [c.kind for c in nfe] == ["nfe_changed"]


def test_report_writes_results_md_json_and_png(tiny_rows, tmp_path):
    _, rows = tiny_rows
    meta = {"machine": {"cpu_model": "test", "threads": 2}, "options": {"dtype": "float32"},
            "complete": True}
    written = write_report(tmp_path, meta, rows)
    md = (tmp_path / "results.md").read_text()
    assert "## f_div" in md and "sparsekern" in md and "### solve" in md
    assert written["plots"], "no plot written"
    for png in written["plots"]:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    meta2, rows2 = load_results(tmp_path / "results.json")
    assert meta2["complete"] and len(rows2) == len(rows)
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes left no temporary files


def test_timing_reports_percentiles_and_respects_the_budget():
    calls = []
    t = measure(lambda: calls.append(1), TimingConfig(budget_s=0.02, min_repeats=3,
                                                      max_repeats=7), CPU)
    assert 3 <= t.repeats <= 7 and t.p10_ms <= t.median_ms <= t.p90_ms
    assert len(calls) == t.calls


def test_cli_lists_and_rejects_bad_options(capsys):
    assert bench_main(["--list"]) == 0
    assert "miniboone/unstructured/0.1" in capsys.readouterr().out
    assert bench_main(["--cases", "nosuchshape", "--no-progress"]) == 2
    assert bench_main(["--providers", "nosuch", "--no-progress"]) == 2


def test_readme_documents_every_row_field():
    readme = (Path(__file__).resolve().parents[1] / "bench" / "README.md").read_text()
    for name in ROW_FIELDS:
        assert f"`{name}`" in readme, f"bench/README.md does not document the row field {name}"



ROOT = Path(__file__).resolve().parents[1]
COMMITTED = ROOT / "bench" / "results" / "cpu-intel-xeon-2t" / "results.json"


def _readme_performance_table(readme: str) -> str:
    """The generated block of README.md's "## Performance" section: from its "Measured on"
    line to the last row of the table that follows."""
    section = readme.split("\n## Performance\n", 1)[1].split("\n## ", 1)[0]
    lines = section.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("Measured on "))
    end = next(i for i in range(start + 3, len(lines)) if not lines[i].startswith("|"))
    return "\n".join(lines[start:end]) + "\n"


def test_readme_performance_table_is_generated_from_the_committed_results():
    readme = (ROOT / "README.md").read_text()
    source = COMMITTED.relative_to(ROOT).as_posix()
    assert (f"generated by `bench.report.readme_table` from the committed `{source}`"
            in " ".join(readme.split()))
    meta, rows = load_results(COMMITTED)
    table = readme_table(meta, rows)
    assert _readme_performance_table(readme) == table, (
        f"README.md's performance table is not what `python -m bench.report {source} "
        "--readme` prints; paste that in")
    # every shape, a subset of the grid (the full grid is in results.md)
    cases = [line.split(" | ")[0].removeprefix("| ") for line in table.splitlines()[4:]]
    assert {c.split("/")[0] for c in cases} == set(SHAPES)
    assert len(cases) == 25 < len({r["case"] for r in rows}) == 55
    assert readme_table(meta, rows, cases=None).count("\n| ") == 2 + 55


def test_report_readme_option_prints_the_readme_table(capsys):
    meta, rows = load_results(COMMITTED)
    assert report_main([str(COMMITTED), "--readme"]) == 0
    assert capsys.readouterr().out == readme_table(meta, rows)
    assert report_main([str(COMMITTED), "--readme", "--readme-cases", "toy/*"]) == 0
    body = capsys.readouterr().out.splitlines()[4:]
    assert len(body) == 10 and all(line.startswith("| toy/") for line in body)


def test_torch_bsr_provider_matches_the_masked_layer_or_says_why_not():
    import warnings

    from bench.providers import BSRLinear, bsr_unavailable

    reason = bsr_unavailable("cpu")
    assert reason is None or "BSR" in reason
    lin = torch.nn.Linear(21, 43)
    lin.register_buffer("weight_mask", (torch.rand(43, 21) < 0.3).float())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch: "sparse BSR support is in beta"
        layer = BSRLinear(lin)
        x = torch.randn(5, 21)
        torch.testing.assert_close(layer(x), x @ (lin.weight * lin.weight_mask).t() + lin.bias)
    assert layer.blocksize in (16, 8, 4, 2, 1)
    assert "torch_bsr" in make_providers()


def test_reduced_precision_providers_run_on_cuda_only_and_are_checked_loosely():
    from bench.providers import REDUCED_PROVIDERS, Sparsekern, default_providers
    from bench.report import REDUCED_REL_ERR

    registry = make_providers()
    for name, precision in REDUCED_PROVIDERS.items():
        assert registry[name].precision == precision
        assert registry[name].unavailable(CPU) == (f"{precision} products have kernels on "
                                                   "CUDA only (Triton)")
        assert registry[name].config(64).precision == precision
    assert not set(REDUCED_PROVIDERS) & set(default_providers(CPU, registry))
    assert registry["sparsekern_bf16"].unavailable(torch.device("cuda"), torch.float64) == (
        "bf16 products round float32 models; this run is torch.float64")
    # The provider itself, on CPU through the reference's rounding: rows say the precision.
    net = build_field(Case(TINY, "unstructured", 0.4))
    prepared = Sparsekern("x", backend="ref", precision="bf16").prepare(net, 64)
    assert prepared.info["precision"] == "bf16"
    z, t = torch.randn(64, TINY.dim), torch.tensor(0.5)
    with torch.no_grad():
        err = ((prepared.field(t, z) - net(t, z)).norm() / net(t, z).norm()).item()
    assert 1e-5 < err < REDUCED_REL_ERR["bf16"]

    def row(provider, precision, metric, rel_err, nfe=None):
        r = dict.fromkeys(ROW_FIELDS)
        r.update(case="c", provider=provider, precision=precision, metric=metric,
                 rel_err=rel_err, nfe=nfe, dtype="float32")
        return r

    rows = [row("dense_eager", None, "solve", None, 100),
            row("sparsekern_bf16", "bf16", "f_div", 1e-2),
            row("sparsekern_bf16", "bf16", "solve", 1e-2, 130),
            row("sparsekern_fp16", "fp16", "f_div", 1e-2),
            row("sparsekern", "ieee", "f_div", 1e-2)]
    assert consistency_problems(rows) == [
        "c sparsekern_fp16 f_div: outputs differ from dense_eager by 1.00e-02 (relative)",
        "c sparsekern f_div: outputs differ from dense_eager by 1.00e-02 (relative)"]
