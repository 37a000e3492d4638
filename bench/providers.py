"""Providers: the ways of running one pruned vector field that the suite compares.

Each provider turns the pruned ``flows.ODEnet`` of a case into a *field*: a
module called f(t, z) that ``flows.ODEFunc`` (and so ``flows.CNF``) can
integrate. Where the field has ``forward_and_divergence(t, z, noise)``,
ODEFunc takes f and the divergence from it in one call; otherwise it computes
the divergence by autograd, ``create_graph`` when gradients are enabled (as in
training), not under no_grad (evaluation).

- ``dense_eager``: the pruned model as is (zeros inside dense matrices),
  autograd divergence. What every public implementation of the method does,
  and the baseline of every ratio.
- ``torch_compile``: ``torch.compile`` of the same dense model (fullgraph,
  static shapes). Its divergence is ``torch.func.jvp`` (forward mode: one extra
  pass, traceable by dynamo) when no gradient is needed, and ``torch.func.vjp``
  when one is (the training step): in torch 2.13 the backward of a
  jvp compiled by inductor fails with "ZeroTensors are immutable".
- ``torch_csr``: every pruned linear map as a ``torch.sparse_csr`` matrix (built
  per call from a trainable values vector, so the training step gets weight
  gradients at the kept places) times the feature-major input, autograd divergence.
- ``sparsekern``: ``compile_sparse`` with backend and layout "auto"; the fused
  forward + JVP kernel for f with divergence.
- ``sparsekern_<backend>`` (cpu, triton, cuda, ref): the same with that backend
  forced; ``sparsekern_dense`` / ``_csr`` / ``_blocked``: layout forced;
  ``sparsekern_generic``: the generic tier (autograd divergence through sparse ops).
"""

from __future__ import annotations

import copy
import functools
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from bench.cases import Shape, build_flow
from flows.prune import prunable_layers


@dataclass
class Prepared:
    """A provider's field for one vector field, and what to record about it.

    Attributes:
        field: module with f's call signature, maybe with forward_and_divergence.
        div_impl: how the Hutchinson divergence is computed ("autograd", "jvp",
            "fused", ...), per metric when it differs ({"f_div": ..., "train_step": ...}).
        info: extra facts for the rows (e.g. the backend sparsekern resolved to,
            the per-layer layouts it chose).
    """

    field: nn.Module
    div_impl: dict[str, str]
    info: dict[str, object] = field(default_factory=dict)


class Provider:
    """Base class. Subclasses set ``name`` and implement ``prepare``."""

    name = "?"
    description = ""

    def unavailable(self, device: torch.device) -> str | None:
        """None if the provider runs on ``device``, else why not."""
        return None

    def prepare(self, net: nn.Module, batch: int) -> Prepared:
        """The provider's field for ``net`` (which it must not modify)."""
        raise NotImplementedError

    def prepare_flow(self, shape: Shape, nets: list[nn.Module], batch: int) -> nn.Module:
        """The shape's flow with this provider's fields for ``nets`` (one per block)."""
        return build_flow(shape, [self.prepare(n, batch).field for n in nets])


# ----------------------------------------------------------------------- dense eager


class DenseEager(Provider):
    name = "dense_eager"
    description = "the pruned model as is (zeros in dense matrices), autograd divergence"

    def prepare(self, net: nn.Module, batch: int) -> Prepared:
        return Prepared(net, {"f_div": "autograd", "train_step": "autograd (create_graph)",
                              "solve": "autograd"})


# --------------------------------------------------------------------- torch.compile


