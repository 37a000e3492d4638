import dataclasses
import json
import subprocess
import sys
import typing

import pytest
import torch

import flows.pipeline as pipeline
from flows.pipeline import (
    Task,
    build_config,
    build_model,
    load_cycle_model,
    load_run_data,
    run_cycle,
    run_pipeline,
)
from flows.presets import PRESETS, get_preset, load_config_file, parse_assignment
from flows.prune import alive_neurons, prunable_layers
from flows.run_config import RUN_DEFAULTS, PruneSettings, RunConfig
from flows.rundir import RESULT_FIELDS
from flows.settings import SCHEMA, SettingError

TINY = {
    "data": {"n_train": 256, "n_val": 64, "n_test": 64},
    "model": {"hidden": [8, 8], "atol": 1e-3, "rtol": 1e-3},
    "train": {"batch_size": 64},
}


def tiny(dataset="gaussians", **run):
    over = {k: dict(v) for k, v in TINY.items()}
    over["run"] = {"iters": 8, "cycles": 2, "speedup_steps": 0, **run}
    over["prune"] = {"prune_ratio": 0.3}
    return build_config(dataset, over)


def strip(rows):
    drop = {"seconds", "prepare_seconds", "train_seconds", "eval_seconds", "step_seconds_dense",
            "step_seconds_compiled", "speedup", "per_rank"}
    return [{k: v for k, v in r.items() if k not in drop} for r in rows]


@pytest.mark.parametrize("method", ["unstructured", "structured"])
def test_pipeline_rows_checkpoints_and_report(tmp_path, method):
    rows = run_pipeline(tiny(method=method), tmp_path, progress=False)
    assert [r["cycle"] for r in rows] == [0, 1, 2]
    for r in rows:
        assert set(RESULT_FIELDS) <= set(r)
        assert all(torch.isfinite(torch.tensor(r[k])) for k in ("train_nll", "val_nll", "test_nll"))
        assert r["nfe_forward"] > 0 and r["nfe_backward"] > 0  # adjoint, as in Table S1
    nz = [r["nonzero_params"] for r in rows]
    assert nz[0] > nz[1] > nz[2]
    assert rows[0]["prune_ratio"] == 0
    if method == "unstructured":
        assert [r["kept_fraction"] for r in rows] == pytest.approx([1, 0.7, 0.49], abs=0.01)
    else:
        model, _, _ = load_cycle_model(tmp_path, 2)
        first = prunable_layers(model)[0][1]
        assert int(alive_neurons(first).sum()) == 8 - 2 - 2  # round(0.3*8), round(0.3*6)
    for k in range(3):
        assert (tmp_path / "checkpoints" / f"cycle_{k:03d}.pt").is_file()
    assert not list((tmp_path / "checkpoints").glob("train_cycle_*"))
    assert json.loads((tmp_path / "results.json").read_text()) == rows
    md = (tmp_path / "results.md").read_text()
    assert "| cycle |" in md and md.count("\n| ") >= 4
    assert (tmp_path / "plots" / "nll_vs_prune_ratio.png").stat().st_size > 1000
    assert (tmp_path / "plots" / "density_per_cycle.png").stat().st_size > 1000


def test_pruned_weights_of_a_cycle_are_zero_in_its_checkpoint(tmp_path):
    run_pipeline(tiny(cycles=1), tmp_path, progress=False, plots=False)
    model, _, _ = load_cycle_model(tmp_path, 1)
    for _, m in prunable_layers(model):
        assert torch.all(m.weight[m.weight_mask == 0] == 0)
        assert (m.weight_mask == 0).any()


