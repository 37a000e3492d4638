"""compile_sparse and write_back: the engine's entry points."""

from __future__ import annotations

import copy

from torch import nn

from sparsekern.config import SparseConfig
from sparsekern.field import CompiledField
from sparsekern.fused import FusedMLP, recognise_chain
from sparsekern.generic import GenericField
from sparsekern.masks import CompileError


def _compile_field(f: nn.Module, config: SparseConfig) -> CompiledField:
    if isinstance(f, CompiledField):
        raise CompileError(f"{type(f).__name__} is already compiled; compile its source instead")
    chain = None if config.tier == "generic" else recognise_chain(f)
    if chain is not None:
        return FusedMLP(f, chain, config)
    if config.tier == "fused":
        raise CompileError(
            f"tier='fused' needs a recognised MLP (flows.ODEnet or an nn.Sequential of Linear "
            f"and one elementwise activation), got {type(f).__name__}; use tier='auto'"
        )
    return GenericField(f, config)


def _with_compiled_dynamics(model: nn.Module, config: SparseConfig) -> nn.Module | None:
    """A structural copy of a flows model whose ODE functions hold compiled fields.

    Containers on the way to an ``ODEFunc`` are copied shallowly, so parameters
    outside the vector fields (a CNF's end time, a read-out layer) stay shared
    with ``model``; None if ``model`` holds no ``ODEFunc``.
    """
    from flows.odefunc import ODEFunc

    if isinstance(model, ODEFunc):
        new = copy.copy(model)
        new._modules = dict(model._modules)
        new._parameters = dict(model._parameters)
        new._buffers = dict(model._buffers)
        new.odenet = _compile_field(model.odenet, config)
        return new
    changed = {}
    for name, child in model.named_children():
        compiled = _with_compiled_dynamics(child, config)
        if compiled is not None:
            changed[name] = compiled
    if not changed:
        return None
    new = copy.copy(model)
    new._modules = dict(model._modules)
    new._parameters = dict(model._parameters)
    new._buffers = dict(model._buffers)
    for name, child in changed.items():
        new._modules[name] = child
    return new


def compile_sparse(model: nn.Module, config: SparseConfig | None = None) -> nn.Module:
    """Compile a pruned (or dense) vector field, or every vector field inside a flow.

    Args:
        model: a vector field f(t, z) or f(z) (any nn.Module; flows.ODEnet and
            nn.Sequential MLPs get the fused tier), or a flows model holding
            ODE functions (``flows.CNF``, ``SequentialFlow``, ``ODEBlock``,
            ``ODEClassifier``). Masks come from ``weight_mask`` buffers
            (flows.prune or torch.nn.utils.prune) or, without one, exact zeros.
        config: ``SparseConfig`` (layout, backend, tier, fallback, ...).

    Returns:
        For a vector field, a ``CompiledField`` with f's call signature (same
        output), ``forward_and_divergence(t, z, noise=None)`` and
        ``write_back()``. For a flow, a model of the same class whose dynamics
        (and divergence) run compiled; its parameters are the kept values plus
        the flow's own parameters outside its vector fields (shared with
        ``model``). ``sparsekern.write_back(compiled)`` copies trained values
        back into ``model``.

    Raises:
        CompileError: a mask of the wrong shape, NaN weights, an op on the state
            path that cannot be compiled (unless fallback="eager"), ...
    """
    config = config or SparseConfig()
    if not isinstance(model, nn.Module):
        raise TypeError(f"compile_sparse takes an nn.Module, got {type(model).__name__}")
    flow = _with_compiled_dynamics(model, config)
    if flow is not None:
        return flow
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
