import math

import pytest
import torch
from engine_helpers import Counted

from flows import (
    CNF,
    ConvODEnet,
    LogitTransform,
    ODEnet,
    SequentialFlow,
    divergence_exact,
    divergence_hutchinson,
    sample_noise,
    standard_normal_logprob,
)

F64 = torch.float64


def random_cnf(dim=2, hidden=(16, 16), time="concat", scale=2.0, **kw):
    """A random CNF whose map is far from the identity (weights scaled up)."""
    net = ODEnet(dim, hidden, time=time, activation="tanh").double()
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(scale)
    kw.setdefault("atol", 1e-8)
    kw.setdefault("rtol", 1e-8)
    return CNF(net, divergence=kw.pop("divergence", "exact"), **kw).double()


def test_density_integrates_to_one():
    flow = random_cnf()
    n, lim = 241, 8.0
    axis = torch.linspace(-lim, lim, n, dtype=F64)
    xx, yy = torch.meshgrid(axis, axis, indexing="xy")
    pts = torch.stack([xx.reshape(-1), yy.reshape(-1)], 1)
    with torch.no_grad():
        logp = flow.log_prob(pts)
    cell = (2 * lim / (n - 1)) ** 2
    mass = logp.exp().sum().item() * cell
    assert abs(mass - 1) < 0.02
    # The flow must really transform the density, or this test proves nothing.
    assert (logp - standard_normal_logprob(pts)).abs().max() > 0.5


@pytest.mark.parametrize("noise", ["gaussian", "rademacher"])
def test_hutchinson_is_unbiased_for_the_exact_trace(noise):
    net = ODEnet(5, (32, 32), time="concatsquash", activation="softplus").double()
    z0 = torch.randn(1, 5, dtype=F64)
    z = z0.repeat(20000, 1).requires_grad_(True)
    dz = net(torch.tensor(0.3, dtype=F64), z)
    exact = divergence_exact(dz, z)
    est = divergence_hutchinson(dz, z, sample_noise(z, noise))
    assert torch.allclose(exact, exact[:1].expand_as(exact))
    se = est.std() / math.sqrt(est.numel())
    assert abs(est.mean() - exact[0]) < 3 * se
    assert est.std() > 1e-3  # a real estimator, not the trace itself


def test_exact_divergence_equals_jacobian_trace():
    net = ODEnet(4, (9,), time="concat", activation="elu").double()
    t = torch.tensor(0.2, dtype=F64)
    z = torch.randn(3, 4, dtype=F64, requires_grad=True)
    div = divergence_exact(net(t, z), z)
    for b in range(3):
        jac = torch.autograd.functional.jacobian(lambda v: net(t, v[None])[0], z[b].detach())
        assert torch.allclose(div[b], torch.trace(jac))


def test_log_prob_hutchinson_agrees_with_exact_in_expectation():
    # A fixed-step solver keeps the steps independent of the noise, so the
    # estimate of the integral is unbiased sample by sample.
    opts = {"solver": "rk4", "solver_options": {"step_size": 0.05}}
    exact_flow = random_cnf(dim=3, hidden=(12,), scale=1.5, **opts)
    hutch = CNF(exact_flow.odenet, divergence="hutchinson", noise="rademacher", **opts).double()
    x = torch.randn(1, 3, dtype=F64)
    with torch.no_grad():
        ref = exact_flow.log_prob(x)[0]
        est = hutch.log_prob(x.repeat(4000, 1))
    se = est.std() / math.sqrt(est.numel())
    assert abs(est.mean() - ref) < 3 * se
    assert est.std() > 1e-4


@pytest.mark.parametrize("divergence", ["exact", "hutchinson"])
def test_sample_then_forward_returns_base_samples(divergence):
    flow = random_cnf(divergence=divergence, atol=1e-7, rtol=1e-7)
    z = torch.randn(64, 2, dtype=F64)
    x = flow.sample(z=z)
    assert (x - z).abs().max() > 0.1  # the flow moves points
    with torch.no_grad():
        z_back, delta = flow(x, torch.zeros(64, dtype=F64))
    assert torch.allclose(z_back, z, atol=1e-5)
    assert delta.shape == (64,)


def test_sample_draws_from_the_base_with_the_model_dtype():
    flow = random_cnf()
    x = flow.sample(10, generator=torch.Generator().manual_seed(3))
    y = flow.sample(10, generator=torch.Generator().manual_seed(3))
    assert x.shape == (10, 2) and x.dtype == F64
    assert torch.equal(x, y)
    with pytest.raises(ValueError, match="n >= 1"):
        flow.sample()


@pytest.mark.parametrize("adjoint", [False, True])
def test_nfe_counters_equal_calls_of_f(adjoint):
    counting = Counted(ODEnet(2, (8, 8), time="concat").double())
    flow = CNF(counting, adjoint=adjoint, atol=1e-6, rtol=1e-6).double()
    x = torch.randn(32, 2, dtype=F64)
    loss = -flow.log_prob(x).mean()
    assert flow.nfe_forward == counting.nfe > 0
    before = counting.nfe
    loss.backward()
    assert flow.nfe_backward == counting.nfe - before
    if adjoint:
        assert flow.nfe_backward > 0
    else:
        assert flow.nfe_backward == 0  # backprop re-uses the forward graph
    assert all(p.grad is not None for p in counting.parameters())


