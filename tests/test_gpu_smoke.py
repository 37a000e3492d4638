"""bench/gpu_smoke.py, the Python side of ``bash bench/gpu_check.sh smoke``, on the CPU.

The solve check runs for real (backend "ref" on CPU tensors, a 64 batch: seconds); the
summary is fed a phase's files as gpu_check.sh leaves them, one step of each outcome.
Nothing here needs a GPU or Triton.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from bench import gpu_smoke

ROOT = Path(__file__).resolve().parents[1]
ROW_KEYS = {"case", "backend", "dtype", "device", "batch", "nfe_dense", "nfe_compiled",
            "nfe_equal", "nfe_truth", "max_abs_dlogp", "rel_err", "rel_err_truth",
            "rel_err_dense_truth", "tol", "ok", "compile_s", "first_solve_s", "solve_ms",
            "dense_solve_ms", "backend_used", "layouts", "error"}


@pytest.fixture(scope="module")
def solve_json(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("smoke") / "solve-ref.json"
    rc = gpu_smoke.main(["solve", "--device", "cpu", "--backends", "ref", "--batch", "64",
                         "--out", str(out)])
    assert rc == 0, out.read_text()
    return out


def test_compiled_solve_matches_the_dense_model_in_both_dtypes(solve_json):
    doc = json.loads(solve_json.read_text())
    assert doc["schema"] == gpu_smoke.SCHEMA and doc["kind"] == "smoke_solve"
    assert doc["complete"] is True
    rows = doc["rows"]
    assert [r["dtype"] for r in rows] == ["float32", "float64"]
    for r in rows:
        assert set(r) == ROW_KEYS
        assert r["ok"] and r["error"] is None, r
        assert r["case"] == "toy/unstructured/0.3" and r["backend"] == "ref"
        assert r["nfe_compiled"] == r["nfe_dense"] > 0
        assert r["layouts"] and r["solve_ms"] > 0 and r["compile_s"] >= 0
    f32, f64 = rows
    assert f64["rel_err"] <= gpu_smoke.F64_TOL and f64["tol"] == gpu_smoke.F64_TOL
    assert f32["rel_err_truth"] <= f32["tol"]
    # 2 x the dense error plus a rounding floor well below 1e-3 (no step slack: same steps).
    assert 2 * f32["rel_err_dense_truth"] < f32["tol"] < 2 * f32["rel_err_dense_truth"] + 1e-3
    assert f32["nfe_truth"] > 0


def test_a_failed_solve_is_a_row_with_its_error(tmp_path):
    out = tmp_path / "solve.json"
    rc = gpu_smoke.main(["solve", "--device", "cpu", "--backends", "fortran", "--dtypes",
                         "float64", "--batch", "8", "--out", str(out)])
    assert rc == 1
    (row,) = json.loads(out.read_text())["rows"]
    assert row["ok"] is False and "fortran" in row["error"]


def _phase_dir(d: Path, solve_json: Path, *, killed: bool) -> Path:
    """The files of a smoke phase: steps.tsv, logs, versions, solve and bench JSON."""
    (d / "started").write_text("1700000000\n")
    steps = [
        ("versions", "0", "4", "30", ""),
        ("pytest-triton", "0", "71", "120", ""),
        ("solve-ref", "0", "12", "45", ""),
        ("cuda-build", "124" if killed else "0", "200", "200",
         "not built within its budget" if killed else "in the background"),
        ("pytest-cuda", "skip" if killed else "0", "0", "0", "not built" if killed else ""),
        ("bench", "137" if killed else "0", "90", "90", "providers dense_eager"),
    ]
    (d / "steps.tsv").write_text("".join("\t".join(s) + "\n" for s in steps))
    (d / "pytest-triton.log").write_text(
        "tests/test_engine_ops.py::test_x[triton] PASSED [ 50%]\n"
        "=========== 88 passed, 3 skipped, 2100 deselected in 65.20s (0:01:05) ===========\n")
    if not killed:
        (d / "pytest-cuda.log").write_text("== 40 passed, 1 deselected in 20.1s ==\n")
    (d / "versions.json").write_text(json.dumps(
        {"gpu": "NVIDIA H200", "gpu_capability": "sm_90", "torch": "2.11.0", "cuda": "13.0",
         "triton": "3.5.0", "nvidia_smi": "NVIDIA H200, 570.00, 143771 MiB, 1980 MHz",
         "missing": {}}))
    (d / solve_json.name).write_text(solve_json.read_text())
    (d / "bench").mkdir()
    rows = [{"case": "toy/unstructured/0.3", "provider": p, "metric": m, "median_ms": ms,
             "speedup": sp, "rel_err": 0.0, "backend": b, "first_ms": 900.0, "error": None}
            for p, m, ms, sp, b in (("torch.mm", "roofline", 0.01, None, None),
                                    ("dense_eager", "f_div", 0.5, 1.0, None),
                                    ("sparsekern_triton", "f_div", 0.1, 5.0, "triton"))]
    if killed:
        rows.append({"case": "toy/unstructured/0.3", "provider": "sparsekern_cuda",
                     "metric": "f_div", "median_ms": None, "error": "RuntimeError: x | y"})
    (d / "bench" / "results.json").write_text(json.dumps(
        {"schema": 1, "meta": {"complete": not killed, "skipped": {}}, "rows": rows}))
    return d


def test_summary_of_a_passing_phase(tmp_path, solve_json, capsys):
    d = _phase_dir(tmp_path, solve_json, killed=False)
    assert gpu_smoke.main(["summary", "--dir", str(d)]) == 0
    printed = capsys.readouterr().out
    doc = json.loads((d / "smoke.json").read_text())
    assert (d / "smoke.md").read_text() == printed
    assert doc["schema"] == gpu_smoke.SCHEMA and doc["kind"] == "gpu_smoke" and doc["ok"]
    assert doc["total_s"] > 0 and doc["versions"]["gpu"] == "NVIDIA H200"
    assert [s["status"] for s in doc["steps"]] == ["ok"] * 6
    triton = doc["steps"][1]
    assert triton["pytest"]["finished"] and triton["pytest"]["counts"] == {
        "passed": 88, "skipped": 3, "deselected": 2100}
    assert len(doc["solve"]) == 2 and all(r["ok"] for r in doc["solve"])
    assert {r["provider"] for r in doc["bench"]} == {"dense_eager", "sparsekern_triton"}
    assert doc["problems"] == []
    assert "torch 2.11.0, CUDA 13.0, Triton 3.5.0" in printed
    assert "| step | status | seconds | limit s | detail |" in printed
    assert "| pytest-triton | ok | 71 | 120 | 88 passed, 3 skipped, 2100 deselected" in printed
    assert "| toy/unstructured/0.3 | sparsekern_triton | triton | 0.1 | 5.00 |" in printed
    assert printed.rstrip().endswith(")") and "smoke: PASS" in printed


def test_summary_of_a_phase_with_timeouts_and_skips(tmp_path, solve_json, capsys):
    d = _phase_dir(tmp_path, solve_json, killed=True)
    (d / "pytest-triton.log").write_text(
        "tests/test_cuda_build.py::TestOnGpu::test_sparse_ops[1-0.0-float32-triton] PASSED\n"
        "tests/test_cuda_build.py::TestOnGpu::test_sparse_ops[1-0.5-float32-triton] FAILED\n"
        "tests/test_cuda_build.py::TestOnGpu::test_sparse_ops[1-0.9-float32-triton] PASSED\n")
    with open(d / "steps.tsv", "a") as f:
        f.write("pytest-nothing\t0\t3\t60\t\n")
    (d / "pytest-nothing.log").write_text("==== 2000 deselected in 3.00s ====\n")
    assert gpu_smoke.main(["summary", "--dir", str(d)]) == 1
    printed = capsys.readouterr().out
    doc = json.loads((d / "smoke.json").read_text())
    status = {s["name"]: s["status"] for s in doc["steps"]}
    assert status == {"versions": "ok", "pytest-triton": "ok", "solve-ref": "ok",
                      "cuda-build": "timeout", "pytest-cuda": "skipped", "bench": "timeout",
                      "pytest-nothing": "failed"}  # a selection that ran no test fails
    killed = doc["steps"][1]["pytest"]
    assert not killed["finished"] and killed["counts"] == {"passed": 2, "failed": 1}
    assert "stopped before the end: 2 passed, 1 failed" in printed
    assert "(the bench stopped before its last case)" in printed
    assert "error: RuntimeError: x / y" in printed  # a | would break the table
    assert doc["problems"] == ["step cuda-build: timeout", "step bench: timeout",
                               "step pytest-nothing: failed",
                               "bench toy/unstructured/0.3 sparsekern_cuda: RuntimeError: x | y"]
    assert "- step bench: timeout" in printed
    assert "smoke: FAIL" in printed and not doc["ok"]


def test_summary_of_an_empty_folder_fails_but_writes_its_files(tmp_path, capsys):
    assert gpu_smoke.main(["summary", "--dir", str(tmp_path)]) == 1
    assert json.loads((tmp_path / "smoke.json").read_text())["steps"] == []
    assert "smoke: FAIL" in capsys.readouterr().out


def test_the_bench_wrapper_never_starts_a_cuda_build(monkeypatch):
    import bench.cli
    from sparsekern.backends import cuda

    def build():
        raise AssertionError("the smoke bench started a CUDA build")

    monkeypatch.setattr(cuda, "available", build)
    monkeypatch.setattr(cuda, "is_built", lambda: False)
    seen = []
    monkeypatch.setattr(bench.cli, "main", lambda argv: seen.append(argv) or int(
        cuda.available()))
    assert gpu_smoke.main(["bench", "--", "--cases", "toy"]) == 0
    assert seen == [["--cases", "toy"]]
    assert cuda.available is build  # restored


def test_gpu_check_script_parses_and_lists_the_smoke_phase():
    script = ROOT / "bench" / "gpu_check.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    usage = subprocess.run(["bash", str(script)], capture_output=True, text=True)
    assert usage.returncode == 2
    assert "gpu_check.sh smoke" in usage.stdout and "SMOKE_DEVICE=cpu" in usage.stdout
