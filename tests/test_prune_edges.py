"""Pruning never silently breaks a model (issue 13): the edge cases of flows.prune.

Structured pruning keeps at least one live neuron per hidden layer; unstructured
(global magnitude) pruning may empty a layer, but then says so with an
``EmptyLayerWarning`` naming it, and ``empty_layers`` lists such layers; a fully
pruned model still reports finite numbers.
"""

import math
import warnings

import pytest
import torch
from torch import nn

from flows import CNF, ConvODEnet, ODEClassifier, ODEnet, SequentialFlow
from flows.prune import (
    EmptyLayerWarning,
    alive_neurons,
    empty_layers,
    prunable_layers,
    prune_,
    prune_structured_,
    prune_unstructured_,
    sparsity,
)


def live_counts(chain: nn.Module) -> list[int]:
    return [int(alive_neurons(m).sum()) for _, m in prunable_layers(chain)]


def empty_layer_warnings(record: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in record if issubclass(w.category, EmptyLayerWarning)]


# --- structured: never the last live neuron ---------------------------------------------


def test_structured_keeps_the_last_neuron_of_the_papers_toy_model():
    # The run: 128 -> 13 -> 1, and then no further (it used to go to 0).
    net = ODEnet(2, (128,), activation="sigmoid")
    removed = [prune_structured_(net, 0.9) for _ in range(4)]
    assert removed == [115, 12, 0, 0]  # the count stays truthful: nothing more went
    assert live_counts(net) == [1, 2]
    # The one neuron left really is connected: its row and its column stay.
    first, last = (m for _, m in prunable_layers(net))
    assert int(first.weight_mask.sum()) == 2 and int(last.weight_mask.sum()) == 2
    assert empty_layers(net) == []
    z = torch.randn(8, 2)
    out = net(torch.tensor(0.0), z)
    assert torch.isfinite(out).all()
    # The output still depends on the state through the kept neuron.
    assert not torch.allclose(out, net(torch.tensor(0.0), z + 1.0))


@pytest.mark.parametrize("time", ["none", "concat", "concatsquash"])
def test_structured_keeps_a_neuron_in_every_hidden_layer_of_a_deep_net(time):
    net = ODEnet(3, (64, 32, 16, 8), time=time)
    total = 0
    for _ in range(6):
        with warnings.catch_warnings():
            warnings.simplefilter("error", EmptyLayerWarning)  # nothing empties
            total += prune_structured_(net, 0.9)
    counts = live_counts(net)
    assert counts[:-1] == [1, 1, 1, 1]
    assert counts[-1] == 3  # outputs are never pruned
    assert total == (64 - 1) + (32 - 1) + (16 - 1) + (8 - 1)
    assert empty_layers(net) == []
    assert torch.isfinite(net(torch.tensor(0.5), torch.randn(4, 3))).all()


def test_structured_count_is_the_neurons_actually_removed():
    # With two live neurons, round(0.9 * 2) = 2 would take both: only one goes.
    net = ODEnet(2, (2, 5))
    assert prune_structured_(net, 0.9) == 1 + 4
    assert live_counts(net) == [1, 1, 2]
    assert prune_structured_(net, 0.9) == 0
    assert live_counts(net) == [1, 1, 2]


def test_structured_keeps_a_channel_of_every_hidden_convolution():
    net = ConvODEnet((1, 4, 4), hidden_channels=(6, 6))
    for _ in range(4):
        prune_structured_(net, 0.9)
    assert live_counts(net) == [1, 1, 1]
    assert empty_layers(net) == []


def test_structured_keeps_a_neuron_in_each_block_of_a_stacked_flow():
    flow = SequentialFlow([CNF(ODEnet(2, (16, 16)), atol=1e-3, rtol=1e-3) for _ in range(2)])
    removed = sum(prune_structured_(flow, 0.9) for _ in range(5))
    assert removed == 2 * 2 * (16 - 1)
    for cnf in flow.cnfs:
        assert live_counts(cnf.odenet) == [1, 1, 2]
    assert empty_layers(flow) == []
    assert torch.isfinite(flow.log_prob(torch.randn(4, 2))).all()


def test_structured_keeps_a_neuron_in_a_classifier_and_never_touches_its_readout():
    clf = ODEClassifier(in_dim=2, n_classes=3, hidden=(8, 8))
    removed = sum(prune_structured_(clf, 0.9) for _ in range(4))
    assert removed == 7 + 7
    assert live_counts(clf.block.odenet) == [1, 1, 2]
    assert torch.all(clf.readout.weight_mask == 1)
    assert torch.isfinite(clf(torch.randn(5, 2))).all()


