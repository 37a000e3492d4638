"""Bad input never ends in a traceback: one line on stderr, exit code 2, nothing written.

Settings (``--set``, ``--config``, every flag), files (checkpoints, results.json,
config.json, output paths, stale temporary files) and non-finite data.
"""

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flows.cli import build_parser, config_from_args, main

TINY = [
    "--set", "data.n_train=128",
    "--set", "data.n_val=32",
    "--set", "data.n_test=32",
    "--set", "model.hidden=[4]",
    "--set", "model.atol=1e-3",
    "--set", "model.rtol=1e-3",
    "--set", "train.batch_size=64",
    "--set", "run.speedup_steps=0",
    "--set", "run.eval_samples=32",
    "--kernels", "dense",
    "--no-progress",
]  # fmt: skip


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every path under root with its bytes (None for directories)."""
    return {
        str(p.relative_to(root)): (None if p.is_dir() else p.read_bytes())
        for p in sorted(root.rglob("*"))
    }


def one_error_line(capsys, *needles: str) -> str:
    """stderr holds exactly one line, naming every needle; no traceback."""
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def fails_cleanly(capsys, root: Path, argv: list[str], *needles: str) -> str:
    """main(argv) returns 2 with one error line naming needles and leaves root unchanged."""
    before = snapshot(root)
    capsys.readouterr()
    assert main(argv) == 2
    line = one_error_line(capsys, *needles)
    assert snapshot(root) == before
    return line


RUN = ["prune", "--cycles", "1", "--iters", "2", "--prune-ratio", "0.5"]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A tiny finished prune run (cycles 0 and 1); copy it before changing it."""
    out = tmp_path_factory.mktemp("runs") / "g"
    assert main([*RUN, "--out", str(out), *TINY]) == 0
    return out


