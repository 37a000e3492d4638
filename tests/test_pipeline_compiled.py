"""Train-prune-retrain on compiled kernels: same results as the dense masked model."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from flows.cli import main
from flows.engine import compile_for_training
from flows.pipeline import Task, build_config, build_model, load_run_data, run_pipeline
from flows.prune import prunable_layers, prune_
from flows.train import TrainConfig, fit
from sparsekern import FusedMLP, compiled_fields, write_back

TINY = {
    "data": {"n_train": 512, "n_val": 128, "n_test": 128},
    "model": {"hidden": [32, 32]},
    "train": {"batch_size": 128},
}


def _config(dataset="gaussians", **run):
    over = {k: dict(v) for k, v in TINY.items()}
    over["run"] = {"iters": 6, "cycles": 2, **run}
    over["prune"] = {"prune_ratio": 0.5}
    return build_config(dataset, over)


@pytest.mark.parametrize("method", ["unstructured", "structured"])
def test_first_20_retraining_steps_match_the_dense_model_in_float64(method):
    config = _config(method=method, dtype="float64")
    data = load_run_data(config)
    task = Task(config, data)
    torch.manual_seed(0)
    model = build_model(config, data)
    prune_(model, 0.5, method)
    prune_(model, 0.5, method)  # a cycle deep into pruning: dead and unread neurons appear
    dense = copy.deepcopy(model)
    work, not_compiled = compile_for_training(model)
    assert not_compiled == [] and isinstance(work.odenet, FusedMLP)
    cfg = TrainConfig(iters=20, batch_size=128, lr=5e-3, seed=7)
    torch.manual_seed(1)
    h_dense = fit(dense, task.loss, task.train_tensors, cfg, progress=False)
    torch.manual_seed(1)
    h_comp = fit(work, task.loss, task.train_tensors, cfg, progress=False)
    losses_dense = torch.tensor([h["train_loss"] for h in h_dense], dtype=torch.float64)
    losses_comp = torch.tensor([h["train_loss"] for h in h_comp], dtype=torch.float64)
    assert len(losses_comp) == 20
    rel = ((losses_comp - losses_dense).abs() / losses_dense.abs()).max().item()
    assert rel <= 1e-8, f"largest relative loss difference {rel:.2e}"
    assert [h["nfe_forward"] for h in h_comp] == [h["nfe_forward"] for h in h_dense]
    # The trained kept values, written back, are the dense model's (pruned places stay 0).
    write_back(work)
    for (_, a), (_, b) in zip(prunable_layers(model), prunable_layers(dense), strict=True):
        assert torch.allclose(a.weight, b.weight, rtol=1e-8, atol=1e-10)
        assert torch.count_nonzero(a.weight[a.weight_mask == 0]) == 0


def test_a_small_float32_run_ends_where_the_dense_run_does(tmp_path):
    """Same seed, float32: the compiled run's NLLs stay within noise of the dense run's.

    The two runs differ only in float32 summation order, which 3 cycles of
    training amplify; the NLLs of every cycle must agree to 0.1%.
    """
    rows = {}
    for kernels in ("dense", "compiled"):
        rows[kernels] = run_pipeline(_config(kernels=kernels, cycles=3, speedup_steps=0),
                                     tmp_path / kernels, progress=False, plots=False)
    dense, comp = rows["dense"], rows["compiled"]
    assert [r["nonzero_params"] for r in comp] == [r["nonzero_params"] for r in dense]
    for a, b in zip(comp, dense, strict=True):
        for key in ("train_nll", "val_nll", "test_nll"):
            assert a[key] == pytest.approx(b[key], rel=1e-3), (key, a["cycle"], a[key], b[key])
    assert all(r["kernels"] == "compiled" and r["not_compiled"] == [] for r in comp)
    assert all(r["kernels"] == "dense" and "not_compiled" not in r for r in dense)


def test_rows_and_report_show_the_measured_speedup(tmp_path):
    rows = run_pipeline(_config(cycles=1, speedup_steps=2), tmp_path, progress=False,
                        plots=False)
    for r in rows:
        assert r["step_seconds_dense"] > 0 and r["step_seconds_compiled"] > 0
        assert r["speedup"] == pytest.approx(r["step_seconds_dense"] / r["step_seconds_compiled"])
        assert r["step_nfe_dense"] == pytest.approx(r["step_nfe_compiled"], rel=0.02)
        assert r["train_seconds"] > 0 and r["eval_seconds"] > 0 and r["prepare_seconds"] > 0
        assert r["seconds"] == pytest.approx(
            r["prepare_seconds"] + r["train_seconds"] + r["eval_seconds"])
    md = (tmp_path / "results.md").read_text()
    assert "speedup" in md and "compiled kernels" in md
    assert f"{rows[1]['speedup']:.2f}x" in md


def test_measuring_the_speedup_does_not_change_the_results(tmp_path):
    strip = {"seconds", "prepare_seconds", "train_seconds", "eval_seconds", "step_seconds_dense",
             "step_seconds_compiled", "speedup", "step_nfe_dense", "step_nfe_compiled",
             "per_rank"}
    a = run_pipeline(_config(cycles=1, speedup_steps=0), tmp_path / "a", progress=False,
                     plots=False)
    b = run_pipeline(_config(cycles=1, speedup_steps=2), tmp_path / "b", progress=False,
                     plots=False)
    assert [{k: v for k, v in r.items() if k not in strip} for r in a] == [
        {k: v for k, v in r.items() if k not in strip} for r in b
    ]


def test_image_flows_compile_with_nothing_left_dense(tmp_path):
    over = {
        "model": {"hidden": [4], "blocks": 1, "atol": 1e-3, "rtol": 1e-3},
        "train": {"batch_size": 16},
        "run": {"iters": 1, "cycles": 1, "speedup_steps": 0, "eval_samples": 16},
    }
    config = build_config("digits", over)
    rows = run_pipeline(config, tmp_path, progress=False, plots=False)
    assert rows[-1]["not_compiled"] == []
    assert rows[-1]["kernels"] == "compiled"
    md = (tmp_path / "results.md").read_text()
    assert "Not compiled (ran dense through PyTorch)" not in md


def test_cli_kernels_flag(tmp_path):
    out = tmp_path / "run"
    code = main(["prune", "--dataset", "gaussians", "--out", str(out), "--iters", "2",
                 "--cycles", "1", "--kernels", "dense", "--no-progress",
                 "--set", "data.n_train=256", "--set", "data.n_val=64",
                 "--set", "data.n_test=64", "--set", "model.hidden=[8]"])
    assert code == 0
    config = json.loads((out / "config.json").read_text())
    assert config["run"]["kernels"] == "dense"
    assert all(r["kernels"] == "dense" for r in json.loads((out / "results.json").read_text()))


def test_compiled_cycle_trains_kept_values_only():
    config = _config()
    data = load_run_data(config)
    torch.manual_seed(0)
    model = build_model(config, data)
    prune_(model, 0.5, "unstructured")
    work, _ = compile_for_training(model)
    kept = sum(int(m.weight_mask.sum()) for _, m in prunable_layers(model))
    biases = sum(m.bias.numel() for _, m in prunable_layers(model))
    assert sum(p.numel() for p in work.parameters()) == kept + biases
    assert len(compiled_fields(work)) == 1