def test_structured_keeps_a_neuron_of_a_plain_chain():
    net = nn.Sequential(nn.Linear(3, 10), nn.Tanh(), nn.Linear(10, 3))
    for _ in range(3):
        prune_structured_(net, 0.9)
    assert live_counts(net) == [1, 3]


# --- unstructured: the paper's global magnitude, but an emptied layer is announced ------


def tiny_output_layer_flow() -> CNF:
    """A CNF whose output layer holds the 32 smallest weights (of 64)."""
    flow = CNF(ODEnet(2, (16,)), atol=1e-3, rtol=1e-3)
    (_, first), (_, last) = prunable_layers(flow)
    with torch.no_grad():
        first.weight.copy_(1.0 + torch.rand_like(first.weight))
        last.weight.copy_(1e-3 * (1.0 + torch.rand_like(last.weight)))
    return flow


def test_unstructured_stays_global_and_warns_when_it_empties_the_output_layer():
    flow = tiny_output_layer_flow()
    with pytest.warns(EmptyLayerWarning, match=r"odefunc\.odenet\.layers\.1") as record:
        assert prune_unstructured_(flow, 0.5) == 32
    # Global magnitude, as in the paper: the whole output layer went, nothing else.
    (_, first), (_, last) = prunable_layers(flow)
    assert torch.all(first.weight_mask == 1) and torch.all(last.weight_mask == 0)
    assert len(empty_layer_warnings(record.list)) == 1  # one layer emptied, one warning
    assert empty_layers(flow) == ["odefunc.odenet.layers.1"]
    # The warning points at the line that asked for the pruning, not into flows or torch.
    assert record.list[0].filename == __file__


def test_the_warning_points_at_the_caller_through_prune_too():
    flow = tiny_output_layer_flow()
    with pytest.warns(EmptyLayerWarning, match="unstructured pruning emptied") as record:
        prune_(flow, 0.5, "unstructured")
    assert [w.filename for w in record.list] == [__file__]


def test_an_empty_layer_is_announced_once_then_listed_every_cycle():
    flow = tiny_output_layer_flow()
    with pytest.warns(EmptyLayerWarning):
        prune_unstructured_(flow, 0.5)
    # Later cycles that empty nothing new stay quiet about the old empty layer ...
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        assert prune_unstructured_(flow, 0.5) == 16
    assert empty_layer_warnings(record) == []
    assert empty_layers(flow) == ["odefunc.odenet.layers.1"]
    # ... and one that empties another layer names that one only.
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        while "odefunc.odenet.layers.0" not in empty_layers(flow):
            prune_unstructured_(flow, 0.9)
    messages = empty_layer_warnings(record)
    assert len(messages) == 1 and "odefunc.odenet.layers.0" in messages[0]
    assert "layers.1" not in messages[0]
    assert empty_layers(flow) == ["odefunc.odenet.layers.0", "odefunc.odenet.layers.1"]


def test_unstructured_that_empties_nothing_does_not_warn():
    net = ODEnet(2, (16, 16))
    with warnings.catch_warnings():
        warnings.simplefilter("error", EmptyLayerWarning)
        prune_(net, 0.5, "unstructured")
    assert empty_layers(net) == []


def test_empty_layers_of_unpruned_and_hand_masked_models():
    net = ODEnet(2, (4, 4), time="concatsquash")
    assert empty_layers(net) == []  # no masks yet: nothing is pruned
    prune_unstructured_(net, 0.0)
    assert empty_layers(net) == []
    with torch.no_grad():
        net.layers[1].linear.weight_mask.zero_()
    # Qualified names of the prunable module, registration order; hypernets never listed.
    assert empty_layers(net) == ["layers.1.linear"]
    assert issubclass(EmptyLayerWarning, UserWarning)  # shown by default, filterable alone


def test_structured_warns_if_mixed_masks_leave_a_layer_empty():
    # Structured masks alone never empty a layer, but on top of unstructured masks
    # removing a neuron can take the next layer's last kept inputs: that is said too.
    net = ODEnet(2, (4,)).double()
    first, last = net.layers
    with torch.no_grad():
        first.weight.copy_(torch.tensor([[0.1, 0.1], [0.2, 0.2], [3.0, 3.0], [4.0, 4.0]]))
    prune_unstructured_(net, 0.0)
    with torch.no_grad():
        last.weight_mask[:, 2:] = 0  # only the inputs from neurons 0 and 1 stay
    with pytest.warns(EmptyLayerWarning, match=r"structured pruning emptied layer 'layers\.1'"):
        assert prune_structured_(net, 0.5) == 2  # the weakest two: neurons 0 and 1
    assert empty_layers(net) == ["layers.1"]
    assert live_counts(net) == [2, 0]


