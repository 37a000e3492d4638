import json
import subprocess
import sys

import torch

from flows.cli import main

TINY = [
    "--set",
    "data.n_train=256",
    "--set",
    "data.n_val=64",
    "--set",
    "data.n_test=64",
    "--set",
    "model.hidden=[8]",
    "--set",
    "model.atol=1e-3",
    "--set",
    "model.rtol=1e-3",
    "--set",
    "train.batch_size=64",
    "--no-progress",
]


def test_tiny_prune_run_and_the_other_commands(tmp_path, capsys):
    out = tmp_path / "run"
    assert (
        main(
            [
                "prune",
                "--dataset",
                "gaussians",
                "--method",
                "unstructured",
                "--prune-ratio",
                "0.3",
                "--cycles",
                "2",
                "--iters",
                "3",
                "--out",
                str(out),
                *TINY,
            ]
        )
        == 0
    )
    rows = json.loads((out / "results.json").read_text())
    assert [r["cycle"] for r in rows] == [0, 1, 2]
    assert rows[0]["nonzero_params"] > rows[1]["nonzero_params"] > rows[2]["nonzero_params"]
    assert all(torch.isfinite(torch.tensor(r["test_nll"])) for r in rows)
    assert rows[2]["kept_fraction"] == 15 / 32  # 32 weights: round(0.3 * 32), round(0.3 * 22)
    printed = capsys.readouterr().out
    assert "| cycle |" in printed

    assert main(["eval", "--run", str(out), "--cycle", "1", "--splits", "val", "test"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["cycle"] == 1
    assert abs(result["test"]["nll"] - rows[1]["test_nll"]) < 1e-5

    assert main(["sample", "--run", str(out), "-n", "50", "--out", str(tmp_path / "s.pt")]) == 0
    assert torch.load(tmp_path / "s.pt").shape == (50, 2)
    assert main(["sample", "--run", str(out), "-n", "50", "--out", str(tmp_path / "s.png")]) == 0
    assert (tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG"

    assert main(["report", str(out), "--out", str(tmp_path / "rep")]) == 0
    assert "gaussians unstructured" in (tmp_path / "rep" / "report.md").read_text()
    assert (tmp_path / "rep" / "metric_vs_prune_ratio.png").is_file()


def test_train_is_the_dense_warm_start(tmp_path):
    out = tmp_path / "dense"
    assert main(["train", "--dataset", "gaussians", "--iters", "2", "--out", str(out), *TINY]) == 0
    rows = json.loads((out / "results.json").read_text())
    assert len(rows) == 1 and rows[0]["prune_ratio"] == 0


def test_errors_are_reported_plainly(tmp_path, capsys):
    code = main(
        ["prune", "--out", str(tmp_path), "--set", "train.learning_rate=1", "--no-progress"]
    )
    assert code == 2
    assert "unknown setting 'train.learning_rate'" in capsys.readouterr().err
    assert main(["eval", "--run", str(tmp_path / "nothing")]) == 2


def test_console_entry_point_runs():
    result = subprocess.run(
        [sys.executable, "-m", "flows", "--help"], capture_output=True, text=True
    )
    assert result.returncode == 0
    for command in ("train", "prune", "eval", "sample", "report", "demo"):
        assert command in result.stdout


CONFIG_YAML = """\
run:
  cycles: 1
  method: structured
  patience: 3
  target_ratio: 0.9
  iters: 2
data: {n_train: 256, n_val: 64, n_test: 64}
model: {hidden: [8], atol: 1.0e-3, rtol: 1.0e-3}
train: {batch_size: 64}
"""


def test_config_file_run_settings_are_not_overridden_by_flag_defaults(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(CONFIG_YAML)
    out = tmp_path / "run"
    assert main(["prune", "--config", str(cfg), "--out", str(out), "--no-progress"]) == 0
    run = json.loads((out / "config.json").read_text())["run"]
    assert (run["cycles"], run["method"], run["patience"], run["target_ratio"]) == (
        1,
        "structured",
        3,
        0.9,
    )
    rows = json.loads((out / "results.json").read_text())
    assert [r["cycle"] for r in rows] == [0, 1]

    # The same settings from a JSON file; flags given explicitly still win over the file.
    from flows.cli import build_parser, config_from_args

    cfg_json = tmp_path / "run.json"
    cfg_json.write_text(json.dumps({"run": {"cycles": 5, "method": "structured", "patience": 2}}))
    argv = ["prune", "--config", str(cfg_json), "--out", str(out)]
    run = config_from_args(build_parser().parse_args(argv), pruning=True)["run"]
    assert (run["cycles"], run["method"], run["patience"]) == (5, "structured", 2)
    argv += ["--cycles", "7", "--method", "unstructured", "--patience", "4"]
    run = config_from_args(build_parser().parse_args(argv), pruning=True)["run"]
    assert (run["cycles"], run["method"], run["patience"]) == (7, "unstructured", 4)
    # Without a file or flags the documented defaults apply.
    run = config_from_args(build_parser().parse_args(["prune", "--out", str(out)]), True)["run"]
    assert (run["cycles"], run["method"], run["patience"], run["target_ratio"]) == (
        8,
        "unstructured",
        None,
        None,
    )


def _tiny_demo(monkeypatch):
    """Make `sparseflow demo` tiny: small data, net and loose tolerances."""
    import flows.pipeline as pipeline
    from flows.cli import merge_free

    real = pipeline.build_config
    tiny = {
        "data": {"n_train": 256, "n_val": 64, "n_test": 64},
        "model": {"hidden": [8], "atol": 1e-3, "rtol": 1e-3},
        "train": {"batch_size": 64},
        "run": {"eval_samples": 64, "speedup_steps": 1},
    }
    monkeypatch.setattr(
        pipeline, "build_config", lambda dataset, over=None: real(dataset, merge_free(over, tiny))
    )
    return ["--cycles", "1", "--iters", "2", "--no-progress"]


def test_demo_run_twice_resumes_and_reprints(tmp_path, monkeypatch, capsys):
    flags = _tiny_demo(monkeypatch)
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), *flags]) == 0
    first = capsys.readouterr().out
    results = {m: (out / m / "results.json").read_text() for m in ("unstructured", "structured")}
    assert "## gaussians, structured pruning" in first

    assert main(["demo", "--out", str(out), *flags]) == 0
    captured = capsys.readouterr()
    second = captured.out
    assert "already holds" not in captured.err
    assert "finished demo run" in second
    assert second.count("| cycle |") == first.count("| cycle |") == 2
    for m, text in results.items():  # nothing was retrained or overwritten
        assert (out / m / "results.json").read_text() == text
    assert (out / "report.md").is_file()

    # Other settings in the same directory: a clear error, nothing overwritten.
    assert main(["demo", "--out", str(out), *flags, "--seed", "3"]) == 2
    err = capsys.readouterr().err
    assert "other settings" in err and "--out" in err
    for m, text in results.items():
        assert (out / m / "results.json").read_text() == text


def test_demo_continues_an_interrupted_demo(tmp_path, monkeypatch, capsys):
    import shutil

    flags = _tiny_demo(monkeypatch)
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), *flags]) == 0
    drop = {"seconds", "prepare_seconds", "train_seconds", "eval_seconds", "step_seconds_dense",
            "step_seconds_compiled", "speedup", "per_rank"}

    def rows(m):
        return [
            {k: v for k, v in r.items() if k not in drop}
            for r in json.loads((out / m / "results.json").read_text())
        ]

    ref = {m: rows(m) for m in ("unstructured", "structured")}
    # Only the unstructured half finished: the next demo continues with the structured one.
    shutil.rmtree(out / "structured")
    (out / "report.md").unlink()
    capsys.readouterr()
    assert main(["demo", "--out", str(out), *flags]) == 0
    assert "resuming" in capsys.readouterr().out
    assert {m: rows(m) for m in ref} == ref
    assert (out / "report.md").is_file()
