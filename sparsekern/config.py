"""SparseConfig: the knobs of compile_sparse."""

from __future__ import annotations

from dataclasses import dataclass

LAYOUTS = ("auto", "dense", "csr", "blocked")
BACKEND_CHOICES = ("auto", "ref", "cpu", "triton", "cuda")
TIERS = ("auto", "fused", "generic")
FALLBACKS = ("error", "eager")


@dataclass(frozen=True)
class SparseConfig:
    """How ``compile_sparse`` compiles a vector field.

    Attributes:
        layout: per-layer storage. "auto" measures the candidates on each layer
            (``sparsekern.cost``); "dense" (neuron-reduced dense), "csr" and
            "blocked" force one for every layer.
        backend: kernels. "auto" picks by device (cpu: the C++ extension, cuda:
            Triton); "ref" is plain PyTorch (the test oracle).
        tier: "auto" fuses recognised MLPs (flows.ODEnet, nn.Sequential chains)
            and compiles anything else generically; "generic" forces the
            generic tier (autograd to any order everywhere); "fused" raises if
            the model is not a recognised MLP.
        fallback: what to do with an op on the state path that the engine
            cannot compile (e.g. a pruned Conv2d): "error" raises naming it,
            "eager" leaves it to PyTorch with a warning.
        reduce_neurons: remove neurons that no output depends on and fold the
            constant output of neurons that depend on no input.
        batch_hint: batch size the "auto" layout is measured at.
        autotune: "auto" measures the candidate layouts (fastest here, but a
            near tie may go either way from run to run); False picks by a
            density rule alone, so the same masks always give the same layouts
            and bit-identical results (the pipeline's resumable runs use this).
        allow_tf32: let GPU kernels use TF32 products (default exact fp32:
            adaptive solvers need the accuracy).
    """

    layout: str = "auto"
    backend: str = "auto"
    tier: str = "auto"
    fallback: str = "error"
    reduce_neurons: bool = True
    batch_hint: int = 1024
    autotune: bool = True
    allow_tf32: bool = False

    def __post_init__(self) -> None:
        for name, allowed in (
            ("layout", LAYOUTS),
            ("backend", BACKEND_CHOICES),
            ("tier", TIERS),
            ("fallback", FALLBACKS),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(
                    f"SparseConfig.{name}={getattr(self, name)!r}; expected one of {allowed}"
                )
        if self.batch_hint < 1:
            raise ValueError(f"SparseConfig.batch_hint must be >= 1, got {self.batch_hint}")
