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
from bench.metrics import FLOW_METRICS, METRICS, run_solve, run_train_solve
from bench.providers import SOLVER_ONLY, make_providers, resolve_providers
from bench.report import consistency_problems, load_results, readme_table, write_report
from bench.report import main as report_main
from bench.runner import Settings, metrics_of, run_benchmark
from bench.schema import ROW_FIELDS
from bench.timing import TimingConfig, measure

# torch.compile's tracing (torch internals) warns that torch.jit.script is deprecated.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")

TINY = Shape("tiny", 3, (12, 12), "softplus", "concatsquash", 2, 8, 1e-4, 1e-3, 0.5)
TINY1 = Shape("tiny1", 3, (12, 12), "softplus", "concatsquash", 1, 8, 1e-4, 1e-3, 0.5)
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
        registry = make_providers()
        assert got == {(p, m) for p in provs for m in metrics_of(registry[p], list(METRICS))
                       } | {("torch.mm", "roofline")}
    # solver providers: flow metrics only
    for name in ("sparsekern_native", "torchode"):
        if name in names:
            assert {r["metric"] for r in rows if r["provider"] == name} == set(FLOW_METRICS)
    json.dumps(rows)  # JSON-ready


def test_providers_agree_on_outputs_and_solve_nfe(tiny_rows):
    _, rows = tiny_rows
    assert consistency_problems(rows) == []
    for case in ("tiny/unstructured/0.4", "tiny/structured/0.5"):
        solves = [r for r in rows if r["case"] == case and r["metric"] == "solve"]
        base = next(r["nfe"] for r in solves if r["provider"] == "dense_eager")
        assert base > 0
        for r in solves:
            if r["provider"] != "torchode":  # per-sample steps: its own NFE
                assert abs(r["nfe"] - base) <= 0.02 * base, (r["provider"], r["nfe"], base)
        for r in (x for x in rows if x["case"] == case and x["metric"] in FLOW_METRICS):
            if r["model_ms"] is None:  # a native loop that evaluates the field in C++ / ops
                assert r["provider"] == "sparsekern_native" and r["solver_ms"] is None
                continue
            assert r["model_ms"] > 0 and r["solver_ms"] >= 0, (r["provider"], r["metric"])
            assert r["model_ms"] + r["solver_ms"] == pytest.approx(r["median_ms"], rel=0.5)
            assert r["ode_solver"] == {"sparsekern_native": "sparsekern.odeint",
                                       "torchode": "torchode"}.get(r["provider"], "torchdiffeq")
            if r["metric"] == "train_solve":
                assert r["nfe"] > 0 and r["atol"] == TINY.atol
                assert (r["nfe_backward"] is None) == (r["provider"] == "torchode")
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
    train = r[("tiny/unstructured/0.4", "sparsekern", "train_solve")]
    assert train["flops"] == 4 * b * k * train["nfe"] + 12 * b * k * train["nfe_backward"]
    assert train["per_nfe_ms"] == pytest.approx(
        train["median_ms"] / (train["nfe"] + train["nfe_backward"]))
    if ("tiny/unstructured/0.4", "torchode", "train_solve") in r:  # through the steps
        ode = r[("tiny/unstructured/0.4", "torchode", "train_solve")]
        assert ode["flops"] == 12 * b * k * ode["nfe"]


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
    out = capsys.readouterr().out
    assert "miniboone/unstructured/0.1" in out and "mnist/unstructured/0.37" in out
    assert "cifar10/structured/0.5   [no flow metrics]" in out
    assert "not on the image shapes: converts nn.Linear layers only" in out
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
    # every MLP shape (the committed results predate the image shapes)
    assert {c.split("/")[0] for c in cases} == {s for s in SHAPES if not SHAPES[s].is_conv}
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


# ------------------------------------------------------------------ solvers, train_solve

FAST = TimingConfig(budget_s=0.005, warmup=1, min_repeats=1, max_repeats=1, min_sample_s=1e-4)


def _flow_inputs(shape, dtype=torch.float32, batch=16):
    from bench.metrics import make_inputs

    return make_inputs(shape.dim, batch, batch, shape.T, dtype, CPU, seed=0)


def _nets(shape, dtype=torch.float32, structure="unstructured", density=0.4):
    return [build_field(Case(shape, structure, density), dtype=dtype, block=b)
            for b in range(shape.blocks)]