@pytest.mark.parametrize("kill_at", ["between_cycles", "inside_cycle"])
def test_interrupted_run_resumes_to_the_same_results(tmp_path, monkeypatch, kill_at):
    config = tiny(cycles=3)
    ref = run_pipeline(config, tmp_path / "ref", progress=False, plots=False)

    real_loss = pipeline.Task.loss
    calls = {"n": 0}
    # Cycles 0 and 1 take 8 steps each; die in cycle 2 before or after its first checkpoint.
    die_at = 17 if kill_at == "between_cycles" else 8 + 8 + 5

    def dying_loss(self, model, batch):
        calls["n"] += 1
        if calls["n"] == die_at:
            raise KeyboardInterrupt
        return real_loss(self, model, batch)

    monkeypatch.setattr(pipeline.Task, "loss", dying_loss)
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(config, tmp_path / "run", progress=False, plots=False)
    monkeypatch.setattr(pipeline.Task, "loss", real_loss)
    assert len(json.loads((tmp_path / "run" / "results.json").read_text())) == 2
    torch.manual_seed(999)
    resumed = run_pipeline(config, tmp_path / "run", resume=True, progress=False, plots=False)
    assert strip(resumed) == strip(ref)


def test_a_finished_run_is_not_overwritten_or_resumed_with_other_settings(tmp_path):
    run_pipeline(tiny(cycles=0), tmp_path, progress=False, plots=False)
    with pytest.raises(FileExistsError, match="--resume"):
        run_pipeline(tiny(cycles=0), tmp_path, progress=False, plots=False)
    with pytest.raises(ValueError, match="different configuration"):
        run_pipeline(tiny(cycles=0, seed=3), tmp_path, resume=True, progress=False, plots=False)


def test_early_stopping_when_validation_stops_improving(tmp_path, monkeypatch):
    real = pipeline.Task.evaluate
    val_by_cycle = iter([5.0, 4.0, 4.5, 4.6, 4.7, 4.8])

    def scripted(self, model, split, limit=None):
        out = real(self, model, split, limit)
        if split == "val":
            out["nll"] = next(val_by_cycle)
        return out

    monkeypatch.setattr(pipeline.Task, "evaluate", scripted)
    rows = run_pipeline(tiny(cycles=5, patience=2), tmp_path, progress=False, plots=False)
    # Best at cycle 1; cycles 2 and 3 do not improve on it: stop after cycle 3.
    assert [r["cycle"] for r in rows] == [0, 1, 2, 3]


def test_every_cycle_trains_with_a_fresh_optimizer(tmp_path, monkeypatch):
    import flows.train

    made = []
    real = flows.train.make_optimizer

    def recording(params, config):
        opt = real(params, config)
        made.append((opt, [len(s) for s in opt.state.values()]))
        return opt

    monkeypatch.setattr(flows.train, "make_optimizer", recording)
    run_pipeline(tiny(cycles=2), tmp_path, progress=False, plots=False)
    assert len(made) == 3  # the warm start and two retrain cycles
    assert len({id(opt) for opt, _ in made}) == 3
    # Each starts without moments, with the preset's learning rate.
    assert all(state == [] for _, state in made)
    lrs = [opt.param_groups[0]["initial_lr" if "initial_lr" in opt.param_groups[0] else "lr"]
           for opt, _ in made]
    assert lrs == [lrs[0]] * 3
    # ...and trained: moments exist by the end of each cycle.
    assert all(len(opt.state) > 0 for opt, _ in made)


def test_target_ratio_stops_the_run(tmp_path):
    rows = run_pipeline(tiny(cycles=10, target_ratio=0.5), tmp_path, progress=False, plots=False)
    assert rows[-1]["prune_ratio"] >= 0.5 > rows[-2]["prune_ratio"]


def test_moons_classifier_pipeline_reports_accuracy(tmp_path):
    config = build_config(
        "moons",
        {
            "data": {"n_train": 256, "n_val": 64, "n_test": 64},
            "model": {"hidden": [32]},
            "run": {"iters": 80, "cycles": 1},
        },
    )
    rows = run_pipeline(config, tmp_path, progress=False)
    assert rows[0]["test_accuracy"] > 0.75  # chance is 0.5
    for r in rows:
        assert r["nfe_forward"] > 0 and r["nfe_backward"] > 0  # the classifier's block counts
    assert {"train_accuracy", "val_accuracy"} <= set(rows[1])
    assert (tmp_path / "plots" / "nll_vs_prune_ratio.png").is_file()


