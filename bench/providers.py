"""Providers: the ways of running one pruned vector field that the suite compares.

Each provider turns the pruned ``flows.ODEnet`` of a case into a *field*: a
module called f(t, z) that ``flows.ODEFunc`` (and so ``flows.CNF``) can
integrate. Where the field has ``forward_and_divergence(t, z, noise)``,
ODEFunc takes f and the divergence from it in one call; otherwise it computes
the divergence by autograd, ``create_graph`` when gradients are enabled (as in
training), not under no_grad (evaluation).

- ``dense_eager``: the pruned model as is (zeros inside dense matrices),
  autograd divergence. What every public implementation of the method does,
  and the baseline of every ratio. On a GPU these are cuBLAS products in exact
  fp32: preparing it switches torch's TF32 flags off explicitly (``exact_fp32``),
  for the rest of the run, so no provider is measured with TF32 products.
- ``torch_compile``: ``torch.compile`` of the same dense model (fullgraph,
  static shapes). Its divergence is ``torch.func.jvp`` (forward mode: one extra
  pass, traceable by dynamo) when no gradient is needed, and ``torch.func.vjp``
  when one is (the training step): in torch 2.13 the backward of a
  jvp compiled by inductor fails with "ZeroTensors are immutable".
- ``torch_csr``: every pruned linear map as a ``torch.sparse_csr`` matrix (built
  per call from a trainable values vector, so the training step gets weight
  gradients at the kept places) times the feature-major input, autograd divergence.
- ``torch_bsr``: the same with ``torch.sparse_bsr`` matrices: per layer the
  largest block size in ``BSR_BLOCKSIZES`` that stores at most ``BSR_MAX_FILL``
  times the kept entries, the matrix zero-padded to a multiple of it. Available
  only where torch can differentiate BSR x dense products w.r.t. the dense
  operand (the divergence needs W^T g): probed per device (``bsr_unavailable``);
  torch's CPU build cannot (no BSC/BSR addmm on CPU), so it runs on CUDA only.
- ``sparsekern``: ``compile_sparse`` with backend and layout "auto"; the fused
  forward + JVP kernel for f with divergence. Its flows solve under torchdiffeq
  (``CNF.solver_engine = "torchdiffeq"``): the compiled field inside the
  original solver, so ``solve`` measures the field's gain alone.
- ``sparsekern_native``: the same compiled flow solved by ``sparsekern.odeint``
  (``solver_engine = "auto"``, what flows does by default with a compiled
  field): the native solver loop. Flow metrics only (solve, train_solve); its
  per-call metrics would be sparsekern's, so they are not measured.
- ``sparsekern_<backend>`` (cpu, triton, cuda, ref): the same with that backend
  forced; ``sparsekern_dense`` / ``_csr`` / ``_blocked``: layout forced;
  ``sparsekern_generic``: the generic tier (autograd divergence through sparse ops).
- ``sparsekern_bf16`` / ``_fp16``: ``SparseConfig(precision=...)``, products on
  bf16/fp16 operands with float32 accumulation (Triton tensor cores; CUDA
  only). Not exact: their outputs are checked against the looser
  ``REDUCED_REL_ERR`` bound, and their solves may take other steps.
- ``torchode``: the dense masked model (as dense_eager runs it, autograd
  divergence) under torchode's dopri5 (``ODETerm``, ``Dopri5``,
  ``IntegralController``, ``AutoDiffAdjoint``) with the case's atol, rtol and T.
  torchode steps every sample on its own (per-sample step sizes), so its NFE
  and outputs differ from torchdiffeq's within the tolerances: its outputs are
  checked loosely (``bench.report.LOOSE_REL_ERR``) and its NFE not at all. Its
  train_solve backpropagates through the steps (AutoDiffAdjoint), not the
  adjoint method. Flow metrics only; unavailable where torchode is not
  installed (``pip install --no-deps torchode==1.0.1 torchtyping==0.1.5
  "typeguard>=2.11.1,<3"``, or the project's ``bench`` extra).

The image shapes (``bench.cases.IMAGE_SHAPES``: convolutional fields on [B, C, H, W])
run on dense_eager, torch_compile and every sparsekern provider (``compile_sparse``
gives a ``sparsekern.fused_conv.FusedConvNet``; sparsekern_native's host loop calls its
``forward_and_divergence``). torch_csr and torch_bsr convert nn.Linear layers only
and torchode's flow holds a flat per-sample state: ``Provider.shape_unavailable``
says so, and the runner writes no rows for them there (``meta.skipped_shapes``).
"""

