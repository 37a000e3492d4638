"""Benchmark cases: the paper's model shapes x pruning structure x density, and their models.

Shapes are the paper's models (docs/design.md, section 7): the toy CNF and the five
FFJORD tabular models (hidden widths, activation, number of CNF blocks, batch).
The tabular models use concatsquash time input and FFJORD's tabular solver
tolerances (atol 1e-8, rtol 1e-6, T = 0.5), as ``flows.presets`` does; the toy
model is autonomous with atol = rtol = 1e-5, T = 1.

The image shapes (``mnist``, ``cifar10``) are the vector field of the first scale
of FFJORD's multiscale image flows (``flows.multiscale``): a ``flows.ConvODEnet``
of four 3x3 concat convolutions C -> 64 -> 64 -> 64 -> C (time the last input
channel), softplus, on 1x28x28 / 3x32x32 states, batch 200, dopri5 at atol =
rtol = 1e-5, T = 1, Rademacher Hutchinson noise (FFJORD's image settings). Their
"weights" are the convolution taps (time-channel taps included), and their
densities are the issue's (unstructured 1, 0.37, 0.2, 0.05; structured 0.5 of
the filters of every hidden layer). Their flow metrics run on a few cases only
(``Shape.flow_densities``) and at a smaller batch (``Shape.solve_batch``): a CNF
training step of an image field at batch 200 takes minutes on a CPU.

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
from flows.odenet import ConvODEnet, ODEnet
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
        image: (H, W) of an image shape (then ``dim`` is the channel count C and the
            field a ``flows.ConvODEnet`` of ``kernel`` x ``kernel`` concat convolutions);
            None for the MLP shapes.
        noise: the Hutchinson probe of f_div, train_step and the flow metrics
            ("gaussian", or "rademacher" as FFJORD's image models).
        densities, structured_densities: the shape's own unstructured / structured
            densities (None: ``UNSTRUCTURED_DENSITIES`` / ``STRUCTURED_DENSITIES``).
        flow_densities: unstructured densities whose cases measure the flow metrics
            (None: every case).
        solve_batch: the flow metrics' default batch cap for this shape (None: the
            command line's ``--solve-batch`` default); an explicit ``--solve-batch``
            replaces it.
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
    image: tuple[int, int] | None = None
    kernel: int = 3
    noise: str = "gaussian"
    densities: tuple[float, ...] | None = None
    structured_densities: tuple[float, ...] | None = None
    flow_densities: tuple[float, ...] | None = None
    solve_batch: int | None = None

    @property
    def is_conv(self) -> bool:
        """An image shape: a convolutional field (``flows.ConvODEnet``) on [B, C, H, W]."""
        return self.image is not None

    @property
    def state_shape(self) -> tuple[int, ...]:
        """One state without the batch dimension: (d,), or (C, H, W) for an image shape."""
        return (self.dim,) if self.image is None else (self.dim, *self.image)

    @property
    def pixels(self) -> int:
        """Output positions of every layer per sample: H x W for an image shape, else 1."""
        return 1 if self.image is None else self.image[0] * self.image[1]

    @property
    def widths(self) -> tuple[int, ...]:
        """(d, *hidden, d): features, or channels for an image shape."""
        return (self.dim, *self.hidden, self.dim)

    @property
    def conv_layers(self) -> list[tuple[int, int, int]]:
        """Image shapes: [(out, in, k)] of the convolutions, ``in`` counting the time
        channel (concat convolutions); [] otherwise."""
        if self.image is None:
            return []
        return [(b, a + 1, self.kernel) for a, b in itertools.pairwise(self.widths)]

    def flow_metric_reason(self, case: Case) -> str | None:
        """None if ``case`` measures the flow metrics (solve, train_solve), else why not."""
        if self.flow_densities is None:
            return None
        if case.structure == "unstructured" and case.density in self.flow_densities:
            return None
        why = "a CNF training step of an image field takes minutes on a CPU"
        if not self.flow_densities:
            return f"the flow metrics are not measured on {self.name} ({why})"
        where = ", ".join(f"{self.name}/unstructured/{d:g}" for d in self.flow_densities)
        return f"the flow metrics of {self.name} run on {where} only ({why})"

    @property
    def label(self) -> str:
        """e.g. "43-860x2-43 softplus concatsquash x1" or (an image shape) "1x28x28 conv3x3
        64x3 softplus concat x1"."""
        if self.image is not None:
            c, (h, w) = self.dim, self.image
            return (f"{c}x{h}x{w} conv{self.kernel}x{self.kernel} {self._hidden_label()} "
                    f"{self.activation} {self.time} x{self.blocks}")
        return (f"{self.dim}-{self._hidden_label()}-{self.dim} {self.activation} {self.time} "
                f"x{self.blocks}")

    def _hidden_label(self) -> str:
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
        return "-".join(parts)

    @property
    def layer_shapes(self) -> list[tuple[int, int]]:
        """[(out, in)] of the prunable (state-path) linear maps of one vector field; for an
        image shape the convolutions as matrices [out, in * k * k] (``in`` with the time
        channel)."""
        if self.image is not None:
            return [(o, i * k * k) for o, i, k in self.conv_layers]
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

# The image shapes' densities (issue 17): unstructured 63% pruned (the paper's best MNIST
# ratio), 80% and 95%; structured half of the filters of every hidden layer.
IMAGE_DENSITIES = (1.0, 0.37, 0.2, 0.05)
IMAGE_STRUCTURED_DENSITIES = (0.5,)
# The flow metrics (solve, train_solve) of the image shapes: these cases, at this batch.
IMAGE_FLOW_DENSITIES = {"mnist": (1.0, 0.37), "cifar10": ()}
IMAGE_SOLVE_BATCH = 50


