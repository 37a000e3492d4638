"""What is measured for each (case, provider): the four metrics, their FLOPs, and the roofline.

Metrics (per NFE for the first three, per solve for the last):

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
  provider, so the NFE must agree across providers. Forward hooks on every
  ``ODEFunc`` split the time into model time (inside f) and solver time.

FLOPs count only products with the kept weights, K of them per vector field,
batch B, whatever a provider actually computes (a dense provider multiplies
by the zeros as well; that is the point of the comparison):

- f: 2 K B (one multiply-add per kept weight and sample);
- f_div: 4 K B (f, and one more product per layer for the JVP, or the VJP);
- train_step: 12 K B (f_div's two products per layer, and their backward, each
  needing the input gradient and the weight gradient: 3 x f_div);
- solve: 4 B sum over blocks of K_b x NFE_b (one f_div per function evaluation).

Biases, activations and the divergence's dot product are not counted. The
roofline is the rate of ``torch.mm`` on the dense layer shapes [B, in] x [in, out]
of one vector field at the case's batch, measured in the same process;
``roofline_fraction`` = achieved GFLOP/s on the kept weights / that rate.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from bench.timing import Timing, TimingConfig, measure, synchronizer
from flows.cnf import CNF
from flows.odefunc import ODEFunc

METRICS = ("f", "f_div", "train_step", "solve")
FLOPS_PER_KEPT_WEIGHT = {"f": 2, "f_div": 4, "train_step": 12, "solve": 4}
FLOP_COUNTING = (
    "FLOPs on kept weights only (K per vector field, batch B): f 2KB, f_div 4KB, "
    "train_step 12KB, solve 4B*sum_blocks(K_b*NFE_b); biases and activations not counted. "
    "Roofline: torch.mm on the dense layer shapes at batch B, same process."
)


@dataclass
class Inputs:
    """Fixed inputs of a case, shared by every provider.

    Attributes:
        t: scalar time [] (0.5 of the shape's T). z, noise: [B, d].
        logp: [B] zeros (the CNF's log-density slot).
        grad_f: [B, d], grad_div: [B]: cotangents of the training loss.
        x: [B_solve, d] data of the solve. seed: of the solve's Hutchinson noise.
    """

    t: torch.Tensor
    z: torch.Tensor
    noise: torch.Tensor
    logp: torch.Tensor
    grad_f: torch.Tensor
    grad_div: torch.Tensor
    x: torch.Tensor
    seed: int


def make_inputs(dim: int, batch: int, solve_batch: int, T: float, dtype: torch.dtype,
                device: torch.device, seed: int) -> Inputs:
    """Seeded inputs (drawn on the CPU in float64, then converted: identical on every device)."""
    gen = torch.Generator().manual_seed(seed)

    def draw(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype=dtype,
                                                                          device=device)

    return Inputs(
        t=torch.tensor(0.5 * T, dtype=dtype, device=device),
        z=draw(batch, dim),
        noise=draw(batch, dim),
        logp=torch.zeros(batch, dtype=dtype, device=device),
        grad_f=draw(batch, dim),
        grad_div=draw(batch),
        x=draw(solve_batch, dim),
        seed=seed,
    )


@dataclass
class Result:
    """A metric's timing, its outputs (for the cross-provider check) and solve details."""

    timing: Timing
    outputs: tuple[torch.Tensor, ...]
    nfe: int | None = None
    nfe_per_block: list[int] | None = None
    model_ms: float | None = None
    solver_ms: float | None = None


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
    """Forward hooks on every ODEFunc of a flow: seconds spent inside f calls."""

    def __init__(self, flow: nn.Module, device: torch.device) -> None:
        self.sync = synchronizer(device)
        self.seconds = 0.0
        self._start = 0.0
        self.handles = []
        for m in flow.modules():
            if isinstance(m, ODEFunc):
                self.handles.append(m.register_forward_pre_hook(self._pre))
                self.handles.append(m.register_forward_hook(self._post))

    def _pre(self, module: nn.Module, args: object) -> None:
        self.sync()
        self._start = time.perf_counter()

    def _post(self, module: nn.Module, args: object, output: object) -> None:
        self.sync()
        self.seconds += time.perf_counter() - self._start

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def run_solve(flow: nn.Module, inputs: Inputs, config: TimingConfig,
              device: torch.device) -> Result:
    """Time a whole log-likelihood solve, with its NFE and the model / solver split.

    On CUDA the hooks synchronise around every f call (so the split is exact,
    and the total includes those syncs).
    """
    clock = _ModelClock(flow, device)
    sync = synchronizer(device)
    cnfs = [m for m in flow.modules() if isinstance(m, CNF)]
    records: list[tuple[float, float, list[int]]] = []
    last: list[torch.Tensor] = []

    def fn() -> None:
        clock.seconds = 0.0
        torch.manual_seed(inputs.seed)  # the same Hutchinson noise for every provider
        sync()
        t0 = time.perf_counter()
        with torch.no_grad():
            logp = flow.log_prob(inputs.x)
        sync()
        records.append((time.perf_counter() - t0, clock.seconds, [c.nfe_forward for c in cnfs]))
        last[:] = [logp]

    try:
        timing = measure(fn, config, device)
    finally:
        clock.remove()
    timed = records[-timing.repeats * timing.inner:]
    totals = np.array([r[0] for r in timed])
    models = np.array([r[1] for r in timed])
    per_block = records[-1][2]
    return Result(timing, tuple(last), nfe=sum(per_block), nfe_per_block=per_block,
                  model_ms=float(np.median(models)) * 1e3,
                  solver_ms=float(np.median(totals - models)) * 1e3)


RUNNERS: dict[str, Callable[..., Result]] = {
    "f": run_f,
    "f_div": run_f_div,
    "train_step": run_train_step,
}


def flops(metric: str, kept: int, batch: int, nfe_per_block: list[int] | None = None,
          kept_per_block: list[int] | None = None) -> int:
    """FLOPs on the kept weights of one call of ``metric`` (module docstring)."""
    per = FLOPS_PER_KEPT_WEIGHT[metric]
    if metric == "solve":
        if nfe_per_block is None or kept_per_block is None:
            raise ValueError("solve FLOPs need the NFE and kept weights of every block")
        return per * batch * sum(k * n for k, n in zip(kept_per_block, nfe_per_block,
                                                        strict=True))
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
