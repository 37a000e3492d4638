import pytest
import torch
from sklearn.datasets import make_moons

from flows import ODEClassifier


def moons(n=256, seed=0):
    x, y = make_moons(n, noise=0.1, random_state=seed)
    return torch.tensor(x, dtype=torch.float32), torch.tensor(y)


def test_state_at_T_is_the_logits_in_2d():
    clf = ODEClassifier(hidden=(16, 16))
    x, _ = moons(8)
    assert torch.equal(clf(x), clf.block(x))
    assert clf(x).shape == (8, 2)
    wide = ODEClassifier(in_dim=2, n_classes=3, hidden=(8,))
    assert wide(x).shape == (8, 3)


def test_moons_classifier_learns():
    torch.manual_seed(0)
    x, y = moons()
    clf = ODEClassifier(hidden=(32, 32), atol=1e-3, rtol=1e-3)
    opt = torch.optim.Adam(clf.parameters(), lr=1e-2)
    losses = []
    for _ in range(40):
        loss = torch.nn.functional.cross_entropy(clf(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    nfe_backward = clf.block.nfe_backward
    acc = (clf(x).argmax(1) == y).float().mean().item()
    assert losses[-1] < 0.6 * losses[0]
    assert acc > 0.85
    assert clf.block.nfe_forward > 0 and nfe_backward > 0  # adjoint by default


def test_classifier_exposes_the_blocks_nfe_counters():
    clf = ODEClassifier(in_dim=2, n_classes=3, hidden=(8,), atol=1e-3, rtol=1e-3)
    assert clf.nfe_forward == 0 and clf.nfe_backward == 0
    x, y = moons(16)
    loss = torch.nn.functional.cross_entropy(clf(x), y)
    assert clf.nfe_forward == clf.block.nfe_forward > 0
    loss.backward()
    assert clf.nfe_backward == clf.block.nfe_backward > 0


def test_default_width_is_table_s1s_moons_model():
    # Table S1, MOON: Layers 2 (linear layers), Hidden Size 128 -> 2-128-2.
    clf = ODEClassifier()
    assert clf.block.odenet.hidden == (128,)


def test_trajectory_starts_at_the_input_and_ends_at_the_block_output():
    clf = ODEClassifier(hidden=(8,))
    x, _ = moons(5)
    with torch.no_grad():
        traj = clf.block.trajectory(x, torch.linspace(0, 1, 4))
        assert traj.shape == (4, 5, 2)
        assert torch.equal(traj[0], x)
        assert torch.allclose(traj[-1], clf.block(x), atol=1e-4)


def test_classifier_rejects_one_class():
    with pytest.raises(ValueError, match="n_classes"):
        ODEClassifier(n_classes=1)