from __future__ import annotations

import copy
import functools
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F

from bench.cases import Shape, build_flow
from bench.metrics import FLOW_METRICS
from flows.cnf import CNF
from flows.likelihood import standard_normal_logprob
from flows.prune import prunable_layers

# Why a provider that only swaps the solver has no per-call metrics.
SOLVER_ONLY = "a solver provider: measured on whole solves only"


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

    def unavailable(self, device: torch.device, dtype: torch.dtype = torch.float32
                    ) -> str | None:
        """None if the provider runs on ``device`` in ``dtype``, else why not."""
        return None

    def prepare(self, net: nn.Module, batch: int) -> Prepared:
        """The provider's field for ``net`` (which it must not modify)."""
        raise NotImplementedError

    def metric_unavailable(self, metric: str) -> str | None:
        """None if the provider measures ``metric``, else why not (no row is written)."""
        return None

    def shape_unavailable(self, shape: Shape) -> str | None:
        """None if the provider runs ``shape``'s fields, else why not (no row is written)."""
        return None

    def prepare_flow(self, shape: Shape, nets: list[nn.Module], batch: int) -> nn.Module:
        """The shape's flow with this provider's fields for ``nets`` (one per block)."""
        return build_flow(shape, [self.prepare(n, batch).field for n in nets])

    def prepare_train_flow(self, shape: Shape, nets: list[nn.Module], batch: int
                           ) -> nn.Module:
        """The flow of the train_solve metric: ``prepare_flow``'s, its CNFs with the
        shape's gradient method (``Shape.adjoint``)."""
        flow = self.prepare_flow(shape, nets, batch)
        for m in flow.modules():
            if isinstance(m, CNF):
                m.adjoint = shape.adjoint
        return flow


def _set_solver_engine(flow: nn.Module, engine: str) -> nn.Module:
    for m in flow.modules():
        if isinstance(m, CNF):
            m.solver_engine = engine
    return flow


# ----------------------------------------------------------------------- dense eager


def exact_fp32(device: torch.device) -> None:
    """On CUDA: torch's products in exact fp32 from now on (TF32 off for cuBLAS and cuDNN).

    torch's default, said explicitly: user code, a plugin or
    ``torch.set_float32_matmul_precision("high")`` may have switched TF32 on, and
    the comparison is at fp32 accuracy (as sparsekern's kernels compute by
    default). Process-wide on purpose: the backward products of a training step
    run outside any call of the field, after it returns.
    """
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False


def _device_of(net: nn.Module) -> torch.device:
    first = next(net.parameters(), None)
    return first.device if first is not None else torch.device("cpu")


class DenseEager(Provider):
    name = "dense_eager"
    description = ("the pruned model as is (zeros in dense matrices; on a GPU cuBLAS with TF32 "
                   "off), autograd divergence")

    def prepare(self, net: nn.Module, batch: int) -> Prepared:
        device = _device_of(net)
        exact_fp32(device)
        info: dict[str, object] = {"tf32": False} if device.type == "cuda" else {}
        return Prepared(net, {"f_div": "autograd", "train_step": "autograd (create_graph)",
                              "solve": "autograd"}, info)


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
        return f, (jv * noise).flatten(1).sum(1)

    def _vjp(self, t: torch.Tensor, z: torch.Tensor, noise: torch.Tensor):
        f, pullback = torch.func.vjp(lambda zz: self.net(t, zz), z)
        (ej,) = pullback(noise)
        return f, (ej * noise).flatten(1).sum(1)

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


