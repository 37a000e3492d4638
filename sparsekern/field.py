"""CompiledField: what compile_sparse returns for a vector field, whichever tier compiled it.

``FieldContract`` is the contract as a ``typing.Protocol``: what model code (an
ODE function, a solver) may rely on, whichever tier compiled the field.
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import torch
from torch import nn

from sparsekern import backends
from sparsekern.backends import BackendChoice
from sparsekern.config import SparseConfig, check_dtype
from sparsekern.masks import CompileError
from sparsekern.precision import is_reduced

if TYPE_CHECKING:
    from sparsekern.solver.rk import SolveStats


@runtime_checkable
class FieldContract(Protocol):
    """A compiled vector field (docs/design.md, "The engine contract").

    ``field(t, z)`` (or ``field(z)``, the source's arity): z [B, d] -> dz/dt [B, d].
    """

    tier: str
    backend: str

    def forward_and_divergence(
        self, t: torch.Tensor | None, z: torch.Tensor, noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(dz [B, d], div [B]): Hutchinson noise^T (df/dz) noise with noise [B, d],
        the exact trace of df/dz without."""
        ...

    def write_back(self) -> None:
        """Copy the trained kept values into the source module (zeros where pruned)."""
        ...

    def summary(self) -> str:
        """A markdown table of what was compiled (layers, layouts, backend)."""
        ...


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


def check_precision_dtype(precision: str, dtype: torch.dtype, what: str) -> None:
    """Raise a TypeError unless ``precision`` can round products of ``what`` (``dtype``)."""
    if is_reduced(precision) and dtype != torch.float32:
        raise TypeError(f"{what} is {dtype}; SparseConfig.precision={precision!r} rounds the "
                        "products of float32 models (keep the model float32, or use "
                        "precision='ieee')")


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
        backend: the backend its ops run on ("ref", "cpu", "triton", "cuda"),
            resolved from ``config.backend`` for the device of its parameters;
            with "auto" on CUDA, measured (``select_backend``) where the field
            can make a sample input.
    """

    tier = "?"
    # How the last sparsekern.odeint solve of this field ran: the native loop with its
    # NFE and steps, or torchdiffeq and why (shown by summary()).
    last_solve: str | None = None
    # Its SolveStats (the forward solve's, then the adjoint's backward solves'), whose
    # model_seconds the C++ loop measures (the bench's model / solver split).
    last_solve_stats: tuple[SolveStats, ...] = ()

    def __init__(self, source: nn.Module, config: SparseConfig) -> None:
        super().__init__()
        self.config = config
        self.arity = call_arity(source)
        first_named = None
        for name, p in source.named_parameters():
            if not p.is_floating_point():
                continue
            try:
                what = f"parameter '{name}' of {type(source).__name__}"
                check_dtype(p.dtype, what)
                check_precision_dtype(config.precision, p.dtype, what)
            except TypeError as exc:
                raise CompileError(str(exc)) from None
            if first_named is None:
                first_named = (name, p)
            elif (p.dtype, p.device) != (first_named[1].dtype, first_named[1].device):
                # One kernel call takes every layer: they must agree, or a product fails
                # later with a message that names no layer.
                ref_name, ref = first_named
                raise CompileError(
                    f"parameter '{name}' of {type(source).__name__} is {p.dtype} on {p.device}, "
                    f"but '{ref_name}' is {ref.dtype} on {ref.device}; compile_sparse needs one "
                    "dtype and device for the whole field (convert it with .to())"
                )
        self._source = [source]  # not a submodule: its dense parameters are not ours
        first = next(source.parameters(), None)
        self._backend = BackendChoice(backends.resolve(
            config.backend, first.device if first is not None else torch.device("cpu"),
            config.precision,
        ))

    @property
    def source(self) -> nn.Module:
        """The module this was compiled from."""
        return self._source[0]

    @property
    def backend(self) -> str:
        """The backend the field's kernels run on (read by its layers at call time)."""
        return self._backend.name

    def _set_backend(self, backend: str) -> None:
        self._backend.name = backend

    def _first_tensor(self) -> torch.Tensor | None:
        """A tensor with the field's dtype and device: its first parameter or, for a field
        with every weight pruned (no parameter), its first floating buffer (kept values)."""
        first: torch.Tensor | None = next(self.parameters(), None)
        if first is None:
            first = next((b for b in self.buffers() if b.is_floating_point()), None)
        return first

    def _apply(self, fn, recurse=True):
        # The backend follows the device (resolved here, not per call, so that
        # torch.compile sees a constant).
        first = self._first_tensor()
        if first is not None:
            try:
                probe = fn(torch.empty(0, dtype=first.dtype, device=first.device))
            except Exception:  # not a conversion we can predict: let torch's own run decide
                probe = None
            if isinstance(probe, torch.Tensor) and probe.is_floating_point():
                what = f"the dtype this converts the compiled {type(self.source).__name__} to"
                check_dtype(probe.dtype, what)
                check_precision_dtype(self.config.precision, probe.dtype, what)
        before = None if first is None else (first.device, first.dtype)
        out = super()._apply(fn, recurse)
        first = self._first_tensor()
        if first is not None and (first.device, first.dtype) != before:
            self._set_backend(backends.resolve(self.config.backend, first.device,
                                              self.config.precision))
            self.select_backend()
        return out

    # -- backend="auto" by measurement ------------------------------------------------
    def _backend_key(self) -> tuple | None:
        """What the measured backend choice depends on (shapes, layouts, ...); None: no measuring.

        Subclasses that can run ``_sample_call`` return a hashable key here.
        """
        return None

    def _sample_call(self, batch: int, generator: torch.Generator
                     ) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor] | None:
        """(t, z, noise) to time ``forward_and_divergence`` on, or None if unknown."""
        return None

    def select_backend(self) -> str:
        """backend="auto" on CUDA with ``config.autotune``: time each GPU backend, keep the fastest.

        The candidates (``backends.candidates``) each run ``forward_and_divergence``
        (Hutchinson, no gradient) at ``config.batch_hint`` on this field once
        (``autotune.fastest_backend``, cached per device, field structure,
        candidates and batch). Without measuring (autotune=False, one
        candidate, or a field with no sample input) the rule of
        ``backends.resolve`` stands: Triton first.

        Returns:
            The backend the field runs on now.
        """
        from sparsekern.autotune import fastest_backend

        first = self._first_tensor()
        if (self.config.backend != "auto" or not self.config.autotune or first is None
                or first.device.type not in backends.MEASURED_DEVICE_TYPES):
            return self.backend
        found = tuple(backends.candidates(first.device.type, self.config.precision))
        key = self._backend_key()
        if len(found) < 2 or key is None:
            return self.backend
        chosen = fastest_backend(self, found, key, first.device)
        if chosen is not None:
            self._set_backend(chosen)
        return self.backend

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

    def _solve_line(self) -> list[str]:
        """summary()'s last line: how the last sparsekern.odeint solve ran, if one did."""
        return [] if self.last_solve is None else [f"Last solve: {self.last_solve}"]
