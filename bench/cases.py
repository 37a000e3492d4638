"""Benchmark cases: the paper's model shapes x pruning structure x density, and their models.

Shapes are the paper's models (docs/design.md, section 7): the toy CNF and the five
FFJORD tabular models (hidden widths, activation, number of CNF blocks, batch).
The tabular models use concatsquash time input and FFJORD's tabular solver
tolerances (atol 1e-8, rtol 1e-6, T = 0.5), as ``flows.presets`` does; the toy
model is autonomous with atol = rtol = 1e-5, T = 1.

A case is named ``<shape>/<structure>/<density>``, e.g. ``miniboone/unstructured/0.1``:

- unstructured: ``density`` is the exact kept fraction of the prunable weights of
  each vector field: by default (``masks="random"``) a uniformly random mask
  keeping round(density x n) of the n weights of every layer; with
  ``masks="magnitude"``, ``flows.prune.prune_unstructured_`` (global magnitude
  over the field's layers, one shot). Density 1 is the dense model (no masks).
  On freshly initialised weights global magnitude is a poor stand-in for a
  trained model: the init scale is 1/sqrt(fan_in), so it empties the wide
  hidden layers first (MINIBOONE at 2% keeps almost only the 43-wide input
  layer, and f no longer depends on z), which is why random is the default.
- structured: ``density`` is the fraction of neurons kept in every hidden layer
  (``flows.prune.prune_structured_``, L1 norm of incoming weights); the kept
  fraction of weights is lower (about density^2 between hidden layers).

Weights are a fresh random initialisation (seeded): the time per call does not
depend on their values, and the solve's NFE, which does, is the same for every
provider of a case because they all integrate the same model.
"""

from __future__ import annotations

import fnmatch
import itertools
from dataclasses import dataclass

import torch
from torch import nn

from flows.cnf import CNF, SequentialFlow
from flows.odenet import ODEnet
from flows.prune import (
    apply_masks_,
    ensure_masks,
    prunable_layers,
    prune_structured_,
    prune_unstructured_,
)

STRUCTURES = ("unstructured", "structured")
UNSTRUCTURED_DENSITIES = (1.0, 0.5, 0.2, 0.1, 0.05, 0.02)
STRUCTURED_DENSITIES = (0.5, 0.3, 0.1)
MASK_KINDS = ("random", "magnitude")


@dataclass(frozen=True)
class Shape:
    """One model of the paper: its vector field, its flow and its batch.

    Attributes:
        name: short name ("toy", "power", ...).
        dim: state dimension d. hidden: hidden widths.
        activation: flows.odenet activation name. time: "none" or "concatsquash".
        blocks: CNF blocks in the flow (each with its own vector field).
        batch: batch size of every measurement.
        atol, rtol, T: dopri5 tolerances and integration time of the solve.
        extra_densities: unstructured densities measured for this shape only
            (the toy model's 0.3: 70% pruned, the paper's best toy ratio).
        adjoint: how the train_solve metric gets its gradients: the adjoint method
            (True: what the paper's presets train every model with, flows.presets)
            or backpropagation through the solver's steps.
    """

    name: str
    dim: int
    hidden: tuple[int, ...]
    activation: str
    time: str
    blocks: int
    batch: int
    atol: float
    rtol: float
    T: float
    extra_densities: tuple[float, ...] = ()
    adjoint: bool = True

    @property
    def widths(self) -> tuple[int, ...]:
        """(d, *hidden, d)."""
        return (self.dim, *self.hidden, self.dim)

    @property
    def label(self) -> str:
        """e.g. "43-860x2-43 softplus concatsquash x1"."""
        parts, prev, run = [], None, 0
        for w in self.hidden:
            if w == prev:
                run += 1
            else:
                if prev is not None:
                    parts.append(f"{prev}x{run}" if run > 1 else str(prev))
                prev, run = w, 1
        if prev is not None:
            parts.append(f"{prev}x{run}" if run > 1 else str(prev))
        return (f"{self.dim}-{'-'.join(parts)}-{self.dim} {self.activation} {self.time} "
                f"x{self.blocks}")

    @property
    def layer_shapes(self) -> list[tuple[int, int]]:
        """[(out, in)] of the prunable (state-path) linear maps of one vector field."""
        return [(b, a) for a, b in itertools.pairwise(self.widths)]

    @property
    def dense_weights(self) -> int:
        """Prunable weights of one vector field."""
        return sum(o * i for o, i in self.layer_shapes)


def _tabular(name: str, dim: int, hidden: tuple[int, ...], act: str, blocks: int,
             batch: int) -> Shape:
    return Shape(name, dim, hidden, act, "concatsquash", blocks, batch, 1e-8, 1e-6, 0.5)


SHAPES: dict[str, Shape] = {
    "toy": Shape("toy", 2, (64, 64, 64), "sigmoid", "none", 1, 1024, 1e-5, 1e-5, 1.0,
                 extra_densities=(0.3,)),
    "power": _tabular("power", 6, (60, 60, 60), "tanh", 5, 10000),
    "gas": _tabular("gas", 8, (160, 160, 160), "tanh", 5, 1000),
    "hepmass": _tabular("hepmass", 21, (210, 210), "softplus", 10, 10000),
    "miniboone": _tabular("miniboone", 43, (860, 860), "softplus", 1, 1000),
    "bsds300": _tabular("bsds300", 63, (1260, 1260, 1260), "softplus", 2, 10000),
}