def _replace_linears(net: nn.Module, make: Callable[[nn.Linear], nn.Module], who: str
                     ) -> nn.Module:
    """A copy of ``net`` with every prunable nn.Linear replaced by ``make(linear)``."""
    out = copy.deepcopy(net)
    for name, module in prunable_layers(out):
        if type(module) is not nn.Linear:
            raise TypeError(f"{who} provider: {name} is a {type(module).__name__}, "
                            "only nn.Linear layers are converted")
        parent_name, _, attr = name.rpartition(".")
        parent = out.get_submodule(parent_name) if parent_name else out
        setattr(parent, attr, make(module))
    return out


# Why the providers that convert nn.Linear layers do not run the image shapes.
LINEAR_ONLY = ("converts nn.Linear layers only: torch.sparse has no sparse convolution, so "
               "the image shapes' convolutional fields have nothing to run on")


def to_csr_model(net: nn.Module) -> nn.Module:
    """A copy of ``net`` with every prunable nn.Linear replaced by a ``CSRLinear``."""
    return _replace_linears(net, CSRLinear, "torch_csr")


class TorchCSR(Provider):
    name = "torch_csr"
    description = ("pruned weights as torch.sparse_csr tensors (torch.sparse.mm), "
                   "autograd divergence")

    def shape_unavailable(self, shape: Shape) -> str | None:
        return LINEAR_ONLY if shape.is_conv else None

    def prepare(self, net: nn.Module, batch: int) -> Prepared:
        return Prepared(to_csr_model(net), {"f_div": "autograd",
                                            "train_step": "autograd (create_graph)",
                                            "solve": "autograd"})


# ------------------------------------------------------------------- torch.sparse BSR

BSR_BLOCKSIZES = (16, 8, 4, 2, 1)
BSR_MAX_FILL = 2.0


def _kept(linear: nn.Linear) -> torch.Tensor:
    mask = getattr(linear, "weight_mask", None)
    w = linear.weight
    return (mask != 0) if mask is not None else torch.ones_like(w, dtype=torch.bool)


