"""FFJORD's multiscale image flow (flows.multiscale): structure, exactness, its pipeline."""

from __future__ import annotations

import json

import pytest
import torch

from flows import CNF, ConvODEnet, LogitTransform, MultiscaleFlow, Squeeze
from flows.cli import main
from flows.likelihood import standard_normal_logprob
from flows.multiscale import (
    dense_parameter_count,
    n_scales,
    odenet_parameter_count,
    scale_shapes,
    squeeze2d,
    unsqueeze2d,
)
from flows.odefunc import exact_divergence
from flows.pipeline import RunData, build_config, build_model, iterations_per_cycle, run_pipeline
from flows.presets import get_preset
from flows.prune import alive_neurons, prune_structured_, prune_unstructured_, sparsity
from flows.report import render_report
from flows.run_report import image_grid, params_table

F64 = torch.float64


def _flow(shape, hidden=(4,), blocks=1, tol=1e-10, divergence="exact", **kw):
    """A tiny float64 multiscale flow, solved tightly (exactness tests)."""
    torch.manual_seed(0)
    cnf = dict(divergence=divergence, atol=tol, rtol=tol, adjoint=False, train_T=True, **kw)
    return MultiscaleFlow(shape, hidden, blocks=blocks, cnf_kwargs=cnf).double()


def _pixels(*shape):
    """Dequantised-looking pixels inside (0, 1), away from the logit's ends."""
    return 0.1 + 0.8 * torch.rand(*shape, dtype=F64)


# ---------------------------------------------------------------- structure


def test_scales_follow_ffjords_halving_rule():
    # Halve while both sides are >= 4: 28 -> 14 -> 7 -> (3), 32 -> 16 -> 8 -> 4 -> (2).
    assert (n_scales(28, 28), n_scales(32, 32), n_scales(8, 8)) == (3, 4, 2)
    assert n_scales(8, 12) == 2 and n_scales(3, 64) == 0
    assert scale_shapes((1, 28, 28)) == [(1, 28, 28), (2, 14, 14), (4, 7, 7)]
    assert scale_shapes((3, 32, 32)) == [(3, 32, 32), (6, 16, 16), (12, 8, 8), (24, 4, 4)]
    flow = MultiscaleFlow((1, 28, 28), (2,), blocks=2)
    assert flow.state_shape == (1, 28, 28)
    # Factored parts, then the last scale: their sizes add up to the data's.
    assert flow.z_shapes == [(2, 14, 14), (4, 7, 7), (4, 7, 7)]
    assert sum(c * h * w for c, h, w in flow.z_shapes) == 784
    kinds = [[type(m).__name__ for m in scale] for scale in flow.scales]
    assert kinds == [
        ["LogitTransform", "CNF", "CNF", "Squeeze", "CNF", "CNF"],
        ["CNF", "CNF", "Squeeze", "CNF", "CNF"],
        ["CNF", "CNF"],
    ]
    fields = [c.odenet.state_shape for c in flow.cnfs]
    assert fields == [(1, 28, 28)] * 2 + [(4, 14, 14)] * 2 + [(2, 14, 14)] * 2 + \
        [(8, 7, 7)] * 2 + [(4, 7, 7)] * 2


def test_dense_parameter_counts_match_table_3():
    """MNIST 801K and CIFAR-10 1.36M (Table 3), to the last parameter.

    Every vector field is a ConvODEnet on c channels: four 3x3 concat convolutions
    c -> 64 -> 64 -> 64 -> c, each seeing one more input channel (time):
    64 (c+1) 9 + 64 + 2 (64 * 65 * 9 + 64) + c * 65 * 9 + c = 1162 c + 75648.
    Two CNFs per stack; a scale on (c, h, w) has a stack on c and, but the last, one
    on 4c after the squeeze; the next scale has 2c channels; one trained sqrt(T)
    per CNF.
    MNIST (1, 28, 28), 3 scales: fields on 1,1,4,4 | 2,2,8,8 | 4,4 -> 38 channels
    over 10 CNFs: 1162 * 38 + 10 * 75648 + 10 = 800,646.
    CIFAR-10 (3, 32, 32), 4 scales: 3,3,12,12 | 6,6,24,24 | 12,12,48,48 | 24,24
    -> 258 channels over 14 CNFs: 1162 * 258 + 14 * 75648 + 14 = 1,358,882.
    """
    assert odenet_parameter_count(5) == 1162 * 5 + 75648
    assert 1162 * 38 + 10 * 75648 + 10 == 800_646
    assert 1162 * 258 + 14 * 75648 + 14 == 1_358_882
    for dataset, shape, expected, paper in (
        ("mnist", (1, 28, 28), 800_646, "801K"),
        ("cifar10", (3, 32, 32), 1_358_882, "1.36M"),
    ):
        config = build_config(dataset)
        x = torch.zeros(2, *shape)
        model = build_model(config, RunData(x, x, x, levels=256))
        assert isinstance(model, MultiscaleFlow)
        count = sum(p.numel() for p in model.parameters())
        assert count == expected == dense_parameter_count(shape), dataset
        assert sum(p.numel() for c in model.cnfs for p in c.odenet.parameters()) == \
            expected - len(model.cnfs)
        rounded = f"{round(count / 1e3)}K" if count < 1e6 else f"{count / 1e6:.2f}M"
        assert rounded == paper