def _cnfs(flow):
    from flows.cnf import CNF

    return [m for m in flow.modules() if isinstance(m, CNF)]


def test_sparsekern_solves_under_torchdiffeq_and_sparsekern_native_natively():
    """The sparsekern provider keeps the compiled field inside torchdiffeq; sparsekern_native
    is the same compiled flow under sparsekern.odeint: in float64 the same steps (NFE)
    and log-likelihood."""
    registry = make_providers()
    nets = _nets(TINY, torch.float64)
    inputs = _flow_inputs(TINY, torch.float64)
    results = {}
    for name, engine in (("sparsekern", "torchdiffeq"), ("sparsekern_native", "auto")):
        flow = registry[name].prepare_flow(TINY, nets, 16)
        cnfs = _cnfs(flow)
        assert len(cnfs) == 2 and all(c.solver_engine == engine for c in cnfs)
        results[name] = run_solve(flow, inputs, FAST, CPU)
        notes = [c.odefunc.odenet.last_solve for c in cnfs]  # set by sparsekern.odeint only
        if name == "sparsekern":
            assert notes == [None, None] and results[name].ode_solver == "torchdiffeq"
        else:
            assert all(n.startswith("native") for n in notes), notes
            assert results[name].ode_solver == "sparsekern.odeint"
    td, native = results["sparsekern"], results["sparsekern_native"]
    assert native.nfe_per_block == td.nfe_per_block and td.nfe > 0
    torch.testing.assert_close(native.outputs[0], td.outputs[0], rtol=1e-10, atol=1e-10)
    assert td.model_ms > 0
    # The native loop's field calls are timed where it makes them from Python (this
    # time-dependent field); a time-free field is evaluated without a module call.
    assert native.model_ms is None or native.model_ms > 0
    for name in ("sparsekern_native", "torchode"):
        for metric in ("f", "f_div", "train_step"):
            assert registry[name].metric_unavailable(metric) == SOLVER_ONLY
        assert all(registry[name].metric_unavailable(m) is None for m in FLOW_METRICS)
    assert registry["sparsekern"].metric_unavailable("f_div") is None