def test_presets_hold_the_papers_hyperparameters():
    g = get_preset("gaussians")
    assert g["model"]["hidden"] == [128] and g["model"]["activation"] == "sigmoid"
    assert (g["train"]["optimizer"], g["train"]["lr"], g["train"]["weight_decay"]) == (
        "adamw",
        5e-3,
        1e-5,
    )
    assert (g["model"]["atol"], g["model"]["adjoint"], g["prune"]["prune_ratio"]) == (
        1e-5,
        True,
        0.1,
    )
    s = get_preset("gaussianspiral")
    assert s["model"]["hidden"] == [64, 64, 64] and s["train"]["lr"] == 5e-2
    assert s["train"]["weight_decay"] == 1e-2
    m = get_preset("moons")
    assert m["task"] == "classification" and m["model"]["activation"] == "tanh"
    assert (m["train"]["optimizer"], m["train"]["batch_size"], m["model"]["rtol"]) == (
        "adam",
        128,
        1e-4,
    )
    p = get_preset("power")
    assert p["train"]["lr_milestones"] == [90, 97] and p["prune"]["prune_ratio"] == 0.25
    assert (p["model"]["atol"], p["model"]["rtol"], p["model"]["blocks"]) == (1e-8, 1e-6, 5)
    assert get_preset("miniboone")["model"]["hidden"] == [860, 860]
    assert get_preset("hepmass")["prune"]["prune_ratio"] == 0.22
    assert get_preset("mnist")["train"]["batch_size"] == 200
    # FFJORD's train_tabular: time_length 0.5, train_T.
    for name in ("power", "gas", "hepmass", "miniboone", "bsds300"):
        model = get_preset(name)["model"]
        assert (model["T"], model["train_T"]) == (0.5, True), name
    assert {
        "gaussians",
        "gaussianspiral",
        "spiral",
        "moons",
        "power",
        "gas",
        "hepmass",
        "miniboone",
        "bsds300",
        "mnist",
        "cifar10",
    } <= set(PRESETS)


def test_overrides_from_files_and_assignments(tmp_path):
    f = tmp_path / "over.yaml"
    f.write_text("train:\n  lr: 0.001\nmodel:\n  hidden: [32, 32]\n")
    config = build_config("gaussians", load_config_file(f))
    assert config["train"]["lr"] == 1e-3 and config["model"]["hidden"] == [32, 32]
    assert parse_assignment("model.hidden=[4,4]") == {"model": {"hidden": [4, 4]}}
    assert parse_assignment("run.method=structured") == {"run": {"method": "structured"}}
    with pytest.raises(ValueError, match=r"unknown setting 'train\.learning_rate'"):
        build_config("gaussians", {"train": {"learning_rate": 1}})
    with pytest.raises(ValueError, match=r"run\.method='magnitude'"):
        build_config("gaussians", {"run": {"method": "magnitude"}})
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_assignment("train.lr")


def test_budget_scales_epochs_and_lr_milestones():
    config = build_config("power", {"run": {"budget": 0.1}})
    cfg = pipeline.train_config(config, n_train=100000, cycle=0)
    assert cfg.iters == round(100 * 10 * 0.1)
    assert cfg.lr_milestones == (90, 97)


# ---------------------------------------------------------------- structure (issue 15)

ROW_KEYS = [
    "cycle", "prune_ratio", "kept_fraction", "nonzero_params", "total_params", "empty_layers",
    "train_nll",
    "val_nll", "test_nll", "nfe_forward", "nfe_backward", "seconds", "prepare_seconds",
    "train_seconds", "eval_seconds", "iters", "kernels", "step_seconds_dense",
    "step_seconds_compiled", "speedup", "step_nfe_dense", "step_nfe_compiled", "world_size",
    "per_rank", "not_compiled",
]


