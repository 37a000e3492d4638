"""Pruning of ODE vector fields: global magnitude (unstructured) and neuron (structured).

Masks live in buffers named as ``torch.nn.utils.prune`` names them
(``weight_mask``, ``bias_mask``) on the pruned modules themselves, while the
``weight`` parameter stays an ordinary parameter holding exact zeros at pruned
places. So other tools (and ``sparsekern``) read the masks, and a pruned model
is still an ordinary module. Training keeps the zeros with ``mask_gradients_``
after backward and ``apply_masks_`` after each optimiser step.

Prunable weights are the main linear and convolution weights. The small
time-conditioning layers of concatsquash (``hyper_gate``, ``hyper_bias``) are
not pruned, as in the original code.

Unstructured pruning removes a fraction of the remaining weights (globally), so
after n cycles (1 - PR)^n of the prunable weights remain. Structured pruning
removes a fraction of the live neurons of every hidden layer of each vector
field (never a field's outputs, never a classifier's read-out), so neurons
follow (1 - PR)^n per hidden layer but weights do not; ``sparsity`` reports the
weights actually kept.

Edge cases never break a model silently. Structured pruning keeps at least one
live neuron in every hidden layer (a layer down to one is left alone, and the
returned count is what really went). Unstructured pruning stays the paper's
global magnitude pruning, so it may remove every weight of some layer; then it
warns with an ``EmptyLayerWarning`` naming the layer, and ``empty_layers(model)``
lists all such layers for reports. ``sparsity`` and ``alive_neurons`` stay
finite and well defined for fully pruned layers and models.
"""

from __future__ import annotations

import itertools
import os
import sys
import warnings

import torch
from torch import nn

from flows.odenet import ConvODEnet, ODEnet

PRUNE_METHODS = ("unstructured", "structured")


class EmptyLayerWarning(UserWarning):
    """A prune call masked every weight of a prunable layer.

    The layer then passes on its bias alone (a constant in the state), so it and
    everything downstream of it no longer sees the input. The message names the
    layer by its qualified module name in the pruned model, e.g.
    ``'odefunc.odenet.layers.2'``.
    """


def prunable_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every prunable Linear / Conv2d, in registration order.

    For the chain models of ``flows`` (ODEnet, ConvODEnet, ODEClassifier)
    registration order is the order along the network, which structured
    pruning relies on.
    """
    layers = []
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear | nn.Conv2d) and not name.rsplit(".", 1)[-1].startswith(
            "hyper_"
        ):
            layers.append((name, m))
    return layers


def _check_fraction(fraction: float) -> None:
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"prune fraction must lie in [0, 1), got {fraction}")


def ensure_masks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Give every prunable layer all-ones ``weight_mask`` / ``bias_mask`` buffers if absent.

    Returns ``prunable_layers(model)``.
    """
    layers = prunable_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no prunable Linear or Conv2d layer")
    for name, m in layers:
        if not hasattr(m, "weight_mask"):
            m.register_buffer("weight_mask", torch.ones_like(m.weight))
        elif m.weight_mask.shape != m.weight.shape:
            raise ValueError(
                f"{name}.weight_mask has shape {list(m.weight_mask.shape)}, "
                f"expected the weight's {list(m.weight.shape)}"
            )
        if m.bias is not None and not hasattr(m, "bias_mask"):
            m.register_buffer("bias_mask", torch.ones_like(m.bias))
    return layers


@torch.no_grad()
def apply_masks_(model: nn.Module) -> None:
    """Zero every weight (and bias) entry whose mask is zero, in place."""
    for _, m in prunable_layers(model):
        if hasattr(m, "weight_mask"):
            m.weight.mul_(m.weight_mask)
        if m.bias is not None and hasattr(m, "bias_mask"):
            m.bias.mul_(m.bias_mask)


@torch.no_grad()
def mask_gradients_(model: nn.Module) -> None:
    """Zero the gradients at pruned places, so no optimiser moves a pruned weight."""
    for _, m in prunable_layers(model):
        if hasattr(m, "weight_mask") and m.weight.grad is not None:
            m.weight.grad.mul_(m.weight_mask)
        if m.bias is not None and hasattr(m, "bias_mask") and m.bias.grad is not None:
            m.bias.grad.mul_(m.bias_mask)


def has_masks(model: nn.Module) -> bool:
    """Whether any prunable layer of ``model`` carries a ``weight_mask`` buffer."""
    return any(hasattr(m, "weight_mask") for _, m in prunable_layers(model))


def empty_layers(model: nn.Module) -> list[str]:
    """Qualified names of the prunable layers with no kept weight, in registration order.

    A layer is empty when its ``weight_mask`` is all zero (its bias may still be
    kept). Layers without a mask are unpruned, hence never empty; a model with no
    prunable layer gives ``[]``. Names are relative to ``model``, as in
    ``prunable_layers`` (e.g. ``"odefunc.odenet.layers.1"`` for a CNF).
    """
    return [
        name
        for name, m in prunable_layers(model)
        if hasattr(m, "weight_mask") and not bool(m.weight_mask.any())
    ]


