"""What model code tells the engine: which modules are MLP vector fields, and where they are.

The engine imports no model library. Model code describes itself in three ways:

- **An MLP vector field** implements ``sparsekern_mlp(self) -> MLPSpec | None``
  (``DescribesMLP``): its linear layers in order (``LinearSpec``: an
  ``nn.Linear``, the layer's time mode, for concatsquash the gate and time-bias
  hyper modules), the activation module(s) between them and the state width.
  None means "not an MLP the fused tier can run" (the generic tier compiles it).
  The engine reads the masks itself (``masked_tensor``) and builds the ``Chain``
  that the fused tier (``sparsekern.fused``) compiles.
- **A convolutional vector field** implements ``sparsekern_convnet(self) ->
  ConvNetSpec | None`` (``DescribesConvNet``): its ``nn.Conv2d`` layers in order
  (``ConvSpec``: the convolution and its time mode, "none" or "concat" with the
  time as the last input channel), the activations and the state's channel
  count. The fused tier (``sparsekern.fused_conv``) compiles the ``ConvChain``
  built from it; a layer that changes H or W, or an activation without a kernel,
  sends the field to the generic tier.
- **A container** (an ODE function, a flow) implements
  ``sparsekern_fields(self) -> tuple[str, ...]`` (``DeclaresFields``): the names
  of its child modules that are vector fields. ``compile_sparse`` compiles those
  children in a structural copy of the model.
- **A type the engine cannot change** is described by a function registered with
  ``register_mlp(cls, describe)``. ``nn.Sequential`` (``Linear, act, ...,
  Linear``) is registered here.

A described MLP computes, for f(t, z) or f(z), ``h = z``; for each layer
``a = layer(t, h)``, then ``h = act(a)`` except after the last layer, where per
time mode ``layer(t, h)`` is

- ``"none"``: ``linear(h)``;
- ``"concat"``: ``linear(cat([h, t]))``: the time is the last input column;
- ``"concatsquash"``: ``linear(h) * sigmoid(hyper_gate(t)) + hyper_bias(t)``,
  with ``hyper_gate`` an ``nn.Linear(1, out)`` and ``hyper_bias`` an
  ``nn.Linear(1, out, bias=False)``.

Widths chain from ``in_dim`` back to ``in_dim``. A description that breaks these
rules (a module that is no ``nn.Linear`` or not inside the field, widths that do
not chain, a time mode the field cannot be given) is a ``CompileError``; an
activation the fused tier has no kernel for, or two activation types, sends the
field to the generic tier.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol, TypeVar, cast, get_args, runtime_checkable

import torch
from torch import nn

from sparsekern.activations import activation_name
from sparsekern.conv import conv_geometry
from sparsekern.field import call_arity
from sparsekern.masks import CompileError, MaskedTensor, masked_tensor

TimeMode = Literal["none", "concat", "concatsquash"]
TIME_MODES: tuple[str, ...] = get_args(TimeMode)


# -- what model code returns ---------------------------------------------------------


@dataclass(frozen=True)
class LinearSpec:
    """One linear layer of an MLP vector field (see the module docstring for its map).

    ``linear``: the main map, whose ``weight`` is what pruning masks. For
    ``time="concat"`` it has one input column more than the state width (t, last).
    ``hyper_gate`` / ``hyper_bias``: concatsquash only, the small maps of t.
    """

    linear: nn.Linear
    time: TimeMode = "none"
    hyper_gate: nn.Linear | None = None
    hyper_bias: nn.Linear | None = None


@dataclass(frozen=True)
class MLPSpec:
    """An MLP vector field: its layers, the activation(s) between them, the state width.

    ``activations``: one module per hidden layer (``len(layers) - 1``; a list, an
    nn.ModuleList or an nn.Sequential of them), or a single module applied after
    every hidden layer.
    """

    layers: Sequence[LinearSpec]
    activations: nn.Module | Sequence[nn.Module]
    in_dim: int


ConvTimeMode = Literal["none", "concat"]
CONV_TIME_MODES: tuple[str, ...] = get_args(ConvTimeMode)


@dataclass(frozen=True)
class ConvSpec:
    """One convolution of a convolutional vector field (``ConvNetSpec``).

    ``conv``: the ``nn.Conv2d`` whose weight pruning masks; stride 1, zero
    padding (k - 1) / 2 of a square odd kernel, dilation 1, groups 1, so every
    layer keeps H and W. ``time="concat"``: its *last* input channel is the
    time, a constant t image (FFJORD's ConcatConv2d; FFJORD puts it first).
    """

    conv: nn.Conv2d
    time: ConvTimeMode = "none"


@dataclass(frozen=True)
class ConvNetSpec:
    """A convolutional vector field: per layer ``a = conv(cat([h, t]) or h)``, ``h = act(a)``
    except after the last, from ``h = z`` [B, in_channels, H, W] back to in_channels.

    ``activations`` as in ``MLPSpec``.
    """

    layers: Sequence[ConvSpec]
    activations: nn.Module | Sequence[nn.Module]
    in_channels: int


@runtime_checkable
class DescribesConvNet(Protocol):
    """A module that can describe itself as a convolutional vector field."""

    def sparsekern_convnet(self) -> ConvNetSpec | None: ...


@runtime_checkable
class DescribesMLP(Protocol):
    """A module that can describe itself as an MLP vector field."""

    def sparsekern_mlp(self) -> MLPSpec | None: ...


@runtime_checkable
class DeclaresFields(Protocol):
    """A container whose named child modules are vector fields."""

    def sparsekern_fields(self) -> tuple[str, ...]: ...


@dataclass(frozen=True, eq=False)  # eq=False: it holds a tensor
class Dynamics:
    """What an ODE function integrates, so ``sparsekern.odeint`` can run it natively.

    A tensor state z gives dz/dt = field(t, z). A tuple state (z, logp) gives
    (field(t, z), -div field), a continuous normalizing flow's dynamics, with the
    divergence exact or Hutchinson's with the fixed probe ``noise`` [B, d] (drawn
    once per solve by the caller).

    Attributes:
        field: the vector field, a module called field(t, z) or field(z); the
            native solver runs it when it is a ``CompiledField``.
        divergence: "exact" or "hutchinson" (used for tuple states).
        noise: the Hutchinson probe, like z; None for the exact trace.
        count: told the number of field evaluations a native solve made (the
            ODE function's NFE counter), or None.
    """

    field: nn.Module
    divergence: Literal["exact", "hutchinson"] = "exact"
    noise: torch.Tensor | None = None
    count: Callable[[int], None] | None = None


@runtime_checkable
class DescribesDynamics(Protocol):
    """An ODE function that says what it integrates (``Dynamics``)."""

    def sparsekern_dynamics(self) -> Dynamics: ...


Describe = Callable[[nn.Module], MLPSpec | None]
_REGISTRY: dict[type, Describe] = {}
_M = TypeVar("_M", bound=nn.Module)


def register_mlp(cls: type[_M], describe: Callable[[_M], MLPSpec | None]) -> None:
    """Describe instances of ``cls`` (and its subclasses) with ``describe(module)``.

    For types whose code cannot implement ``sparsekern_mlp`` (torch's own, a third
    party's). A module's own ``sparsekern_mlp`` comes first; otherwise the most
    specific registered class in its MRO. Registering a class again replaces its entry.
    """
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise TypeError(f"register_mlp takes an nn.Module subclass, got {cls!r}")
    if not callable(describe):
        raise TypeError(f"register_mlp takes a callable describe function, got {describe!r}")
    # describe_mlp calls it only on instances of cls (or of its subclasses).
    _REGISTRY[cls] = cast(Describe, describe)


def unregister_mlp(cls: type[nn.Module]) -> Describe | None:
    """Remove the entry of ``cls``; returns its describe function (None if it had none)."""
    return _REGISTRY.pop(cls, None)


def describe_mlp(f: nn.Module) -> MLPSpec | None:
    """The MLP description of ``f``: its own ``sparsekern_mlp()``, else the registry's."""
    if isinstance(f, DescribesMLP):
        spec, source = f.sparsekern_mlp(), f"{type(f).__name__}.sparsekern_mlp()"
    else:
        found = next((c for c in type(f).__mro__ if c in _REGISTRY), None)
        # A subclass that computes something else (its own forward, e.g. a residual
        # nn.Sequential) is not what the registered description says: generic tier.
        if found is None or getattr(type(f), "forward", None) is not getattr(
                found, "forward", None):
            return None
        describe = _REGISTRY[found]
        spec = describe(f)
        source = f"the describe function registered for {type(f).__name__}"
    if spec is not None and not isinstance(spec, MLPSpec):
        raise CompileError(f"{source} returned a {type(spec).__name__}; expected an "
                           "MLPSpec, or None for a field the fused tier should not run")
    return spec


def declared_fields(model: nn.Module) -> tuple[str, ...] | None:
    """The vector-field children ``model`` declares (checked), or None if it declares none."""
    if not isinstance(model, DeclaresFields):
        return None
    names = model.sparsekern_fields()
    what = f"{type(model).__name__}.sparsekern_fields()"
    if isinstance(names, str) or not isinstance(names, Sequence) or not all(
        isinstance(n, str) for n in names
    ):
        raise CompileError(f"{what} returned {names!r}; expected a tuple of child module names")
    for n in names:
        if model._modules.get(n) is None:
            raise CompileError(f"{what} names '{n}', which is not a child module of "
                               f"{type(model).__name__} (children: {list(model._modules)})")
    return tuple(dict.fromkeys(names))


# -- what the fused tier compiles ------------------------------------------------------


@dataclass
class ChainLayer:
    """One linear layer of a recognised MLP, as masked tensors."""

    name: str
    weight: MaskedTensor  # [out, in] (+1 time column for concat)
    bias: MaskedTensor | None
    time: str = "none"  # "none" | "concat" | "concatsquash"
    gate_weight: MaskedTensor | None = None  # concatsquash: sigmoid(gate_weight t + gate_bias)
    gate_bias: MaskedTensor | None = None
    time_weight: MaskedTensor | None = None  # concatsquash: + time_weight t


@dataclass
class Chain:
    layers: list[ChainLayer]
    act: str
    in_dim: int


def _shape(linear: nn.Linear) -> tuple[int, int]:
    # torch.nn.utils.prune keeps the parameter as weight_orig (weight is then derived).
    w = getattr(linear, "weight_orig", None)
    w = linear.weight if w is None else w
    return tuple(w.shape)


class _Names:
    """Qualified names of f's submodules; the k-th use of a module gets its k-th name."""

    def __init__(self, f: nn.Module, where: str) -> None:
        self.where = where
        self.names: dict[int, list[str]] = {}
        for name, m in f.named_modules(remove_duplicate=False):
            self.names.setdefault(id(m), []).append(name)
        self.used: dict[int, int] = {}

    def __call__(self, module: nn.Module, what: str) -> str:
        names = self.names.get(id(module))
        if names is None:
            raise CompileError(f"{self.where}: {what} ({type(module).__name__}) is not a "
                               "submodule of the field; describe the field's own modules")
        k = self.used.get(id(module), 0)
        self.used[id(module)] = k + 1
        return names[min(k, len(names) - 1)]


def _check_hyper(module: object, what: str, out: int, where: str, bias: bool | None) -> None:
    if not isinstance(module, nn.Linear):
        raise CompileError(f"{where}: {what} must be an nn.Linear(1, {out}) for "
                           f"time='concatsquash', got {type(module).__name__}")
    if _shape(module) != (out, 1):
        raise CompileError(f"{where}: {what} maps {_shape(module)[1]} -> {_shape(module)[0]}, "
                           f"expected 1 -> {out} (the layer's output width)")
    if bias is False and module.bias is not None:
        raise CompileError(f"{where}: {what} must have no bias (bias=False); the fused tier "
                           "adds hyper_bias.weight * t only")


def build_chain(f: nn.Module, spec: MLPSpec, where: str | None = None) -> Chain | None:
    """The ``Chain`` of ``spec`` with f's masks; None for activations without a fused kernel.

    Raises CompileError on a description that breaks the rules of the module docstring.
    """
    where = where or f"the MLP description of {type(f).__name__}"
    layers = list(spec.layers)
    if not layers:
        raise CompileError(f"{where} has no layers")
    acts = _activation_list(spec, len(layers), where)
    if not isinstance(spec.in_dim, int) or spec.in_dim < 1:
        raise CompileError(f"{where}: in_dim must be a positive int, got {spec.in_dim!r}")
    for i, layer in enumerate(layers):
        if not isinstance(layer, LinearSpec):
            raise CompileError(f"{where}: layer {i} is a {type(layer).__name__}, not a LinearSpec")
        if not isinstance(layer.linear, nn.Linear):
            raise CompileError(f"{where}: layer {i}'s linear is a "
                               f"{type(layer.linear).__name__}, not an nn.Linear")
        if layer.time not in TIME_MODES:
            raise CompileError(f"{where}: layer {i} has time={layer.time!r}; expected one of "
                               f"{TIME_MODES}")
        out = _shape(layer.linear)[0]
        if layer.time == "concatsquash":
            _check_hyper(layer.hyper_gate, f"layer {i}'s hyper_gate", out, where, None)
            _check_hyper(layer.hyper_bias, f"layer {i}'s hyper_bias", out, where, False)
        elif layer.hyper_gate is not None or layer.hyper_bias is not None:
            raise CompileError(f"{where}: layer {i} has hyper modules but time={layer.time!r}; "
                               "they belong to time='concatsquash'")
    # Widths: each layer reads the previous one's output (plus t for concat).
    width = spec.in_dim
    for i, layer in enumerate(layers):
        out, n_in = _shape(layer.linear)
        state_in = n_in - 1 if layer.time == "concat" else n_in
        if state_in != width:
            extra = " plus the time column" if layer.time == "concat" else ""
            raise CompileError(f"{where}: layer {i} reads {state_in} state inputs{extra}, "
                               f"but {'in_dim is' if i == 0 else 'the layer before gives'} "
                               f"{width}")
        width = out
    if width != spec.in_dim:
        raise CompileError(f"{where}: the last layer gives {width} outputs, but a vector field "
                           f"maps in_dim={spec.in_dim} back to {spec.in_dim}")
    if any(layer.time != "none" for layer in layers) and call_arity(f) == 1:
        raise CompileError(f"{where} has time-dependent layers, but {type(f).__name__} is "
                           "called f(z), without a time")
    act = _fused_activation(acts)
    if act is None:
        return None  # no fused kernel for it, or two activation types: the generic tier
    name_of = _Names(f, where)
    chain = []
    for i, layer in enumerate(layers):
        name = name_of(layer.linear, f"layer {i}'s linear")
        weight = masked_tensor(layer.linear, name, "weight")
        assert weight is not None  # an nn.Linear has a weight (prune: weight_orig + mask)
        bias = masked_tensor(layer.linear, name, "bias", zeros_are_pruned=False)
        if layer.time != "concatsquash":
            chain.append(ChainLayer(name, weight, bias, layer.time))
            continue
        hyper_gate, hyper_bias = layer.hyper_gate, layer.hyper_bias
        # _check_hyper (above) made both nn.Linear for every concatsquash layer.
        assert hyper_gate is not None and hyper_bias is not None
        gate = name_of(hyper_gate, f"layer {i}'s hyper_gate")
        tbias = name_of(hyper_bias, f"layer {i}'s hyper_bias")
        chain.append(ChainLayer(
            name, weight, bias, "concatsquash",
            gate_weight=masked_tensor(hyper_gate, gate, "weight", zeros_are_pruned=False),
            gate_bias=masked_tensor(hyper_gate, gate, "bias", zeros_are_pruned=False),
            time_weight=masked_tensor(hyper_bias, tbias, "weight", zeros_are_pruned=False),
        ))
    return Chain(chain, act, spec.in_dim)


def recognise_chain(f: nn.Module) -> Chain | None:
    """The MLP structure of ``f`` if the fused tier can compile it, else None."""
    spec = describe_mlp(f)
    return None if spec is None else build_chain(f, spec)


def state_mask(layer: ChainLayer) -> torch.Tensor:
    mask = layer.weight.mask
    return mask[:, :-1] if layer.time == "concat" else mask


@dataclass
class ConvChainLayer:
    """One convolution of a recognised convolutional field, as masked tensors."""

    name: str
    weight: MaskedTensor  # [out, in (+1 time channel for concat), k, k]
    bias: MaskedTensor | None
    time: str
    kernel: int


@dataclass
class ConvChain:
    layers: list[ConvChainLayer]
    act: str
    in_channels: int


def conv_state_mask(layer: ConvChainLayer) -> torch.Tensor:
    """[out, state in] channel connectivity: a kept tap anywhere in the kernel."""
    mask = layer.weight.mask.any(3).any(2)
    return mask[:, :-1] if layer.time == "concat" else mask


def _activation_list(spec: MLPSpec | ConvNetSpec, n_layers: int, where: str) -> list[nn.Module]:
    # An nn.ModuleList (or a Sequential of activations) is a module too, but a list here.
    if isinstance(spec.activations, nn.Module) and not isinstance(
            spec.activations, nn.ModuleList | nn.Sequential):
        return [spec.activations] * (n_layers - 1)
    acts = list(spec.activations)
    if len(acts) != n_layers - 1:
        raise CompileError(f"{where} has {n_layers} layers and {len(acts)} activations; "
                           f"expected {n_layers - 1} (one per hidden layer) or one module")
    for a in acts:
        if not isinstance(a, nn.Module):
            raise CompileError(f"{where}: activations must be nn.Modules, got {type(a).__name__}")
    return acts


def _fused_activation(acts: list[nn.Module]) -> str | None:
    """The one activation type with a fused kernel, else None (the generic tier)."""
    names = [activation_name(a) for a in acts]
    act = names[0] if names else "identity"
    if act is None or any(n != act for n in names):
        return None
    return act


def fused_conv_geometry(conv: nn.Conv2d) -> str | None:
    """Why the fused tier cannot run ``conv`` (None: it can): its layers keep H and W."""
    geometry = conv_geometry(conv)
    if isinstance(geometry, str):
        return geometry
    k = conv.kernel_size[0]
    if k % 2 != 1 or geometry != (1, k // 2):
        return f"kernel {k}, (stride, padding) {geometry}: not stride 1 with padding k // 2"
    return None


def describe_convnet(f: nn.Module) -> ConvNetSpec | None:
    """``f.sparsekern_convnet()`` if f implements it (checked), else None."""
    if not isinstance(f, DescribesConvNet):
        return None
    spec = f.sparsekern_convnet()
    if spec is not None and not isinstance(spec, ConvNetSpec):
        raise CompileError(f"{type(f).__name__}.sparsekern_convnet() returned a "
                           f"{type(spec).__name__}; expected a ConvNetSpec, or None")
    return spec


def build_conv_chain(f: nn.Module, spec: ConvNetSpec) -> ConvChain | None:
    """The ``ConvChain`` of ``spec`` with f's masks; None where the fused tier cannot run it
    (an activation without a fused kernel, a layer that changes H or W).

    Raises CompileError on a description that breaks the rules of ``ConvNetSpec``.
    """
    where = f"the convolutional description of {type(f).__name__}"
    layers = list(spec.layers)
    if not layers:
        raise CompileError(f"{where} has no layers")
    acts = _activation_list(spec, len(layers), where)
    if not isinstance(spec.in_channels, int) or spec.in_channels < 1:
        raise CompileError(f"{where}: in_channels must be a positive int, "
                           f"got {spec.in_channels!r}")
    width = spec.in_channels
    for i, layer in enumerate(layers):
        if not isinstance(layer, ConvSpec) or not isinstance(layer.conv, nn.Conv2d):
            raise CompileError(f"{where}: layer {i} must be a ConvSpec of an nn.Conv2d, got "
                               f"{type(layer).__name__}")
        if layer.time not in CONV_TIME_MODES:
            raise CompileError(f"{where}: layer {i} has time={layer.time!r}; expected one of "
                               f"{CONV_TIME_MODES}")
        n_in = layer.conv.in_channels - (layer.time == "concat")
        if n_in != width:
            extra = " plus the time channel" if layer.time == "concat" else ""
            raise CompileError(f"{where}: layer {i} reads {n_in} state channels{extra}, but "
                               f"{'in_channels is' if i == 0 else 'the layer before gives'} "
                               f"{width}")
        width = layer.conv.out_channels
    if width != spec.in_channels:
        raise CompileError(f"{where}: the last layer gives {width} channels, but a vector field "
                           f"maps in_channels={spec.in_channels} back to {spec.in_channels}")
    if any(layer.time != "none" for layer in layers) and call_arity(f) == 1:
        raise CompileError(f"{where} has time-dependent layers, but {type(f).__name__} is "
                           "called f(z), without a time")
    act = _fused_activation(acts)
    if act is None or any(fused_conv_geometry(layer.conv) for layer in layers):
        return None
    name_of = _Names(f, where)
    chain = []
    for i, layer in enumerate(layers):
        name = name_of(layer.conv, f"layer {i}'s conv")
        weight = masked_tensor(layer.conv, name, "weight")
        assert weight is not None  # an nn.Conv2d has a weight
        bias = masked_tensor(layer.conv, name, "bias", zeros_are_pruned=False)
        chain.append(ConvChainLayer(name, weight, bias, layer.time, layer.conv.kernel_size[0]))
    return ConvChain(chain, act, spec.in_channels)


def recognise_convnet(f: nn.Module) -> ConvChain | None:
    """The convolutional structure of ``f`` if the fused tier can compile it, else None."""
    spec = describe_convnet(f)
    return None if spec is None else build_conv_chain(f, spec)


# -- the engine's own registrations ----------------------------------------------------


def _describe_sequential(f: nn.Sequential) -> MLPSpec | None:
    """``Linear, act, ..., Linear`` (torchdyn style, f(z)) with chained widths, out = in."""
    if len(f) % 2 != 1:
        return None
    mods = list(f)
    acts = mods[1::2]
    if not all(type(m) is nn.Linear for m in mods[0::2]):
        return None
    linears = cast("list[nn.Linear]", mods[0::2])  # every one checked just above
    shapes = [_shape(m) for m in linears]
    if any(a[0] != b[1] for a, b in itertools.pairwise(shapes)):
        return None
    if shapes[-1][0] != shapes[0][1]:
        return None  # not a vector field (output width differs from input width)
    return MLPSpec([LinearSpec(m) for m in linears], acts, shapes[0][1])


register_mlp(nn.Sequential, _describe_sequential)
