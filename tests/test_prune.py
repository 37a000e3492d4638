import itertools

import pytest
import torch
from torch import nn

from flows import CNF, ConvODEnet, ODEClassifier, ODEnet, SequentialFlow
from flows.prune import (
    alive_neurons,
    prunable_layers,
    prune_,
    prune_structured_,
    prune_unstructured_,
    sparsity,
)
from flows.train import TrainConfig, train_density


def distinct_weights(model):
    """Give every prunable weight a distinct magnitude, so 'the smallest' is unambiguous."""
    layers = prunable_layers(model)
    n = sum(m.weight.numel() for _, m in layers)
    values = (torch.randperm(n).double() + 1) / n
    signs = torch.where(torch.rand(n) < 0.5, -1.0, 1.0).double()
    offset = 0
    with torch.no_grad():
        for _, m in layers:
            k = m.weight.numel()
            m.weight.copy_(
                (values[offset : offset + k] * signs[offset : offset + k]).view_as(m.weight)
            )
            offset += k


def test_prunable_layers_skip_the_time_hypernetworks():
    net = ODEnet(3, (5, 4), time="concatsquash")
    names = [name for name, _ in prunable_layers(net)]
    assert names == ["layers.0.linear", "layers.1.linear", "layers.2.linear"]


@pytest.mark.parametrize("time", ["none", "concat", "concatsquash"])
def test_global_magnitude_removes_exactly_the_smallest(time):
    net = ODEnet(3, (10, 7), time=time).double()
    distinct_weights(net)
    hyper_before = [p.clone() for n, p in net.named_parameters() if "hyper" in n]
    before = torch.cat([m.weight.flatten().abs() for _, m in prunable_layers(net)])
    k = prune_unstructured_(net, 0.3)
    assert k == round(0.3 * before.numel())
    after = torch.cat([m.weight.flatten() for _, m in prunable_layers(net)])
    masks = torch.cat([m.weight_mask.flatten() for _, m in prunable_layers(net)])
    smallest = torch.sort(before).indices[:k]
    expected = torch.ones_like(before)
    expected[smallest] = 0
    assert torch.equal(masks, expected)
    assert torch.equal(after == 0, expected == 0)
    # The layers are pruned unevenly: the threshold is global, not per layer.
    per_layer = [m.weight_mask.mean().item() for _, m in prunable_layers(net)]
    assert max(per_layer) - min(per_layer) > 0.01
    hyper_after = [p for n, p in net.named_parameters() if "hyper" in n]
    assert all(torch.equal(a, b) for a, b in zip(hyper_before, hyper_after, strict=True))


@pytest.mark.parametrize("method", ["unstructured", "structured"])
def test_kept_fraction_follows_one_minus_pr_to_the_n(method):
    net = ODEnet(4, (200, 200, 200))
    pr, cycles = 0.2, 6
    for n in range(1, cycles + 1):
        prune_(net, pr, method)
        if method == "unstructured":
            kept = sparsity(net)["kept_fraction"]
            assert kept == pytest.approx(0.8**n, abs=n / sparsity(net)["prunable"])
        else:
            for _, m in prunable_layers(net)[:-1]:
                assert alive_neurons(m).float().mean().item() == pytest.approx(0.8**n, abs=n / 200)


def test_structured_removes_rows_and_the_matching_inputs_downstream():
    net = ODEnet(3, (12, 9), time="concat").double()
    removed = prune_structured_(net, 0.5)
    layers = [m for _, m in prunable_layers(net)]
    assert removed == 6 + round(0.5 * 9)
    for m, nxt in itertools.pairwise(layers):
        dead = ~alive_neurons(m)
        assert torch.all(m.weight[dead] == 0) and torch.all(m.bias[dead] == 0)
        assert torch.all(nxt.weight[:, : m.weight.shape[0]][:, dead] == 0)
    # Masks are exactly (live rows) x (live inputs): whole rows and whole
    # columns go, never parts of them; concat's time column stays.
    cols = torch.ones(layers[0].weight.shape[1], dtype=torch.bool)
    for m in layers:
        rows = alive_neurons(m)
        assert torch.equal(m.weight_mask.bool(), rows[:, None] & cols[None, :])
        cols = torch.cat([rows, torch.ones(1, dtype=torch.bool)])
    assert torch.all(alive_neurons(layers[-1]))  # outputs are never pruned
    # Pruned neurons really no longer affect the output.
    z = torch.randn(5, 3, dtype=torch.float64)
    dead0 = torch.nonzero(~alive_neurons(layers[0])).flatten()
    out = net(torch.tensor(0.2), z)
    with torch.no_grad():
        layers[1].weight[:, dead0] = 123.0
        layers[1].weight.mul_(layers[1].weight_mask)
    assert torch.equal(out, net(torch.tensor(0.2), z))


