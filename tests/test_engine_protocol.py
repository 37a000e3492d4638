"""The engine knows no model library: model code describes itself (sparsekern.protocol).

A user's own MLP (no flows import) reaches the fused tier through ``sparsekern_mlp``,
a container through ``sparsekern_fields``, a type it cannot change through
``register_mlp``; malformed descriptions are a clear CompileError.
"""

from __future__ import annotations

import itertools
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from engine_helpers import (
    BACKENDS,
    DEVICE,
    F64_F_TOL,
    F64_TOL,
    compiled_grads,
    dense_grads,
    random_mask,
    rel_err,
)
from torch import nn

from sparsekern import CompiledField, CompileError, SparseConfig, compile_sparse, write_back
from sparsekern.divergence import divergence_exact, divergence_hutchinson
from sparsekern.protocol import (
    DeclaresFields,
    DescribesMLP,
    LinearSpec,
    MLPSpec,
    register_mlp,
    unregister_mlp,
)

ROOT = Path(__file__).resolve().parents[1]
F64 = torch.float64


# ---------------------------------------------------------------- user model code


class TimeConcat(nn.Module):
    """``W [x, t] + b``, the time as the last input column."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self._layer = nn.Linear(n_in + 1, n_out)

    def forward(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        tt = torch.ones_like(x[:, :1]) * t
        return self._layer(torch.cat([x, tt], 1))


class UserMLP(nn.Module):
    """An FFJORD-style vector field: concat layers, one softplus between them."""

    def __init__(self, d: int, hidden: tuple[int, ...]) -> None:
        super().__init__()
        widths = (d, *hidden, d)
        self.d = d
        self.layers = nn.ModuleList(TimeConcat(a, b) for a, b in itertools.pairwise(widths))
        self.act = nn.Softplus()

    def forward(self, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        h = z
        for i, layer in enumerate(self.layers):
            h = layer(t, h)
            if i < len(self.layers) - 1:
                h = self.act(h)
        return h

    def sparsekern_mlp(self) -> MLPSpec:
        return MLPSpec([LinearSpec(layer._layer, "concat") for layer in self.layers], self.act,
                       self.d)


def _prune(model: nn.Module, density: float, seed: int) -> nn.Module:
    """flows-style masks (a ``weight_mask`` buffer, zeros in the weight), without flows."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for i, m in enumerate(m for m in model.modules() if isinstance(m, nn.Linear)):
            mask = random_mask(*m.weight.shape, density, gen, empty_row=i % 2, empty_col=0)
            m.weight.mul_(mask)
            m.register_buffer("weight_mask", mask.to(m.weight.dtype))
    return model


def _user_mlp(seed: int = 0) -> UserMLP:
    torch.manual_seed(seed)
    f = UserMLP(3, (16, 12)).to(F64)
    with torch.no_grad():
        for p in f.parameters():
            p.mul_(2.0)  # far from the identity, so a wrong term shows
    return _prune(f, 0.5, seed).to(DEVICE)


# ---------------------------------------------------------------- no flows in the engine


def test_the_engine_loads_no_flows_module():
    code = textwrap.dedent("""
        import sys
        import torch
        from torch import nn
        import sparsekern
        from sparsekern import SparseConfig, compile_sparse

        f = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 3)).double()
        z = torch.randn(4, 3, dtype=torch.float64)
        for tier in ("auto", "generic"):
            fast = compile_sparse(f, SparseConfig(backend="ref", tier=tier))
            assert fast.tier == ("fused" if tier == "auto" else "generic"), fast.tier
            fast(z)
            fast.forward_and_divergence(None, z)
            fast.forward_and_divergence(None, z, torch.randn_like(z))
        loaded = sorted(m for m in sys.modules if m == "flows" or m.startswith("flows."))
        assert not loaded, loaded
        print("ok")
    """)
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-3000:]


# ---------------------------------------------------------------- a user's own MLP


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_user_mlp_reaches_the_fused_tier_and_equals_the_dense_model(backend):
    f = _user_mlp(1)
    assert isinstance(f, DescribesMLP)
    fast = compile_sparse(f, SparseConfig(backend=backend))
    assert fast.tier == "fused"
    gen = torch.Generator().manual_seed(2)
    z = torch.randn(9, 3, generator=gen, dtype=F64).to(DEVICE)
    noise = torch.randn(9, 3, generator=gen, dtype=F64).to(DEVICE)
    t = torch.tensor(0.7, dtype=F64, device=DEVICE)
    with torch.no_grad():
        assert rel_err(fast(t, z), f(t, z)) <= F64_F_TOL
    for probe in (None, noise):
        zz = z.clone().requires_grad_(True)
        dz = f(t, zz)
        div = (divergence_exact(dz, zz) if probe is None
               else divergence_hutchinson(dz, zz, probe))
        ((dz ** 2).sum() + div.sum()).backward()
        ref_z, ref_p = zz.grad, dense_grads(f)
        f.zero_grad()
        zc = z.clone().requires_grad_(True)
        dz_c, div_c = fast.forward_and_divergence(t, zc, probe)
        assert rel_err(dz_c, dz) <= F64_F_TOL
        assert rel_err(div_c, div) <= F64_TOL
        ((dz_c ** 2).sum() + div_c.sum()).backward()
        assert rel_err(zc.grad, ref_z) <= F64_TOL
        got = compiled_grads(fast, f)
        assert set(got) == set(ref_p)
        for name, g in got.items():
            assert rel_err(g, ref_p[name]) <= F64_TOL, name
        fast.zero_grad()


