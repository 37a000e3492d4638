"""Property test of the engine: random small fields, random masks, every backend and tier.

Hypothesis draws a field (flows.ODEnet in each time mode, or an nn.Sequential MLP; a
state of 1-3 dims, 0-2 hidden layers of width 1-9, any fused activation), a mask per
layer (random density, all zero, with empty rows or columns, or full; biases sometimes
pruned), a layout and a batch of 0-3. Compiled by both tiers on every available backend,
the field must give the dense masked model's f, Hutchinson and exact divergences, and
gradients w.r.t. z and every kept value (float64: f to 1e-12, the rest to 1e-10, norm-wise;
``test_engine_edges.check_field``).

Deterministic in CI: ``derandomize=True`` and no example database, so every run draws the
same examples. The Triton backend runs a smaller set of examples under its interpreter
in a child pytest (TRITON_INTERPRET=1 from its start; the ``*Interpreted`` class).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from engine_helpers import DEVICE
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_engine_edges import (
    HOST_BACKENDS,
    build_field,
    check_field,
    layer_shapes,
    run_interpreted_child,
    sample_inputs,
)

from sparsekern import SparseConfig, compile_sparse

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
KINDS = ("none", "concat", "concatsquash", "sequential")
ACTS = ("tanh", "sigmoid", "softplus", "relu", "elu", "swish")
MASK_MODES = ("random", "random", "zero", "empty-row", "empty-col", "full")
LAYOUTS = ("dense", "csr", "blocked")


def _settings(examples: int) -> settings:
    return settings(max_examples=examples, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@st.composite
def field_specs(draw) -> dict:
    kind = draw(st.sampled_from(KINDS))
    d = draw(st.integers(1, 3))
    hidden = tuple(draw(st.lists(st.integers(1, 9), min_size=0, max_size=2)))
    act = draw(st.sampled_from(ACTS + (("identity",) if kind == "sequential" else ())))
    shapes = layer_shapes(kind, hidden, d)
    modes = draw(st.lists(st.sampled_from(MASK_MODES), min_size=len(shapes),
                          max_size=len(shapes)))
    bias_pruned = draw(st.lists(st.booleans(), min_size=len(shapes), max_size=len(shapes)))
    return {"kind": kind, "d": d, "hidden": hidden, "act": act, "modes": modes,
            "bias_pruned": bias_pruned, "density": draw(st.sampled_from((0.2, 0.5, 0.8))),
            "seed": draw(st.integers(0, 2**16)), "layout": draw(st.sampled_from(LAYOUTS)),
            "batch": draw(st.integers(0, 3))}


def _masks(spec: dict) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
    gen = torch.Generator().manual_seed(spec["seed"])
    masks, bias_masks = [], []
    for (rows, cols), mode, bias in zip(layer_shapes(spec["kind"], spec["hidden"], spec["d"]),
                                        spec["modes"], spec["bias_pruned"], strict=True):
        mask = torch.rand(rows, cols, generator=gen) < spec["density"]
        if mode == "zero":
            mask[:] = False
        elif mode == "full":
            mask[:] = True
        elif mode == "empty-row":
            mask[int(torch.randint(rows, (1,), generator=gen))] = False
        elif mode == "empty-col":
            mask[:, int(torch.randint(cols, (1,), generator=gen))] = False
        masks.append(mask)
        bias_masks.append((torch.rand(rows, generator=gen) < 0.5).double() if bias else None)
    return masks, bias_masks


def check_spec(spec: dict, backends: tuple[str, ...]) -> None:
    masks, bias_masks = _masks(spec)
    net = build_field(spec["kind"], spec["hidden"], spec["act"], masks, d=spec["d"],
                      seed=spec["seed"], bias_masks=bias_masks)
    t, z, noise = sample_inputs(spec["d"], spec["batch"], seed=spec["seed"] + 1)
    for backend in backends:
        for tier in ("fused", "generic"):
            fast = compile_sparse(net, SparseConfig(tier=tier, layout=spec["layout"],
                                                    backend=backend, autotune=False))
            check_field(net, fast, t, z, noise, f"{spec} {backend}/{tier}")


@_settings(100)
@given(spec=field_specs())
def test_random_fields_match_the_dense_masked_model(spec):
    check_spec(spec, HOST_BACKENDS)


class TestPropertyInterpreted:
    """The same property on backend "triton", interpreted on CPU tensors (child process)."""

    __test__ = INTERPRETED

    @_settings(10)
    @given(spec=field_specs())
    def test_random_fields_on_triton(self, spec):
        check_spec(spec, ("triton",))


def test_interpreted_property_passes():
    """TestPropertyInterpreted passes on the Triton interpreter (child process)."""
    run_interpreted_child(Path(__file__), min_passed=1)


test_interpreted_property_passes.__test__ = not INTERPRETED and DEVICE.type == "cpu"
