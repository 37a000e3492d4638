"""The fused tier: recognised MLP vector fields as one forward + JVP program.

Compiled: a ``Chain`` from ``sparsekern.protocol``, the description of an MLP
that model code gives (``sparsekern_mlp()``, ``register_mlp``; time "none",
"concat", "concatsquash"; one activation type), nn.Sequential chains included.

Each layer becomes ``a = scale * (W_core x) + shift`` with W_core a
``CoreMatrix`` over the live neurons; the time terms (concat's time column,
concatsquash's gate and bias) and the folded constants of dead neurons enter
through the per-call vectors ``scale`` and ``shift``, computed by ordinary
differentiable PyTorch from the kept parameters.

Neuron reduction (``SparseConfig.reduce_neurons``), on the kept state weights:
- alive: depends on z (reads a kept weight from an alive neuron; all state
  dims are alive);
- needed: some output depends on it (is read through a kept weight by a
  needed neuron of the next layer; all outputs are needed).
Alive and needed neurons are computed; needed but dead ones are constants
act(shift) (t-dependent, never z-dependent), folded into the next layer's
shift; the rest are dropped. Their parameters stay in the ``KeptTensor`` of
their layer, so they still receive (zero) gradients and optimiser steps exactly
as in the dense masked model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from sparsekern import ops
from sparsekern.activations import ACT_FNS, ACT_IDS
from sparsekern.autotune import choose_layout
from sparsekern.config import SparseConfig
from sparsekern.field import CompiledField
from sparsekern.linear import CoreMatrix, KeptPool, KeptTensor, program_matmul
from sparsekern.masks import MaskedTensor
from sparsekern.precision import (
    cublas_may_use_tf32,
    cuda_matmul_precision,
    round_cotangent,
    round_operand,
)
from sparsekern.program import Primitives, program_forward
from sparsekern.protocol import Chain, ChainLayer, state_mask


def reduce_chain(chain: Chain, reduce: bool) -> list[dict[str, torch.Tensor]]:
    """Per layer: ``rows`` (computed), ``cols`` (read), ``dead`` (folded constants), as int64."""
    return reduce_masks([state_mask(layer) for layer in chain.layers], chain.in_dim, reduce)


def reduce_masks(masks: Sequence[torch.Tensor], in_dim: int, reduce: bool
                 ) -> list[dict[str, torch.Tensor]]:
    """Neuron reduction (module docstring) of a chain of [out, in] state connectivity masks
    (a convolution's: output channel x input channel, ``sparsekern.fused_conv``)."""
    n = len(masks)
    dev = masks[0].device
    alive: list[torch.Tensor] = []
    prev = torch.ones(in_dim, dtype=torch.bool, device=dev)
    for m in masks:
        prev = (m & prev[None, :]).any(1) if reduce else torch.ones(m.shape[0], dtype=torch.bool,
                                                                   device=dev)
        alive.append(prev)
    # Filled from the last layer back: needed[i] is set before it is read.
    needed = cast("list[torch.Tensor]", [None] * n)
    needed[-1] = torch.ones(masks[-1].shape[0], dtype=torch.bool, device=dev)
    for i in range(n - 1, 0, -1):
        needed[i - 1] = ((masks[i] & needed[i][:, None]).any(0) if reduce
                         else torch.ones(masks[i].shape[1], dtype=torch.bool, device=dev))
    plan = []
    prev_rows: torch.Tensor | None = None
    for i, m in enumerate(masks):
        last = i == n - 1
        rows = torch.ones_like(needed[i]) if last else alive[i] & needed[i]
        dead = torch.zeros_like(rows) if last else needed[i] & ~alive[i]
        if i == 0:
            cols = ((m & rows[:, None]).any(0) if reduce
                    else torch.ones(m.shape[1], dtype=torch.bool, device=dev))
        else:
            assert prev_rows is not None  # set by layer i - 1
            cols = prev_rows
        plan.append({
            "rows": rows.nonzero().squeeze(1),
            "cols": cols.nonzero().squeeze(1),
            "dead": dead.nonzero().squeeze(1),
        })
        prev_rows = rows
    return plan


class FusedLayer(nn.Module):
    """One layer of a FusedMLP: kept parameters, its core and its fold of dead inputs."""

    weight: KeptTensor
    bias: KeptTensor | None
    gate_weight: KeptTensor | None  # concatsquash only, as are gate_bias and time_weight
    gate_bias: KeptTensor | None
    time_weight: KeptTensor | None
    core: CoreMatrix
    n_fold: int  # set with fold_index
    # Buffers.
    rows: torch.Tensor
    dead: torch.Tensor | None
    time_sel: torch.Tensor  # concat only, as is time_rows
    time_rows: torch.Tensor
    fold_sel: torch.Tensor | None
    fold_index: torch.Tensor  # registered when fold_sel is not None

    def __init__(self, layer: ChainLayer, plan: dict[str, torch.Tensor],
                 prev_dead: torch.Tensor | None, layout: str, pool: KeptPool) -> None:
        super().__init__()
        self.name = layer.name
        self.time = layer.time

        def kept(source: MaskedTensor | None) -> KeptTensor | None:
            # From the field's pool: a layer used twice shares its kept values (and their
            # gradient sums over the uses); its core, folds and reduction stay per use.
            return None if source is None else pool.get(source)

        self.weight = pool.get(layer.weight)
        self.bias = kept(layer.bias)
        self.gate_weight = kept(layer.gate_weight)
        self.gate_bias = kept(layer.gate_bias)
        self.time_weight = kept(layer.time_weight)
        n_out, n_in_total = self.weight.shape
        self.n_out = n_out
        self.n_in = n_in_total - 1 if layer.time == "concat" else n_in_total
        rows, cols, dead = plan["rows"], plan["cols"], plan["dead"]
        self.all_rows = rows.numel() == n_out
        self.register_buffer("rows", rows, persistent=False)
        self.register_buffer("dead", dead if dead.numel() else None, persistent=False)
        self.core = CoreMatrix(self.weight, rows, cols, layout)
        r = self.weight.flat_index // n_in_total
        c = self.weight.flat_index % n_in_total
        if layer.time == "concat":
            t_sel = (c == self.n_in).nonzero().squeeze(1)
            self.register_buffer("time_sel", t_sel, persistent=False)
            self.register_buffer("time_rows", r[t_sel], persistent=False)
        # Kept weights from dead (constant) neurons of the previous layer.
        self.register_buffer("fold_sel", None, persistent=False)
        if prev_dead is not None and prev_dead.numel():
            pos = torch.full((n_in_total,), -1, dtype=torch.long, device=c.device)
            pos[prev_dead] = torch.arange(prev_dead.numel(), device=c.device)
            sel = (pos[c] >= 0).nonzero().squeeze(1)
            if sel.numel():
                self.fold_sel = sel
                fold_index = r[sel] * prev_dead.numel() + pos[c[sel]]
                self.register_buffer("fold_index", fold_index, persistent=False)
                self.n_fold = prev_dead.numel()

    def affine(self, t: torch.Tensor | None, like: torch.Tensor) -> tuple[torch.Tensor | None,
                                                                           torch.Tensor]:
        """(scale, shift) over all n_out rows at time t, before folding: a = scale * Wx + shift."""
        shift = self.bias.dense() if self.bias is not None else like.new_zeros(self.n_out)
        if self.time == "none":
            return None, shift
        tt = torch.as_tensor(t, dtype=like.dtype, device=like.device).reshape(())
        if self.time == "concat":
            col = self.weight.values.index_select(0, self.time_sel)
            wt = col.new_zeros(self.n_out).index_put((self.time_rows,), col)
            return None, shift + tt * wt
        # concatsquash: build_chain gives it both (the hyper_gate's and hyper_bias' weights).
        assert self.gate_weight is not None and self.time_weight is not None
        gate_b = self.gate_bias.dense() if self.gate_bias is not None else 0
        gate = torch.sigmoid(self.gate_weight.dense().view(-1) * tt + gate_b)
        return gate, shift * gate + self.time_weight.dense().view(-1) * tt

    def fold(self, consts: torch.Tensor) -> torch.Tensor:
        """W[:, dead_prev] @ consts over all n_out rows."""
        assert self.fold_sel is not None  # called for layers with a fold only (_program)
        vals = self.weight.values.index_select(0, self.fold_sel)
        w = vals.new_zeros(self.n_out * self.n_fold).index_put((self.fold_index,), vals)
        return w.view(self.n_out, self.n_fold) @ consts

    def kept_tensors(self) -> list[KeptTensor]:
        return [k for k in (self.weight, self.bias, self.gate_weight, self.gate_bias,
                            self.time_weight) if k is not None]


# Optimiser steps in this process. A fused optimiser (Adam(fused=True)) updates the
# kept values without bumping their version counters, so the no-grad input cache
# (FusedMLP._op_inputs) also keys on this count.
_OPTIMIZER_STEPS = [0]


def _count_optimizer_step(optimizer: torch.optim.Optimizer, args: object, kwargs: object
                          ) -> None:
    _OPTIMIZER_STEPS[0] += 1


register_optimizer_step_post_hook(_count_optimizer_step)


class _GraphPrimitives(Primitives):
    """The program's forward primitives for f with autograd: registered differentiable
    ops (``linear.program_matmul``) and torch's activations, no tangent columns.

    bf16/fp16 products round their operands and, through ``round_cotangent``, the
    cotangents of autograd's backward products, as ``mlp_fwd`` / ``mlp_bwd`` do.
    """

    def __init__(self, backend: str, act, precision: str) -> None:
        self.backend, self.act, self.precision = backend, act, precision

    def product(self, layer, x):
        p = self.precision
        return round_cotangent(program_matmul(layer, round_operand(x, p), self.backend), p)

    @staticmethod
    def _affine(m, scale, shift):
        return (m if scale is None else scale[:, None] * m) + shift[:, None]

    def hidden(self, m, scale, shift, keep_m):
        return self.act(self._affine(m, scale, shift))

    def head(self, m, scale, shift):
        return self._affine(m, scale, shift)


@dataclass
class OpCall:
    """The constant inputs of a time-free field's ``mlp_fwd`` calls, for a whole solve.

    ``tensors`` = values + scales + shifts (``graph``: built with autograd, so the
    gradients the op returns for them map back to the kept values in one
    ``torch.autograd.grad``). ``cols0``: the state dims the first layer reads,
    None for all.
    """

    values: list[torch.Tensor]
    index: list[torch.Tensor]
    scales: list[torch.Tensor]
    shifts: list[torch.Tensor]
    layouts: list[int]
    act: int
    backend: str
    precision: str
    cols0: torch.Tensor | None

    @property
    def tensors(self) -> list[torch.Tensor]:
        return [*self.values, *self.scales, *self.shifts]


class FusedMLP(CompiledField):
    """A recognised MLP compiled to the fused program (``sparsekern.ref.mlp_fwd_ref``).

    ``forward_and_divergence`` runs one ``sparsekern::mlp_fwd`` op (forward pass
    and JVP together; differentiable once). ``forward`` without gradients runs
    the same op with no tangent; with gradients it runs the program's layer loop
    (``program.program_forward``) on differentiable primitives (``_GraphPrimitives``),
    so autograd works to any order. The op's ``index`` list is constant
    (``_index_list``); its ``values`` (``CoreMatrix.op_value``) are built per call,
    or reused between calls that record no graph (``_op_inputs``).
    """

    tier = "fused"
    layers: Sequence[FusedLayer]  # an nn.ModuleList
    cols0: torch.Tensor  # buffer

    def __init__(self, source: nn.Module, chain: Chain, config: SparseConfig) -> None:
        super().__init__(source, config)
        self.act = chain.act
        self.act_id = ACT_IDS[chain.act]
        self.in_dim = chain.in_dim
        plan = reduce_chain(chain, config.reduce_neurons)
        layers = []
        prev_dead = None
        dtype = chain.layers[0].weight.value.dtype
        backend = self.backend
        pool = KeptPool()
        for layer, p in zip(chain.layers, plan, strict=True):
            if config.layout == "auto":
                core_mask = state_mask(layer).index_select(0, p["rows"]).index_select(1, p["cols"])
                layout = choose_layout(core_mask, 2 * config.batch_hint, dtype, backend,
                                       config.autotune)
            else:
                layout = config.layout
            layers.append(FusedLayer(layer, p, prev_dead, layout, pool))
            prev_dead = p["dead"]
        self.layers = cast("Sequence[FusedLayer]", nn.ModuleList(layers))
        self.register_buffer("cols0", plan[0]["cols"], persistent=False)
        self.all_cols0 = plan[0]["cols"].numel() == chain.in_dim
        self.layouts = [layer.core.code for layer in self.layers]
        self._kept = list({id(k): k for layer in self.layers
                           for k in layer.kept_tensors()}.values())  # tied ones once
        self._time_free = all(layer.time == "none" for layer in self.layers)
        self._op_cache: tuple | None = None
        self._index: list[torch.Tensor] | None = None
        self.select_backend()

    # -- backend="auto" by measurement (CompiledField.select_backend) ---------------
    def _backend_key(self) -> tuple:
        cores = tuple((layer.core.layout, layer.core.n_rows, layer.core.n_cols, layer.core.nnz,
                       layer.time) for layer in self.layers)
        return ("fused", self.act, self.in_dim, self.layers[0].weight.values.dtype,
                self.config.precision, cores)

    def _sample_call(self, batch: int, generator: torch.Generator
                     ) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
        like = self.layers[0].weight.values
        z = torch.randn(batch, self.in_dim, dtype=like.dtype, device=like.device,
                        generator=generator)
        t = torch.full((), 0.5, dtype=like.dtype, device=like.device)
        noise = torch.randn(batch, self.in_dim, dtype=like.dtype, device=like.device,
                            generator=generator)
        return t, z, noise

    # -- the per-call program -------------------------------------------------------
    def _program(self, t: torch.Tensor | None, like: torch.Tensor
                 ) -> list[tuple[FusedLayer, torch.Tensor | None, torch.Tensor]]:
        """Per layer (layer, scale over computed rows or None, shift over computed rows)."""
        out = []
        consts: torch.Tensor | None = None
        act = ACT_FNS[self.act]
        for layer in self.layers:
            scale, shift = layer.affine(t, like)
            if layer.fold_sel is not None and consts is not None:
                extra = layer.fold(consts)
                shift = shift + (extra if scale is None else scale * extra)
            consts = None if layer.dead is None else act(shift.index_select(0, layer.dead))
            if not layer.all_rows:
                shift = shift.index_select(0, layer.rows)
                scale = None if scale is None else scale.index_select(0, layer.rows)
            out.append((layer, scale, shift))
        return out

    def _needs_grad(self, *tensors: torch.Tensor | None) -> bool:
        if not torch.is_grad_enabled():
            return False
        return any(t is not None and t.requires_grad for t in tensors) or any(
            k.values.requires_grad for k in self._kept
        )

    def _check(self, z: torch.Tensor) -> None:
        like = self.layers[0].weight.values
        self.check_input(z, like)
        if z.dim() != 2 or z.shape[1] != self.in_dim:
            raise ValueError(f"compiled {type(self.source).__name__} expects z of shape "
                             f"[B, {self.in_dim}], got {list(z.shape)}")

    def _gather(self, x: torch.Tensor) -> torch.Tensor:
        """[B, d] -> the first layer's feature-major input rows [n0, B], contiguous."""
        return x.t().contiguous() if self.all_cols0 else x.t().index_select(0, self.cols0)

    def _index_list(self) -> list[torch.Tensor]:
        """The op's ``index`` list: constant (the cores' buffers), built once and again
        after ``.to()`` replaced the buffers (``_apply``)."""
        if self._index is not None and not torch.compiler.is_compiling():
            return self._index
        index = [t for layer in self.layers for t in layer.core.index_tensors()]
        if not torch.compiler.is_compiling():
            self._index = index
        return index

    def _apply(self, fn, recurse=True):
        self._index = None  # the buffers are replaced; CompiledField may run calls meanwhile
        return super()._apply(fn, recurse)

    def _build_op_inputs(self, t, z, values: list[torch.Tensor] | None = None
                         ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
        """The op's per-call ``values`` (unless given), scales and shifts for time t."""
        build = values is None
        values = [] if values is None else values
        scales: list[torch.Tensor] = []
        shifts: list[torch.Tensor] = []
        empty = z.new_empty(0)
        for layer, scale, shift in self._program(t, z):
            if build:
                values.append(layer.core.op_value(layer.weight.values))
            scales.append(empty if scale is None else scale)
            shifts.append(shift)
        return values, scales, shifts

    def _op_inputs(self, t, z, save: bool
                   ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
        """``_build_op_inputs``, reused between calls that record no graph.

        Rebuilding scatters every kept tensor into its core and costs more than
        the kernel on small fields (about 0.15 ms of a 0.3 ms toy evaluation).
        Without a backward to feed, the result depends only on the kept values
        (and t, where a layer reads it): it is kept while every kept-values tensor
        is the same object with the same version counter and storage, and no
        optimiser has stepped since. So optimiser steps (fused ones too, which bump
        no version counter), load_state_dict (``assign=True`` too), in-place writes,
        ``.to()`` and ``torch.func.functional_call`` all rebuild it; writes through
        ``.data``, which autograd does not see either, do not.
        """
        if save or torch.compiler.is_compiling():
            return self._build_op_inputs(t, z)
        live = [k.values for k in self._kept]  # through the attribute: swaps show
        key = (tuple((id(v), v._version, v.data_ptr()) for v in live), _OPTIMIZER_STEPS[0],
               z.dtype, z.device)
        if self._op_cache is None or self._op_cache[0] != key:
            self._op_cache = (key, self._build_op_inputs(t, z))
            return self._op_cache[1]
        values, scales, shifts = self._op_cache[1]
        if self._time_free:
            return values, scales, shifts
        return self._build_op_inputs(t, z, values)

    def tangents(self, noise: torch.Tensor | None, exact: bool, b: int, like: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """The op's (tan0 [K, n0, B], probe) for a batch of b: the Hutchinson probe
        noise [B, d] (and its rows the first layer reads), the exact trace's unit
        tangents, or none (noise None, not exact). Contiguous, as the kernels read them."""
        n0 = self.cols0.numel()
        empty = like.new_empty(0)
        if exact:
            eye = torch.eye(self.in_dim, dtype=like.dtype, device=like.device)
            units = eye if self.all_cols0 else eye.index_select(1, self.cols0)
            return units[:, :, None].expand(self.in_dim, n0, b).contiguous(), empty
        if noise is None:
            return like.new_empty(0, n0, b), empty
        # One contiguous copy serves as probe and, when every state dim is read, as
        # tangent too (the op would otherwise copy each).
        probe = noise.t().contiguous()[None]
        return (probe if self.all_cols0 else probe.index_select(1, self.cols0)), probe

    def _run_fused(self, t, z, noise, exact: bool, save: bool) -> tuple[torch.Tensor, torch.Tensor]:
        values, scales, shifts = self._op_inputs(t, z, save)
        x0 = self._gather(z)
        tan0, probe = self.tangents(noise, exact, z.shape[0], z)
        f, div, _ = ops.mlp_fwd(x0, tan0, probe, values, self._index_list(), scales, shifts,
                                self.layouts, self.act_id, exact, save, self.backend,
                                self.config.precision)
        return f.t().contiguous(), div

    def _run_graph(self, t, z) -> torch.Tensor:
        """f by the program loop (``program.program_forward``) with differentiable
        primitives and no tangent, so autograd differentiates it to any order."""
        program = self._program(t, z)
        precision = self.config.precision
        # bf16/fp16: the kept values rounded before the core takes its part (the same
        # numbers as rounding the core's; zeros stay zeros).
        layers = [layer.core.program(round_operand(layer.weight.values, precision))
                  for layer, _, _ in program]
        prims = _GraphPrimitives(self.backend, ACT_FNS[self.act], precision)
        # Dense cores multiply with torch's matmul, TF32 as configured (its backward runs
        # later, under the caller's setting; the sparse ops are exact either way).
        with cuda_matmul_precision(z.device, cublas_may_use_tf32(precision)):
            f, _ = program_forward(prims, layers, self._gather(z),
                                   [scale for _, scale, _ in program],
                                   [shift for _, _, shift in program], save=False)
        return f.t()

    def op_call(self, like: torch.Tensor, graph: bool) -> OpCall | None:
        """The op inputs for a whole solve (``OpCall``), or None where a layer reads t.

        like: a tensor of the solve's dtype and device. graph: build them with
        autograd (the adjoint maps the op's gradients back through them).
        """
        if not self._time_free:
            return None
        if graph:
            with torch.enable_grad():
                values, scales, shifts = self._build_op_inputs(None, like)
        else:
            values, scales, shifts = self._op_inputs(None, like, save=False)
        return OpCall(values, self._index_list(), scales, shifts, self.layouts, self.act_id,
                      self.backend, self.config.precision,
                      None if self.all_cols0 else self.cols0)

    # -- the contract -------------------------------------------------------------
    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        t, z = self._split_args(args)
        self._check(z)
        if self._needs_grad(t, z):
            return self._run_graph(t, z)
        return self._run_fused(t, z, None, exact=False, save=False)[0]

    def forward_and_divergence(
        self, t: torch.Tensor | None, z: torch.Tensor, noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        self._check(z)
        if noise is not None:
            self.check_input(noise, z, "noise")
            if noise.shape != z.shape:
                raise ValueError(f"noise has shape {list(noise.shape)}, expected z's "
                                 f"{list(z.shape)}")
        return self._run_fused(t, z, noise, exact=noise is None, save=self._needs_grad(t, z))

    def write_back(self) -> None:
        done: set[int] = set()
        for layer in self.layers:
            for kept in layer.kept_tensors():
                if id(kept) not in done:  # a tied tensor once
                    done.add(id(kept))
                    kept.write_back()

    def summary(self) -> str:
        lines = [f"FusedMLP ({self.act}, {len(self.layers)} layers, "
                 f"backend {self.backend})",
                 "| layer | time | layout | shape | core | kept | density | dead folded |",
                 "| --- | --- | --- | --- | --- | ---: | ---: | ---: |"]
        for layer in self.layers:
            core = layer.core
            dead = 0 if layer.dead is None else layer.dead.numel()
            lines.append(
                f"| {layer.name} | {layer.time} | {core.layout} | {layer.n_out}x{layer.n_in} | "
                f"{core.n_rows}x{core.n_cols} | {core.nnz} | {100 * core.density:.1f}% | {dead} |"
            )
        return "\n".join(lines + self._solve_line())