def test_an_unsupported_activation_sends_a_described_mlp_to_the_generic_tier():
    f = _user_mlp()
    f.act = nn.GELU()
    assert compile_sparse(f, SparseConfig(backend="ref")).tier == "generic"
    with pytest.raises(CompileError, match="tier='fused' needs a recognised MLP"):
        compile_sparse(f, SparseConfig(backend="ref", tier="fused"))


# ---------------------------------------------------------------- containers


class Dynamics(nn.Module):
    """A user's ODE function: declares its vector field, owns a scale and a read-out."""

    def __init__(self, field: nn.Module) -> None:
        super().__init__()
        self.field = field
        self.scale = nn.Parameter(torch.tensor(1.5, dtype=F64))
        self.readout = nn.Linear(3, 3).to(F64)

    def sparsekern_fields(self) -> tuple[str, ...]:
        return ("field",)

    def forward(self, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return self.readout(self.scale * self.field(t, z))


class Model(nn.Module):
    """A plain container on the way (declares nothing itself)."""

    def __init__(self) -> None:
        super().__init__()
        self.dynamics = Dynamics(_user_mlp(3).cpu())
        self.head = nn.Linear(3, 2).to(F64)

    def forward(self, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return self.head(self.dynamics(t, z))


def test_a_declared_vector_field_is_compiled_and_the_rest_shared():
    model = Model()
    assert isinstance(model.dynamics, DeclaresFields)
    fast = compile_sparse(model, SparseConfig(backend="ref"))
    assert type(fast) is Model and type(fast.dynamics) is Dynamics
    assert isinstance(fast.dynamics.field, CompiledField) and fast.dynamics.field.tier == "fused"
    assert isinstance(model.dynamics.field, UserMLP)  # the source is untouched
    assert fast.dynamics.scale is model.dynamics.scale
    assert fast.dynamics.readout is model.dynamics.readout and fast.head is model.head
    src = {id(p) for p in model.parameters()}
    kept = {id(p) for p in fast.dynamics.field.parameters()}
    outside = {id(p) for p in fast.parameters()} - kept
    assert outside == {id(p) for n, p in model.named_parameters() if not n.startswith(
        "dynamics.field.")} and not kept & src
    z = torch.randn(5, 3, dtype=F64)
    t = torch.tensor(0.2, dtype=F64)
    with torch.no_grad():
        assert rel_err(fast(t, z), model(t, z)) <= F64_F_TOL
    assert write_back(fast) == 1


def test_a_field_held_twice_is_compiled_once():
    model = Model()
    model.twin = model.dynamics  # the same container under a second name
    fast = compile_sparse(model, SparseConfig(backend="ref"))
    assert fast.twin is fast.dynamics and fast.dynamics is not model.dynamics


def test_a_container_naming_no_child_is_refused():
    model = Model()
    model.dynamics.sparsekern_fields = lambda: ("feild",)
    with pytest.raises(CompileError, match=r"Dynamics.sparsekern_fields\(\) names 'feild', "
                                           r"which is not a child module"):
        compile_sparse(model, SparseConfig(backend="ref"))
    model.dynamics.sparsekern_fields = lambda: "field"
    with pytest.raises(CompileError, match="expected a tuple of child module names"):
        compile_sparse(model, SparseConfig(backend="ref"))


# ---------------------------------------------------------------- the registry


class ThirdPartyMLP(nn.Module):
    """A type whose code cannot implement the protocol: f(z) = fc2(tanh(fc1(z)))."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.act = nn.Linear(3, 10), nn.Linear(10, 3), nn.Tanh()

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(z)))


def _describe(m: ThirdPartyMLP) -> MLPSpec:
    return MLPSpec([LinearSpec(m.fc1), LinearSpec(m.fc2)], [m.act], 3)


@pytest.fixture
def registered():
    def register(describe):
        register_mlp(ThirdPartyMLP, describe)

    yield register
    unregister_mlp(ThirdPartyMLP)


def test_a_registered_type_is_fused(registered):
    f = _prune(ThirdPartyMLP().to(F64), 0.6, 4)
    assert compile_sparse(f, SparseConfig(backend="ref")).tier == "generic"
    registered(_describe)
    fast = compile_sparse(f, SparseConfig(backend="ref"))
    assert fast.tier == "fused"
    assert [layer.name for layer in fast.layers] == ["fc1", "fc2"]
    z = torch.randn(6, 3, dtype=F64)
    with torch.no_grad():
        assert rel_err(fast(z), f(z)) <= F64_F_TOL


def _other(m):
    return nn.Linear(3, 10)


BAD = {
    "not a spec": (lambda m: [m.fc1, m.fc2],
                   r"registered for ThirdPartyMLP returned a list; expected an MLPSpec"),
    "not a linear": (lambda m: MLPSpec([LinearSpec(m.fc1), LinearSpec(m.act)], [m.act], 3),
                     r"layer 1's linear is a Tanh, not an nn.Linear"),
    "not a submodule": (lambda m: MLPSpec([LinearSpec(_other(m)), LinearSpec(m.fc2)], m.act, 3),
                        r"layer 0's linear \(Linear\) is not a submodule of the field"),
    "widths": (lambda m: MLPSpec([LinearSpec(m.fc1), LinearSpec(m.fc2)], m.act, 4),
               r"layer 0 reads 3 state inputs, but in_dim is 4"),
    "time mode": (lambda m: MLPSpec([LinearSpec(m.fc1, "sideways"), LinearSpec(m.fc2)], m.act, 3),
                  r"layer 0 has time='sideways'; expected one of"),
    "no hypernets": (lambda m: MLPSpec([LinearSpec(m.fc1, "concatsquash"), LinearSpec(m.fc2)],
                                       m.act, 3),
                     r"layer 0's hyper_gate must be an nn.Linear\(1, 10\) for "
                     r"time='concatsquash', got NoneType"),
    "activations": (lambda m: MLPSpec([LinearSpec(m.fc1), LinearSpec(m.fc2)], [m.act] * 2, 3),
                    r"has 2 layers and 2 activations; expected 1"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_a_bad_description_is_a_clear_compile_error(registered, case):
    describe, message = BAD[case]
    registered(describe)
    with pytest.raises(CompileError, match=message):
        compile_sparse(ThirdPartyMLP().to(F64), SparseConfig(backend="ref"))


def test_a_time_dependent_description_of_an_autonomous_field_is_refused(registered):
    f = ThirdPartyMLP().to(F64)
    f.fc2 = nn.Linear(11, 3).to(F64)  # one more input column: the time, if concat
    registered(lambda m: MLPSpec([LinearSpec(m.fc1), LinearSpec(m.fc2, "concat")], m.act, 3))
    with pytest.raises(CompileError, match=r"has time-dependent layers, but ThirdPartyMLP is "
                                           r"called f\(z\), without a time"):
        compile_sparse(f, SparseConfig(backend="ref"))


def test_register_mlp_takes_module_types_and_callables():
    with pytest.raises(TypeError, match=r"nn\.Module subclass"):
        register_mlp(int, _describe)
    with pytest.raises(TypeError, match="callable"):
        register_mlp(ThirdPartyMLP, "describe")


# ---------------------------------------------------------------- flows implements it


def test_flows_implements_the_protocol():
    from flows import ODEnet
    from flows.odefunc import ODEFunc

    net = ODEnet(2, (8, 8), time="concatsquash")
    assert isinstance(net, DescribesMLP) and isinstance(ODEFunc(net), DeclaresFields)
    assert ODEFunc(net).sparsekern_fields() == ("odenet",)
    spec = net.sparsekern_mlp()
    assert [s.time for s in spec.layers] == ["concatsquash"] * 3 and spec.in_dim == 2
    net.acts[1] = nn.ReLU()  # two activation types: not the fused tier's
    assert net.sparsekern_mlp() is None


def test_a_registered_type_subclassed_with_its_own_forward_is_not_fused():
    # The registry describes what nn.Sequential.forward computes; a subclass that
    # computes something else must not get that description (it compiled to the wrong
    # function before: max error 2.6 on this field).
    class Residual(nn.Sequential):
        def forward(self, z):
            return z + super().forward(z)

    torch.manual_seed(0)
    f = Residual(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 3))
    fast = compile_sparse(f, SparseConfig(backend="ref"))
    assert fast.tier == "generic"
    z = torch.randn(5, 3)
    torch.testing.assert_close(fast(z), f(z))

    class Plain(nn.Sequential):  # same forward: still the registered description
        pass

    assert compile_sparse(Plain(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 3)),
                          SparseConfig(backend="ref")).tier == "fused"


def test_activations_may_come_as_a_module_list():
    # An nn.ModuleList is itself a Module: it must be read as the list it is, not as
    # one unknown activation (which sent the field to the generic tier silently).
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lins = nn.ModuleList([nn.Linear(2, 8), nn.Linear(8, 8), nn.Linear(8, 2)])
            self.acts = nn.ModuleList([nn.Tanh(), nn.Tanh()])

        def forward(self, z):
            for lin, act in zip(self.lins, [*self.acts, None], strict=True):
                z = lin(z) if act is None else act(lin(z))
            return z

        def sparsekern_mlp(self):
            return MLPSpec([LinearSpec(m) for m in self.lins], self.acts, in_dim=2)

    f = Net()
    fast = compile_sparse(f, SparseConfig(backend="ref", tier="fused"))
    z = torch.randn(4, 2)
    torch.testing.assert_close(fast(z), f(z))
