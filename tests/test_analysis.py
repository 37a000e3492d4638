import json
import math

import pytest
import torch
from torch import nn

from flows.analysis import HessianOperator, analyze_hessian, boundary_distances, robustness_summary
from flows.analysis.hessian import hutchinson_trace, lanczos, largest_eigenvalue, power_iteration
from flows.analysis.runs import _backprop_through_solver, _fixed_loss, loss_description
from flows.cli import main
from flows.pipeline import Task, build_config, build_model, load_run_data
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
    assert stats.kept_parameters == 5 and stats.power_converged and stats.lanczos_converged
    assert stats.lanczos_iterations == 5  # the Krylov space is all 5 coordinates
    assert stats.lambda_max_std is None and stats.repeats == 1


def test_lanczos_tolerance_stops_early_on_a_known_spectrum():
    # An isolated smallest eigenvalue: Lanczos finds it long before the Krylov
    # space fills the 60 coordinates.
    eig = [0.1, *torch.linspace(2.0, 10.0, 59).tolist()]
    q = Quadratic(eig)
    op = HessianOperator(q, q.loss)
    res = lanczos(op, 60, tol=1e-8)
    assert res.converged
    assert res.iterations <= 40  # of 60 (it takes 27)
    assert op.products == res.iterations
    assert res.residual <= 1e-8 * abs(res.ritz_values[0])
    assert res.ritz_values[0] == pytest.approx(0.1, rel=1e-7)
    # A looser tolerance stops no later; no tolerance takes every step and,
    # short of the full space, claims no convergence.
    loose = lanczos(op, 60, tol=1e-3)
    assert loose.converged and loose.iterations <= res.iterations
    assert abs(loose.ritz_values[0] - 0.1) <= loose.residual  # the residual bounds the error
    full = lanczos(op, 40)
    assert full.iterations == 40 and not full.converged


def test_indefinite_quadratic_keeps_the_sign_of_lambda_max():
    q = Quadratic([-5.0, 1.0, 3.0])
    op = HessianOperator(q, q.loss)
    # Plain power iteration finds the dominant eigenvalue, which is negative here.
    dominant, _, _ = power_iteration(op, 500, 1e-12)
    assert dominant == pytest.approx(-5.0, rel=1e-6)
    lam, radius, n, converged = largest_eigenvalue(op, 500, 1e-12)
    assert lam == pytest.approx(3.0, rel=1e-6) and radius == pytest.approx(5.0, rel=1e-6)
    assert converged and n > 2
    stats = analyze_hessian(q, q.loss, power_iters=500, tol=1e-12, trace_samples=50)
    assert stats.lambda_max == pytest.approx(3.0, rel=1e-6)
    assert stats.lambda_min == pytest.approx(-5.0, rel=1e-8)
    assert stats.spectral_radius == pytest.approx(5.0, rel=1e-6)
    assert stats.condition_number == pytest.approx(3.0 / 5.0, rel=1e-6)


def test_repeats_give_finite_error_bars_and_progress_counts_every_product():
    # Too few iterations to converge: the estimates depend on the start vector.
    q = Quadratic([0.5, 1.0, 2.0, 3.0, 4.0, 9.0, 10.0])
    stages = []
    stats = analyze_hessian(
        q,
        q.loss,
        power_iters=3,
        tol=0.0,
        trace_samples=5,
        lanczos_steps=2,
        repeats=4,
        on_product=stages.append,
    )
    assert stats.repeats == 4 and len(stats.lambda_max_repeats) == 4
    for key in ("lambda_max", "lambda_min", "condition_number"):
        std = getattr(stats, f"{key}_std")
        assert std is not None and math.isfinite(std) and std > 0, key
    assert stats.lambda_max == pytest.approx(sum(stats.lambda_max_repeats) / 4)
    assert stats.lambda_min == pytest.approx(sum(stats.lambda_min_repeats) / 4)
    assert all(0.5 - 1e-9 <= v <= 10 + 1e-9 for v in stats.lambda_max_repeats)
    assert not stats.power_converged and not stats.lanczos_converged
    # One progress call per product: 4 x (3 power + 2 Lanczos) + 5 trace probes.
    assert len(stages) == 4 * (3 + 2) + 5
    assert stages.count("power 2/4") == 3 and stages.count("lanczos 4/4") == 2
    assert stages[-5:] == ["trace"] * 5
    with pytest.raises(ValueError, match="repeats"):
        analyze_hessian(q, q.loss, repeats=0)


