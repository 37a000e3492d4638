import json
import math

import pytest
import torch
from torch import nn

from flows.analysis import HessianOperator, analyze_hessian, boundary_distances, robustness_summary
from flows.analysis.hessian import hutchinson_trace, lanczos, power_iteration
from flows.cli import main
from flows.prune import prune_unstructured_

F64 = torch.float64


class Quadratic(nn.Module):
    """loss = 0.5 p^T A p with a known spectrum."""

    def __init__(self, eigenvalues):
        super().__init__()
        n = len(eigenvalues)
        q, _ = torch.linalg.qr(
            torch.randn(n, n, dtype=F64, generator=torch.Generator().manual_seed(0))
        )
        self.register_buffer("A", q @ torch.diag(torch.tensor(eigenvalues, dtype=F64)) @ q.T)
        self.p = nn.Parameter(torch.randn(n, dtype=F64))

    def loss(self):
        return 0.5 * self.p @ self.A @ self.p


def test_quadratic_spectrum_is_recovered():
    eig = [0.5, 1.0, 2.0, 3.0, 10.0]
    q = Quadratic(eig)
    stats = analyze_hessian(
        q, q.loss, power_iters=500, tol=1e-10, trace_samples=400, lanczos_steps=10
    )
    assert stats.lambda_max == pytest.approx(10.0, rel=1e-6)
    assert stats.lambda_min == pytest.approx(0.5, rel=1e-8)
    assert stats.condition_number == pytest.approx(20.0, rel=1e-6)
    assert abs(stats.trace - sum(eig)) < 3 * stats.trace_stderr + 1e-9
    assert stats.ritz_values == pytest.approx(eig, rel=1e-8)
    assert stats.kept_parameters == 5 and stats.power_converged


def test_masked_coordinates_are_left_out():
    # Pruning coordinate i of a diagonal quadratic removes eigenvalue A_ii.
    q = Quadratic([1.0, 2.0, 3.0, 4.0])
    q.A = torch.diag(torch.tensor([1.0, 2.0, 3.0, 40.0], dtype=F64))
    q.register_buffer("p_mask", torch.tensor([1.0, 1.0, 1.0, 0.0], dtype=F64))
    op = HessianOperator(q, q.loss)
    assert op.dim == 3
    lam, _, _ = power_iteration(op, 300, 1e-12)
    assert lam == pytest.approx(3.0, rel=1e-6)
    assert lanczos(op, 10) == pytest.approx([1.0, 2.0, 3.0])
    v = op.random(torch.Generator().manual_seed(0))
    assert v[0][3] == 0 and op(v)[0][3] == 0


def test_small_network_matches_autograd_hessian_on_kept_coordinates():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).double()
    prune_unstructured_(net, 0.4)
    x = torch.randn(16, 3, dtype=F64)
    y = torch.randn(16, 1, dtype=F64)
    names = [n for n, _ in net.named_parameters()]
    params = [p.detach().clone() for p in net.parameters()]

    def loss_of(*flat):
        out = torch.func.functional_call(net, dict(zip(names, flat, strict=True)), (x,))
        return ((out - y) ** 2).mean()

    blocks = torch.autograd.functional.hessian(loss_of, tuple(params))
    sizes = [p.numel() for p in params]
    full = torch.cat(
        [
            torch.cat([blocks[i][j].reshape(sizes[i], sizes[j]) for j in range(len(params))], 1)
            for i in range(len(params))
        ]
    )
    op = HessianOperator(net, lambda: ((net(x) - y) ** 2).mean())
    keep = torch.cat([m.flatten() for m in op.masks]).bool()
    h = full[keep][:, keep]
    eig = torch.linalg.eigvalsh(h)
    stats = analyze_hessian(
        net,
        op.loss_fn,
        power_iters=2000,
        tol=1e-12,
        trace_samples=2000,
        lanczos_steps=int(keep.sum()),
    )
    assert stats.kept_parameters == int(keep.sum())
    assert abs(stats.lambda_max) == pytest.approx(eig.abs().max().item(), rel=1e-4)
    assert stats.lambda_min == pytest.approx(eig.min().item(), rel=1e-6, abs=1e-9)
    assert abs(stats.trace - torch.trace(h).item()) < 3 * stats.trace_stderr
    # The unrestricted Hessian has a different spectrum: the mask matters.
    assert not torch.allclose(torch.linalg.eigvalsh(full).max(), eig.max())