@pytest.fixture
def run_copy(finished_run, tmp_path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(finished_run, dst)
    return dst


# ---------------------------------------------------------------- settings


@pytest.mark.parametrize(
    ("assignment", "needles"),
    [
        ("train.lr=abc", ["train.lr", "'abc'", "number > 0"]),
        ("train.lr=-0.1", ["train.lr", "-0.1", "number > 0"]),
        ("train.lr=NaN", ["train.lr", "nan", "number > 0"]),
        ("train.batch_size=10.5", ["train.batch_size", "10.5", "integer >= 1"]),
        ("train.batch_size=0", ["train.batch_size", "0", "integer >= 1"]),
        ("train.epochs=true", ["train.epochs", "True", "integer"]),
        ("model.adjoint=maybe", ["model.adjoint", "'maybe'", "true or false"]),
        ("model.adjoint=1", ["model.adjoint", "1", "true or false"]),
        ("model.atol=0", ["model.atol", "0", "> 0"]),
        ("model.hidden=[0]", ["model.hidden", "[0]", "integers >= 1"]),
        ("model.hidden=[]", ["model.hidden", "[]", "non-empty list"]),
        ("model.hidden=64", ["model.hidden", "64", "list"]),
        ("model.hidden=[8.5]", ["model.hidden", "[8.5]", "integers"]),
        ("model.solver=rk45", ["model.solver", "'rk45'", "dopri5"]),
        ("model.activation=relu6", ["model.activation", "'relu6'", "tanh"]),
        ("model.T=0", ["model.T", "0", "> 0"]),
        ("train.beta2=1", ["train.beta2", "1", "[0, 1)"]),
        ("train.weight_decay=-1", ["train.weight_decay", "-1", ">= 0"]),
        ("train.lr_milestones=[1.5]", ["train.lr_milestones", "integers"]),
        ("train.optimizer=sgd", ["train.optimizer", "'sgd'", "adam"]),
        ("run.target_ratio=1.5", ["run.target_ratio", "1.5", "(0, 1)"]),
        ("run.patience=0", ["run.patience", "0", ">= 1", "null"]),
        ("run.eval_samples=0", ["run.eval_samples", "integer >= 1"]),
        ("run.data_root=5", ["run.data_root", "5", "path"]),
        ("task=classification", ["task", "'classification'", "'density'"]),
        ("run.dataset=spiral", ["run.dataset", "'spiral'", "--dataset"]),
        ("train.lr.x=1", ["train.lr", "{'x': 1}", "number"]),
    ],
)
def test_bad_set_values_are_one_line_naming_key_value_and_expectation(
    tmp_path, capsys, assignment, needles
):
    out = tmp_path / "out"
    argv = ["prune", "--out", str(out), "--iters", "1", "--cycles", "0", *TINY, "--set", assignment]
    fails_cleanly(capsys, tmp_path, argv, *needles)
    assert not out.exists()


@pytest.mark.parametrize(
    ("flags", "needles"),
    [
        (["--cycles", "-1"], ["--cycles", "'-1'", "integer >= 0"]),
        (["--cycles", "2.5"], ["--cycles", "'2.5'", "integer"]),
        (["--iters", "0"], ["--iters", "'0'", "integer >= 1"]),
        (["--prune-ratio", "1.0"], ["--prune-ratio", "'1.0'", "(0, 1)"]),
        (["--prune-ratio", "nan"], ["--prune-ratio", "'nan'", "(0, 1)"]),
        (["--budget", "0"], ["--budget", "'0'", "> 0"]),
        (["--target-ratio", "0"], ["--target-ratio", "(0, 1)"]),
        (["--patience", "0"], ["--patience", ">= 1"]),
        (["--seed", "-3"], ["--seed", "'-3'", "integer in [0, "]),
        (["--threads", "0"], ["--threads", "'0'", "integer >= 1"]),
        (["--method", "magnitude"], ["--method", "'magnitude'"]),
        (["--bogus"], ["--bogus"]),
    ],
)
def test_bad_run_flags_are_one_line_naming_the_flag(tmp_path, capsys, flags, needles):
    out = tmp_path / "out"
    quick = ["--iters", "1", "--cycles", "0", *TINY]  # were a bad flag accepted, a short run
    fails_cleanly(capsys, tmp_path, ["prune", "--out", str(out), *quick, *flags], *needles)
    assert not out.exists()


@pytest.mark.parametrize(
    ("argv", "needles"),
    [
        (["sample", "-n", "0"], ["-n", "'0'", "integer >= 1"]),
        (["sample", "-n", "ten"], ["-n", "'ten'", "integer"]),
        (["eval", "--cycle", "-1"], ["--cycle", "'-1'", "integer >= 0"]),
        (["analyze", "hessian", "--samples", "0"], ["--samples", "'0'", ">= 1"]),
        (["analyze", "hessian", "--power-iters", "0"], ["--power-iters", ">= 1"]),
        (["analyze", "hessian", "--tol", "-0.001"], ["--tol", "'-0.001'", ">= 0"]),
        (["analyze", "hessian", "--tol", "inf"], ["--tol", "'inf'"]),
        (["analyze", "hessian", "--trace-samples", "1"], ["--trace-samples", ">= 2"]),
        (["analyze", "hessian", "--lanczos-steps", "1"], ["--lanczos-steps", ">= 2"]),
        (["analyze", "hessian", "--lanczos-tol", "-1"], ["--lanczos-tol", ">= 0"]),
        (["analyze", "hessian", "--repeats", "0"], ["--repeats", ">= 1"]),
        (["analyze", "hessian", "--seed", "-1"], ["--seed", "in [0, "]),
        (["analyze", "boundary", "--grid", "1"], ["--grid", "'1'", ">= 2"]),
    ],
)
def test_bad_flags_of_the_other_commands(tmp_path, capsys, argv, needles):
    argv = [*argv, "--run", str(tmp_path / "run")]
    if argv[0] == "sample":
        argv += ["--out", str(tmp_path / "s.pt")]
    fails_cleanly(capsys, tmp_path, argv, *needles)


@pytest.mark.parametrize(
    ("flags", "needles"),
    [
        (["--cycles", "-1"], ["--cycles", ">= 0"]),
        (["--iters", "0"], ["--iters", ">= 1"]),
        (["--prune-ratio", "0"], ["--prune-ratio", "(0, 1)"]),
        (["--threads", "-2"], ["--threads", ">= 1"]),
    ],
)
def test_bad_demo_flags(tmp_path, capsys, flags, needles):
    out = tmp_path / "demo"
    quick = ["--iters", "1", "--cycles", "0", "--no-progress"]
    fails_cleanly(capsys, tmp_path, ["demo", "--out", str(out), *quick, *flags], *needles)
    assert not out.exists()


def test_yaml_numbers_in_exponent_form_are_numbers(tmp_path):
    cfg = tmp_path / "over.yaml"
    cfg.write_text("train:\n  lr: 1e-3\n  weight_decay: 5E-6\n  batch_size: 64\nmodel:\n"
                   "  atol: .5e-4\n  hidden: [8, 8]\n")
    args = build_parser().parse_args(["prune", "--config", str(cfg), "--out", str(tmp_path)])
    config = config_from_args(args, pruning=True)
    assert config["train"]["lr"] == 1e-3 and isinstance(config["train"]["lr"], float)
    assert config["train"]["weight_decay"] == 5e-6
    assert config["model"]["atol"] == 0.5e-4
    assert config["train"]["batch_size"] == 64 and isinstance(config["train"]["batch_size"], int)
    assert config["model"]["hidden"] == [8, 8]


@pytest.mark.parametrize(
    ("name", "text", "needles"),
    [
        ("bad.yaml", "train:\n  batch_size: 10.5\n", ["train.batch_size", "10.5", "integer"]),
        ("bad.json", '{"model": {"adjoint": "maybe"}}', ["model.adjoint", "true or false"]),
        ("bad.yaml", "train: [lr\n", ["bad.yaml", "YAML"]),
        ("bad.json", '{"train": ', ["bad.json", "JSON"]),
        ("bad.json", "[1, 2]", ["bad.json", "mapping"]),
        ("bad.toml", "lr = 1", ["bad.toml", ".yaml"]),
        ("bad.yaml", "train:\n  lr: {a: 1}\n", ["train.lr", "number"]),
    ],
)
def test_bad_config_files(tmp_path, capsys, name, text, needles):
    cfg = tmp_path / name
    cfg.write_text(text)
    out = tmp_path / "out"
    argv = ["prune", "--config", str(cfg), "--out", str(out), "--iters", "1", "--cycles", "0"]
    fails_cleanly(capsys, tmp_path, argv, *needles)
    assert not out.exists()


def test_missing_config_file_or_a_directory(tmp_path, capsys):
    out = tmp_path / "out"
    missing = tmp_path / "nope.yaml"
    fails_cleanly(capsys, tmp_path, ["train", "--config", str(missing), "--out", str(out)],
                  str(missing), "not found")
    folder = tmp_path / "dir.yaml"
    folder.mkdir()
    fails_cleanly(capsys, tmp_path, ["train", "--config", str(folder), "--out", str(out)],
                  str(folder), "directory")


def test_every_preset_satisfies_the_schema_and_the_schema_covers_every_key():
    from flows.pipeline import build_config
    from flows.presets import PRESETS
    from flows.run_config import RUN_DEFAULTS
    from flows.settings import SCHEMA

    for name in PRESETS:
        config = build_config(name)
        for section, values in config.items():
            keys = values if isinstance(values, dict) else {None: values}
            for key in keys:
                full = section if key is None else f"{section}.{key}"
                assert full in SCHEMA, full
    assert {f"run.{k}" for k in RUN_DEFAULTS} <= set(SCHEMA)


def test_the_python_api_rejects_bad_settings_too():
    import dataclasses

    from flows.pipeline import build_config
    from flows.run_config import RunConfig
    from flows.settings import SettingError

    with pytest.raises(SettingError, match=r"train\.lr='abc'"):
        build_config("gaussians", {"train": {"lr": "abc"}})
    with pytest.raises(ValueError, match=r"model\.hidden"):
        build_config("gaussians", {"model": {"hidden": [8, -1]}})
    with pytest.raises(ValueError, match=r"run\.cycles"):
        checked = RunConfig.from_dict(build_config("gaussians"))
        dataclasses.replace(checked, run=dataclasses.replace(checked.run, cycles=1.5))
    config = build_config("gaussians", {"train": {"lr": 1}})  # ints are numbers
    assert config["train"]["lr"] == 1


def test_analysis_functions_check_their_arguments(tmp_path):
    from flows.analysis import HessianOperator, analyze_hessian, boundary_distances, lanczos
    from flows.analysis.hessian import power_iteration
    from flows.analysis.runs import boundary_over_run, hessian_over_run

    p = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))
    model = torch.nn.Module()
    model.p = p

    def loss():
        return (p**2).sum()

    op = HessianOperator(model, loss)
    with pytest.raises(ValueError, match="iters"):
        power_iteration(op, 0)
    with pytest.raises(ValueError, match="tol"):
        power_iteration(op, 5, tol=-1.0)
    with pytest.raises(ValueError, match="steps"):
        lanczos(op, 0)
    with pytest.raises(ValueError, match="lanczos_steps"):
        analyze_hessian(model, loss, lanczos_steps=1)
    with pytest.raises(ValueError, match="trace_samples"):
        analyze_hessian(model, loss, trace_samples=1)
    with pytest.raises(ValueError, match="lanczos_tol"):
        analyze_hessian(model, loss, lanczos_tol=math.nan)
    with pytest.raises(ValueError, match="n_grid"):
        boundary_distances(lambda x: x, torch.zeros(2, 2), lim=1.0, n_grid=1)
    # Checked before the run directory is even looked at.
    with pytest.raises(ValueError, match="samples=0"):
        hessian_over_run(tmp_path / "nothing", samples=0)
    with pytest.raises(ValueError, match="n_grid"):
        boundary_over_run(tmp_path / "nothing", n_grid=0)