def test_train_solve_agrees_across_dense_sparsekern_and_native():
    """One training step of a one-block flow (adjoint): dense_eager, sparsekern (under
    torchdiffeq) and sparsekern_native give the same loss, kept-parameter gradients and
    forward and backward NFE in float64."""
    registry = make_providers()
    nets = _nets(TINY1, torch.float64)
    inputs = _flow_inputs(TINY1, torch.float64)
    got = {}
    for name in ("dense_eager", "sparsekern", "sparsekern_native"):
        flow = registry[name].prepare_train_flow(TINY1, nets, 16)
        assert all(c.adjoint for c in _cnfs(flow))  # Shape.adjoint: True, as the presets
        got[name] = run_train_solve(flow, inputs, FAST, CPU)
        assert all(p.grad is None for p in nets[0].parameters())  # left clean for the next
    ref = got["dense_eager"]
    assert ref.nfe > 0 and ref.nfe_backward > 0 and ref.ode_solver == "torchdiffeq"
    assert ref.output_keys[0] == "loss" and "0:layers.0.linear.weight" in ref.output_keys
    for name in ("sparsekern", "sparsekern_native"):
        r = got[name]
        assert (r.nfe, r.nfe_backward) == (ref.nfe, ref.nfe_backward), name
        assert r.output_keys == ref.output_keys, name
        torch.testing.assert_close(r.outputs[0], ref.outputs[0], rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(r.outputs[1], ref.outputs[1], rtol=1e-7, atol=1e-9)
    assert got["sparsekern_native"].ode_solver == "sparsekern.odeint"
    assert ref.outputs[1].abs().sum() > 0


def test_dense_train_solve_of_a_later_block_takes_the_compiled_steps():
    """The autograd divergence of a later block under the adjoint's no-grad forward solve
    (flows.odefunc, test_cnf's test_divergence_under_no_grad_*) gives the fused steps."""
    registry = make_providers()
    nets = _nets(TINY)
    inputs = _flow_inputs(TINY)
    dense = run_train_solve(registry["dense_eager"].prepare_train_flow(TINY, nets, 16), inputs,
                            FAST, CPU)
    fused = run_train_solve(registry["sparsekern"].prepare_train_flow(TINY, nets, 16), inputs,
                            FAST, CPU)
    assert dense.nfe_per_block == fused.nfe_per_block


def test_torchode_provider_runs_or_says_why_not(monkeypatch):
    import sys

    from bench import providers

    registry = make_providers()
    reason = registry["torchode"].unavailable(CPU)
    if reason is None:
        nets = _nets(TINY)
        inputs = _flow_inputs(TINY)
        dense = run_solve(registry["dense_eager"].prepare_flow(TINY, nets, 16), inputs, FAST,
                          CPU)
        flow = registry["torchode"].prepare_flow(TINY, nets, 16)
        ode = run_solve(flow, inputs, FAST, CPU)
        assert ode.ode_solver == "torchode" and "per-sample" in ode.solve_note
        assert ode.nfe > 0 and len(ode.nfe_per_block) == 2 and ode.model_ms > 0
        # other steps, the same model, noise and tolerances: close, not equal
        torch.testing.assert_close(ode.outputs[0], dense.outputs[0], rtol=1e-2, atol=1e-2)
        train = run_train_solve(registry["torchode"].prepare_train_flow(TINY, nets, 16),
                                inputs, FAST, CPU)
        assert train.nfe_backward is None and train.outputs[1].abs().sum() > 0
    else:
        assert "torchode" in reason
    # without torchode: a reason, never a crash
    providers.torchode_unavailable.cache_clear()
    monkeypatch.setitem(sys.modules, "torchode", None)
    try:
        why = registry["torchode"].unavailable(CPU)
        assert why is not None and "torchode is not installed" in why and "pip install" in why
    finally:
        monkeypatch.delitem(sys.modules, "torchode")
        providers.torchode_unavailable.cache_clear()
    if reason is None:
        assert registry["torchode"].unavailable(CPU) is None


def test_report_checks_torchode_loosely_and_train_solve_nfe_strictly():
    def row(provider, metric, rel_err=None, nfe=None, nfe_backward=None):
        r = dict.fromkeys(ROW_FIELDS)
        r.update(case="c", provider=provider, metric=metric, rel_err=rel_err, nfe=nfe,
                 nfe_backward=nfe_backward, dtype="float32")
        return r

    rows = [row("dense_eager", "solve", None, 100), row("dense_eager", "train_solve", None, 100,
                                                         80),
            row("torchode", "solve", 5e-3, 140), row("torchode", "train_solve", 2e-2, 140),
            row("sparsekern_native", "train_solve", 1e-6, 100, 90)]
    assert consistency_problems(rows) == [
        "c torchode train_solve: outputs differ from dense_eager by 2.00e-02 (relative)",
        "c sparsekern_native train_solve: backward NFE 90 against dense_eager's 80"]


# ------------------------------------------------------------------ image (conv) cases

IMAGE_TINY = TimingConfig(budget_s=0.01, warmup=1, min_repeats=3, max_repeats=3,
                          min_sample_s=1e-4)


def _image_case(name):
    return next(c for c in all_cases() if c.name == name)


def test_image_shapes_are_the_first_scale_of_the_multiscale_flows():
    from bench.cases import IMAGE_SHAPES
    from bench.report import IMAGE_SHAPES as REPORTED
    from flows.multiscale import odenet_parameter_count
    from flows.odenet import ConvODEnet
    from flows.prune import prunable_layers

    assert tuple(IMAGE_SHAPES) == REPORTED == ("mnist", "cifar10")
    for name, (c, side) in (("mnist", (1, 28)), ("cifar10", (3, 32))):
        shape = SHAPES[name]
        assert shape.is_conv and shape.state_shape == (c, side, side)
        assert shape.pixels == side * side and shape.blocks == 1 and shape.batch == 200
        assert (shape.atol, shape.rtol, shape.T, shape.noise) == (1e-5, 1e-5, 1.0, "rademacher")
        assert shape.label == f"{c}x{side}x{side} conv3x3 64x3 softplus concat x1"
        net = build_field(Case(shape, "unstructured", 1.0))
        assert isinstance(net, ConvODEnet) and net.in_shape == (c, side, side)
        weights = sum(m.weight.numel() for _, m in prunable_layers(net))
        biases = sum(m.bias.numel() for _, m in prunable_layers(net))
        assert shape.dense_weights == weights
        assert weights + biases == odenet_parameter_count(c) == 1162 * c + 75648
        assert shape.conv_layers == [(64, c + 1, 3), (64, 65, 3), (64, 65, 3), (c, 65, 3)]
        names = [x.name for x in all_cases() if x.shape is shape]
        assert names == [f"{name}/unstructured/{d}" for d in ("1", "0.37", "0.2", "0.05")] + [
            f"{name}/structured/0.5"]
    assert len(all_cases()) == 65 and not any(c.startswith(("mnist", "cifar10"))
                                              for c in QUICK_CASES)
    assert {c.name for c in select(["mnist", "cifar10"])} == {
        c.name for c in all_cases() if c.shape.is_conv}


def test_image_cases_prune_taps_and_filters_and_know_their_flop_ratio():
    from bench.cases import reduced_weights
    from sparsekern import SparseConfig, compile_sparse
    from sparsekern.conv import ConvCore

    mnist = SHAPES["mnist"]
    net = build_field(_image_case("mnist/unstructured/0.2"))
    for layer, (o, i, k) in zip(net.layers, mnist.conv_layers, strict=True):
        assert int(layer.conv.weight_mask.sum()) == round(0.2 * o * i * k * k)
    net = build_field(_image_case("mnist/structured/0.5"))
    live = [int(layer.conv.weight_mask.flatten(1).any(1).sum()) for layer in net.layers]
    assert live == [32, 32, 32, 1]  # half of every hidden layer's filters, never the output
    # The reduced network is what compile_sparse leaves: 32x1, 32x32, 32x32, 1x32 dense cores
    assert reduced_weights(net) == 9 * (32 + 32 * 32 + 32 * 32 + 32) == 19008
    assert mnist.dense_weights / reduced_weights(net) == pytest.approx(4.03, abs=0.01)
    for name in ("mnist/structured/0.5", "mnist/unstructured/0.05", "cifar10/unstructured/0.2"):
        net = build_field(_image_case(name))
        fast = compile_sparse(net, SparseConfig(layout="dense"))
        cores = [m for m in fast.modules() if isinstance(m, ConvCore)]
        assert reduced_weights(net) == sum(c.nnz for c in cores), name
    # MLP fields: the kept weights, unless random masks cut neurons off
    rnd = build_field(Case(TINY, "unstructured", 0.4))
    assert reduced_weights(rnd) <= kept_weights(rnd)
    # Flow metrics: two MNIST cases only
    assert mnist.flow_metric_reason(_image_case("mnist/unstructured/0.37")) is None
    assert mnist.flow_metric_reason(_image_case("mnist/unstructured/1")) is None
    assert "mnist/unstructured/1, mnist/unstructured/0.37 only" in mnist.flow_metric_reason(
        _image_case("mnist/structured/0.5"))
    assert "not measured on cifar10" in SHAPES["cifar10"].flow_metric_reason(
        _image_case("cifar10/unstructured/1"))
    assert TINY.flow_metric_reason(Case(TINY, "structured", 0.5)) is None


def test_image_inputs_are_rademacher_images_and_solve_batches_are_capped():
    from bench.metrics import make_inputs
    from bench.runner import solve_batch_of

    inp = make_inputs((3, 4, 5), 6, 2, 1.0, torch.float32, CPU, seed=0, noise="rademacher")
    assert inp.z.shape == inp.noise.shape == inp.grad_f.shape == (6, 3, 4, 5)
    assert inp.x.shape == (2, 3, 4, 5) and inp.grad_div.shape == (6,)
    assert set(inp.noise.unique().tolist()) == {-1.0, 1.0}
    gauss = make_inputs(TINY.dim, 8, 8, 0.5, torch.float32, CPU, seed=0)
    assert gauss.z.shape == (8, 3) and len(gauss.noise.unique()) == 24
    with pytest.raises(ValueError, match="noise"):
        make_inputs(3, 8, 8, 0.5, torch.float32, CPU, seed=0, noise="uniform")
    mnist = SHAPES["mnist"]
    assert solve_batch_of(mnist, 200, Settings(solve_batch=1024)) == 50  # the shape's cap
    assert solve_batch_of(mnist, 200, Settings(solve_batch=200, shape_solve_batch=False)) == 200
    assert solve_batch_of(mnist, 200, Settings(solve_batch=None, shape_solve_batch=False)) == 200
    assert solve_batch_of(mnist, 2, Settings()) == 2
    assert solve_batch_of(SHAPES["bsds300"], 10000, Settings(solve_batch=1024)) == 1024


def test_linear_only_and_flat_state_providers_do_not_run_image_shapes():
    registry = make_providers()
    mnist = SHAPES["mnist"]
    for name in ("torch_csr", "torch_bsr"):
        assert "nn.Linear layers only" in registry[name].shape_unavailable(mnist)
    assert "image states" in registry["torchode"].shape_unavailable(mnist)
    for name, p in registry.items():
        assert p.shape_unavailable(TINY) is None, name
        if name not in ("torch_csr", "torch_bsr", "torchode"):
            assert p.shape_unavailable(mnist) is None, name


@pytest.fixture(scope="module")
def image_rows():
    """MNIST's dense case with every metric (flow metrics at batch 2) on dense_eager,
    sparsekern and sparsekern_native (torch_csr and torchode write nothing), and the
    structured case and 63% on the per-NFE metrics: batch 2, one thread, tiny budget."""
    registry = make_providers()
    flow = ["dense_eager", "torch_csr", "sparsekern", "sparsekern_native", "torchode"]
    flow = [n for n in flow if registry[n].unavailable(CPU) is None]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rows = run_benchmark([_image_case("mnist/unstructured/1")],
                             [registry[n] for n in flow],
                             Settings(metrics=["f_div", "train_step", "solve", "train_solve"],
                                      timing=IMAGE_TINY, batch=2), progress=False)
        # sparsekern's csr cores (below 40% kept) need sparsekern::conv2d: dense cores here
        rows += run_benchmark([_image_case("mnist/structured/0.5"),
                               _image_case("mnist/unstructured/0.37")],
                              [registry[n] for n in ("dense_eager", "sparsekern_dense")],
                              Settings(metrics=["f", "f_div", "train_step", "solve"],
                                       timing=IMAGE_TINY, batch=2), progress=False)
    finally:
        torch.set_num_threads(threads)
    return rows


def test_an_image_case_runs_end_to_end(image_rows):
    rows = image_rows
    for r in rows:
        assert set(r) == set(ROW_FIELDS)
        assert r["error"] is None, (r["case"], r["provider"], r["metric"], r["error"])
        assert r["shape"] == "mnist" and r["batch"] == 2 and r["median_ms"] > 0
    got = {(r["case"], r["provider"], r["metric"]) for r in rows}
    dense = "mnist/unstructured/1"
    assert got == (
        {(dense, p, m) for p in ("dense_eager", "sparsekern")
         for m in ("f_div", "train_step", "solve", "train_solve")}
        | {(dense, "sparsekern_native", m) for m in ("solve", "train_solve")}
        | {(c, p, m) for c in ("mnist/structured/0.5", "mnist/unstructured/0.37")
           for p in ("dense_eager", "sparsekern_dense") for m in ("f", "f_div", "train_step")}
        | {("mnist/unstructured/0.37", p, "solve") for p in ("dense_eager", "sparsekern_dense")}
        | {(c, "torch.conv2d", "roofline") for c in (dense, "mnist/structured/0.5",
                                                      "mnist/unstructured/0.37")})
    assert consistency_problems(rows) == []
    by = {(r["case"], r["provider"], r["metric"]): r for r in rows}
    for (case, provider, metric), r in by.items():
        if provider not in ("dense_eager", "torch.conv2d"):
            assert r["rel_err"] is not None and r["rel_err"] < 1e-3, (case, provider, metric)
        k = r["kept_weights"]
        if metric in ("f", "f_div", "train_step"):  # per kept tap and output pixel
            per = {"f": 2, "f_div": 4, "train_step": 12}[metric]
            assert r["flops"] == per * k * 2 * 784
        if metric == "roofline":
            assert r["flops"] == 2 * 2 * 784 * SHAPES["mnist"].dense_weights
            assert r["roofline_fraction"] == 1.0
        elif metric != "roofline":
            assert r["roofline_gflops"] == by[(case, "torch.conv2d", "roofline")]["gflops"]
    train = by[(dense, "sparsekern", "train_solve")]
    assert train["flops"] == 784 * (4 * 2 * train["kept_weights"] * train["nfe"]
                                    + 12 * 2 * train["kept_weights"] * train["nfe_backward"])
    native = by[(dense, "sparsekern_native", "train_solve")]
    assert native["ode_solver"] == "sparsekern.odeint" and "native" in native["solve_note"]
    assert native["model_ms"] > 0  # its host loop calls the field's forward_and_divergence
    for metric in ("solve", "train_solve"):
        nfes = {(by[(dense, p, metric)]["nfe"], by[(dense, p, metric)]["nfe_backward"])
                for p in ("dense_eager", "sparsekern", "sparsekern_native")}
        assert len(nfes) == 1, (metric, nfes)
    s = by[("mnist/structured/0.5", "sparsekern_dense", "f_div")]
    assert s["flop_ratio"] == pytest.approx(76617 / 19008)
    assert s["kept_fraction"] == pytest.approx(19881 / 76617)
    assert by[(dense, "sparsekern", "f_div")]["layouts"] == ["dense"] * 4
    assert by[(dense, "sparsekern", "f_div")]["div_impl"] == "fused"


def test_image_rows_make_a_report_with_the_image_targets(image_rows, tmp_path):
    write_report(tmp_path, {"machine": {"cpu_model": "test"}, "complete": True}, image_rows)
    md = (tmp_path / "results.md").read_text()
    assert "| mnist/structured/0.5 | 25.9% | 4.03x |" in md
    assert "F.conv2d on the dense convolutions" in md
    assert (tmp_path / "speedup_f_div.png").exists()


def test_image_targets_are_decided_from_the_rows():
    from bench.report import image_target_checks, render_markdown

    def row(case, provider, metric, speedup, flop_ratio=None, error=None):
        r = dict.fromkeys(ROW_FIELDS)
        r.update(case=case, provider=provider, metric=metric, speedup=speedup,
                 median_ms=None if error else 1.0, flop_ratio=flop_ratio, error=error)
        return r

    rows = [row("mnist/unstructured/0.2", "sparsekern", "f_div", 2.5),
            row("mnist/unstructured/0.05", "sparsekern", "f_div", 3.0),
            row("mnist/structured/0.5", "sparsekern", "f_div", 3.3, flop_ratio=4.03),
            row("cifar10/structured/0.5", "sparsekern", "f_div", 3.0, flop_ratio=3.92),
            row("cifar10/unstructured/0.2", "sparsekern", "f_div", None, error="X: y"),
            row("mnist/unstructured/0.37", "sparsekern", "train_solve", 1.2),
            row("mnist/unstructured/0.37", "sparsekern_native", "train_solve", 0.9),
            row("mnist/unstructured/0.37", "sparsekern", "train_step", 1.5)]
    got = [(c["case"], c["provider"], c["measured"], c["needed"], c["met"])
           for c in image_target_checks(rows)]
    assert got == [
        ("mnist/unstructured/0.2", "sparsekern", "2.50x", ">= 2.00x", True),
        ("mnist/unstructured/0.05", "sparsekern", "3.00x", ">= 4.00x", False),
        ("mnist/structured/0.5", "sparsekern", "3.30x", ">= 3.22x (FLOP ratio 4.03)", True),
        ("cifar10/structured/0.5", "sparsekern", "3.00x", ">= 3.14x (FLOP ratio 3.92)", False),
        ("mnist/unstructured/0.37", "sparsekern", "1.20x", "> 1.00x", True),
        ("mnist/unstructured/0.37", "sparsekern_native", "0.90x", "> 1.00x", False),
        ("mnist/unstructured/0.37", "sparsekern", "1.50x", "> 1.00x", True)]
    md = render_markdown({}, rows)
    assert "## Image-flow speed targets (issue 17" in md
    assert "| structured 50% of filters: f_div >= 0.8 x FLOP ratio | mnist/structured/0.5 |" in md


@pytest.mark.skipif(not hasattr(__import__("sparsekern.ops").ops, "conv2d"),
                    reason="sparsekern::conv2d (the CSR convolution kernel) has not landed")
def test_sparsekern_runs_sparse_image_cases_on_its_csr_convolution():
    registry = make_providers()
    rows = run_benchmark([_image_case("mnist/unstructured/0.2")],
                         [registry[n] for n in ("dense_eager", "sparsekern")],
                         Settings(metrics=["f_div", "train_step"], timing=IMAGE_TINY, batch=2),
                         progress=False)
    assert consistency_problems(rows) == []
    for r in rows:
        assert r["error"] is None, (r["provider"], r["metric"], r["error"])
        if r["provider"] == "sparsekern":
            assert "csr" in r["layouts"] and r["rel_err"] < 1e-3
