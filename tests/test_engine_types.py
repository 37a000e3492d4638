"""The engine's typed surface: the compiled-field Protocol and the Literal options."""

from __future__ import annotations

import typing

import pytest
from test_backend_select import _Residual  # not an MLP: the generic tier compiles it
from torch import nn

from sparsekern import SparseConfig, compile_sparse
from sparsekern.field import FieldContract


@pytest.mark.parametrize("tier", ("fused", "generic"))
def test_every_tier_satisfies_the_field_contract(tier):
    net = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 3))
    fast = compile_sparse(net if tier == "fused" else _Residual(), SparseConfig(backend="ref"))
    assert fast.tier == tier
    assert isinstance(fast, FieldContract)
    assert not isinstance(net, FieldContract), "a plain module is no compiled field"


def test_string_options_are_literal_types():
    hints = typing.get_type_hints(SparseConfig)
    for name, values in (("layout", {"auto", "dense", "csr", "blocked"}),
                         ("backend", {"auto", "ref", "cpu", "triton", "cuda"}),
                         ("tier", {"auto", "fused", "generic"}),
                         ("fallback", {"error", "eager"}),
                         ("precision", {"ieee", "tf32", "bf16", "fp16"})):
        assert typing.get_origin(hints[name]) is typing.Literal, name
        assert set(typing.get_args(hints[name])) == values, name