def test_eval_of_a_cycle_the_run_does_not_have(finished_run, capsys):
    fails_cleanly(capsys, finished_run, ["eval", "--run", str(finished_run), "--cycle", "7"],
                  str(finished_run), "no finished cycle 7", "0, 1")


# ---------------------------------------------------------------- files


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("command", ["eval", "sample", "hessian", "resume"])
def test_truncated_checkpoint_is_one_line_naming_the_file(run_copy, tmp_path, capsys, command):
    ckpt = run_copy / "checkpoints" / "cycle_001.pt"
    _truncate(ckpt)
    argv = {
        "eval": ["eval", "--run", str(run_copy)],
        "sample": ["sample", "--run", str(run_copy), "--out", str(tmp_path / "s.pt")],
        "hessian": ["analyze", "hessian", "--run", str(run_copy), "--samples", "8",
                    "--power-iters", "2", "--trace-samples", "2", "--lanczos-steps", "2",
                    "--repeats", "1", "--no-progress"],
        "resume": [*RUN, "--out", str(run_copy), "--resume", *TINY],
    }[command]
    fails_cleanly(capsys, tmp_path, argv, str(ckpt), "truncated or corrupt")


def test_truncated_in_cycle_checkpoint_is_reported_before_resuming(run_copy, tmp_path, capsys):
    # Make the run look killed inside cycle 1, with a damaged in-cycle checkpoint.
    rows = json.loads((run_copy / "results.json").read_text())
    (run_copy / "results.json").write_text(json.dumps(rows[:1]))
    (run_copy / "checkpoints" / "cycle_001.pt").unlink()
    partial = run_copy / "checkpoints" / "train_cycle_001.pt"
    partial.write_bytes((run_copy / "checkpoints" / "cycle_000.pt").read_bytes()[:100])
    argv = [*RUN, "--out", str(run_copy), "--resume", *TINY]
    fails_cleanly(capsys, tmp_path, argv, str(partial), "truncated or corrupt")


