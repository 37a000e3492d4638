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
