"""CompiledField: what compile_sparse returns for a vector field, whichever tier compiled it."""

from __future__ import annotations

import functools
import inspect
import warnings

import torch
from torch import nn

from sparsekern.config import SparseConfig
from sparsekern.masks import CompileError


def call_arity(f: nn.Module) -> int:
    """1 for a field called f(z), 2 for f(t, z); CompileError otherwise."""
    params = [
        p for p in inspect.signature(f.forward).parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty
    ]
    if len(params) not in (1, 2):
        names = ", ".join(p.name for p in params)
        raise CompileError(
            f"{type(f).__name__}.forward takes ({names}); compile_sparse compiles vector fields "
            "called as f(z) or f(t, z)"
        )
    return len(params)


@functools.cache
def _auto_backend(device_type: str) -> str:
    if device_type == "cpu":
        from sparsekern.backends import cpu

        if cpu.available():
            return "cpu"
        warnings.warn("sparsekern: the C++ CPU kernels could not be built; running the plain "
                      "PyTorch reference backend (correct, not fast)", stacklevel=3)
        return "ref"
    if device_type == "cuda":
        from sparsekern import triton as triton_backend

        return "triton" if triton_backend.available() else "ref"
    return "ref"


def resolve_backend(choice: str, device: torch.device) -> str:
    """The backend that runs on ``device`` for a config's ``backend`` choice."""
    return _auto_backend(device.type) if choice == "auto" else choice


class CompiledField(nn.Module):
    """A compiled vector field: same call as the source, plus the divergence and write-back.

    ``forward(t, z)`` (or ``forward(z)`` for a field compiled from f(z)):
    z [B, ...] -> dz/dt [B, ...], as the source module computes it.

    ``forward_and_divergence(t, z, noise=None) -> (dz [B, ...], div [B])``: with
    noise [B, ...] the Hutchinson estimate noise^T (df/dz) noise, without it the
    exact trace of df/dz.

    ``write_back()``: copy the trained kept values into the source module's dense
    weights (zeros at pruned places).

    Attributes:
        tier: "fused" or "generic".
        config: the SparseConfig it was compiled with.
    """

    tier = "?"

    def __init__(self, source: nn.Module, config: SparseConfig) -> None:
        super().__init__()
        self.config = config
        self.arity = call_arity(source)
        self._source = [source]  # not a submodule: its dense parameters are not ours
        first = next(source.parameters(), None)
        self.backend = resolve_backend(
            config.backend, first.device if first is not None else torch.device("cpu")
        )

    @property
    def source(self) -> nn.Module:
        """The module this was compiled from."""
        return self._source[0]

    def _apply(self, fn, recurse=True):
        # The backend follows the device (resolved here, not per call, so that
        # torch.compile sees a constant).
        out = super()._apply(fn, recurse)
        first = next(self.parameters(), None)
        if first is not None:
            self.backend = resolve_backend(self.config.backend, first.device)
            for m in self.modules():
                if m is not self and hasattr(m, "backend"):
                    m.backend = self.backend
        return out

    def _split_args(self, args: tuple) -> tuple[torch.Tensor | None, torch.Tensor]:
        if len(args) != self.arity:
            sig = "(t, z)" if self.arity == 2 else "(z)"
            raise TypeError(f"this compiled field is called as f{sig}, got {len(args)} arguments")
        return (None, args[0]) if self.arity == 1 else (args[0], args[1])

    def check_input(self, z: torch.Tensor, like: torch.Tensor, what: str = "z") -> None:
        if not isinstance(z, torch.Tensor):
            raise TypeError(f"{what} must be a tensor, got {type(z).__name__}")
        if z.dtype != like.dtype or z.device != like.device:
            raise TypeError(
                f"{what} is {z.dtype} on {z.device}, but the compiled field holds {like.dtype} "
                f"on {like.device}; convert one with .to()"
            )

    def write_back(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward_and_divergence(  # pragma: no cover - abstract
        self, t: torch.Tensor | None, z: torch.Tensor, noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def summary(self) -> str:  # pragma: no cover - abstract
        raise NotImplementedError
