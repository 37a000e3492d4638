"""compile_sparse and write_back: the engine's entry points."""

from __future__ import annotations

import copy

from torch import nn

from sparsekern.config import SparseConfig
from sparsekern.field import CompiledField
from sparsekern.fused import FusedMLP
from sparsekern.fused_conv import FusedConvNet
from sparsekern.generic import GenericField
from sparsekern.masks import CompileError
from sparsekern.protocol import declared_fields, recognise_chain, recognise_convnet


def _compile_field(f: nn.Module, config: SparseConfig) -> CompiledField:
    if isinstance(f, CompiledField):
        raise CompileError(f"{type(f).__name__} is already compiled; compile its source instead")
    chain = None if config.tier == "generic" else recognise_chain(f)
    if chain is not None:
        return FusedMLP(f, chain, config)
    conv_chain = None if config.tier == "generic" else recognise_convnet(f)
    if conv_chain is not None:
        return FusedConvNet(f, conv_chain, config)
    if config.tier == "fused":
        raise CompileError(
            f"tier='fused' needs a recognised MLP (a module whose sparsekern_mlp() describes "
            f"it, a type registered with sparsekern.protocol.register_mlp, or an nn.Sequential "
            f"of Linear and one elementwise activation) or a convolutional field whose "
            f"sparsekern_convnet() describes it, got {type(f).__name__}; use tier='auto'"
        )
    return GenericField(f, config)


def _shallow_copy(model: nn.Module, children: dict[str, nn.Module]) -> nn.Module:
    new = copy.copy(model)
    new._modules = dict(model._modules)
    new._parameters = dict(model._parameters)
    new._buffers = dict(model._buffers)
    new._modules.update(children)
    return new


def _with_compiled_fields(model: nn.Module, config: SparseConfig) -> nn.Module | None:
    """A structural copy of ``model`` whose declared vector fields are compiled fields.

    Every child a module names in ``sparsekern_fields()`` is compiled (once, however
    many places hold it). Containers on the way are copied shallowly, so parameters
    outside the vector fields (a flow's end time, a read-out layer) stay the same
    Parameters as in ``model``. None if nothing inside declares fields.
    """
    fields: dict[int, nn.Module] = {}
    containers = 0
    for m in model.modules():
        names = declared_fields(m)
        containers += names is not None
        for name in names or ():
            field = m._modules[name]
            assert field is not None  # declared_fields checked that each name is a child module
            fields[id(field)] = field
    if not containers:
        return None
    done: dict[int, nn.Module | None] = {}

    def rebuild(module: nn.Module) -> nn.Module | None:
        if id(module) not in done:
            if id(module) in fields:
                done[id(module)] = _compile_field(module, config)
            else:
                changed = {}
                for name, child in module._modules.items():
                    new = None if child is None else rebuild(child)
                    if new is not None:
                        changed[name] = new
                done[id(module)] = _shallow_copy(module, changed) if changed else None
        return done[id(module)]

    # A container with no field to compile is still a container: a copy, not a field.
    new = rebuild(model)
    return _shallow_copy(model, {}) if new is None else new


def compile_sparse(model: nn.Module, config: SparseConfig | None = None) -> nn.Module:
    """Compile a pruned (or dense) vector field, or every vector field inside a model.

    How a model tells the engine what it is (``sparsekern.protocol``):

    - a vector field whose ``sparsekern_mlp()`` describes it as an MLP (its
      ``nn.Linear`` layers, time modes, activation), or whose type has a describe
      function (``register_mlp``; ``nn.Sequential`` chains have one), gets the
      fused tier, as does one whose ``sparsekern_convnet()`` describes it as a
      chain of convolutions (``sparsekern.fused_conv``); any other vector field
      the generic tier (pruned ``nn.Linear`` and ``nn.Conv2d`` on the state path
      made sparse);
    - a container whose ``sparsekern_fields()`` names child modules that are vector
      fields (an ODE function) has those children compiled, wherever it sits in
      ``model`` (a CNF, a stack of flows, a classifier).

    Args:
        model: a vector field f(t, z) or f(z) (any nn.Module), or a model holding
            such containers. Masks come from ``weight_mask`` buffers (with exact
            zeros at pruned places, or torch.nn.utils.prune's ``weight_orig``)
            or, without one, exact zeros.
        config: ``SparseConfig`` (layout, backend, tier, fallback, ...).

    Returns:
        For a vector field, a ``CompiledField`` with f's call signature (same
        output), ``forward_and_divergence(t, z, noise=None)`` and
        ``write_back()``. For a model holding declared fields, a structural copy
        of the same classes in which those fields (and their divergence) run
        compiled; containers on the way are copied shallowly, so its parameters
        are the kept values plus the model's own parameters outside its vector
        fields, the same Parameter objects as in ``model``.
        ``sparsekern.write_back(compiled)`` copies trained values back into ``model``.

    Raises:
        CompileError: a mask of the wrong shape, NaN weights, an op on the state
            path that cannot be compiled (unless fallback="eager"), a malformed
            ``sparsekern_mlp`` / ``sparsekern_fields`` answer, ...
    """
    config = config or SparseConfig()
    if not isinstance(model, nn.Module):
        raise TypeError(f"compile_sparse takes an nn.Module, got {type(model).__name__}")
    compiled = _with_compiled_fields(model, config)
    if compiled is not None:
        return compiled
    return _compile_field(model, config)


def compiled_fields(model: nn.Module) -> list[CompiledField]:
    """Every CompiledField inside ``model`` (itself included)."""
    return [m for m in model.modules() if isinstance(m, CompiledField)]


def write_back(model: nn.Module) -> int:
    """Copy trained kept values of every compiled field in ``model`` into its source module.

    Returns the number of fields written back.
    """
    fields = compiled_fields(model)
    for f in fields:
        f.write_back()
    return len(fields)
