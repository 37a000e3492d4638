import pytest
import torch
from torch import nn

from flows import ACTIVATIONS, ConcatSquashLinear, ConvODEnet, ODEnet

TIME_MODES = ("none", "concat", "concatsquash")


@pytest.mark.parametrize("time", TIME_MODES)
@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
def test_odenet_shape_and_time_dependence(time, activation):
    net = ODEnet(3, (7, 5), time=time, activation=activation).double()
    z = torch.randn(4, 3, dtype=torch.float64)
    out0 = net(torch.tensor(0.0), z)
    out1 = net(torch.tensor(0.7), z)
    assert out0.shape == (4, 3)
    if time == "none":
        assert torch.equal(out0, out1)
    else:
        assert not torch.allclose(out0, out1)


def test_odenet_structure_follows_widths():
    net = ODEnet(2, (64, 64, 64), activation="sigmoid")
    linears = [m for m in net.modules() if isinstance(m, nn.Linear)]
    assert [tuple(m.weight.shape) for m in linears] == [(64, 2), (64, 64), (64, 64), (2, 64)]
    assert sum(isinstance(m, nn.Sigmoid) for m in net.modules()) == 3


def test_concat_layer_sees_time_as_last_input():
    net = ODEnet(2, (4,), time="concat", activation="tanh").double()
    layer = net.layers[0].linear
    assert layer.weight.shape == (4, 3)
    z = torch.randn(5, 2, dtype=torch.float64)
    t = torch.tensor(0.3, dtype=torch.float64)
    h = torch.cat([z, torch.full((5, 1), 0.3, dtype=torch.float64)], 1) @ layer.weight.T
    expected = torch.tanh(h + layer.bias)
    assert torch.allclose(net.acts[0](net.layers[0](t, z)), expected)


def test_concatsquash_matches_ffjord_formula():
    layer = ConcatSquashLinear(3, 4).double()
    x = torch.randn(6, 3, dtype=torch.float64)
    t = torch.tensor(0.4, dtype=torch.float64)
    gate = torch.sigmoid(layer.hyper_gate.weight[:, 0] * 0.4 + layer.hyper_gate.bias)
    expected = (x @ layer.linear.weight.T + layer.linear.bias) * gate + layer.hyper_bias.weight[
        :, 0
    ] * 0.4
    assert torch.allclose(layer(t, x), expected)


def test_odenet_rejects_bad_arguments():
    with pytest.raises(ValueError, match="activation='gelu'"):
        ODEnet(2, activation="gelu")
    with pytest.raises(ValueError, match="time='squash'"):
        ODEnet(2, time="squash")
    with pytest.raises(ValueError, match="hidden widths"):
        ODEnet(2, (8, 0))
    with pytest.raises(ValueError, match=r"shape \[B, 2\]"):
        ODEnet(2)(torch.tensor(0.0), torch.randn(3, 5))


def test_conv_odenet_keeps_image_shape_and_uses_time():
    net = ConvODEnet((1, 6, 5), hidden_channels=(4, 4)).double()
    z = torch.randn(2, 1, 6, 5, dtype=torch.float64)
    a = net(torch.tensor(0.0), z)
    b = net(torch.tensor(1.0), z)
    assert a.shape == z.shape
    assert not torch.allclose(a, b)
    assert net.layers[0].conv.weight.shape == (4, 2, 3, 3)  # time is the extra input channel
    with pytest.raises(ValueError, match="in_shape"):
        ConvODEnet((1, 6))
    with pytest.raises(ValueError, match="ConvODEnet expects"):
        net(torch.tensor(0.0), torch.randn(2, 3, 6, 5, dtype=torch.float64))