@pytest.mark.parametrize("adjoint", [False, True])
def test_hutchinson_noise_is_drawn_once_per_solve(adjoint, monkeypatch):
    import flows.odefunc

    seen = []
    real = flows.odefunc.divergence_hutchinson

    def recording(dz, z, noise, **kw):
        seen.append(noise.detach().clone())
        return real(dz, z, noise, **kw)

    monkeypatch.setattr(flows.odefunc, "divergence_hutchinson", recording)
    flow = CNF(ODEnet(2, (8, 8), time="concat").double(), divergence="hutchinson",
               adjoint=adjoint, atol=1e-6, rtol=1e-6).double()
    x = torch.randn(32, 2, dtype=F64)
    (-flow.log_prob(x).mean()).backward()
    first = len(seen)
    # Every evaluation of one solve, the adjoint's backward ones included, used one probe.
    assert first >= flow.nfe_forward > 1
    assert all(torch.equal(n, seen[0]) for n in seen)
    flow.log_prob(x)
    second = seen[first:]
    assert second and all(torch.equal(n, second[0]) for n in second)
    assert not torch.equal(second[0], seen[0])  # a new solve draws a new probe


def test_adjoint_and_backprop_give_the_same_gradients():
    base = random_cnf(scale=1.0, atol=1e-9, rtol=1e-9)
    adj = CNF(base.odenet, divergence="exact", adjoint=True, atol=1e-9, rtol=1e-9).double()
    x = torch.randn(16, 2, dtype=F64)
    grads = []
    for flow in (base, adj):
        flow.zero_grad()
        (-flow.log_prob(x).mean()).backward()
        grads.append(torch.cat([p.grad.flatten() for p in flow.odenet.parameters()]))
    assert torch.allclose(grads[0], grads[1], rtol=1e-5, atol=1e-7)


def test_stacked_blocks_compose():
    # Two blocks of an autonomous field over [0, 1/2] equal one block over [0, 1].
    net = ODEnet(2, (16,), activation="tanh").double()
    kw = {"divergence": "exact", "atol": 1e-9, "rtol": 1e-9}
    one = CNF(net, T=1.0, **kw).double()
    two = SequentialFlow([CNF(net, T=0.5, **kw), CNF(net, T=0.5, **kw)]).double()
    x = torch.randn(20, 2, dtype=F64)
    with torch.no_grad():
        assert torch.allclose(one.log_prob(x), two.log_prob(x), atol=1e-6)
        assert torch.allclose(one.sample(z=x), two.sample(z=x), atol=1e-6)
    assert two.nfe_forward == sum(c.nfe_forward for c in two.cnfs) > 0
    assert two.state_shape == (2,)


def test_train_T_gets_a_gradient():
    flow = CNF(ODEnet(2, (8,)), train_T=True, T=0.5)
    (-flow.log_prob(torch.randn(8, 2)).mean()).backward()
    assert flow.sqrt_T.grad is not None and flow.sqrt_T.grad != 0
    assert torch.isclose(flow.T, torch.tensor(0.5))


def test_logit_transform_inverse_and_log_det():
    lt = LogitTransform(alpha=0.05)
    x = torch.rand(4, 3, dtype=F64)
    y, d = lt(x, torch.zeros(4, dtype=F64))
    x_back, d_back = lt(y, d, reverse=True)
    assert torch.allclose(x_back, x)
    assert torch.allclose(d_back, torch.zeros(4, dtype=F64), atol=1e-12)
    for b in range(4):
        jac = torch.autograd.functional.jacobian(lambda v: lt(v[None])[0][0], x[b])
        assert torch.allclose(-d[b], torch.logdet(jac))


def test_image_flow_with_logit_transform():
    cnf = CNF(ConvODEnet((1, 4, 4), hidden_channels=(4,)), atol=1e-4, rtol=1e-4)
    flow = SequentialFlow([LogitTransform(1e-6), cnf])
    x = torch.rand(3, 1, 4, 4)
    logp = flow.log_prob(x)
    assert logp.shape == (3,) and torch.isfinite(logp).all()
    s = flow.sample(2)
    assert s.shape == (2, 1, 4, 4) and (s > 0).all() and (s < 1).all()


def test_cnf_rejects_bad_configuration():
    net = ODEnet(2, (4,))
    with pytest.raises(ValueError, match="divergence='trace'"):
        CNF(net, divergence="trace")
    with pytest.raises(ValueError, match="noise='uniform'"):
        CNF(net, noise="uniform")
    with pytest.raises(ValueError, match="solver='rk45'"):
        CNF(net, solver="rk45").log_prob(torch.randn(2, 2))
    with pytest.raises(ValueError, match="step_size"):
        CNF(net, solver="rk4").log_prob(torch.randn(2, 2))
    with pytest.raises(ValueError, match="T must be positive"):
        CNF(net, T=0.0)
    with pytest.raises(ValueError, match=r"delta_logp must have shape \[2\]"):
        CNF(net)(torch.randn(2, 2), torch.zeros(3))


def test_divergence_under_no_grad_of_a_state_that_requires_grad():
    """odeint_adjoint's forward solve of a later flow block evaluates, under no_grad,
    views of a state that requires grad: the autograd divergence must still be df/dz's
    trace, not zero (it was, before z was detached there)."""
    from flows.odefunc import ODEFunc
    from flows.odenet import ODEnet

    f = ODEFunc(ODEnet(2, [8], time="none", activation="tanh"), divergence="exact")
    w = torch.randn(5, 2, requires_grad=True) * 1.0
    y = torch.cat([w.reshape(-1), torch.zeros(5)])
    t = torch.tensor(0.0)
    with torch.no_grad():
        _, div = f(t, (y[:10].view(5, 2), torch.zeros(5)))
    _, ref = f(t, (w.detach(), torch.zeros(5)))
    torch.testing.assert_close(div, ref.detach())