def _caller_stacklevel() -> int:
    """``stacklevel`` for a warning raised here, pointing at the first caller outside.

    Frames of this module (``prune_`` -> ``prune_unstructured_`` -> ...) and of
    torch (the ``torch.no_grad`` decorator) are skipped, so the warning shows the
    line that asked for the pruning, e.g. in the pipeline. Counted from the frame
    that calls ``warnings.warn``, i.e. this function's caller.
    """
    torch_dir = os.path.dirname(torch.__file__) + os.sep
    frame, level = sys._getframe(1), 1
    while frame is not None and (
        frame.f_code.co_filename == __file__ or frame.f_code.co_filename.startswith(torch_dir)
    ):
        frame, level = frame.f_back, level + 1
    return level


def _warn_newly_empty(model: nn.Module, before: list[str], method: str) -> None:
    """One EmptyLayerWarning per layer that is empty now but was not in ``before``.

    Layers already empty stay quiet: the event is reported once, when it happens,
    while ``empty_layers`` gives the full state whenever it is needed.
    """
    known = set(before)
    for name in empty_layers(model):
        if name not in known:
            warnings.warn(
                f"{method} pruning emptied layer {name!r}: all its weights are now masked, "
                "so it passes on only its bias and what comes after it no longer sees the "
                "input (empty_layers(model) lists it)",
                EmptyLayerWarning,
                stacklevel=_caller_stacklevel(),
            )


@torch.no_grad()
def prune_unstructured_(model: nn.Module, fraction: float) -> int:
    """Global magnitude pruning: remove ``fraction`` of the remaining prunable weights.

    The smallest magnitudes across all prunable layers at once go (ties broken
    by position), as in the paper, even when that removes every weight of some
    layer: no layer is protected. A layer emptied by this call raises one
    ``EmptyLayerWarning`` naming it (qualified module name); layers that were
    already empty before the call are not warned about again, since
    ``empty_layers(model)`` reports them. Returns the number of weights pruned in
    this call (0 once nothing is left or ``fraction`` rounds to nothing).
    """
    _check_fraction(fraction)
    layers = ensure_masks(model)
    apply_masks_(model)
    empty_before = empty_layers(model)
    mags = torch.cat([m.weight.detach().abs().flatten() for _, m in layers]).double()
    kept = torch.cat([m.weight_mask.flatten() for _, m in layers]).bool()
    k = round(fraction * int(kept.sum()))
    if k == 0:
        return 0
    # Pruned entries sort last; a stable sort makes ties deterministic.
    mags[~kept] = float("inf")
    drop = torch.sort(mags, stable=True).indices[:k]
    flat_mask = kept.to(torch.float64)
    flat_mask[drop] = 0
    offset = 0
    for _, m in layers:
        n = m.weight.numel()
        m.weight_mask.copy_(flat_mask[offset : offset + n].view_as(m.weight_mask))
        offset += n
    apply_masks_(model)
    _warn_newly_empty(model, empty_before, "unstructured")
    return k


def alive_neurons(layer: nn.Module) -> torch.Tensor:
    """Bool [out_features] (or [out_channels]): rows with any kept incoming weight.

    All False for an empty layer (every weight masked); a layer without a mask
    has every row alive.
    """
    mask = getattr(layer, "weight_mask", torch.ones_like(layer.weight))
    return mask.flatten(1).any(1)