def test_squeeze_has_ffjords_channel_order_and_log_determinant_zero():
    x = torch.arange(2 * 4 * 6, dtype=F64).reshape(1, 2, 4, 6)
    y = squeeze2d(x)
    assert y.shape == (1, 8, 2, 3)
    for c in range(2):
        for i in range(2):
            for j in range(2):
                assert torch.equal(y[0, 4 * c + 2 * i + j], x[0, c, i::2, j::2])
    assert torch.equal(y, torch.nn.functional.pixel_unshuffle(x, 2))
    assert torch.equal(unsqueeze2d(y), x)
    # A permutation of the pixels: |det| = 1, and the layer passes delta_logp on.
    layer = Squeeze(2)
    v = torch.randn(1, 2, 4, 6, dtype=F64)
    jac = torch.autograd.functional.jacobian(lambda u: layer(u)[0].reshape(-1), v).reshape(48, 48)
    assert torch.equal(jac.sum(0), torch.ones(48, dtype=F64))
    assert torch.equal(jac.sum(1), torch.ones(48, dtype=F64))
    assert torch.linalg.slogdet(jac)[1].abs().item() < 1e-12
    dlp = torch.tensor([1.5], dtype=F64)
    out, dlp_out = layer(v, dlp)
    assert dlp_out is dlp
    back, _ = layer(out, None, reverse=True)
    assert torch.equal(back, v)
    with pytest.raises(ValueError, match="divisible by 2, got 5 x 6"):
        squeeze2d(torch.zeros(1, 1, 5, 6))


# ---------------------------------------------------------------- exactness (float64)


@pytest.mark.parametrize("shape", [(1, 8, 8), (2, 8, 12), (3, 16, 16)])
def test_forward_then_reverse_gives_the_input_back(shape):
    flow = _flow(shape, tol=1e-9)
    x = _pixels(3, *shape)
    z, none = flow(x)  # the states alone (no log-density): cheap, and what sampling solves
    assert none is None and z.shape == (3, x[0].numel())
    back, _ = flow(z, None, reverse=True)
    assert back.shape == x.shape
    assert (back - x).abs().max().item() < 1e-7
    # z also reverses from [B, C, H, W], the shape sample() draws.
    again, _ = flow(z.reshape(3, *shape), None, reverse=True)
    assert torch.equal(again, back)


def test_reverse_undoes_the_log_determinant_too():
    flow = _flow((1, 8, 8), tol=1e-9)
    x = _pixels(2, 1, 8, 8)
    z, dlp = flow(x, torch.zeros(2, dtype=F64))
    back, dlp_back = flow(z, dlp, reverse=True)
    assert (back - x).abs().max().item() < 1e-7
    # The exact trace integrates the same log-determinant both ways.
    assert dlp.abs().min().item() > 1.0 and dlp_back.abs().max().item() < 1e-7


def test_log_prob_is_the_change_of_variables_of_the_whole_map():
    """log p(x) = log N(z; 0, I) + log |det dz/dx|, dz/dx by autograd through the solves."""
    flow = _flow((1, 8, 8), hidden=(6,))
    x = _pixels(1, 1, 8, 8)
    lp = flow.log_prob(x)
    z = flow(x)[0]
    assert z.shape == (1, 64)
    jac = torch.autograd.functional.jacobian(
        lambda v: flow(v.reshape(1, 1, 8, 8))[0].reshape(-1), x.reshape(-1))
    logdet = torch.linalg.slogdet(jac)[1]
    brute = standard_normal_logprob(z) + logdet
    assert abs(lp.item() - brute.item()) < 1e-7
    # The CNFs contribute (the check is not just the logit transform's determinant).
    s = 1e-6 + (1 - 2e-6) * x
    logit = (torch.log(torch.tensor(1 - 2e-6, dtype=F64)) - s.log() - (-s).log1p()).sum()
    assert abs(logdet.item() - logit.item()) > 1e-2
    # FFJORD's definition: log N summed over all C*H*W dimensions, minus delta_logp.
    zero = torch.zeros(1, dtype=F64)
    z2, dlp = flow(x, zero)
    assert torch.allclose(lp, standard_normal_logprob(z2) - dlp, rtol=0, atol=1e-12)