# --- fully pruned: finite numbers everywhere ---------------------------------------------


def fully_pruned() -> CNF:
    flow = CNF(ODEnet(2, (8, 8)), atol=1e-3, rtol=1e-3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", EmptyLayerWarning)
        for _ in range(20):
            prune_unstructured_(flow, 0.99)
    return flow


def test_fully_pruned_sparsity_is_finite():
    flow = fully_pruned()
    s = sparsity(flow)
    assert s["kept"] == 0 and s["prunable"] == 2 * 8 + 8 * 8 + 8 * 2
    assert s["kept_fraction"] == 0.0 and s["prune_ratio"] == 1.0
    assert all(math.isfinite(v) for v in s.values())
    assert s["nonzero_params"] <= 8 + 8 + 2  # only biases can stay
    assert empty_layers(flow) == [name for name, _ in prunable_layers(flow)]


def test_fully_pruned_model_prunes_nothing_more_and_still_runs():
    flow = fully_pruned()
    for _, m in prunable_layers(flow):
        assert not alive_neurons(m).any()
    with warnings.catch_warnings():
        warnings.simplefilter("error", EmptyLayerWarning)  # already empty: no new news
        assert prune_unstructured_(flow, 0.5) == 0
        assert prune_structured_(flow, 0.5) == 0
    assert sparsity(flow)["prune_ratio"] == 1.0
    assert torch.isfinite(flow.log_prob(torch.randn(4, 2))).all()


def test_sparsity_of_a_model_without_prunable_weights_is_finite():
    s = sparsity(nn.Sequential(nn.Tanh()))
    assert s == {
        "prunable": 0,
        "kept": 0,
        "kept_fraction": 1.0,
        "prune_ratio": 0.0,
        "nonzero_params": 0,
        "total_params": 0,
    }


# --- the runs: they finish, and the results say which layers are empty -------------


@pytest.mark.slow
def test_an_unstructured_run_that_empties_a_layer_finishes_and_lists_it(tmp_path, capsys):
    # Global magnitude pruning of the 2-128-2 gaussians model empties its output layer in
    # cycle 2; the compiled field's adjoint used to crash there on the empty parameter.
    import json

    from flows.cli import main

    out = tmp_path / "run"
    rc = main(["prune", "--dataset", "gaussians", "--method", "unstructured",
               "--prune-ratio", "0.5", "--cycles", "2", "--iters", "30", "--out", str(out),
               "--no-progress", "--set", "run.speedup_steps=0"])
    assert rc == 0
    # The command line shows the warning as one line, without Python's source line.
    stderr = capsys.readouterr().err
    warned = [line for line in stderr.splitlines() if "emptied layer" in line]
    assert warned == ["sparseflow prune: warning: unstructured pruning emptied layer "
                      "'odefunc.odenet.layers.1': all its weights are now masked, so it "
                      "passes on only its bias and what comes after it no longer sees the "
                      "input (empty_layers(model) lists it)"]
    assert "prune_(model" not in stderr
    rows = json.loads((out / "results.json").read_text())
    assert [r["empty_layers"] for r in rows] == [[], [], ["odefunc.odenet.layers.1"]]
    assert all(math.isfinite(r["test_nll"]) for r in rows)
    assert "odefunc.odenet.layers.1 from cycle 2" in (out / "results.md").read_text()


@pytest.mark.slow
def test_a_structured_run_at_90_percent_keeps_a_neuron_and_finishes(tmp_path):
    import json

    from flows.cli import main

    out = tmp_path / "run"
    with warnings.catch_warnings():
        warnings.simplefilter("error", EmptyLayerWarning)
        rc = main(["prune", "--dataset", "gaussians", "--method", "structured",
                   "--prune-ratio", "0.9", "--cycles", "3", "--iters", "20", "--out", str(out),
                   "--no-progress", "--set", "run.speedup_steps=0"])
    assert rc == 0
    rows = json.loads((out / "results.json").read_text())
    assert len(rows) == 4 and all(r["empty_layers"] == [] for r in rows)
    # 128 -> 13 -> 1 -> 1 hidden neurons; each keeps 2 weights in and 2 out, of 512.
    assert rows[2]["kept_fraction"] == rows[3]["kept_fraction"] == pytest.approx(4 / 512)
