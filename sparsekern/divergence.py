"""Divergence of a vector field, tr(df/dz), by autograd: exact and Hutchinson.

Both take the output ``dz`` of f and the input ``z`` it was computed from
(inside ``torch.enable_grad()``), so they work for any f. The generic tier's
``forward_and_divergence`` uses them through the compiled module; model code
(an ODE function integrating a CNF) may use them for its dense fields.
"""

from __future__ import annotations

import torch


def _grad_or_zeros(
    out: torch.Tensor, z: torch.Tensor, grad_out: torch.Tensor, create_graph: bool
) -> torch.Tensor:
    # A fully pruned or constant f has an output that does not depend on z (or no
    # graph at all); its Jacobian is zero, which autograd reports as None/error.
    if not out.requires_grad:
        return torch.zeros_like(z)
    (g,) = torch.autograd.grad(
        out, z, grad_out, create_graph=create_graph, retain_graph=True, allow_unused=True
    )
    return torch.zeros_like(z) if g is None else g


def divergence_hutchinson(
    dz: torch.Tensor, z: torch.Tensor, noise: torch.Tensor, create_graph: bool = True
) -> torch.Tensor:
    """Hutchinson estimate e^T (df/dz) e of the divergence, one per sample.

    Args:
        dz: f(z), [B, ...], computed from z with grad enabled.
        z: [B, ...] input that requires grad.
        noise: e, [B, ...] like z.
        create_graph: keep the graph so the result can be differentiated again
            (needed for training and for the adjoint method).

    Returns:
        [B] estimates; unbiased for tr(df/dz) when E[e e^T] = I.
    """
    if noise.shape != z.shape:
        raise ValueError(f"noise shape {list(noise.shape)} must equal z shape {list(z.shape)}")
    e_jac = _grad_or_zeros(dz, z, noise, create_graph)
    return (e_jac * noise).flatten(1).sum(1)


def divergence_exact(dz: torch.Tensor, z: torch.Tensor, create_graph: bool = True) -> torch.Tensor:
    """Exact trace of df/dz per sample, with one backward pass per state dimension.

    Args:
        dz: f(z), [B, ...], computed from z with grad enabled.
        z: [B, ...] input that requires grad.
        create_graph: keep the graph for a further derivative.

    Returns:
        [B] traces. Costs D backward passes for D = prod(z.shape[1:]): meant for
        small D (2D toys, tabular data) and for exact test likelihoods.
    """
    flat = dz.flatten(1)
    d = flat.shape[1]
    div = torch.zeros(flat.shape[0], dtype=dz.dtype, device=dz.device)
    for i in range(d):
        # Unit cotangent on output i; gradient column i is dz_i/dz_i per sample.
        cot = torch.zeros_like(flat)
        cot[:, i] = 1
        g = _grad_or_zeros(dz, z, cot.view_as(dz), create_graph)
        div = div + g.flatten(1)[:, i]
    return div
