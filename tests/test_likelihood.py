import math

import pytest
import torch

from flows import bits_per_dim, dequantize, standard_normal_logprob


def test_standard_normal_logprob_matches_torch_distributions():
    z = torch.randn(5, 3, 2, dtype=torch.float64)
    ref = torch.distributions.Normal(0.0, 1.0).log_prob(z).flatten(1).sum(1)
    assert torch.allclose(standard_normal_logprob(z), ref)


def test_bits_per_dim_of_the_uniform_density_is_the_bit_depth():
    # The uniform density on [0, 1)^D has log p = 0: exactly log2(levels) bits/dim.
    assert bits_per_dim(torch.zeros(7), dims=784).item() == pytest.approx(8.0)
    assert bits_per_dim(torch.zeros(7), dims=64, levels=17).item() == pytest.approx(math.log2(17))
    # One nat more per sample is 1 / (D ln 2) bits/dim fewer.
    assert bits_per_dim(torch.full((3,), 10.0), dims=10).item() == pytest.approx(
        8 - 1 / math.log(2)
    )


def test_dequantize_fills_each_bin_uniformly():
    x = torch.randint(0, 256, (20000,)).double()
    y = dequantize(x, generator=torch.Generator().manual_seed(0))
    assert (y >= 0).all() and (y < 1).all()
    assert torch.equal(torch.floor(y * 256), x)
    frac = y * 256 - x
    assert abs(frac.mean().item() - 0.5) < 0.01
    with pytest.raises(ValueError, match="levels"):
        dequantize(x, levels=1)