class _CompiledDense(nn.Module):
    """The dense model under torch.compile, with a traceable Hutchinson divergence."""

    def __init__(self, net: nn.Module, backend: str) -> None:
        super().__init__()
        self.net = net
        compile_ = functools.partial(torch.compile, backend=backend, fullgraph=True,
                                     dynamic=False)
        self._f = compile_(self._call)
        self._div_jvp = compile_(self._jvp)
        self._div_vjp = compile_(self._vjp)

    def _call(self, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return self.net(t, z)

    def _jvp(self, t: torch.Tensor, z: torch.Tensor, noise: torch.Tensor):
        f, jv = torch.func.jvp(lambda zz: self.net(t, zz), (z,), (noise,))
        return f, (jv * noise).sum(1)

    def _vjp(self, t: torch.Tensor, z: torch.Tensor, noise: torch.Tensor):
        f, pullback = torch.func.vjp(lambda zz: self.net(t, zz), z)
        (ej,) = pullback(noise)
        return f, (ej * noise).sum(1)

    def forward(self, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return self._f(t, z)

    def forward_and_divergence(self, t: torch.Tensor, z: torch.Tensor,
                               noise: torch.Tensor | None = None):
        if noise is None:
            raise NotImplementedError("torch_compile provider: Hutchinson divergence only")
        t = torch.as_tensor(t, dtype=z.dtype, device=z.device)
        grad = torch.is_grad_enabled() and (
            z.requires_grad or any(p.requires_grad for p in self.net.parameters()))
        return (self._div_vjp if grad else self._div_jvp)(t, z, noise)


class TorchCompile(Provider):
    name = "torch_compile"
    description = ("torch.compile of the dense model (fullgraph); divergence by "
                   "torch.func.jvp, or torch.func.vjp when training")

    def __init__(self, backend: str = "inductor") -> None:
        self.backend = backend

    def prepare(self, net: nn.Module, batch: int) -> Prepared:
        # Each case brings new shapes; a fresh dynamo cache keeps recompile limits away.
        torch._dynamo.reset()
        return self._prepared(net)

    def _prepared(self, net: nn.Module) -> Prepared:
        return Prepared(_CompiledDense(net, self.backend),
                        {"f_div": "jvp", "train_step": "vjp", "solve": "jvp"},
                        {"compile_backend": self.backend})

    def prepare_flow(self, shape: Shape, nets: list[nn.Module], batch: int) -> nn.Module:
        # No reset here: the runner prepares every provider at the start of a case, and
        # the blocks' same-shaped modules share the compiled graphs of block 0.
        return build_flow(shape, [self._prepared(n).field for n in nets])


# ------------------------------------------------------------------- torch.sparse CSR


class CSRLinear(nn.Module):
    """A pruned nn.Linear as a torch.sparse_csr matrix: x [B, in] -> [B, out].

    The kept values are a Parameter; the CSR tensor is assembled from them on
    every call (cheap: no copy of the indices), so autograd reaches them.
    """

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        w = linear.weight.detach()
        mask = getattr(linear, "weight_mask", None)
        kept = (mask != 0) if mask is not None else torch.ones_like(w, dtype=torch.bool)
        with warnings.catch_warnings():
            # torch warns once per process that sparse CSR support is "in beta".
            warnings.simplefilter("ignore", UserWarning)
            csr = torch.where(kept, w, torch.zeros_like(w)).to_sparse_csr()
            # to_sparse_csr drops exact zeros at kept places too; keep the mask's pattern.
            if csr.values().numel() != int(kept.sum()):
                csr = self._csr_from_mask(w, kept)
        self.register_buffer("crow", csr.crow_indices())
        self.register_buffer("col", csr.col_indices())
        self.values = nn.Parameter(csr.values().clone())
        self.size = tuple(w.shape)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone())

    @staticmethod
    def _csr_from_mask(w: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
        rows, cols = kept.nonzero(as_tuple=True)
        crow = torch.zeros(w.shape[0] + 1, dtype=torch.long, device=w.device)
        crow[1:] = torch.cumsum(kept.sum(1), 0)
        return torch.sparse_csr_tensor(crow, cols, w[rows, cols], w.shape)

    def weight_csr(self) -> torch.Tensor:
        return torch.sparse_csr_tensor(self.crow, self.col, self.values, self.size,
                                       check_invariants=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.sparse.mm(self.weight_csr(), x.t()).t()
        return y if self.bias is None else y + self.bias


def to_csr_model(net: nn.Module) -> nn.Module:
    """A copy of ``net`` with every prunable nn.Linear replaced by a ``CSRLinear``."""
    out = copy.deepcopy(net)
    for name, module in prunable_layers(out):
        if type(module) is not nn.Linear:
            raise TypeError(f"torch_csr provider: {name} is a {type(module).__name__}, "
                            "only nn.Linear layers are converted")
        parent_name, _, attr = name.rpartition(".")
        parent = out.get_submodule(parent_name) if parent_name else out
        setattr(parent, attr, CSRLinear(module))
    return out


class TorchCSR(Provider):
    name = "torch_csr"
    description = ("pruned weights as torch.sparse_csr tensors (torch.sparse.mm), "
                   "autograd divergence")

    def prepare(self, net: nn.Module, batch: int) -> Prepared:
        return Prepared(to_csr_model(net), {"f_div": "autograd",
                                            "train_step": "autograd (create_graph)",
                                            "solve": "autograd"})


# ----------------------------------------------------------------------- sparsekern


def _sparsekern_backend_reason(backend: str, device: torch.device) -> str | None:
    if backend == "ref":
        return None
    if backend == "cpu":
        if device.type != "cpu":
            return "the cpu backend runs on CPU tensors"
        from sparsekern.backends import cpu

        return None if cpu.available() else "the C++ CPU extension does not build here"
    if device.type != "cuda":
        return f"the {backend} backend needs CUDA"
    if backend == "triton":
        from sparsekern import triton as triton_backend

        return None if triton_backend.available() else "triton is not available"
    if backend == "cuda":
        try:
            from sparsekern.backends import cuda
        except ImportError as exc:
            return f"sparsekern.backends.cuda does not import ({exc})"
        return None if cuda.available() else "the CUDA extension does not build here"
    return f"unknown backend {backend!r}"


class Sparsekern(Provider):
    """compile_sparse with a given backend, layout and tier."""

    def __init__(self, name: str, backend: str = "auto", layout: str = "auto",
                 tier: str = "auto", description: str = "") -> None:
        self.name = name
        self.backend = backend
        self.layout = layout
        self.tier = tier
        self.description = description

    def unavailable(self, device: torch.device) -> str | None:
        return None if self.backend == "auto" else _sparsekern_backend_reason(self.backend,
                                                                               device)

    def config(self, batch: int):
        from sparsekern import SparseConfig

        return SparseConfig(backend=self.backend, layout=self.layout, tier=self.tier,
                            batch_hint=batch)

    def prepare(self, net: nn.Module, batch: int) -> Prepared:
        from sparsekern import compile_sparse
        from sparsekern.linear import CoreMatrix

        fast = compile_sparse(net, self.config(batch))
        info: dict[str, object] = {
            "backend": fast.backend, "tier": fast.tier,
            "layouts": [m.layout for m in fast.modules() if isinstance(m, CoreMatrix)],
        }
        div = "fused" if fast.tier == "fused" else "autograd"
        return Prepared(fast, {"f_div": div, "train_step": div, "solve": div}, info)

    def prepare_flow(self, shape: Shape, nets: list[nn.Module], batch: int) -> nn.Module:
        from sparsekern import compile_sparse

        return compile_sparse(build_flow(shape, nets), self.config(batch))


# --------------------------------------------------------------------------- registry

MAIN_PROVIDERS = ("dense_eager", "torch_compile", "torch_csr", "sparsekern")


def make_providers(compile_backend: str = "inductor") -> dict[str, Provider]:
    """Every provider the suite knows, by name (available or not on this machine)."""
    providers: list[Provider] = [
        DenseEager(),
        TorchCompile(compile_backend),
        TorchCSR(),
        Sparsekern("sparsekern", description="compile_sparse, backend and layout auto"),
    ]
    for backend in ("cpu", "triton", "cuda", "ref"):
        providers.append(Sparsekern(f"sparsekern_{backend}", backend=backend,
                                    description=f"compile_sparse, backend {backend!r}"))
    for layout in ("dense", "csr", "blocked"):
        providers.append(Sparsekern(f"sparsekern_{layout}", layout=layout,
                                    description=f"compile_sparse, layout {layout!r} forced"))
    providers.append(Sparsekern("sparsekern_generic", tier="generic",
                                description="compile_sparse, generic tier (autograd divergence)"))
    return {p.name: p for p in providers}


def auto_backend(device: torch.device) -> str:
    """The backend sparsekern's "auto" resolves to on ``device``."""
    from sparsekern.field import resolve_backend

    return resolve_backend("auto", device)


def default_providers(device: torch.device, registry: dict[str, Provider]) -> list[str]:
    """The main providers, plus each compiled sparsekern backend that runs here and that
    "auto" does not already pick (on a GPU: triton is auto, cuda is added)."""
    names = list(MAIN_PROVIDERS)
    auto = auto_backend(device)
    for backend in ("cpu", "triton", "cuda"):
        name = f"sparsekern_{backend}"
        if backend != auto and registry[name].unavailable(device) is None:
            names.append(name)
    return names


def resolve_providers(requested: list[str] | None, device: torch.device,
                      registry: dict[str, Provider]) -> list[str]:
    """Provider names from the command line ("default", "all" or names), in run order.

    ``dense_eager`` runs first when selected: it gives the reference outputs
    the others are checked against.

    Raises:
        ValueError: an unknown provider name.
    """
    if not requested or requested == ["default"]:
        names = default_providers(device, registry)
    else:
        names = []
        for r in requested:
            expand = {"default": default_providers(device, registry),
                      "all": list(registry)}.get(r, [r])
            for n in expand:
                if n not in registry:
                    raise ValueError(f"unknown provider {n!r}; known: {', '.join(registry)}")
                if n not in names:
                    names.append(n)
    return sorted(names, key=lambda n: n != "dense_eager")