def test_hutchinson_rademacher_estimate_is_unbiased_on_average():
    flow = _flow((1, 8, 8), divergence="hutchinson", noise="rademacher", tol=1e-8)
    x = _pixels(1, 1, 8, 8).expand(400, 1, 8, 8).contiguous()
    with exact_divergence(flow):
        exact = flow.log_prob(x[:1]).item()
    est = flow.log_prob(x)
    assert abs(est.mean().item() - exact) < 4 * est.std().item() / 20 + 1e-6


# ---------------------------------------------------------------- shapes and errors


@pytest.mark.parametrize("shape", [(1, 8, 8), (1, 28, 28), (3, 32, 32)])
def test_shapes_at_batch_one_and_zero(shape):
    flow = _flow(shape, hidden=(2,), tol=1e-3, divergence="hutchinson")
    d = shape[0] * shape[1] * shape[2]
    x = _pixels(1, *shape)
    z, dlp = flow(x, torch.zeros(1, dtype=F64))
    assert z.shape == (1, d) and dlp.shape == (1,)
    assert flow.log_prob(x).shape == (1,)
    assert flow.log_prob(x.reshape(1, d)).shape == (1,)  # flat input too
    assert flow.sample(1).shape == (1, *shape)
    empty, dlp0 = flow(x[:0], torch.zeros(0, dtype=F64))
    assert empty.shape == (0, d) and dlp0.shape == (0,)
    assert flow(empty, None, reverse=True)[0].shape == (0, *shape)
    assert flow.nfe_forward > 0 and flow.nfe_backward == 0


def test_bad_shapes_get_one_clear_error():
    with pytest.raises(ValueError, match=r"3 x 3 is too small for one scale.*at least 4"):
        MultiscaleFlow((1, 3, 3))
    with pytest.raises(ValueError, match=r"squeezes scale 0 .* 1 x 9 x 9; a squeeze needs even"):
        MultiscaleFlow((1, 9, 9))
    with pytest.raises(ValueError, match=r"shape \(C, H, W\)"):
        MultiscaleFlow((28, 28))
    with pytest.raises(ValueError, match="blocks"):
        MultiscaleFlow((1, 8, 8), blocks=0)
    flow = MultiscaleFlow((1, 8, 8), (2,), blocks=1)
    with pytest.raises(ValueError, match=r"expects a batch of shape \[B, 1, 8, 8\] or \[B, 64\]"):
        flow.log_prob(torch.rand(2, 1, 8, 9))
    # Through the pipeline: the data's shape is named before anything runs.
    x = torch.zeros(2, 1, 3, 3)
    with pytest.raises(ValueError, match="too small for one scale"):
        build_model(build_config("digits"), RunData(x, x, x, levels=17))


# ---------------------------------------------------------------- pruning


def test_structured_pruning_drops_lowest_l1_filters_never_a_blocks_outputs():
    torch.manual_seed(1)
    flow = MultiscaleFlow((1, 8, 8), (8, 8), blocks=1)
    nets = [c.odenet for c in flow.cnfs]
    assert all(isinstance(n, ConvODEnet) for n in nets) and len(nets) == 3
    before = [[layer.conv.weight.detach().abs().flatten(1).sum(1) for layer in n.layers]
              for n in nets]
    assert prune_structured_(flow, 0.5) == 3 * 2 * 4  # 4 of 8 filters, 2 hidden layers, 3 nets
    for net, scores in zip(nets, before, strict=True):
        first, second, last = (layer.conv for layer in net.layers)
        c = net.state_shape[0]
        # Per layer, the 4 filters with the lowest L1 norm went (first layer: no pruned inputs).
        assert set(torch.nonzero(~alive_neurons(first)).flatten().tolist()) == \
            set(scores[0].argsort()[:4].tolist())
        assert int(alive_neurons(second).sum()) == 4
        # The block's output layer keeps every output channel (they are dz/dt).
        assert alive_neurons(last).all() and last.bias_mask.all()
        assert last.weight.shape[0] == c
        # Inputs: the state's channels and time (the last input channel) stay everywhere.
        assert first.weight_mask[alive_neurons(first)].all()
        for layer, prev in ((second, first), (last, second)):
            dead = ~alive_neurons(prev)
            assert not layer.weight_mask[:, : prev.out_channels][:, dead].any()
            assert layer.weight_mask[alive_neurons(layer)][:, -1].all()
    s = sparsity(flow)
    assert 0 < s["prune_ratio"] < 1