def test_checkpoint_with_nan_weights_is_reported_when_loaded(run_copy, tmp_path, capsys):
    ckpt = run_copy / "checkpoints" / "cycle_001.pt"
    state = torch.load(ckpt, weights_only=False)
    name = next(k for k in state["model"] if k.endswith("weight"))
    state["model"][name] = torch.full_like(state["model"][name], math.nan)
    torch.save(state, ckpt)
    fails_cleanly(capsys, tmp_path, ["eval", "--run", str(run_copy)], str(ckpt), "non-finite")
    argv = ["sample", "--run", str(run_copy), "--out", str(tmp_path / "s.pt")]
    fails_cleanly(capsys, tmp_path, argv, str(ckpt), "non-finite", name)


def test_checkpoint_of_another_model_is_reported(run_copy, tmp_path, capsys):
    ckpt = run_copy / "checkpoints" / "cycle_001.pt"
    torch.save({"model": {"bogus": torch.zeros(1)}}, ckpt)
    fails_cleanly(capsys, tmp_path, ["eval", "--run", str(run_copy)], str(ckpt), "config.json")
    torch.save([1, 2, 3], ckpt)
    fails_cleanly(capsys, tmp_path, ["eval", "--run", str(run_copy)], str(ckpt))


def test_load_checkpoint_raises_checkpoint_error(tmp_path):
    from flows.checkpoint import CheckpointError, load_checkpoint, save_atomic

    path = save_atomic({"model": {"w": torch.ones(100)}}, tmp_path / "c.pt")
    _truncate(path)
    with pytest.raises(CheckpointError, match="truncated or corrupt") as info:
        load_checkpoint(path)
    assert isinstance(info.value, ValueError) and info.value.path == path
    assert "\n" not in str(info.value)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        load_checkpoint(tmp_path / "missing.pt")