def _pad_to(t: torch.Tensor, bs: int) -> torch.Tensor:
    r, c = t.shape
    out = t.new_zeros((-(-r // bs) * bs, -(-c // bs) * bs))
    out[:r, :c] = t
    return out


def _block_mask(kept: torch.Tensor, bs: int) -> torch.Tensor:
    """[R / bs, C / bs]: blocks of the padded ``kept`` holding a kept entry."""
    p = _pad_to(kept, bs)
    return p.view(p.shape[0] // bs, bs, p.shape[1] // bs, bs).any(3).any(1)


def bsr_blocksize(kept: torch.Tensor) -> int:
    """The largest of ``BSR_BLOCKSIZES`` storing at most ``BSR_MAX_FILL`` x the kept entries.

    Structured pruning (whole neurons) keeps large blocks; unstructured pruning
    at high sparsity ends at small ones (1: CSR in BSR's clothing).
    """
    nnz = int(kept.sum())
    for bs in BSR_BLOCKSIZES:
        if int(_block_mask(kept, bs).sum()) * bs * bs <= BSR_MAX_FILL * nnz:
            return bs
    return 1


class BSRLinear(nn.Module):
    """A pruned nn.Linear as a torch.sparse_bsr matrix: x [B, in] -> [B, out].

    The stored blocks are a Parameter [n_blocks, bs, bs]; pruned places inside a
    stored block are multiplied by a constant 0/1 mask on every call, so they
    stay zero in training as in the masked model. The matrix is zero-padded to
    a multiple of the block size (the input gets zero rows, the output is cut).
    """

    def __init__(self, linear: nn.Linear, blocksize: int | None = None) -> None:
        super().__init__()
        w = linear.weight.detach()
        kept = _kept(linear)
        bs = blocksize or bsr_blocksize(kept)
        wp = _pad_to(torch.where(kept, w, torch.zeros_like(w)), bs)
        kp = _pad_to(kept, bs)
        nbr, nbc = wp.shape[0] // bs, wp.shape[1] // bs
        bmask = kp.view(nbr, bs, nbc, bs).any(3).any(1)
        rows, cols = bmask.nonzero(as_tuple=True)
        crow = torch.zeros(nbr + 1, dtype=torch.long, device=w.device)
        crow[1:] = torch.cumsum(bmask.sum(1), 0)
        blocks = wp.view(nbr, bs, nbc, bs).permute(0, 2, 1, 3)[rows, cols]
        kept_blocks = kp.view(nbr, bs, nbc, bs).permute(0, 2, 1, 3)[rows, cols]
        self.register_buffer("crow", crow)
        self.register_buffer("col", cols.contiguous())
        self.values = nn.Parameter(blocks.contiguous())
        self.register_buffer("value_mask", None if bool(kept_blocks.all())
                             else kept_blocks.to(w.dtype))
        self.blocksize = bs
        self.size = tuple(wp.shape)
        self.out_features, self.in_features = w.shape
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone())

    def weight_bsr(self) -> torch.Tensor:
        vals = self.values if self.value_mask is None else self.values * self.value_mask
        return torch.sparse_bsr_tensor(self.crow, self.col, vals, self.size,
                                       check_invariants=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xt = x.t()
        pad = self.size[1] - self.in_features
        if pad:
            xt = F.pad(xt, (0, 0, 0, pad))
        y = (self.weight_bsr() @ xt)[: self.out_features].t()
        return y if self.bias is None else y + self.bias


def to_bsr_model(net: nn.Module, blocksize: int | None = None) -> nn.Module:
    """A copy of ``net`` with every prunable nn.Linear replaced by a ``BSRLinear``."""
    return _replace_linears(net, lambda m: BSRLinear(m, blocksize), "torch_bsr")


@functools.cache
def bsr_unavailable(device: str) -> str | None:
    """None if torch differentiates BSR x dense products on ``device`` as the bench needs.

    Probes a small pruned layer: its output, the product W^T g with a graph (the
    autograd divergence), and the gradient of that (the training step).
    """
    dev = torch.device(device)
    gen = torch.Generator().manual_seed(0)
    lin = nn.Linear(8, 6)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(6, 8, generator=gen))
    lin.register_buffer("weight_mask", (torch.rand(6, 8, generator=gen) < 0.5).float())
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "sparse BSR support is in beta"
            layer = BSRLinear(lin.to(dev), blocksize=2)
            x = torch.randn(5, 8, generator=gen).to(dev).requires_grad_()
            y = layer(x)
            dense = x @ (lin.weight * lin.weight_mask).t() + lin.bias
            if not torch.allclose(y, dense, rtol=1e-4, atol=1e-5):
                return f"torch's BSR product on {dev.type} disagrees with the dense one"
            (gx,) = torch.autograd.grad(y, x, torch.ones_like(y), create_graph=True)
            gx.square().sum().backward()
    except (RuntimeError, NotImplementedError, TypeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return (f"torch {torch.__version__} cannot differentiate BSR x dense products w.r.t. "
                f"the dense operand on {dev.type} ({first}); the divergence needs W^T g")
    if layer.values.grad is None:
        return f"torch's BSR product on {dev.type} gives its values no gradient"
    return None


class TorchBSR(Provider):
    name = "torch_bsr"
    description = (f"pruned weights as torch.sparse_bsr tensors (block size: the largest of "
                   f"{BSR_BLOCKSIZES} with at most {BSR_MAX_FILL:g}x fill, padded), "
                   "autograd divergence")

    def unavailable(self, device: torch.device, dtype: torch.dtype = torch.float32
                    ) -> str | None:
        return bsr_unavailable(str(device))

    def shape_unavailable(self, shape: Shape) -> str | None:
        return LINEAR_ONLY if shape.is_conv else None

    def prepare(self, net: nn.Module, batch: int) -> Prepared:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            model = to_bsr_model(net)
        sizes = [m.blocksize for m in model.modules() if isinstance(m, BSRLinear)]
        return Prepared(model, {"f_div": "autograd", "train_step": "autograd (create_graph)",
                                "solve": "autograd"},
                        {"layouts": [f"bsr{bs}" for bs in sizes]})


# ----------------------------------------------------------------------- sparsekern


def _sparsekern_backend_reason(backend: str, device: torch.device) -> str | None:
    from sparsekern import backends

    return backends.get(backend).unavailable(device)


class Sparsekern(Provider):
    """compile_sparse with a given backend, layout, tier and product precision.

    ``engine``: the solver of its flows (``CNF.solver_engine``): "torchdiffeq" (the
    compiled field inside torchdiffeq; every sparsekern provider but one) or "auto"
    (``sparsekern.odeint``, the native loop: ``sparsekern_native``, flow metrics only).
    """

    def __init__(self, name: str, backend: str = "auto", layout: str = "auto",
                 tier: str = "auto", description: str = "", precision: str = "ieee",
                 engine: str = "torchdiffeq") -> None:
        self.name = name
        self.backend = backend
        self.layout = layout
        self.tier = tier
        self.description = description
        self.precision = precision
        self.engine = engine

    def metric_unavailable(self, metric: str) -> str | None:
        if self.engine != "torchdiffeq" and metric not in FLOW_METRICS:
            return SOLVER_ONLY
        return None

    def unavailable(self, device: torch.device, dtype: torch.dtype = torch.float32
                    ) -> str | None:
        from sparsekern.precision import is_reduced

        if is_reduced(self.precision):
            # Elsewhere "auto" would run the reference's rounding: a check, not a peer.
            if device.type != "cuda":
                return f"{self.precision} products have kernels on CUDA only (Triton)"
            if dtype != torch.float32:
                return f"{self.precision} products round float32 models; this run is {dtype}"
            return _sparsekern_backend_reason("triton", device)
        return None if self.backend == "auto" else _sparsekern_backend_reason(self.backend,
                                                                               device)

    def config(self, batch: int):
        from sparsekern import SparseConfig

        return SparseConfig(backend=self.backend, layout=self.layout, tier=self.tier,
                            batch_hint=batch, precision=self.precision)

    def prepare(self, net: nn.Module, batch: int) -> Prepared:
        from sparsekern import compile_sparse
        from sparsekern.linear import CoreMatrix

        fast = compile_sparse(net, self.config(batch))
        info: dict[str, object] = {
            "backend": fast.backend, "tier": fast.tier, "precision": self.precision,
            "layouts": [m.layout for m in fast.modules() if isinstance(m, CoreMatrix)],
        }
        div = "fused" if fast.tier == "fused" else "autograd"
        return Prepared(fast, {"f_div": div, "train_step": div, "solve": div}, info)

    def prepare_flow(self, shape: Shape, nets: list[nn.Module], batch: int) -> nn.Module:
        from sparsekern import compile_sparse

        return _set_solver_engine(compile_sparse(build_flow(shape, nets), self.config(batch)),
                                  self.engine)


# -------------------------------------------------------------------------- torchode


@functools.cache
def torchode_unavailable() -> str | None:
    """None if torchode imports here, else why not."""
    try:
        import torchode  # noqa: F401
    except ImportError as exc:
        return (f"torchode is not installed ({exc}); pip install --no-deps torchode==1.0.1 "
                'torchtyping==0.1.5 "typeguard>=2.11.1,<3" (or pip install -e ".[bench]")')
    except Exception as exc:  # e.g. a torchtyping too old for this torch
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        return f"torchode does not import here ({type(exc).__name__}: {first})"
    return None


class PerSampleTime(nn.Module):
    """A field f(t, z) that takes a scalar t, called with one time per sample (torchode's).

    torchode steps every sample on its own, so it calls f with t [B]; flows' time
    inputs (ConcatSquashLinear) take one scalar time. ``torch.func.vmap`` runs the
    field once per sample (a batched computation, not a loop); a scalar t goes
    straight through. ``bench_wrapped`` is the field itself (its parameter names).
    """

    def __init__(self, field: nn.Module) -> None:
        super().__init__()
        self.inner = field

    @property
    def bench_wrapped(self) -> nn.Module:
        return self.inner

    @property
    def state_shape(self):
        return getattr(self.inner, "state_shape", None)

    def forward(self, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=z.dtype, device=z.device)
        if t.dim() == 0:
            return self.inner(t, z)
        if t.shape != (z.shape[0],):
            raise ValueError(f"per-sample times {list(t.shape)} for a batch of {z.shape[0]}")
        return torch.func.vmap(lambda ti, zi: self.inner(ti, zi[None])[0])(t, z)


class TorchodeFlow(nn.Module):
    """A bench flow (``build_flow``: CNF blocks around dense fields) solved by torchode.

    Each block: the state (z, logp) as one [B, d + 1] tensor per sample, the
    block's ``ODEFunc`` (its Hutchinson noise drawn as ``CNF.forward`` draws it, so
    every provider sees the same noise) as the ``ODETerm``, dopri5 with an
    integral step-size controller at the block's atol and rtol from 0 to T,
    ``AutoDiffAdjoint`` (gradients by backpropagation through the steps). Every
    sample has its own steps; the field is still called on the whole batch, and
    each call counts one NFE (``CNF.nfe_forward``), as torchdiffeq's do.
    ``bench_solve_note``: torchode's per-sample counts of the last solve.
    """

    bench_ode_solver = "torchode"

    def __init__(self, flow: nn.Module) -> None:
        super().__init__()
        self.flow = flow
        self.bench_solve_note: str | None = None

    def _cnfs(self) -> list[CNF]:
        return [m for m in self.flow.modules() if isinstance(m, CNF)]

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        z, delta_logp = x, x.new_zeros(x.shape[0])
        notes = []
        for b, cnf in enumerate(self._cnfs()):
            z, delta_logp, stats = self._solve(cnf, z, delta_logp)
            notes.append(f"block {b}: {stats}")
        self.bench_solve_note = "torchode dopri5, per-sample steps; " + "; ".join(notes)
        return standard_normal_logprob(z) - delta_logp

    @staticmethod
    def _solve(cnf: CNF, x: torch.Tensor, logp: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, str]:
        import torchode

        func = cnf.odefunc
        func.reset_nfe()
        func.draw_noise(x)
        d = x.shape[1]

        def f(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            dz, neg_div = func(t, (y[:, :d], y[:, d]))
            return torch.cat([dz, neg_div[:, None]], 1)

        term = torchode.ODETerm(f)
        solver = torchode.AutoDiffAdjoint(
            torchode.Dopri5(term=term),
            torchode.IntegralController(atol=cnf.atol, rtol=cnf.rtol, term=term))
        B = x.shape[0]
        T = cnf.T.to(dtype=x.dtype, device=x.device)
        problem = torchode.InitialValueProblem(
            y0=torch.cat([x, logp[:, None]], 1),
            t_start=torch.zeros(B, dtype=x.dtype, device=x.device), t_end=T.expand(B))
        sol = solver.solve(problem)
        failed = int((sol.status != 0).sum())
        if failed:
            raise RuntimeError(f"torchode: {failed} of {B} samples did not reach T (status "
                               f"{sorted(set(sol.status.tolist()))})")
        cnf.nfe_forward = func.nfe
        func.reset_nfe()
        y = sol.ys[:, -1]
        per = sol.stats["n_f_evals"].double()
        steps = sol.stats["n_steps"].double()
        stats = (f"n_f_evals per sample min/median/max {int(per.min())}/"
                 f"{per.median().item():g}/{int(per.max())}, n_steps max {int(steps.max())}")
        return y[:, :d], y[:, d], stats


class Torchode(Provider):
    name = "torchode"
    description = ("the dense masked model (autograd divergence) under torchode's dopri5, "
                   "per-sample steps (AutoDiffAdjoint: train_solve backpropagates through "
                   "the steps)")

    def unavailable(self, device: torch.device, dtype: torch.dtype = torch.float32
                    ) -> str | None:
        return torchode_unavailable()

    def metric_unavailable(self, metric: str) -> str | None:
        return None if metric in FLOW_METRICS else SOLVER_ONLY

    def shape_unavailable(self, shape: Shape) -> str | None:
        if shape.is_conv:
            return ("the bench's torchode flow holds a flat [B, d + 1] state per sample; image "
                    "states [B, C, H, W] are not wired (and the image shapes measure the flow "
                    "metrics on two MNIST cases only)")
        return None

    def prepare(self, net: nn.Module, batch: int) -> Prepared:
        return Prepared(net, {"solve": "autograd",
                              "train_solve": "autograd (create_graph)"})

    def prepare_flow(self, shape: Shape, nets: list[nn.Module], batch: int) -> nn.Module:
        fields = nets if shape.time == "none" else [PerSampleTime(n) for n in nets]
        return TorchodeFlow(build_flow(shape, fields))

    def prepare_train_flow(self, shape: Shape, nets: list[nn.Module], batch: int
                           ) -> nn.Module:
        # torchode's AutoDiffAdjoint: backpropagation through the steps, whatever the shape.
        return self.prepare_flow(shape, nets, batch)


# --------------------------------------------------------------------------- registry

MAIN_PROVIDERS = ("dense_eager", "torch_compile", "torch_csr", "sparsekern")
# Providers whose products are not exact float32, and their precision.
REDUCED_PROVIDERS = {"sparsekern_bf16": "bf16", "sparsekern_fp16": "fp16"}


def make_providers(compile_backend: str = "inductor") -> dict[str, Provider]:
    """Every provider the suite knows, by name (available or not on this machine)."""
    providers: list[Provider] = [
        DenseEager(),
        TorchCompile(compile_backend),
        TorchCSR(),
        TorchBSR(),
        Sparsekern("sparsekern", description="compile_sparse, backend and layout auto; "
                   "flows solved by torchdiffeq"),
        Sparsekern("sparsekern_native", engine="auto",
                   description="the same compiled flow solved by sparsekern.odeint (native "
                               "loop); solve and train_solve only"),
        Torchode(),
    ]
    for backend in ("cpu", "triton", "cuda", "ref"):
        providers.append(Sparsekern(f"sparsekern_{backend}", backend=backend,
                                    description=f"compile_sparse, backend {backend!r}"))
    for layout in ("dense", "csr", "blocked"):
        providers.append(Sparsekern(f"sparsekern_{layout}", layout=layout,
                                    description=f"compile_sparse, layout {layout!r} forced"))
    providers.append(Sparsekern("sparsekern_generic", tier="generic",
                                description="compile_sparse, generic tier (autograd divergence)"))
    for precision in REDUCED_PROVIDERS.values():
        providers.append(Sparsekern(
            f"sparsekern_{precision}", precision=precision,
            description=f"compile_sparse, {precision} product operands, float32 accumulation"))
    return {p.name: p for p in providers}


def auto_backend(device: torch.device) -> str:
    """The backend sparsekern's "auto" resolves to on ``device``."""
    from sparsekern import backends

    return backends.resolve("auto", device)


def default_providers(device: torch.device, registry: dict[str, Provider]) -> list[str]:
    """The main providers, sparsekern_native, torch_bsr and torchode where they run, each
    compiled sparsekern backend that runs here and that "auto" does not already pick (on a
    GPU: triton is auto, cuda is added), and the bf16/fp16 providers where they run (a GPU)."""
    names = [*MAIN_PROVIDERS, "sparsekern_native"]
    for name in ("torch_bsr", "torchode", *REDUCED_PROVIDERS):
        if name in registry and registry[name].unavailable(device) is None:
            names.append(name)
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
            # default_providers only when asked for: on a GPU it checks the CUDA
            # extension, which builds it (minutes of nvcc) on a fresh machine.
            if r == "default":
                expand = default_providers(device, registry)
            else:
                expand = list(registry) if r == "all" else [r]
            for n in expand:
                if n not in registry:
                    raise ValueError(f"unknown provider {n!r}; known: {', '.join(registry)}")
                if n not in names:
                    names.append(n)
    return sorted(names, key=lambda n: n != "dense_eager")