@dataclass(frozen=True)
class Case:
    """One shape pruned one way: what a row of results describes."""

    shape: Shape
    structure: str
    density: float

    def __post_init__(self) -> None:
        if self.structure not in STRUCTURES:
            raise ValueError(f"structure={self.structure!r}; expected one of {STRUCTURES}")
        if not 0.0 < self.density <= 1.0:
            raise ValueError(f"density must lie in (0, 1], got {self.density}")

    @property
    def name(self) -> str:
        return f"{self.shape.name}/{self.structure}/{self.density:g}"


def all_cases(shapes: dict[str, Shape] | None = None) -> list[Case]:
    """Every case of the full suite, shape by shape, densest first."""
    out = []
    for shape in (shapes or SHAPES).values():
        dens = sorted(set(UNSTRUCTURED_DENSITIES) | set(shape.extra_densities), reverse=True)
        out += [Case(shape, "unstructured", d) for d in dens]
        out += [Case(shape, "structured", d) for d in STRUCTURED_DENSITIES]
    return out


QUICK_CASES = (
    "toy/unstructured/1",
    "toy/unstructured/0.3",
    "miniboone/unstructured/0.1",
    "miniboone/unstructured/0.02",
    "miniboone/structured/0.3",
)


def select_cases(patterns: list[str] | None, cases: list[Case] | None = None) -> list[Case]:
    """The cases whose name matches any pattern (all cases without patterns).

    A pattern is an fnmatch glob over the case name; a pattern also selects
    everything below it, so "toy" selects every toy case and
    "*/structured" every structured one.

    Raises:
        ValueError: a pattern that matches no case (a typo must not run nothing).
    """
    cases = all_cases() if cases is None else cases
    if not patterns:
        return list(cases)
    chosen: list[Case] = []
    for pat in patterns:
        hits = [c for c in cases
                if fnmatch.fnmatchcase(c.name, pat) or fnmatch.fnmatchcase(c.name, pat + "/*")]
        if not hits:
            raise ValueError(f"--cases {pat!r} matches no case; see python -m bench --list")
        chosen += [c for c in hits if c not in chosen]
    return chosen


def _random_masks_(net: nn.Module, density: float, gen: torch.Generator) -> None:
    """A uniformly random mask with round(density * n) kept entries in every layer."""
    with torch.no_grad():
        for _, m in ensure_masks(net):
            n = m.weight.numel()
            keep = torch.randperm(n, generator=gen)[: round(density * n)]
            flat = torch.zeros(n, dtype=m.weight_mask.dtype)
            flat[keep] = 1
            m.weight_mask.copy_(flat.view_as(m.weight_mask))
    apply_masks_(net)


def build_field(case: Case, *, dtype: torch.dtype = torch.float32,
                device: torch.device | str = "cpu", seed: int = 0, block: int = 0,
                masks: str = "random") -> ODEnet:
    """The pruned vector field of ``case`` (block ``block`` of its flow).

    Args:
        case: shape, structure and density.
        dtype, device: of the parameters.
        seed, block: the initialisation is seeded by both, so every block differs
            and every run builds the same model.
        masks: "random" (the same kept fraction in every layer) or "magnitude"
            (flows' global magnitude pruning); unstructured cases only.

    Returns:
        A ``flows.ODEnet`` with ``weight_mask`` buffers (none at density 1),
        pruned weights set to exact zeros.
    """
    if masks not in MASK_KINDS:
        raise ValueError(f"masks={masks!r}; expected one of {MASK_KINDS}")
    shape = case.shape
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed * 1000 + block)
        net = ODEnet(shape.dim, shape.hidden, time=shape.time, activation=shape.activation)
        if case.density < 1.0:
            if case.structure == "structured":
                prune_structured_(net, 1.0 - case.density)
            elif masks == "random":
                _random_masks_(net, case.density, torch.Generator().manual_seed(seed + block))
            else:
                prune_unstructured_(net, 1.0 - case.density)
    return net.to(dtype=dtype, device=device)


def kept_weights(net: nn.Module) -> int:
    """Kept prunable weights of a vector field (all of them if it has no masks)."""
    return sum(int(m.weight_mask.sum()) if hasattr(m, "weight_mask") else m.weight.numel()
               for _, m in prunable_layers(net))


def build_flow(shape: Shape, fields: list[nn.Module], adjoint: bool = False
               ) -> CNF | SequentialFlow:
    """The shape's flow (FFJORD CNF, or a stack of them) around the given vector fields.

    Hutchinson divergence with Gaussian noise drawn once per solve, dopri5 with
    the shape's tolerances and T (fixed: the bench does not train T), and no
    adjoint unless asked (the solve is measured under no_grad; train_solve sets
    ``CNF.adjoint`` to ``shape.adjoint``).
    """
    cnfs = [CNF(f, divergence="hutchinson", noise="gaussian", solver="dopri5",
                atol=shape.atol, rtol=shape.rtol, T=shape.T, adjoint=adjoint)
            for f in fields]
    flow = cnfs[0] if len(cnfs) == 1 else SequentialFlow(cnfs)
    first = next(fields[0].parameters(), None)
    if first is not None:
        flow = flow.to(device=first.device)  # sqrt_T buffer; kept float32 as flows does
    return flow