@pytest.mark.parametrize("name", ["results.json", "config.json"])
@pytest.mark.parametrize("damage", ["truncate", "shape", "directory"])
def test_damaged_run_files_are_one_line_naming_the_file(run_copy, tmp_path, capsys, name, damage):
    path = run_copy / name
    if damage == "truncate":
        _truncate(path)
    elif damage == "shape":
        path.write_text('"just a string"')
    else:
        path.unlink()
        path.mkdir()
    for argv in (
        ["eval", "--run", str(run_copy)],
        ["report", str(run_copy), "--out", str(tmp_path / "rep")],
        ["analyze", "field", "--run", str(run_copy), "--no-progress"],
        [*RUN, "--out", str(run_copy), "--resume", *TINY],
    ):
        fails_cleanly(capsys, tmp_path, argv, str(path))
    assert not (tmp_path / "rep").exists()


def test_config_json_with_a_bad_value_names_the_key_and_file(run_copy, tmp_path, capsys):
    path = run_copy / "config.json"
    config = json.loads(path.read_text())
    config["train"]["lr"] = "abc"
    path.write_text(json.dumps(config))
    fails_cleanly(capsys, tmp_path, ["eval", "--run", str(run_copy)], str(path), "train.lr")
    del config["train"]["lr"]
    path.write_text(json.dumps(config))
    fails_cleanly(capsys, tmp_path, ["eval", "--run", str(run_copy)], str(path), "train.lr")


def test_results_row_without_its_fields_names_the_file(run_copy, tmp_path, capsys):
    path = run_copy / "results.json"
    path.write_text(json.dumps([{"cycle": 0}]))
    fails_cleanly(capsys, tmp_path, ["report", str(run_copy), "--out", str(tmp_path / "r")],
                  str(path), "val_nll")