def vector_field_chains(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of each vector-field chain that structured pruning works on.

    Every ``ODEnet`` / ``ConvODEnet`` inside ``model`` (each block of a
    ``SequentialFlow``, the vector field of an ``ODEClassifier``) is one chain;
    layers outside them (a classifier's read-out) belong to none. A model with
    no such net is taken as one plain chain itself (e.g. an ``nn.Sequential``
    MLP), with its prunable layers in registration order.
    """
    chains = [(n, m) for n, m in model.named_modules() if isinstance(m, ODEnet | ConvODEnet)]
    return chains or [("", model)]


@torch.no_grad()
def prune_structured_(model: nn.Module, fraction: float) -> int:
    """Neuron pruning: in every hidden layer, remove ``fraction`` of the live neurons.

    Works per vector-field chain (``vector_field_chains``): each ODEnet /
    ConvODEnet of a stacked flow or classifier is pruned on its own, so a
    block's output layer never pairs with the next block's input layer. Within
    a chain, every layer but the last loses ``fraction`` of its live neurons
    (output channels for convolutions). A neuron's score is the L1 norm of its
    (kept) incoming weights; the lowest go. A removed neuron loses its row of
    weights, its bias and its column in the next layer's input, so it no longer
    affects the output. A chain's last layer keeps all its outputs (they are
    the state dz/dt), and layers outside the chains (a classifier's read-out)
    are never pruned.

    Every hidden layer keeps at least one live neuron: a layer loses
    ``min(round(fraction * live), live - 1)`` neurons, so one down to a single
    live neuron is left as it is by further calls (the paper's 2-128-2 model at
    0.9 goes 128 -> 13 -> 1 -> 1), and a layer with no live neuron (emptied by
    other masking) is skipped. Structured masks alone therefore never empty a
    layer; should a call still leave one empty (masks from unstructured
    pruning mixed in), it warns as ``prune_unstructured_`` does.

    ``fraction`` is a fraction of neurons per hidden layer, not of weights:
    after n calls each hidden layer keeps about (1 - fraction)^n of its
    neurons, but a weight between two hidden layers survives only if both its
    neurons do, while the input layer's columns and the output layer's rows
    always stay, so the kept fraction of weights does not follow
    (1 - fraction)^n (it is roughly (1 - fraction)^(2n) between hidden layers
    and (1 - fraction)^n at the ends). ``sparsity(model)["prune_ratio"]``
    counts the weights actually removed. Once layers reach one neuron they stop
    following (1 - fraction)^n.

    Returns the number of neurons pruned in this call, over all hidden layers;
    0 when every hidden layer is down to one live neuron (or ``fraction`` rounds
    to nothing), so nothing more can go.
    """
    _check_fraction(fraction)
    ensure_masks(model)
    apply_masks_(model)
    empty_before = empty_layers(model)
    total = 0
    for chain_name, chain in vector_field_chains(model):
        layers = prunable_layers(chain)
        for (name, m), (next_name, nxt) in itertools.pairwise(layers):
            alive = alive_neurons(m)
            if nxt.weight.shape[1] < m.weight.shape[0]:
                where = f"{chain_name}." if chain_name else ""
                raise ValueError(
                    f"structured pruning needs a chain of layers: {where}{next_name} reads "
                    f"{nxt.weight.shape[1]} inputs but {where}{name} has "
                    f"{m.weight.shape[0]} outputs"
                )
            live = int(alive.sum())
            # Never the last live neuron: an empty hidden layer cuts the state
            # off from dz/dt (and leaves an empty matrix for the engine).
            k = min(round(fraction * live), live - 1)
            if k <= 0:
                continue
            score = (m.weight * m.weight_mask).abs().flatten(1).sum(1).double()
            score[~alive] = float("inf")
            drop = torch.sort(score, stable=True).indices[:k]
            m.weight_mask[drop] = 0
            if m.bias is not None:
                m.bias_mask[drop] = 0
            # Inputs beyond this layer's outputs (concat's time column) stay.
            nxt.weight_mask[:, drop] = 0
            total += k
    apply_masks_(model)
    _warn_newly_empty(model, empty_before, "structured")
    return total


def prune_(model: nn.Module, fraction: float, method: str) -> int:
    """Prune ``fraction`` of what remains with ``method`` ("unstructured" or "structured").

    Returns what the method's function returns: weights (unstructured) or
    neurons (structured) pruned in this call. May warn ``EmptyLayerWarning``.
    """
    if method == "unstructured":
        return prune_unstructured_(model, fraction)
    if method == "structured":
        return prune_structured_(model, fraction)
    raise ValueError(f"method={method!r} is not supported; expected one of {PRUNE_METHODS}")


def sparsity(model: nn.Module) -> dict[str, float]:
    """Counts for reports.

    Returns:
        prunable: number of prunable weights; kept: how many are unmasked;
        kept_fraction and prune_ratio (= 1 - kept_fraction) over prunable weights;
        nonzero_params: nonzero entries over all parameters of the model;
        total_params: all parameter entries.

    Always finite: a fully pruned model gives kept 0, kept_fraction 0.0 and
    prune_ratio 1.0; a model without prunable weights gives kept_fraction 1.0
    and prune_ratio 0.0 (nothing to prune, nothing pruned).
    """
    layers = prunable_layers(model)
    prunable = sum(m.weight.numel() for _, m in layers)
    # count_nonzero, not a float sum: exact for any layer size.
    kept = sum(
        int(torch.count_nonzero(m.weight_mask)) if hasattr(m, "weight_mask") else m.weight.numel()
        for _, m in layers
    )
    params = list(model.parameters())
    return {
        "prunable": prunable,
        "kept": kept,
        "kept_fraction": kept / prunable if prunable else 1.0,
        "prune_ratio": 1 - kept / prunable if prunable else 0.0,
        "nonzero_params": sum(int((p != 0).sum()) for p in params),
        "total_params": sum(p.numel() for p in params),
    }
