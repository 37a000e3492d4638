"""bench.ddp_scaling runs end to end on a tiny configuration and refuses bad options."""

from __future__ import annotations

import json

import pytest

from bench import ddp_scaling


@pytest.mark.slow
def test_ddp_scaling_writes_its_report(tmp_path, capsys):
    assert ddp_scaling.main(["--shape", "toy", "--batch", "8", "--steps", "1", "--warmup", "0",
                             "--procs", "2", "--out", str(tmp_path)]) == 0
    (folder,) = tmp_path.glob("*/ddp")
    report = json.loads((folder / "ddp_scaling.json").read_text())
    runs = {r["run"]: r for r in report["runs"]}
    assert list(runs) == ["plain", "torchrun-2"]
    assert runs["torchrun-2"]["processes"] == 2 and runs["plain"]["efficiency"] == 1.0
    # The same fixed-step work per sample on one and on two processes.
    assert runs["plain"]["nfe_forward"] == runs["torchrun-2"]["nfe_forward"] > 0
    assert report["machine"]["torch"] and "efficiency" in (folder / "ddp_scaling.md").read_text()


@pytest.mark.parametrize(("argv", "needle"), [
    (["--shape", "mnist"], "expected a tabular shape"),
    (["--batch", "7", "--procs", "2"], "must divide by every process count"),
    (["--procs", "two"], "expected comma-separated process counts"),
])
def test_ddp_scaling_refuses_bad_options(argv, needle, capsys):
    with pytest.raises(SystemExit) as e:
        ddp_scaling.main(argv)
    assert e.value.code == 2 and needle in capsys.readouterr().err
