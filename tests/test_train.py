import pytest
import torch

import flows.train as train_mod
from flows import CNF, ODEnet
from flows.odefunc import exact_divergence
from flows.train import TrainConfig, evaluate_nll, train_density


def small_flow():
    torch.manual_seed(1)
    return CNF(ODEnet(2, (8, 8), activation="sigmoid"), atol=1e-3, rtol=1e-3)


def data(n=256):
    g = torch.Generator().manual_seed(5)
    return torch.randn(n, 2, generator=g) * 0.5 + 1.0


def test_training_lowers_the_nll():
    flow, x = small_flow(), data()
    before = evaluate_nll(flow, x)
    cfg = TrainConfig(iters=30, batch_size=128, lr=2e-2, eval_every=30)
    history = train_density(flow, x, cfg, val_x=x, progress=False)
    assert len(history) == 30
    assert history[-1]["val_loss"] < before - 0.2
    assert all(row["nfe_forward"] > 0 for row in history)


def test_killed_run_resumes_to_the_same_result(tmp_path, monkeypatch):
    cfg = TrainConfig(iters=6, batch_size=64, lr=1e-2, checkpoint_every=2, eval_every=3)
    x = data()
    ref_flow = small_flow()
    ref = train_density(ref_flow, x, cfg, val_x=x[:32], progress=False)

    calls = {"n": 0}
    real_nll = train_mod.nll_nats

    def dying_nll(logp):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt  # killed during iteration 5, after the checkpoint at 4
        return real_nll(logp)

    ckpt = tmp_path / "ckpt.pt"
    monkeypatch.setattr(train_mod, "nll_nats", dying_nll)
    with pytest.raises(KeyboardInterrupt):
        train_density(small_flow(), x, cfg, val_x=x[:32], checkpoint=ckpt, progress=False)
    monkeypatch.setattr(train_mod, "nll_nats", real_nll)
    assert torch.load(ckpt, weights_only=False)["iter"] == 4
    assert not list(tmp_path.glob("*.tmp"))

    torch.manual_seed(123)  # the resumed run must restore the RNG, not rely on it
    flow = small_flow()
    resumed = train_density(
        flow, x, cfg, val_x=x[:32], checkpoint=ckpt, resume=True, progress=False
    )
    strip = [{k: v for k, v in r.items() if k != "seconds"} for r in resumed]
    assert strip == [{k: v for k, v in r.items() if k != "seconds"} for r in ref]
    for a, b in zip(flow.parameters(), ref_flow.parameters(), strict=True):
        assert torch.equal(a, b)


def test_resume_refuses_a_different_configuration(tmp_path):
    ckpt = tmp_path / "c.pt"
    train_density(
        small_flow(), data(), TrainConfig(iters=2, batch_size=16), checkpoint=ckpt, progress=False
    )
    with pytest.raises(ValueError, match="written with config"):
        train_density(
            small_flow(),
            data(),
            TrainConfig(iters=3, batch_size=16),
            checkpoint=ckpt,
            resume=True,
            progress=False,
        )


def test_exact_divergence_context_restores_the_estimator():
    flow = small_flow()
    with exact_divergence(flow):
        assert flow.odefunc.divergence == "exact"
    assert flow.odefunc.divergence == "hutchinson"
    x = data(64)
    # Exact evaluation is deterministic although the flow trains with noise.
    assert evaluate_nll(flow, x) == evaluate_nll(flow, x)


def test_train_config_validates():
    with pytest.raises(ValueError, match="optimizer='sgd'"):
        TrainConfig(optimizer="sgd")
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        TrainConfig(batch_size=0)
