"""What is measured for each (case, provider): the five metrics, their FLOPs, and the roofline.

Metrics (per NFE for the first three, per solve for the last two, the *flow metrics*):

- ``f``: one call f(t, z) under ``torch.no_grad()``.
- ``f_div``: one call of ``flows.ODEFunc`` on the CNF state (z, logp) under
  ``torch.no_grad()``, with Hutchinson noise: f and its divergence, exactly
  what the log-likelihood solve evaluates per NFE.
- ``train_step``: the same call with gradients on (z and the parameters require
  grad; the autograd divergence keeps its graph, the fused one saves for
  backward), then backward of the scalar loss <f, g_f> + <-div, g_d> for fixed
  random g_f, g_d into the parameters and z.
- ``solve``: ``flow.log_prob(x)`` under ``torch.no_grad()``: dopri5 over every
  CNF block of the shape, Hutchinson noise drawn from the same seed for every
  provider, so the NFE must agree across providers (torchode's per-sample steps
  excepted). The model / solver split times every vector-field evaluation (see
  ``_ModelClock``).
- ``train_solve``: one training step of the whole flow: ``loss =
  -flow.log_prob(x).mean()`` with gradients, then ``loss.backward()``, the CNFs
  with the adjoint method as the shape says (``Shape.adjoint``: True for every
  shape, as the paper's presets train); the same noise as ``solve``. Recorded:
  the forward NFE, the backward (adjoint) NFE, the split, and as outputs the
  loss and the gradients of the kept parameters.

FLOPs count only products with the kept weights, K of them per vector field,
batch B, whatever a provider actually computes (a dense provider multiplies
by the zeros as well; that is the point of the comparison):

- f: 2 K B (one multiply-add per kept weight and sample);
- f_div: 4 K B (f, and one more product per layer for the JVP, or the VJP);
- train_step: 12 K B (f_div's two products per layer, and their backward, each
  needing the input gradient and the weight gradient: 3 x f_div);
- solve: 4 B sum over blocks of K_b x NFE_b (one f_div per function evaluation);
- train_solve with the adjoint: 4 B sum_b K_b x NFE_b (the forward solve) + 12 B
  sum_b K_b x NFEbwd_b (every evaluation of the backward solve is a train_step:
  f_div with its graph, then its vector-Jacobian product); without the adjoint
  (torchode: backpropagation through the steps) 12 B sum_b K_b x NFE_b.

Biases, activations and the divergence's dot product are not counted. The
roofline is the rate of ``torch.mm`` on the dense layer shapes [B, in] x [in, out]
of one vector field at the case's batch, measured in the same process;
``roofline_fraction`` = achieved GFLOP/s on the kept weights / that rate.

Image shapes (convolutional fields): a kept weight is a kept tap, applied at every
output pixel, so every count above is multiplied by H x W (stride 1, same padding;
the taps that fall on the zero padding at the borders are not discounted, as the
usual dense convolution count does not). K counts the time channel's taps too (the
dense model convolves the time channel like any other). Their roofline is the
rate of PyTorch's dense convolution (``F.conv2d``: oneDNN on a CPU, cuDNN on a GPU)
on the field's dense layer shapes [B, in + 1, H, W] at the case's batch: the
analogue of the GEMM rate, so ``roofline_fraction`` is "the fraction of the dense
convolution rate" there (``conv_roofline``).
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from bench.schema import FLOW_METRICS
from bench.timing import Timing, TimingConfig, measure, synchronizer
from flows.cnf import CNF
from flows.odefunc import ODEFunc

METRICS = ("f", "f_div", "train_step", "solve", "train_solve")
# FLOW_METRICS (bench.schema): metrics of a whole flow (every CNF block, a solver),
# built with Provider.prepare_flow at the solve's batch.
FLOPS_PER_KEPT_WEIGHT = {"f": 2, "f_div": 4, "train_step": 12, "solve": 4, "train_solve": 4}
# train_solve: per kept weight, sample and evaluation of the backward solve (a train_step).
BACKWARD_FLOPS_PER_KEPT_WEIGHT = 12
FLOP_COUNTING = (
    "FLOPs on kept weights only (K per vector field, batch B): f 2KB, f_div 4KB, "
    "train_step 12KB, solve 4B*sum_blocks(K_b*NFE_b), train_solve 4B*sum_b(K_b*NFE_b) + "
    "12B*sum_b(K_b*NFEbwd_b) with the adjoint (12B*sum_b(K_b*NFE_b) backpropagating through "
    "the steps); biases and activations not counted. "
    "Roofline: torch.mm on the dense layer shapes at batch B, same process. "
    "Image shapes: K counts kept convolution taps (time channel included), every count "
    "times H*W output pixels (borders not discounted); roofline F.conv2d on the dense "
    "convolutions at batch B."
)


@dataclass
class Inputs:
    """Fixed inputs of a case, shared by every provider.

    Attributes:
        t: scalar time [] (0.5 of the shape's T). z, noise: [B, *state] (state: (d,),
            or (C, H, W) for an image shape); noise Gaussian or Rademacher (+-1).
        logp: [B] zeros (the CNF's log-density slot).
        grad_f: [B, *state], grad_div: [B]: cotangents of the training loss.
        x: [B_solve, *state] data of the solve. seed: of the solve's Hutchinson noise.
    """

    t: torch.Tensor
    z: torch.Tensor
    noise: torch.Tensor
    logp: torch.Tensor
    grad_f: torch.Tensor
    grad_div: torch.Tensor
    x: torch.Tensor
    seed: int


def make_inputs(dim: int | Sequence[int], batch: int, solve_batch: int, T: float,
                dtype: torch.dtype, device: torch.device, seed: int,
                noise: str = "gaussian") -> Inputs:
    """Seeded inputs (drawn on the CPU in float64, then converted: identical on every device).

    ``dim``: the state dimension d, or the shape of one state ((C, H, W) for images).
    ``noise``: the probe of f_div and train_step, "gaussian" or "rademacher" (the signs
    of the same Gaussian draw).
    """
    if noise not in ("gaussian", "rademacher"):
        raise ValueError(f"noise={noise!r}; expected 'gaussian' or 'rademacher'")
    state = (dim,) if isinstance(dim, int) else tuple(dim)
    gen = torch.Generator().manual_seed(seed)

    def draw(*lead: int, sign: bool = False) -> torch.Tensor:
        x = torch.randn(*lead, generator=gen, dtype=torch.float64)
        if sign:
            x = torch.where(x >= 0, 1.0, -1.0).to(torch.float64)
        return x.to(dtype=dtype, device=device)

    return Inputs(
        t=torch.tensor(0.5 * T, dtype=dtype, device=device),
        z=draw(batch, *state),
        noise=draw(batch, *state, sign=noise == "rademacher"),
        logp=torch.zeros(batch, dtype=dtype, device=device),
        grad_f=draw(batch, *state),
        grad_div=draw(batch),
        x=draw(solve_batch, *state),
        seed=seed,
    )


@dataclass
class Result:
    """A metric's timing, its outputs (for the cross-provider check) and solve details.

    Attributes:
        output_keys: what ``outputs`` hold, where a provider may hold something else
            (train_solve: the names of the parameters in the gradient vector); outputs
            are compared in full only where the keys agree.
        nfe, nfe_per_block: forward evaluations of a flow metric (all blocks, per block).
        nfe_backward, nfe_backward_per_block: train_solve with the adjoint: evaluations
            of the backward solves; None otherwise.
        model_ms, solver_ms: the split of a flow metric's median (None where no
            evaluation of the vector field was observed from Python).
        ode_solver: which solver ran ("torchdiffeq", "sparsekern.odeint", "torchode").
        solve_note: what that solver said of its solve (sparsekern.odeint's
            ``last_solve``, torchode's per-sample statistics).
    """

    timing: Timing
    outputs: tuple[torch.Tensor, ...]
    nfe: int | None = None
    nfe_per_block: list[int] | None = None
    model_ms: float | None = None
    solver_ms: float | None = None
    nfe_backward: int | None = None
    nfe_backward_per_block: list[int] | None = None
    ode_solver: str | None = None
    solve_note: str | None = None
    output_keys: tuple[str, ...] | None = None


def _odefunc(field: nn.Module, noise: torch.Tensor) -> ODEFunc:
    func = ODEFunc(field, divergence="hutchinson")
    func.noise = noise
    return func


def run_f(field: nn.Module, inputs: Inputs, config: TimingConfig,
          device: torch.device) -> Result:
    """Time f(t, z) under no_grad."""
    last: list[torch.Tensor] = []

    def fn() -> None:
        with torch.no_grad():
            last[:] = [field(inputs.t, inputs.z)]

    timing = measure(fn, config, device)
    return Result(timing, tuple(last))


def run_f_div(field: nn.Module, inputs: Inputs, config: TimingConfig,
              device: torch.device) -> Result:
    """Time one CNF evaluation (f and the Hutchinson divergence) under no_grad."""
    func = _odefunc(field, inputs.noise)
    last: list[torch.Tensor] = []

    def fn() -> None:
        with torch.no_grad():
            last[:] = func(inputs.t, (inputs.z, inputs.logp))

    timing = measure(fn, config, device)
    return Result(timing, tuple(last))


def run_train_step(field: nn.Module, inputs: Inputs, config: TimingConfig,
                   device: torch.device) -> Result:
    """Time f + divergence with graph, then backward of a scalar loss to parameters and z."""
    func = _odefunc(field, inputs.noise)
    params = [p for p in field.parameters() if p.requires_grad]
    last: list[torch.Tensor] = []

    def fn() -> None:
        for p in params:
            p.grad = None
        z = inputs.z.detach().requires_grad_()
        with torch.enable_grad():
            dz, neg_div = func(inputs.t, (z, inputs.logp))
            loss = (dz * inputs.grad_f).sum() + (neg_div * inputs.grad_div).sum()
            loss.backward()
        last[:] = [z.grad]

    timing = measure(fn, config, device)
    return Result(timing, tuple(last))


class _ModelClock:
    """Seconds spent inside the vector-field evaluations of a flow, and how many there were.

    Forward hooks on every ``ODEFunc`` (what torchdiffeq and torchode call), and a
    wrapper around the ``forward_and_divergence`` of each ODE function's field, which
    ``sparsekern.odeint``'s native loop calls directly. Nested entries (ODEFunc
    calling the fused method under torchdiffeq) count once. A loop that evaluates the
    field without calling the module (sparsekern.odeint on a time-free fused field: one
    op call per evaluation, or its C++ loop) is not observed: ``calls`` stays 0. The
    C++ loop times its kernels itself (``_native_model_seconds``: mlp_fwd, and the
    adjoint's mlp_bwd, so there the vector-Jacobian products are model time); for
    the Python loop's direct op calls the split is unknown (None).
    """

    def __init__(self, flow: nn.Module, device: torch.device) -> None:
        self.sync = synchronizer(device)
        self.seconds = 0.0
        self.calls = 0
        self._depth = 0
        self._start = 0.0
        self.handles = []
        self._patched: list[nn.Module] = []
        for m in flow.modules():
            if not isinstance(m, ODEFunc):
                continue
            self.handles.append(m.register_forward_pre_hook(lambda mod, args: self._enter()))
            self.handles.append(m.register_forward_hook(lambda mod, args, out: self._exit()))
            field = m.odenet
            fused = getattr(field, "forward_and_divergence", None)
            if callable(fused) and "forward_and_divergence" not in vars(field):
                field.forward_and_divergence = self._wrap(fused)
                self._patched.append(field)

    def _wrap(self, fn: Callable) -> Callable:
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            self._enter()
            try:
                return fn(*args, **kwargs)
            finally:
                self._exit()

        return timed

    def reset(self) -> None:
        self.seconds, self.calls, self._depth = 0.0, 0, 0

    def _enter(self) -> None:
        if self._depth == 0:
            self.sync()
            self._start = time.perf_counter()
        self._depth += 1

    def _exit(self) -> None:
        self._depth -= 1
        if self._depth == 0:
            self.sync()
            self.seconds += time.perf_counter() - self._start
            self.calls += 1

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        for field in self._patched:
            del field.forward_and_divergence
        self.handles, self._patched = [], []


def _native_model_seconds(cnfs: list[CNF]) -> float | None:
    """Seconds inside the field kernels of the last solves (and adjoint solves), as the
    C++ loop measures them (``CompiledField.last_solve_stats``); None unless every
    block's solves report them."""
    total = 0.0
    for c in cnfs:
        stats = getattr(c.odefunc.odenet, "last_solve_stats", ())
        if not stats or any(st.model_seconds is None for st in stats):
            return None
        total += sum(st.model_seconds for st in stats)
    return total if cnfs else None


def _ode_solver(flow: nn.Module, cnfs: list[CNF]) -> tuple[str, str | None]:
    """(which solver ran the flow's last solve, what it said), from the flow itself.

    A flow that runs its own solver names it (``bench_ode_solver``, and
    ``bench_solve_note``: the torchode provider's). Otherwise a compiled field's
    ``last_solve``, which only ``sparsekern.odeint`` sets ("native ..." or
    "torchdiffeq (why not native)"), tells; None means torchdiffeq ran it directly.
    """
    own = getattr(flow, "bench_ode_solver", None)
    if own is not None:
        return own, getattr(flow, "bench_solve_note", None)
    notes = [getattr(c.odefunc.odenet, "last_solve", None) for c in cnfs]
    if all(n is None for n in notes):
        return "torchdiffeq", None
    said = "; ".join(dict.fromkeys(str(n) for n in notes))
    if None not in notes and all(n.startswith("native") for n in notes):
        return "sparsekern.odeint", said
    if None not in notes and all(n.startswith("torchdiffeq") for n in notes):
        return "torchdiffeq (via sparsekern.odeint)", said
    return "mixed", said


def kept_gradients(flow: nn.Module) -> tuple[tuple[str, ...], torch.Tensor]:
    """The gradients of every block's kept parameters as one vector, and their names.

    Compiled fields hold the kept values (``sparsekern.linear.KeptTensor``): their
    gradients go to their places in the dense tensor. Dense fields hold dense
    tensors: their gradients are cut to the kept places (``<name>_mask`` buffers,
    as flows.prune keeps them). So the vector of a compiled flow and of its dense
    twin line up, name by name ("<block>:<parameter>"); other representations (CSR
    values) give other names, and are then compared on the loss alone.
    """
    from sparsekern.linear import KeptTensor

    names: list[str] = []
    parts: list[torch.Tensor] = []
    for b, cnf in enumerate(m for m in flow.modules() if isinstance(m, CNF)):
        field = cnf.odefunc.odenet
        field = getattr(field, "bench_wrapped", None) or field  # the torchode provider's
        kept = {m.name: m for m in field.modules() if isinstance(m, KeptTensor)}
        if kept:
            for name in sorted(kept):
                k = kept[name]
                dense = k.values.new_zeros(math.prod(k.shape))
                if k.values.grad is not None:
                    dense[k.flat_index] = k.values.grad.detach()
                names.append(f"{b}:{name}")
                parts.append(dense)
            continue
        for name, param in sorted(field.named_parameters()):
            parent, _, attr = name.rpartition(".")
            module = field.get_submodule(parent) if parent else field
            mask = getattr(module, f"{attr}_mask", None)
            g = (torch.zeros_like(param) if param.grad is None else param.grad.detach())
            if isinstance(mask, torch.Tensor) and mask.shape == g.shape:
                g = torch.where(mask != 0, g, torch.zeros_like(g))
            names.append(f"{b}:{name}")
            parts.append(g.reshape(-1))
    vec = torch.cat(parts) if parts else torch.zeros(0)
    return tuple(names), vec


def run_flow(flow: nn.Module, inputs: Inputs, config: TimingConfig, device: torch.device,
             train: bool = False) -> Result:
    """Time a whole solve of the flow (``solve``), or a training step of it (``train_solve``).

    solve: ``flow.log_prob(x)`` under no_grad; outputs (log p,).
    train_solve: ``loss = -flow.log_prob(x).mean()`` and ``loss.backward()``;
    outputs (loss [1], kept-parameter gradients), keys "loss" and their names.
    The NFE, the model / solver split and the solver that ran come with it. On
    CUDA the clock synchronises around every evaluation of the field (so the
    split is exact, and the total includes those syncs).
    """
    clock = _ModelClock(flow, device)
    sync = synchronizer(device)
    cnfs = [m for m in flow.modules() if isinstance(m, CNF)]
    params = [p for p in flow.parameters() if p.requires_grad]
    records: list[tuple[float, float, int, list[int], list[int]]] = []
    last: list[torch.Tensor] = []

    def fn() -> None:
        clock.reset()
        for p in params:
            p.grad = None
        torch.manual_seed(inputs.seed)  # the same Hutchinson noise for every provider
        sync()
        t0 = time.perf_counter()
        if train:
            with torch.enable_grad():
                loss = -flow.log_prob(inputs.x).mean()
                loss.backward()
            out = [loss.detach().reshape(1)]
        else:
            with torch.no_grad():
                out = [flow.log_prob(inputs.x)]
        sync()
        elapsed = time.perf_counter() - t0
        seconds, calls = clock.seconds, clock.calls
        native = _native_model_seconds(cnfs)
        if calls == 0 and native is not None:
            seconds, calls = native, 1  # the C++ loop timed its kernels itself
        records.append((elapsed, seconds, calls,
                        [c.nfe_forward for c in cnfs], [c.nfe_backward for c in cnfs]))
        last[:] = out

    try:
        timing = measure(fn, config, device)
    finally:
        clock.remove()
    timed = records[-timing.repeats * timing.inner:]
    totals = np.array([r[0] for r in timed])
    models = np.array([r[1] for r in timed])
    observed = all(r[2] > 0 for r in timed)
    per_block = records[-1][3]
    adjoint = train and bool(cnfs) and all(c.adjoint for c in cnfs)
    back_per_block = records[-1][4] if adjoint else None
    solver, note = _ode_solver(flow, cnfs)
    outputs: tuple[torch.Tensor, ...] = tuple(last)
    keys: tuple[str, ...] | None = None
    if train:
        names, grads = kept_gradients(flow)
        outputs, keys = (last[0], grads), ("loss", *names)
        for p in params:
            p.grad = None  # the dense fields are shared with the case's other providers
    return Result(timing, outputs, nfe=sum(per_block), nfe_per_block=per_block,
                  model_ms=float(np.median(models)) * 1e3 if observed else None,
                  solver_ms=float(np.median(totals - models)) * 1e3 if observed else None,
                  nfe_backward=None if back_per_block is None else sum(back_per_block),
                  nfe_backward_per_block=back_per_block, ode_solver=solver, solve_note=note,
                  output_keys=keys)


def run_solve(flow: nn.Module, inputs: Inputs, config: TimingConfig,
              device: torch.device) -> Result:
    """Time a whole log-likelihood solve, with its NFE and the model / solver split."""
    return run_flow(flow, inputs, config, device, train=False)


def run_train_solve(flow: nn.Module, inputs: Inputs, config: TimingConfig,
                    device: torch.device) -> Result:
    """Time a training step of the whole flow (solve with gradients, backward)."""
    return run_flow(flow, inputs, config, device, train=True)


RUNNERS: dict[str, Callable[..., Result]] = {
    "f": run_f,
    "f_div": run_f_div,
    "train_step": run_train_step,
}


FLOW_RUNNERS: dict[str, Callable[..., Result]] = {
    "solve": run_solve,
    "train_solve": run_train_solve,
}


def flops(metric: str, kept: int, batch: int, nfe_per_block: list[int] | None = None,
          kept_per_block: list[int] | None = None,
          nfe_backward_per_block: list[int] | None = None, pixels: int = 1) -> int:
    """FLOPs on the kept weights of one call of ``metric`` (module docstring).

    train_solve: with ``nfe_backward_per_block`` (the adjoint) the forward solve's
    f_div evaluations plus a train_step per backward evaluation; without it
    (backpropagation through the steps) a train_step per forward evaluation.
    ``pixels``: output positions per sample of every layer (H x W of an image shape's
    convolutions: each kept tap is applied at each of them), 1 for the MLPs.
    """
    return pixels * _flops(metric, kept, batch, nfe_per_block, kept_per_block,
                           nfe_backward_per_block)


def _flops(metric: str, kept: int, batch: int, nfe_per_block: list[int] | None,
           kept_per_block: list[int] | None, nfe_backward_per_block: list[int] | None) -> int:
    per = FLOPS_PER_KEPT_WEIGHT[metric]
    if metric in FLOW_METRICS:
        if nfe_per_block is None or kept_per_block is None:
            raise ValueError(f"{metric} FLOPs need the NFE and kept weights of every block")

        def weighted(nfes: list[int]) -> int:
            return sum(k * n for k, n in zip(kept_per_block, nfes, strict=True))

        if metric == "solve":
            return per * batch * weighted(nfe_per_block)
        back = BACKWARD_FLOPS_PER_KEPT_WEIGHT * batch
        if nfe_backward_per_block is None:
            return back * weighted(nfe_per_block)
        return per * batch * weighted(nfe_per_block) + back * weighted(nfe_backward_per_block)
    return per * kept * batch


@functools.cache
def _roofline_cached(layer_shapes: tuple[tuple[int, int], ...], batch: int, dtype: torch.dtype,
                     device_str: str, config: TimingConfig) -> tuple[Timing, float]:
    device = torch.device(device_str)
    gen = torch.Generator().manual_seed(0)
    xs = [torch.randn(batch, i, generator=gen).to(dtype=dtype, device=device)
          for _, i in layer_shapes]
    wts = [torch.randn(o, i, generator=gen).to(dtype=dtype, device=device).t()
           for o, i in layer_shapes]

    def fn() -> None:
        for x, w in zip(xs, wts, strict=True):
            torch.mm(x, w)

    timing = measure(fn, config, device)
    total = 2 * batch * sum(o * i for o, i in layer_shapes)
    return timing, total / (timing.median_ms * 1e-3) / 1e9


def roofline(layer_shapes: list[tuple[int, int]], batch: int, dtype: torch.dtype,
             device: torch.device, config: TimingConfig) -> tuple[Timing, float]:
    """The dense GEMM rate on these layer shapes: (timing of one pass, GFLOP/s).

    Args:
        layer_shapes: [(out, in)] of the linear maps of one vector field.
        batch: rows of the input of every product.

    Cached per process, so the cases of one shape share one measurement.
    """
    return _roofline_cached(tuple(layer_shapes), batch, dtype, str(device), config)


@functools.cache
def _conv_roofline_cached(conv_layers: tuple[tuple[int, int, int], ...], image: tuple[int, int],
                          batch: int, dtype: torch.dtype, device_str: str,
                          config: TimingConfig) -> tuple[Timing, float]:
    device = torch.device(device_str)
    gen = torch.Generator().manual_seed(0)
    xs = [torch.randn(batch, i, *image, generator=gen).to(dtype=dtype, device=device)
          for _, i, _ in conv_layers]
    wts = [torch.randn(o, i, k, k, generator=gen).to(dtype=dtype, device=device)
           for o, i, k in conv_layers]

    def fn() -> None:
        with torch.no_grad():
            for x, w in zip(xs, wts, strict=True):
                F.conv2d(x, w, None, 1, w.shape[-1] // 2)

    timing = measure(fn, config, device)
    total = 2 * batch * image[0] * image[1] * sum(o * i * k * k for o, i, k in conv_layers)
    return timing, total / (timing.median_ms * 1e-3) / 1e9


def conv_roofline(conv_layers: list[tuple[int, int, int]], image: tuple[int, int], batch: int,
                  dtype: torch.dtype, device: torch.device, config: TimingConfig
                  ) -> tuple[Timing, float]:
    """The dense convolution rate on these layers: (timing of one pass, GFLOP/s).

    Args:
        conv_layers: [(out, in, k)] of the convolutions of one field (stride 1, padding
            k // 2), ``in`` with the time channel.
        image: (H, W) of their inputs. batch: samples of every input.

    The image shapes' analogue of ``roofline`` (``F.conv2d`` instead of ``torch.mm``,
    2 x B x H x W x out x in x k^2 FLOPs per layer); cached per process.
    """
    return _conv_roofline_cached(tuple(conv_layers), (image[0], image[1]), batch, dtype,
                                 str(device), config)


def rel_err(got: tuple[torch.Tensor, ...], ref: tuple[torch.Tensor, ...]) -> float | None:
    """Largest norm-wise relative error over paired outputs (None if they do not pair up)."""
    if len(got) != len(ref) or not got:
        return None
    worst = 0.0
    for a, b in zip(got, ref, strict=True):
        if a is None or b is None or a.shape != b.shape:
            return None
        a, b = a.detach().double(), b.detach().double()
        worst = max(worst, float((a - b).norm() / b.norm().clamp_min(1e-30)))
    return worst