def test_trace_needs_an_error_bar():
    q = Quadratic([1.0, 2.0])
    with pytest.raises(ValueError, match="at least 2"):
        hutchinson_trace(HessianOperator(q, q.loss), samples=1)


class Linear2D(nn.Module):
    """Class 1 where x0 > 0.3: the boundary is the line x0 = 0.3."""

    def forward(self, x):
        return torch.stack([torch.zeros_like(x[:, 0]), x[:, 0] - 0.3], 1)


def test_boundary_distance_of_a_known_line():
    x = torch.tensor([[0.0, 0.0], [1.0, 0.5], [-1.0, -1.0], [0.3 + 1e-3, 0.8]])
    d = boundary_distances(Linear2D(), x, lim=2.0, n_grid=201)
    spacing = 4.0 / 200
    expected = torch.tensor([0.3, 0.7, 1.3, 1e-3])
    assert torch.all(d >= expected - 1e-6)
    assert torch.all(d <= expected + spacing)
    s = robustness_summary(d)
    assert s["mean_distance"] == pytest.approx(d.mean().item())
    assert s["p5_distance"] <= s["mean_distance"]


def test_boundary_distance_is_inf_without_another_class():
    class One(nn.Module):
        def forward(self, x):
            return torch.stack([torch.ones(len(x)), torch.zeros(len(x))], 1)

    assert math.isinf(boundary_distances(One(), torch.zeros(3, 2), lim=1.0, n_grid=11)[0])


TINY = [
    "--set",
    "data.n_train=256",
    "--set",
    "data.n_val=64",
    "--set",
    "data.n_test=128",
    "--set",
    "model.atol=1e-3",
    "--set",
    "model.rtol=1e-3",
    "--no-progress",
]


def test_analyze_commands_on_tiny_runs(tmp_path, capsys):
    g = tmp_path / "g"
    assert (
        main(
            [
                "prune",
                "--dataset",
                "gaussians",
                "--cycles",
                "1",
                "--iters",
                "3",
                "--prune-ratio",
                "0.5",
                "--out",
                str(g),
                "--set",
                "model.hidden=[8]",
                "--set",
                "train.batch_size=64",
                *TINY,
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "analyze",
                "hessian",
                "--run",
                str(g),
                "--samples",
                "64",
                "--power-iters",
                "5",
                "--trace-samples",
                "4",
                "--lanczos-steps",
                "4",
                "--no-progress",
            ]
        )
        == 0
    )
    h = json.loads((g / "analysis" / "hessian.json").read_text())
    assert [r["cycle"] for r in h["rows"]] == [0, 1]
    assert h["rows"][1]["kept_parameters"] < h["rows"][0]["kept_parameters"]
    assert h["normalised"][0]["lambda_max"] == pytest.approx(1.0)
    assert (g / "analysis" / "hessian.png").is_file()
    assert "lambda_max / dense" in capsys.readouterr().out

    assert main(["analyze", "field", "--run", str(g), "--no-progress"]) == 0
    field = json.loads((g / "analysis" / "field.json").read_text())
    assert len(field["modes"]) == 6
    assert (g / "analysis" / "field.png").stat().st_size > 1000

    m = tmp_path / "m"
    assert (
        main(
            [
                "prune",
                "--dataset",
                "moons",
                "--cycles",
                "1",
                "--iters",
                "10",
                "--out",
                str(m),
                "--set",
                "model.hidden=[16]",
                *TINY,
            ]
        )
        == 0
    )
    assert main(["analyze", "boundary", "--run", str(m), "--grid", "60", "--no-progress"]) == 0
    b = json.loads((m / "analysis" / "boundary.json").read_text())
    assert len(b["rows"]) == 2
    assert all(0 <= r["p5_distance"] <= r["mean_distance"] for r in b["rows"])
    assert (m / "analysis" / "boundary_cycle_001.png").is_file()
    assert main(["analyze", "boundary", "--run", str(g), "--no-progress"]) == 2  # not a classifier