def _tiny_density_setup(exact):
    config = build_config(
        "gaussians",
        {
            "data": {"n_train": 64, "n_val": 16, "n_test": 16},
            "model": {"hidden": [8]},
            "eval": {"exact": exact},
        },
    )
    data = load_run_data(config)
    torch.manual_seed(0)
    return build_model(config, data), Task(config, data), data


def test_fixed_loss_is_deterministic_and_leaves_the_global_rng_alone():
    model, task, data = _tiny_density_setup(exact=False)
    assert "hutchinson" in loss_description(task, model)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    loss = _fixed_loss(model, task, data, 32, seed=3)
    a, b = loss().item(), loss().item()
    assert a == b  # the same Hutchinson probes every call
    assert torch.equal(torch.get_rng_state(), state)
    assert _fixed_loss(model, task, data, 32, seed=4)().item() != a  # the noise is seeded
    assert torch.equal(torch.get_rng_state(), state)

    model, task, data = _tiny_density_setup(exact=True)
    assert loss_description(task, model) == "nll (nats), exact trace"
    state = torch.get_rng_state()
    with _backprop_through_solver(model):
        stats = analyze_hessian(
            model, _fixed_loss(model, task, data, 16, 0), 3, 1e-3, 2, 3, lanczos_tol=1e-2
        )
    assert math.isfinite(stats.lambda_max) and stats.lambda_max >= stats.lambda_min
    assert torch.equal(torch.get_rng_state(), state)


def test_masked_coordinates_are_left_out():
    # Pruning coordinate i of a diagonal quadratic removes eigenvalue A_ii.
    q = Quadratic([1.0, 2.0, 3.0, 4.0])
    q.A = torch.diag(torch.tensor([1.0, 2.0, 3.0, 40.0], dtype=F64))
    q.register_buffer("p_mask", torch.tensor([1.0, 1.0, 1.0, 0.0], dtype=F64))
    op = HessianOperator(q, q.loss)
    assert op.dim == 3
    lam, _, _ = power_iteration(op, 300, 1e-12)
    assert lam == pytest.approx(3.0, rel=1e-6)
    assert lanczos(op, 10).ritz_values == pytest.approx([1.0, 2.0, 3.0])
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
    assert eig.min() < 0 < eig.max()  # indefinite: the sign of each end matters
    assert stats.lambda_max == pytest.approx(eig.max().item(), rel=1e-4)
    assert stats.lambda_min == pytest.approx(eig.min().item(), rel=1e-6, abs=1e-9)
    assert stats.condition_number == pytest.approx(
        abs(eig.max().item() / eig.min().item()), rel=1e-4
    )
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


HESSIAN = [
    "analyze",
    "hessian",
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
    state = torch.get_rng_state()
    assert main([*HESSIAN, "--run", str(g), "--repeats", "2", "--lanczos-tol", "1e-2"]) == 0
    assert torch.equal(torch.get_rng_state(), state)  # the fixed noise is drawn on a fork
    h = json.loads((g / "analysis" / "hessian.json").read_text())
    assert h["loss"] == "nll (nats), exact trace"  # gaussians evaluate with the exact trace
    assert h["settings"]["repeats"] == 2 and h["settings"]["lanczos_tol"] == 1e-2
    assert [r["cycle"] for r in h["rows"]] == [0, 1]
    assert h["rows"][1]["kept_parameters"] < h["rows"][0]["kept_parameters"]
    assert h["normalised"][0]["lambda_max"] == pytest.approx(1.0)
    for r in h["rows"]:
        assert r["lambda_max"] >= r["lambda_min"]
        assert all(math.isfinite(r[f"{k}_std"]) for k in ("lambda_max", "lambda_min"))
        assert isinstance(r["lanczos_converged"], bool) and 1 <= r["lanczos_iterations"] <= 4
    assert (g / "analysis" / "hessian.png").is_file()
    md = capsys.readouterr().out
    assert "lambda_max / dense" in md and "+- sd over 2 start vectors" in md

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

    assert main([*HESSIAN, "--run", str(m), "--repeats", "1"]) == 0
    h = json.loads((m / "analysis" / "hessian.json").read_text())
    assert h["loss"] == "cross-entropy"
    assert [r["cycle"] for r in h["rows"]] == [0, 1]
    assert h["rows"][1]["kept_parameters"] < h["rows"][0]["kept_parameters"]
    assert all(r["lambda_max"] >= r["lambda_min"] for r in h["rows"])
    assert all(r["lambda_max_std"] is None for r in h["rows"])  # one start vector: no spread