def test_out_below_a_regular_file(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    out = blocker / "run"
    fails_cleanly(capsys, tmp_path, ["train", "--iters", "2", "--out", str(out), *TINY],
                  str(blocker), "not a directory")
    fails_cleanly(capsys, tmp_path, ["train", "--iters", "2", "--out", str(blocker), *TINY],
                  str(blocker), "not a directory")
    fails_cleanly(capsys, tmp_path, ["demo", "--out", str(out)], str(blocker), "not a directory")


def test_out_in_a_read_only_directory(tmp_path, capsys, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir()
    real = os.access

    def access(path, mode, *args, **kwargs):
        if Path(path) == locked and mode & os.W_OK:
            return False
        return real(path, mode, *args, **kwargs)

    monkeypatch.setattr(os, "access", access)
    out = locked / "a" / "run"
    fails_cleanly(capsys, tmp_path, ["train", "--iters", "2", "--out", str(out), *TINY],
                  str(locked), "not writable")


def test_sample_out_problems(finished_run, tmp_path, capsys):
    folder = tmp_path / "folder.pt"
    folder.mkdir()
    run = str(finished_run)
    fails_cleanly(capsys, tmp_path, ["sample", "--run", run, "--out", str(folder)],
                  str(folder), "directory")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    fails_cleanly(capsys, tmp_path, ["sample", "--run", run, "--out", str(blocker / "s.pt")],
                  str(blocker), "not a directory")
    fails_cleanly(capsys, tmp_path, ["sample", "--run", run, "--out", str(tmp_path / "s.txt")],
                  "s.txt", ".png", ".pt")


def test_report_out_below_a_file(finished_run, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    fails_cleanly(capsys, tmp_path, ["report", str(finished_run), "--out", str(blocker / "r")],
                  str(blocker), "not a directory")


KILLED_WRITER = """
import os, sys
from flows import checkpoint

def write(f):
    f.write("half a file")
    f.flush()
    os._exit(9)  # killed mid-write: no cleanup runs

checkpoint._write_atomic(sys.argv[1], "w", write)
"""


def _killed_write(path: Path) -> None:
    subprocess.run([sys.executable, "-c", KILLED_WRITER, str(path)], check=False)


def test_interrupted_writes_leave_no_temporary_files_after_the_next_run(tmp_path):
    from flows.checkpoint import stale_temp_files

    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    _killed_write(out / "results.json")
    _killed_write(out / "checkpoints" / "cycle_000.pt")
    left = sorted(p.name for p in out.rglob("*") if p.is_file())
    assert len(left) == 2 and all(n.endswith(".tmp") for n in left), left
    assert len(stale_temp_files(out)) == 1
    # A temporary file of a live writer (this process) is not touched.
    live = out / f".results.json.sparseflow-{os.getpid()}-abc.tmp"
    live.write_text("busy")
    assert main(["train", "--iters", "2", "--out", str(out), *TINY]) == 0
    assert not stale_temp_files(out) and not stale_temp_files(out / "checkpoints")
    assert [p for p in out.rglob("*.tmp")] == [live]


def test_atomic_writer_removes_stale_temp_files_of_its_directory(tmp_path):
    from flows.checkpoint import write_text_atomic

    _killed_write(tmp_path / "a.json")
    assert len(list(tmp_path.glob("*.tmp"))) == 1
    write_text_atomic("{}", tmp_path / "b.json")
    assert list(tmp_path.glob("*.tmp")) == []
    assert not (tmp_path / "a.json").exists()  # the killed write never replaced anything


# ---------------------------------------------------------------- non-finite data


def _tiny_cnf():
    from flows import CNF, ODEnet

    return CNF(ODEnet(2, (4,)), atol=1e-3, rtol=1e-3)


def test_log_prob_reports_non_finite_rows_before_the_solver():
    from flows.cnf import SequentialFlow

    x = torch.randn(5, 2)
    x[1, 0] = math.nan
    x[3, 1] = math.inf
    for flow in (_tiny_cnf(), SequentialFlow([_tiny_cnf(), _tiny_cnf()])):
        with pytest.raises(ValueError, match=r"2 of 5 rows .*NaN or inf"):
            flow.log_prob(x)


def test_classifier_reports_non_finite_inputs():
    from flows.neural_ode import ODEClassifier

    x = torch.zeros(4, 2)
    x[2, 1] = -math.inf
    with pytest.raises(ValueError, match=r"1 of 4 rows .*NaN or inf"):
        ODEClassifier(2, 2, (4,))(x)


def test_sample_reports_non_finite_base_samples():
    z = torch.zeros(3, 2)
    z[0, 0] = math.nan
    with pytest.raises(ValueError, match=r"1 of 3 rows .*NaN or inf"):
        _tiny_cnf().sample(z=z)


def test_non_finite_dataset_rows_are_reported_before_anything_is_written(
    tmp_path, capsys, monkeypatch
):
    import flows.pipeline as pipeline

    real = pipeline.toy_data

    def with_nans(*args, **kwargs):
        x = real(*args, **kwargs)
        x[[3, 5, 7]] = math.nan
        return x

    monkeypatch.setattr(pipeline, "toy_data", with_nans)
    out = tmp_path / "out"
    fails_cleanly(capsys, tmp_path, ["train", "--iters", "2", "--out", str(out), *TINY],
                  "train split of dataset 'gaussians' has 3 of 128 rows with NaN or inf")
    assert not out.exists()


def test_sample_reports_non_finite_model_output(finished_run, tmp_path, capsys, monkeypatch):
    from flows.cnf import Flow

    monkeypatch.setattr(Flow, "sample", lambda self, n, **kw: torch.full((n, 2), math.nan))
    out = tmp_path / "s.pt"
    fails_cleanly(capsys, tmp_path, ["sample", "--run", str(finished_run), "-n", "10",
                                     "--out", str(out)], "10 of 10", "non-finite")
    assert not out.exists()