def test_unstructured_pruning_is_global_over_every_convolution():
    torch.manual_seed(2)
    flow = MultiscaleFlow((1, 8, 8), (4,), blocks=1)
    removed = prune_unstructured_(flow, 0.3)
    s = sparsity(flow)
    assert removed == round(0.3 * s["prunable"]) and abs(s["prune_ratio"] - 0.3) < 1e-3


# ---------------------------------------------------------------- presets and the pipeline


@pytest.mark.parametrize("dataset", ["mnist", "cifar10"])
def test_image_presets_are_table_s3_with_ffjords_architecture(dataset):
    p = get_preset(dataset)
    m, t = p["model"], p["train"]
    assert (m["kind"], m["hidden"], m["blocks"], m["activation"]) == (
        "conv", [64, 64, 64], 2, "softplus")
    assert (m["divergence"], m["noise"], m["solver"], m["atol"], m["rtol"]) == (
        "hutchinson", "rademacher", "dopri5", 1e-5, 1e-5)
    assert (m["T"], m["train_T"], m["alpha"]) == (1.0, True, 1e-6)
    assert (t["optimizer"], t["batch_size"], t["lr"], t["lr_milestones"], t["lr_gamma"]) == (
        "adam", 200, 1e-3, [45], 0.1)
    assert (t["beta1"], t["beta2"], t["weight_decay"]) == (0.9, 0.999, 0.0)
    assert p["prune"]["prune_ratio"] == 0.22 and p["eval"]["exact"] is False


def test_budget_and_iters_shorten_image_cycles():
    n_train = 54000  # MNIST's training split without its validation tenth
    assert iterations_per_cycle(build_config("mnist"), n_train) == 50 * 270
    assert iterations_per_cycle(build_config("mnist", {"run": {"budget": 0.01}}), n_train) == 135
    assert iterations_per_cycle(build_config("cifar10", {"run": {"iters": 7}}), 45000) == 7


def test_image_grid_tiles_and_clamps():
    x = torch.full((5, 1, 2, 3), 2.0)
    x[1] = float("nan")
    grid = image_grid(x, nrow=2, pad=1)
    assert grid.shape == (3 * 3 + 1, 2 * 4 + 1, 1)
    assert grid.max().item() == 1.0 and grid[1:3, 5:8].eq(0).all()  # NaN image -> 0
    assert image_grid(torch.rand(4, 3, 2, 2), nrow=4).shape == (4, 13, 3)


def test_digits_run_end_to_end_with_image_reports(tmp_path):
    over = {
        "model": {"hidden": [4], "blocks": 1, "atol": 1e-3, "rtol": 1e-3},
        "train": {"batch_size": 16},
        "run": {"iters": 1, "cycles": 1, "speedup_steps": 0, "eval_samples": 16,
                "kernels": "dense"},
    }
    out = tmp_path / "run"
    rows = run_pipeline(build_config("digits", over), out, progress=False, plots=True)
    dense = dense_parameter_count((1, 8, 8), (4,), blocks=1)
    assert [r["total_params"] for r in rows] == [dense, dense]
    assert rows[1]["nonzero_params"] < dense and rows[1]["prune_ratio"] > 0.2
    md = (out / "results.md").read_text()
    assert f"dense model: {dense:,}" in md and "Fig. 7" in md and "bits/dim" in md
    for k in (0, 1):
        png = out / "plots" / f"samples_cycle{k}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"plots/samples_cycle{k}.png" in md
    table = params_table(rows, json.loads((out / "config.json").read_text()))
    assert f"| 1 | {100 * rows[1]['prune_ratio']:.1f}% | {rows[1]['nonzero_params']:,} |" in table
    report = render_report([out], tmp_path / "report", plots=False).read_text()
    assert f"dense model: {dense:,}" in report
    # The sample command writes an image grid for image runs.
    grid = tmp_path / "grid.png"
    assert main(["sample", "--run", str(out), "-n", "9", "--out", str(grid)]) == 0
    assert grid.read_bytes()[:4] == b"\x89PNG"
    tensor = tmp_path / "s.pt"
    assert main(["sample", "--run", str(out), "-n", "3", "--out", str(tensor)]) == 0
    x = torch.load(tensor)
    assert x.shape == (3, 1, 8, 8)


def test_logit_transform_starts_the_first_scale_only():
    flow = MultiscaleFlow((1, 8, 8), (2,), blocks=1, alpha=0.05)
    logits = [m for m in flow.modules() if isinstance(m, LogitTransform)]
    assert len(logits) == 1 and flow.scales[0][0] is logits[0] and logits[0].alpha == 0.05
    assert not any(isinstance(m, LogitTransform) for m in MultiscaleFlow(
        (1, 8, 8), (2,), blocks=1, alpha=None).modules())
    assert all(isinstance(c, CNF) for c in flow.cnfs)
