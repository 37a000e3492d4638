"""Where a layer's kept weights are: masks from flows, torch.nn.utils.prune, or exact zeros.

Three sources, in this order of precedence:
- ``torch.nn.utils.prune``: the module holds ``weight_orig`` (parameter) and
  ``weight_mask`` (buffer); the effective weight is their product.
- ``flows.prune``: the module holds ``weight`` (parameter, zero at pruned
  places) and a ``weight_mask`` buffer.
- no mask: the kept places are the nonzero entries of ``weight``.
Biases follow the same rules with ``bias_mask`` / ``bias_orig``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


class CompileError(ValueError):
    """A model, mask or input that compile_sparse cannot take, named in the message."""


@dataclass
class MaskedTensor:
    """A parameter as the engine sees it: effective values and where they are kept.

    Attributes:
        name: qualified name for messages, e.g. "layers.0.linear.weight".
        value: the effective dense tensor (detached copy, zeros at pruned places).
        mask: bool tensor of the same shape, True where kept.
        target: the parameter that ``write_back`` writes into (``weight`` or
            ``weight_orig``).
    """

    name: str
    value: torch.Tensor
    mask: torch.Tensor
    target: nn.Parameter

    @property
    def kept_values(self) -> torch.Tensor:
        """[nnz] kept entries in row-major order."""
        return self.value[self.mask]

    @torch.no_grad()
    def write(self, values: torch.Tensor) -> None:
        """Write kept ``values`` [nnz] into the target, zeros at the pruned places."""
        if values.shape != (int(self.mask.sum()),):
            raise CompileError(
                f"{self.name}: write_back got {list(values.shape)} values for "
                f"{int(self.mask.sum())} kept places"
            )
        if self.target.shape != self.mask.shape:
            raise CompileError(
                f"{self.name}: the module's tensor changed shape since compile "
                f"({list(self.target.shape)}, compiled {list(self.mask.shape)})"
            )
        self.target.zero_()
        self.target[self.mask] = values.to(self.target.dtype)


def _check_finite(name: str, t: torch.Tensor) -> None:
    if not torch.isfinite(t).all():
        bad = (~torch.isfinite(t)).nonzero()[0].tolist()
        raise CompileError(f"{name} holds NaN or inf (first at index {bad}); the engine "
                           "compiles finite weights only")


def masked_tensor(
    module: nn.Module, module_name: str, attr: str = "weight", zeros_are_pruned: bool = True
) -> MaskedTensor | None:
    """The masked view of ``module.<attr>`` (None if the module has no such tensor).

    ``zeros_are_pruned``: without a mask, exact zeros count as pruned (right for
    the weights of prunable layers; biases and time-conditioning weights pass
    False, so a zero-initialised bias still trains).

    Raises CompileError on a mask of the wrong shape, NaN/inf kept values, or a
    flows-style weight that is nonzero where its mask is zero.
    """
    qual = f"{module_name}.{attr}" if module_name else attr
    orig = getattr(module, f"{attr}_orig", None)
    mask = getattr(module, f"{attr}_mask", None)
    if isinstance(orig, nn.Parameter) and mask is not None:
        target, value = orig, orig.detach()
    else:
        found = getattr(module, attr, None)
        if found is None:
            return None
        if not isinstance(found, nn.Parameter):
            raise CompileError(f"{qual} is not an nn.Parameter (got {type(found).__name__})")
        target = found
        value = target.detach()
    if mask is not None:
        if mask.shape != value.shape:
            raise CompileError(
                f"{qual}_mask has shape {list(mask.shape)}, expected the {attr}'s "
                f"{list(value.shape)}"
            )
        if mask.device != value.device:
            raise CompileError(f"{qual}_mask is on {mask.device}, the {attr} on {value.device}")
        keep = mask != 0
        if orig is None and bool((value[~keep] != 0).any()):
            raise CompileError(
                f"{qual} is nonzero at places its {attr}_mask prunes; apply the masks first "
                "(flows.prune.apply_masks_) so the model computes what its masks say"
            )
    else:
        keep = value != 0 if zeros_are_pruned else torch.ones_like(value, dtype=torch.bool)
    value = torch.where(keep, value, torch.zeros_like(value))
    _check_finite(qual, value[keep])
    return MaskedTensor(qual, value.clone(), keep.clone(), target)
