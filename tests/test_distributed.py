"""Data-parallel runs under torchrun (gloo on CPU): the same results as one process.

A tiny pipeline (gaussians, 2 cycles, rk4 with a fixed step, float64,
Hutchinson noise tied to the global row) runs on 1 and on 2 processes; the
parameters after each cycle must agree to float64 rounding, and a run whose
rank 1 is killed mid-cycle must finish, resumed on 1 or 2 processes, with the
uninterrupted run's results. Every subprocess has a timeout, so a hang fails
the test instead of the CI job.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from flows import distributed
from flows.checkpoint import load_checkpoint
from flows.cli import main
from flows.row_noise import draw, mix_seed, per_row_noise

pytestmark = pytest.mark.slow

ITERS = 100  # a train checkpoint every 25 iterations: the kill lands inside cycle 1
RUN = [
    "prune", "--dataset", "gaussians", "--cycles", "2", "--iters", str(ITERS),
    "--dtype", "float64", "--seed", "0",
    "--set", "model.solver=rk4", "--set", "model.step_size=0.25",
    "--set", "train.batch_size=64", "--set", "data.n_train=512",
    "--set", "data.n_val=128", "--set", "data.n_test=128",
    "--set", "run.speedup_steps=0", "--set", "eval.exact=false",
    "--threads", "1", "--no-progress",
]  # fmt: skip
TIMEOUT_S = 300
CYCLES = ("cycle_000.pt", "cycle_001.pt", "cycle_002.pt")


def command(out: Path, nproc: int, *extra: str, launcher: tuple[str, ...] = ()) -> list[str]:
    """The tiny run on ``nproc`` processes (torchrun, with ``launcher`` flags, for more)."""
    flows = ["-m", "flows", *RUN, "--out", str(out), *extra]
    if nproc == 1:
        return [sys.executable, *flows]
    # A free port per run (--standalone), so runs never meet another's store.
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc-per-node={nproc}", *launcher, *flows]


def run(out: Path, nproc: int, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(command(out, nproc, *extra), capture_output=True, text=True,
                          timeout=TIMEOUT_S, env={**os.environ, "OMP_NUM_THREADS": "1"})


def finished(out: Path, nproc: int, *extra: str) -> Path:
    p = run(out, nproc, *extra)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return out


def rank_pid(rank: int, parent: int) -> int | None:
    """The pid of torchrun's worker ``rank`` under the launcher ``parent``."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            ppid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if ppid == parent and f"RANK={rank}".encode() in env:
            return int(pid)
    return None