def _image(name: str, channels: int, side: int) -> Shape:
    """The first scale of FFJORD's multiscale flow on C x side x side images (module doc)."""
    return Shape(name, channels, (64, 64, 64), "softplus", "concat", 1, 200, 1e-5, 1e-5, 1.0,
                 image=(side, side), noise="rademacher", densities=IMAGE_DENSITIES,
                 structured_densities=IMAGE_STRUCTURED_DENSITIES,
                 flow_densities=IMAGE_FLOW_DENSITIES[name], solve_batch=IMAGE_SOLVE_BATCH)


IMAGE_SHAPES: dict[str, Shape] = {
    "mnist": _image("mnist", 1, 28),
    "cifar10": _image("cifar10", 3, 32),
}
SHAPES.update(IMAGE_SHAPES)


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
        base = UNSTRUCTURED_DENSITIES if shape.densities is None else shape.densities
        dens = sorted(set(base) | set(shape.extra_densities), reverse=True)
        out += [Case(shape, "unstructured", d) for d in dens]
        structured = (STRUCTURED_DENSITIES if shape.structured_densities is None
                      else shape.structured_densities)
        out += [Case(shape, "structured", d) for d in sorted(structured, reverse=True)]
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
                masks: str = "random") -> ODEnet | ConvODEnet:
    """The pruned vector field of ``case`` (block ``block`` of its flow).

    Args:
        case: shape, structure and density.
        dtype, device: of the parameters.
        seed, block: the initialisation is seeded by both, so every block differs
            and every run builds the same model.
        masks: "random" (the same kept fraction in every layer) or "magnitude"
            (flows' global magnitude pruning); unstructured cases only.

    Returns:
        A ``flows.ODEnet`` (an image shape: a ``flows.ConvODEnet``) with
        ``weight_mask`` buffers (none at density 1), pruned weights set to exact zeros.
    """
    if masks not in MASK_KINDS:
        raise ValueError(f"masks={masks!r}; expected one of {MASK_KINDS}")
    shape = case.shape
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed * 1000 + block)
        net: ODEnet | ConvODEnet
        if shape.image is not None:
            net = ConvODEnet(shape.state_shape, shape.hidden, activation=shape.activation,
                             kernel_size=shape.kernel)
        else:
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


def reduced_weights(net: nn.Module) -> int:
    """The weights a pruned field needs per sample once dead units are removed.

    The kept state-path weights of every layer between its *live* inputs and
    outputs, with neuron (channel) reduction as the engine does it (a unit none of
    whose kept weights reads a live input is a constant; a unit nothing live reads
    is dropped; the last layer keeps every output): structured pruning leaves
    smaller dense layers, and these are their sizes. For a ``ConvODEnet`` the
    time-channel taps are left out (the compiled field turns them into a bias map
    once per call, not per sample), and a convolution counts its taps (per output
    pixel). ``dense_weights / reduced_weights`` is the FLOP ratio of a case: the
    dense model's FLOPs over those of the reduced (compiled) network.
    """
    concat = isinstance(net, ConvODEnet)
    masks: list[torch.Tensor] = []
    for _, m in prunable_layers(net):
        weight = m.weight
        assert isinstance(weight, torch.Tensor)
        mask = getattr(m, "weight_mask", None)
        kept = (mask if isinstance(mask, torch.Tensor) else torch.ones_like(weight)) != 0
        kept = kept[:, :-1] if concat else kept
        masks.append(kept.reshape(kept.shape[0], kept.shape[1], -1))  # [out, in, taps]
    conn = [m.any(2) for m in masks]
    dev = conn[0].device
    alive = torch.ones(conn[0].shape[1], dtype=torch.bool, device=dev)
    lives = []
    for c in conn:
        alive = (c & alive[None, :]).any(1)
        lives.append(alive)
    needed = torch.ones(conn[-1].shape[0], dtype=torch.bool, device=dev)
    keep = [needed]
    for c in reversed(conn[1:]):
        needed = (c & needed[:, None]).any(0)
        keep.insert(0, needed)
    rows = [lv & kp for lv, kp in zip(lives[:-1], keep[:-1], strict=True)] + [keep[-1]]
    total, cols = 0, torch.ones(conn[0].shape[1], dtype=torch.bool, device=dev)
    for kept_taps, r in zip(masks, rows, strict=True):
        total += int(kept_taps[r][:, cols].sum())
        cols = r
    return total


def build_flow(shape: Shape, fields: list[nn.Module], adjoint: bool = False
               ) -> CNF | SequentialFlow:
    """The shape's flow (FFJORD CNF, or a stack of them) around the given vector fields.

    Hutchinson divergence with the shape's noise (Gaussian; Rademacher for the image
    shapes) drawn once per solve, dopri5 with
    the shape's tolerances and T (fixed: the bench does not train T), and no
    adjoint unless asked (the solve is measured under no_grad; train_solve sets
    ``CNF.adjoint`` to ``shape.adjoint``).
    """
    cnfs = [CNF(f, divergence="hutchinson", noise=shape.noise, solver="dopri5",
                atol=shape.atol, rtol=shape.rtol, T=shape.T, adjoint=adjoint)
            for f in fields]
    flow = cnfs[0] if len(cnfs) == 1 else SequentialFlow(cnfs)
    first = next(fields[0].parameters(), None)
    if first is not None:
        flow = flow.to(device=first.device)  # sqrt_T buffer; kept float32 as flows does
    return flow