def test_run_cycle_returns_the_row_run_pipeline_writes(tmp_path):
    config = tiny(cycles=0, iters=2, speedup_steps=1)
    rows = run_pipeline(config, tmp_path, progress=False, plots=False)
    # The same cycle again, outside the loop: the pipeline seeds the initial weights
    # with the run's seed, and run_cycle seeds the cycle itself.
    settings = RunConfig.from_dict(config)
    data = load_run_data(settings)
    torch.manual_seed(settings.run.seed)
    model = build_model(settings, data)
    row, history = run_cycle(model, settings, Task(settings, data), 0)
    assert list(row) == ROW_KEYS == list(rows[0])
    assert len(history) == row["iters"] == 2
    assert strip([row]) == strip(rows)
    # A later cycle prunes first; the model is pruned and trained in place.
    row1 = run_cycle(model, settings, Task(settings, data), 1).row
    assert row1["cycle"] == 1 and row1["kept_fraction"] == pytest.approx(0.7, abs=0.01)
    assert row1["nonzero_params"] < row["nonzero_params"]


@pytest.mark.parametrize("dataset", sorted(PRESETS))
def test_run_config_round_trips_every_preset(dataset):
    d = build_config(dataset)
    config = RunConfig.from_dict(d)
    assert config.to_dict() == d
    # ...key for key in the same order, so config.json is written as before.
    assert json.dumps(config.to_dict(), indent=2) == json.dumps(d, indent=2)
    assert RunConfig.from_dict(json.loads(json.dumps(d))) == config  # as read back
    assert config.run.to_dict() == dict(RUN_DEFAULTS, dataset=dataset)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.run.cycles = 3


def test_run_config_string_options_are_the_schemas_choices():
    for section in ("model", "train", "run"):
        kind = typing.get_type_hints(RunConfig)[section]
        for name, hint in typing.get_type_hints(kind).items():
            spec = SCHEMA[f"{section}.{name}"]
            if spec.kind != "choice":
                continue
            if typing.get_origin(hint) is not typing.Literal:  # Literal[...] | None
                hint = next(a for a in typing.get_args(hint) if a is not type(None))
            assert typing.get_origin(hint) is typing.Literal, name
            assert set(typing.get_args(hint)) == set(spec.choices), name
    assert set(typing.get_args(typing.get_type_hints(RunConfig)["task"])) == set(
        SCHEMA["task"].choices
    )


def test_run_config_rejects_a_wrong_type_naming_the_setting():
    d = build_config("gaussians")
    for section, key, value, expected in [
        ("train", "lr", "abc", r"train\.lr='abc' is invalid: expected a number > 0"),
        ("run", "cycles", 1.5, r"run\.cycles=1\.5 .*expected an integer >= 0"),
        ("model", "hidden", "8", r"model\.hidden='8' is invalid"),
        ("run", "kernels", "sparse", r"run\.kernels='sparse' .*expected one of"),
    ]:
        bad = json.loads(json.dumps(d))
        bad[section][key] = value
        with pytest.raises(SettingError, match=expected):
            RunConfig.from_dict(bad)
    del d["train"]["lr"]
    with pytest.raises(ValueError, match=r"lacks setting 'train\.lr'"):
        RunConfig.from_dict(d)
    # Every RunConfig is checked, also one made by replacing a section.
    config = RunConfig.from_dict(build_config("gaussians"))
    with pytest.raises(SettingError, match=r"prune\.prune_ratio=1\.5"):
        dataclasses.replace(config, prune=PruneSettings(prune_ratio=1.5))


@pytest.mark.parametrize(
    ("module", "absent"), [("flows.pipeline", "flows.report"), ("flows.report", "flows.pipeline")]
)
def test_pipeline_and_report_do_not_import_each_other(module, absent):
    code = f"import sys, {module}; print({absent!r} in sys.modules, 'flows.rundir' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "True"]