def killed_run(out: Path, *launcher: str) -> subprocess.CompletedProcess:
    """The 2-process run with rank 1 killed (SIGKILL) once cycle 1 has a train checkpoint."""
    p = subprocess.Popen(command(out, 2, launcher=launcher), stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    target = out / "checkpoints" / "train_cycle_001.pt"
    t0 = time.monotonic()
    try:
        while p.poll() is None and time.monotonic() - t0 < TIMEOUT_S:
            if target.exists() and (pid := rank_pid(1, p.pid)) is not None:
                os.kill(pid, signal.SIGKILL)
                break
            time.sleep(0.02)
        output, _ = p.communicate(timeout=TIMEOUT_S)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    return subprocess.CompletedProcess(p.args, p.returncode, output, "")


def parameters(out: Path) -> list[dict[str, torch.Tensor]]:
    return [load_checkpoint(out / "checkpoints" / name)["model"] for name in CYCLES]


def rows(out: Path) -> list[dict]:
    data = json.loads((out / "results.json").read_text())
    return data["rows"] if isinstance(data, dict) else data


def assert_same_run(a: Path, b: Path, rtol: float = 1e-9) -> None:
    """Parameters and masks after every cycle, and the metrics, agree to float64 rounding.

    The runs differ only in the order of a few sums (DDP averages two shards'
    gradients; the reductions gather ranks' partial sums), so a few ulps per
    step over 300 Adam steps stay far below 1e-9 relative."""
    for cycle, (pa, pb) in enumerate(zip(parameters(a), parameters(b), strict=True)):
        assert pa.keys() == pb.keys()
        for k in pa:
            if k.endswith("_mask"):
                assert torch.equal(pa[k], pb[k]), (cycle, k)
            elif pa[k].is_floating_point():
                torch.testing.assert_close(pa[k], pb[k], rtol=rtol, atol=rtol, msg=f"{cycle} {k}")
    for ra, rb in zip(rows(a), rows(b), strict=True):
        for key in ("prune_ratio", "nonzero_params", "train_nll", "val_nll", "test_nll"):
            assert math.isclose(ra[key], rb[key], rel_tol=rtol), (ra["cycle"], key)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The run on one process."""
    return finished(tmp_path_factory.mktemp("dist") / "one", 1)


@pytest.fixture(scope="module")
def two(tmp_path_factory) -> Path:
    """The run on two processes under torchrun."""
    return finished(tmp_path_factory.mktemp("dist") / "two", 2)


def test_two_processes_match_one(reference, two):
    assert_same_run(reference, two)


def test_results_report_ranks(reference, two):
    for row in rows(two):
        assert row["world_size"] == 2
        for key in ("nfe_forward", "nfe_backward", "prepare_seconds", "train_seconds",
                    "eval_seconds"):
            stats = row["per_rank"][key]
            assert stats["mean"] <= stats["max"]
        # The row's time is the ranks' mean; a fixed-step solve takes the same steps.
        assert row["train_seconds"] == row["per_rank"]["train_seconds"]["mean"]
        assert row["per_rank"]["nfe_forward"]["max"] == row["nfe_forward"] == 16
    assert all(row["world_size"] == 1 for row in rows(reference))
    # Rank 0 alone wrote: no temporary or per-rank files are left.
    assert not list(two.rglob("*.tmp*"))


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("dist") / "killed"
    return out, killed_run(out)


def test_killed_rank_ends_the_job_naming_it(interrupted):
    out, p = interrupted
    assert p.returncode != 0, p.stdout[-3000:]
    # torchrun's report names the killed rank as the first failure.
    cause = p.stdout.split("Root Cause", 1)[1]
    assert "rank      : 1" in cause and "SIGKILL" in cause, p.stdout[-3000:]
    assert len(rows(out)) < 3, "the kill came after the run had finished"
    assert (out / "checkpoints" / "cycle_000.pt").exists()


@pytest.mark.parametrize("nproc", [1, 2])
def test_resume_after_a_killed_rank(interrupted, reference, tmp_path, nproc):
    out = tmp_path / "resumed"
    shutil.copytree(interrupted[0], out)
    finished(out, nproc, "--resume")
    assert_same_run(reference, out)


def test_torchrun_restart_resumes_after_a_killed_rank(reference, tmp_path):
    out = tmp_path / "restarted"
    p = killed_run(out, "--max-restarts", "1")
    assert p.returncode == 0, p.stdout[-3000:]
    # The first round ended with a line naming the lost rank; the second resumed.
    assert "sparseflow prune: error (rank 0 of 2): " in p.stdout, p.stdout[-3000:]
    assert "exitcode: -9) local_rank: 1" in p.stdout, p.stdout[-3000:]
    assert_same_run(reference, out)


def test_batch_must_divide_over_ranks():
    assert distributed.per_rank_batch(64, distributed.World(rank=1, size=4)) == 16
    with pytest.raises(ValueError, match="batch of 63 rows does not divide over 2 processes"):
        distributed.per_rank_batch(63, distributed.World(rank=0, size=2))


def test_batch_that_does_not_divide_fails_before_writing(tmp_path):
    p = run(tmp_path / "odd", 2, "--set", "train.batch_size=63")
    assert p.returncode != 0
    for rank in range(2):  # one line from each rank; torchrun's own report follows
        assert f"error (rank {rank} of 2): the global batch of 63 rows does not divide over 2 " \
            "processes" in p.stderr, p.stderr[-3000:]
    assert "flows/pipeline.py" not in p.stderr  # no traceback of ours
    assert not (tmp_path / "odd").exists()


def test_world_shares_rows_contiguously():
    shares = [distributed.World(rank=r, size=3).rows(10) for r in range(3)]
    assert [(s.start, s.stop) for s in shares] == [(0, 3), (3, 6), (6, 10)]
    assert distributed.World(rank=1, size=3).rows(0) == slice(0, 0)


def _mismatch_worker(rank: int, init: str, results: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    distributed.use_world(distributed.World(rank, 2, rank, torch.device("cpu"), True))
    same = torch.arange(6.0)
    other = torch.ones(5) if rank == 0 else torch.tensor([1.0, 1, 0, 1, 1])
    try:
        distributed.check_same_on_ranks({"a_mask": same}, "the masks")  # agrees: no error
        distributed.check_same_on_ranks({"a_mask": same, "b_mask": other}, "the masks")
        message = "no error"
    except distributed.RankMismatchError as e:
        message = str(e)
    Path(results, str(rank)).write_text(message)
    dist.destroy_process_group()


def test_mask_mismatch_is_an_error_on_every_rank(tmp_path):
    ctx = torch.multiprocessing.get_context("spawn")
    init = f"file://{tmp_path / 'store'}"
    procs = [ctx.Process(target=_mismatch_worker, args=(r, init, str(tmp_path)))
             for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(TIMEOUT_S)
        assert p.exitcode == 0
    for rank in range(2):
        message = (tmp_path / str(rank)).read_text()
        assert message.startswith("the masks differ across ranks: rank(s) 1 disagree"), message
    assert "b_mask (1 entries)" in (tmp_path / "1").read_text()


def test_row_noise_does_not_depend_on_the_split():
    like = torch.empty(64, 3, dtype=torch.float64)
    for kind in ("gaussian", "rademacher", "uniform"):
        with per_row_noise(7, slice(0, 64), 64):
            whole = [draw(like, kind), draw(like, kind)]
        parts = []
        for lo, hi in ((0, 20), (20, 64)):
            with per_row_noise(7, slice(lo, hi), 64):
                parts.append([draw(like[lo:hi], kind), draw(like[lo:hi], kind)])
        for k in range(2):
            assert torch.equal(whole[k], torch.cat([parts[0][k], parts[1][k]]))
        assert not torch.equal(whole[0], whole[1])  # the k-th draw has its own stream
    seeds = []
    for seed in (7, 8):  # a different seed gives different noise
        with per_row_noise(seed, slice(0, 64), 64):
            seeds.append(draw(like, "gaussian"))
    assert not torch.equal(*seeds)


def test_row_noise_refuses_a_batch_that_is_not_its_rows():
    with per_row_noise(0, slice(10, 20), 64), pytest.raises(ValueError, match="rows 10:20"):
        draw(torch.empty(5, 2), "gaussian")
    with pytest.raises(ValueError, match="not inside a batch of 64"):
        with per_row_noise(0, slice(10, 70), 64):
            pass


def test_outside_a_block_draws_use_the_global_rng():
    like = torch.empty(4, 2)
    torch.manual_seed(3)
    a = draw(like, "gaussian")
    torch.manual_seed(3)
    assert torch.equal(a, torch.randn(4, 2))


def test_mix_seed_is_stable_and_distinct():
    assert mix_seed(1, 2) == mix_seed(1, 2)
    assert len({mix_seed(1, 2), mix_seed(2, 1), mix_seed(1, 2, 0)}) == 3
    assert 0 <= mix_seed(5) < 2**63


def test_fixed_step_solver_needs_a_step_size(tmp_path, capsys):
    out = tmp_path / "r"
    assert main(["prune", "--out", str(out), "--set", "model.solver=rk4", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "model.step_size" in err and "Traceback" not in err
    assert not out.exists()