def test_structured_scores_by_incoming_l1_norm():
    net = ODEnet(2, (4,), activation="tanh").double()
    with torch.no_grad():
        net.layers[0].weight.copy_(torch.tensor([[1.0, 1.0], [0.1, 0.0], [-3.0, 0.5], [0.2, -0.2]]))
    prune_structured_(net, 0.5)
    assert alive_neurons(net.layers[0]).tolist() == [True, False, True, False]


def test_structured_on_convolutions_removes_channels():
    net = ConvODEnet((1, 5, 5), hidden_channels=(8, 8))
    prune_structured_(net, 0.25)
    c0 = net.layers[0].conv
    dead = ~alive_neurons(c0)
    assert int(dead.sum()) == 2
    assert torch.all(net.layers[1].conv.weight[:, :8][:, dead] == 0)


@pytest.mark.parametrize("method", ["unstructured", "structured"])
def test_pruned_weights_stay_zero_through_training(method):
    flow = CNF(ODEnet(2, (16, 16), activation="sigmoid"), atol=1e-3, rtol=1e-3)
    prune_(flow, 0.5, method)
    zero_before = [m.weight == 0 for _, m in prunable_layers(flow)]
    x = torch.randn(128, 2)
    cfg = TrainConfig(iters=5, batch_size=64, lr=5e-2, weight_decay=1e-2, optimizer="adamw")
    train_density(flow, x, cfg, progress=False)
    for (_, m), z in zip(prunable_layers(flow), zero_before, strict=True):
        assert torch.all(m.weight[z] == 0)
        assert torch.all(m.weight[m.weight_mask.bool()] != 0)  # the rest did train


def test_sparsity_counts():
    net = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 4))
    prune_unstructured_(net, 0.5)
    s = sparsity(net)
    assert s["prunable"] == 40 and s["kept"] == 20
    assert s["prune_ratio"] == pytest.approx(0.5)
    assert s["nonzero_params"] == 20 + 5 + 4
    assert s["total_params"] == 49


def test_bad_fraction_and_method():
    net = ODEnet(2, (4,))
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        prune_(net, 1.0, "unstructured")
    with pytest.raises(ValueError, match="method='random'"):
        prune_(net, 0.1, "random")
    with pytest.raises(ValueError, match="no prunable"):
        prune_(nn.Tanh(), 0.1, "unstructured")


@pytest.mark.parametrize("time", ["none", "concatsquash"])
def test_structured_prunes_each_block_of_a_stacked_flow_separately(time):
    flow = SequentialFlow([CNF(ODEnet(3, (10, 10), time=time)) for _ in range(2)])
    removed = prune_structured_(flow, 0.5)
    assert removed == 2 * (5 + 5)  # hidden neurons of each block only
    for cnf in flow.cnfs:
        layers = [m for _, m in prunable_layers(cnf.odenet)]
        for m in layers[:-1]:
            assert int(alive_neurons(m).sum()) == 5
        # Every output row of each block's last layer stays alive, and no block
        # loses any of its inputs (the previous block's outputs).
        assert torch.all(alive_neurons(layers[-1]))
        assert torch.all(layers[-1].bias_mask == 1)
        assert torch.all(layers[0].weight_mask.flatten(1).any(0))
    z = torch.randn(4, 3)
    assert torch.isfinite(flow.log_prob(z)).all()


def test_structured_on_a_classifier_never_prunes_the_vector_fields_outputs_or_the_readout():
    clf = ODEClassifier(in_dim=2, n_classes=3, hidden=(8, 8))
    removed = prune_structured_(clf, 0.5)
    assert removed == 4 + 4
    layers = [m for _, m in prunable_layers(clf.block.odenet)]
    assert [int(alive_neurons(m).sum()) for m in layers] == [4, 4, 2]
    assert torch.all(clf.readout.weight_mask == 1) and torch.all(clf.readout.bias_mask == 1)
    assert torch.all(clf.readout.weight != 0)
    # The same without a readout (n_classes == in_dim): unchanged behaviour.
    plain = ODEClassifier(in_dim=2, n_classes=2, hidden=(8, 8))
    prune_structured_(plain, 0.5)
    assert [int(alive_neurons(m).sum()) for _, m in prunable_layers(plain)] == [4, 4, 2]


def test_structured_on_a_plain_chain_without_odenets():
    net = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3))
    assert prune_structured_(net, 0.5) == 4 + 4
    assert [int(alive_neurons(m).sum()) for _, m in prunable_layers(net)] == [4, 4, 3]
