"""The fused tier for convolutional vector fields: forward and JVP together, a hand-written
backward.

Compiled: a ``ConvChain`` (``sparsekern.protocol``: a field whose
``sparsekern_convnet()`` describes it; FFJORD's image ODEnets, whose layers are
concat convolutions: time as a last input channel, square odd kernels, stride
1, zero padding k // 2, one activation type).

The program is the MLP's (``sparsekern.ref.mlp_fwd_ref``) with convolutions for
products. Tensors are feature-major [C, N, H, W]; the state and the Hutchinson
tangent are stacked along N, ``[h | v]``, so one convolution per layer serves
the forward pass and the JVP:

    M_l = conv_l(X_{l-1});  a_l = M_l[:, :B] + shift_l;  u_l = M_l[:, B:]
    X_l = [sigma(a_l) | sigma'(a_l) * u_l]      (no sigma on the last layer)
    div_b = sum_{c, y, x} probe[c, b, y, x] * u_L[c, b, y, x]

``shift_l`` [n_l, 1, H, W] broadcasts over the batch: the bias, the time
channel's term t * conv(ones, W_time) (a map, not a constant: zero padding
makes the border pixels see fewer time taps), and the folded constants of dead
channels. Channel reduction is the MLP's neuron reduction on the [out, in]
channel connectivity (a kept tap anywhere in the kernel,
``protocol.conv_state_mask``): filters that read nothing alive are constants
act(shift), convolved into the next layer's shift; channels nothing reads are
dropped, leaving smaller convolutions (structured pruning). Each core
(``conv.ConvCore``) is dense (PyTorch's convolution) or csr (the sparse
kernel) by density.

The divergence's backward is written by hand (``_ConvProgram``, the MLP's
``mlp_bwd`` with the convolution's adjoints), differentiable once, like the
MLP's fused op; ``forward`` alone runs differentiable ops, to any order. The
exact trace (no noise) is autograd's, one backward pass per state entry: image
flows train with Hutchinson's estimate, and evaluate with it too.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from sparsekern.activations import (
    ACT_FNS,
    ACT_IDS,
    SOFTPLUS_THRESHOLD,
    act_and_slope,
    act_ref,
)
from sparsekern.config import SparseConfig
from sparsekern.conv import ConvCore, conv_layout
from sparsekern.divergence import divergence_exact
from sparsekern.field import CompiledField
from sparsekern.fused import reduce_masks
from sparsekern.linear import KeptPool, KeptTensor
from sparsekern.masks import CompileError
from sparsekern.precision import is_reduced
from sparsekern.protocol import ConvChain, ConvChainLayer, conv_state_mask


class ConvLayer(nn.Module):
    """One layer of a FusedConvNet: its kept parameters, its core, its time taps and fold."""

    weight: KeptTensor
    bias: KeptTensor | None
    core: ConvCore
    rows: torch.Tensor
    dead: torch.Tensor | None
    time_sel: torch.Tensor  # concat only, as is time_index
    time_index: torch.Tensor
    fold_sel: torch.Tensor | None
    fold_index: torch.Tensor  # registered when fold_sel is not None

    def __init__(self, layer: ConvChainLayer, plan: dict[str, torch.Tensor],
                 prev_dead: torch.Tensor | None, layout: str, pool: KeptPool) -> None:
        super().__init__()
        self.name, self.time, self.k = layer.name, layer.time, layer.kernel
        self.padding = self.k // 2
        self.weight = pool.get(layer.weight)
        self.bias = None if layer.bias is None else pool.get(layer.bias)
        n_out, n_in_total = self.weight.shape[:2]
        self.n_out = n_out
        self.n_in = n_in_total - 1 if layer.time == "concat" else n_in_total
        rows, cols, dead = plan["rows"], plan["cols"], plan["dead"]
        self.all_rows = rows.numel() == n_out
        self.register_buffer("rows", rows, persistent=False)
        self.register_buffer("dead", dead if dead.numel() else None, persistent=False)
        self.core = ConvCore(self.weight, rows, cols, layout, 1, self.padding)
        taps = self.k * self.k
        flat = self.weight.flat_index
        r, c, tap = flat // (n_in_total * taps), flat // taps % n_in_total, flat % taps
        if layer.time == "concat":
            t_sel = (c == self.n_in).nonzero().squeeze(1)
            self.register_buffer("time_sel", t_sel, persistent=False)
            self.register_buffer("time_index", r[t_sel] * taps + tap[t_sel], persistent=False)
        # Kept taps reading dead (constant) channels of the previous layer.
        self.register_buffer("fold_sel", None, persistent=False)
        self.n_fold = 0
        if prev_dead is not None and prev_dead.numel():
            pos = torch.full((n_in_total,), -1, dtype=torch.long, device=c.device)
            pos[prev_dead] = torch.arange(prev_dead.numel(), device=c.device)
            sel = (pos[c] >= 0).nonzero().squeeze(1)
            if sel.numel():
                self.fold_sel = sel
                self.n_fold = prev_dead.numel()
                fold_index = (r[sel] * self.n_fold + pos[c[sel]]) * taps + tap[sel]
                self.register_buffer("fold_index", fold_index, persistent=False)

    def _taps(self, sel: torch.Tensor, index: torch.Tensor, n_in: int) -> torch.Tensor:
        """A dense [n_out, n_in, k, k] weight of the kept taps ``sel`` (at ``index``)."""
        vals = self.weight.values.index_select(0, sel)
        w = vals.new_zeros(self.n_out * n_in * self.k * self.k).index_put((index,), vals)
        return w.view(self.n_out, n_in, self.k, self.k)

    def shift(self, t: torch.Tensor | None, like: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """The additive term over all n_out channels at time t, before folding: [n_out, 1,
        1, 1], or [n_out, 1, H, W] with a time channel (its term varies at the borders)."""
        shift = (self.bias.dense() if self.bias is not None
                 else like.new_zeros(self.n_out)).view(self.n_out, 1, 1, 1)
        if self.time == "none":
            return shift
        tt = torch.as_tensor(t, dtype=like.dtype, device=like.device).reshape(())
        ones = like.new_ones(1, 1, h, w)
        tmap = F.conv2d(ones, self._taps(self.time_sel, self.time_index, 1),
                        padding=self.padding)
        return shift + tt * tmap.transpose(0, 1)

    def fold(self, consts: torch.Tensor) -> torch.Tensor:
        """conv(W[:, dead_prev], consts [n_fold, 1, H, W]) over all n_out channels."""
        assert self.fold_sel is not None  # called for layers with a fold only
        w = self._taps(self.fold_sel, self.fold_index, self.n_fold)
        return F.conv2d(consts.transpose(0, 1), w, padding=self.padding).transpose(0, 1)

    def kept_tensors(self) -> list[KeptTensor]:
        return [k for k in (self.weight, self.bias) if k is not None]


def _split(m: torch.Tensor, b: int, bd: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The state and tangent parts of [h | v] stacked along the batch dimension ``bd``."""
    return m.narrow(bd, 0, b), m.narrow(bd, b, m.shape[bd] - b)


def _hidden(a: torch.Tensor, mv: torch.Tensor, net: FusedConvNet, bd: int) -> torch.Tensor:
    """X = [sigma(a) | sigma'(a) u] along the batch dimension ``bd``."""
    h, d1 = act_and_slope(a, net.act_id)
    return torch.cat([h, d1.mul_(mv)], bd)


def _hidden_softplus(mh: torch.Tensor, shift: torch.Tensor, mv: torch.Tensor, bd: int
                     ) -> torch.Tensor:
    """``_hidden`` for softplus (FFJORD's image activation), written into one new tensor.

    The epilogue is as much time as the sparse convolution at 80% pruned: each pass over
    an image batch costs milliseconds, so a is formed in the output's state half, the
    slope in its tangent half, and softplus overwrites a last. The numbers are
    ``act_and_slope``'s (torch's threshold rule: slope 1 above 20).
    """
    x = mh.new_empty(_stacked_shape(mh, mv, bd))
    xh, xv = _split(x, mh.shape[bd], bd)
    torch.add(mh, shift, out=xh)
    torch.sigmoid(xh, out=xv)
    xv.masked_fill_(xh > SOFTPLUS_THRESHOLD, 1.0)
    torch.ops.aten.softplus.out(xh, 1.0, SOFTPLUS_THRESHOLD, out=xh)
    xv.mul_(mv)
    return x


def _stacked_shape(mh: torch.Tensor, mv: torch.Tensor, bd: int) -> list[int]:
    shape = list(mh.shape)
    shape[bd] += mv.shape[bd]
    return shape


def _program_forward(net: FusedConvNet, values: Sequence[torch.Tensor],
                     shifts: Sequence[torch.Tensor], x0: torch.Tensor, v0: torch.Tensor | None,
                     probe: torch.Tensor | None, save: bool
                     ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """The program (module docstring) from the state x0 and tangent v0 (None: no divergence),
    in the net's orientation (``FusedConvNet.batch_major``): f, div [B], and
    [M_1..M_L, X_0..X_{L-1}] if ``save``."""
    bd = net.bdim
    b = x0.shape[bd]
    x = x0 if v0 is None else torch.cat([x0, v0], bd)
    saved_m: list[torch.Tensor] = []
    saved_x: list[torch.Tensor] = [x] if save else []
    last = len(net.layers) - 1
    sum_dims = tuple(d for d in range(4) if d != bd)
    for i, layer in enumerate(net.layers):
        m = layer.core.conv(values[i], x, net.backend, net.batch_major)
        if save:
            saved_m.append(m)
        mh, mv = _split(m, b, bd)
        if i < last and v0 is not None and net.act == "softplus":
            x = _hidden_softplus(mh, shifts[i], mv, bd)  # the hot path: no temporaries
            if save:
                saved_x.append(x)
            continue
        a = mh + shifts[i]
        if i == last:
            if v0 is None or probe is None:
                return a, a.new_zeros(b), saved_m + saved_x
            return a, (probe * mv).sum(sum_dims), saved_m + saved_x
        if v0 is None:
            x = ACT_FNS[net.act](a)
        else:
            x = _hidden(a, mv, net, bd)
        if save:
            saved_x.append(x)
    raise CompileError("the convolutional program has no layer")


class _ConvProgram(torch.autograd.Function):
    """The program with its reverse mode by hand (the MLP's ``mlp_bwd`` with convolutions)."""

    @staticmethod
    def forward(ctx: Any, net: FusedConvNet, x0: torch.Tensor, v0: torch.Tensor,
                probe: torch.Tensor, *tensors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = len(net.layers)
        values, shifts = tensors[:n], tensors[n:]
        f, div, saved = _program_forward(net, values, shifts, x0, v0, probe, save=True)
        ctx.net, ctx.n = net, n
        ctx.save_for_backward(probe, *values, *shifts, *saved)
        return f, div

    @staticmethod
    def backward(ctx: Any, grad_f: torch.Tensor, grad_div: torch.Tensor) -> tuple:
        if torch.is_grad_enabled():
            raise RuntimeError(
                "the fused convolutional divergence is differentiable once; for a graph "
                "through its gradient (create_graph=True) compile with tier='generic'")
        net, n = ctx.net, ctx.n
        bd, bm = net.bdim, net.batch_major
        probe, *rest = ctx.saved_tensors
        values, shifts, saved = rest[:n], rest[n:2 * n], rest[2 * n:]
        saved_m, saved_x = saved[:n], saved[n:]
        b, h, w = grad_f.shape[bd], grad_f.shape[2], grad_f.shape[3]
        g_values: list[torch.Tensor] = [None] * n  # type: ignore[list-item]
        g_shifts: list[torch.Tensor] = [None] * n  # type: ignore[list-item]
        div_shape = (b, 1, 1, 1) if bm else (1, b, 1, 1)
        mbar = torch.cat([grad_f, grad_div.view(div_shape) * probe], bd)
        xbar = None
        for i in reversed(range(n)):
            if i < n - 1:
                assert xbar is not None  # set by layer i + 1
                mh, mv = _split(saved_m[i], b, bd)
                _, d1, d2 = act_ref(mh + shifts[i], net.act_id)
                hbar, vbar = _split(xbar, b, bd)
                mbar = torch.cat([hbar * d1 + vbar * mv * d2, vbar * d1], bd)
            g_state = mbar.narrow(bd, 0, b)
            g_shifts[i] = g_state.sum(bd, keepdim=True).sum_to_size(shifts[i].shape)
            core = net.layers[i].core
            g_values[i] = core.weight_grad(mbar, saved_x[i], net.backend, bm)
            # The first layer's tangent inputs are constants (the probe): state columns only.
            xbar = core.conv_t(values[i], g_state if i == 0 else mbar, h, w, net.backend, bm)
        return (None, xbar, None, None, *g_values, *g_shifts)


class FusedConvNet(CompiledField):
    """A recognised convolutional field compiled to the fused program (module docstring).

    ``forward_and_divergence(t, z, noise)``: z, noise [B, C, H, W] -> (f [B, C, H, W],
    div [B]) in one program (differentiable once); without noise the exact trace by
    autograd. ``forward`` runs differentiable ops (any order).
    """

    tier = "fused"
    layers: Sequence[ConvLayer]  # an nn.ModuleList
    cols0: torch.Tensor  # buffer

    def __init__(self, source: nn.Module, chain: ConvChain, config: SparseConfig) -> None:
        super().__init__(source, config)
        if is_reduced(config.precision):
            raise CompileError(f"{type(source).__name__}: SparseConfig.precision="
                               f"{config.precision!r} has no convolution kernels; use 'ieee'")
        self.act = chain.act
        self.act_id = ACT_IDS[chain.act]
        self.in_channels = chain.in_channels
        plan = reduce_masks([conv_state_mask(layer) for layer in chain.layers],
                            chain.in_channels, config.reduce_neurons)
        pool = KeptPool()
        layers = []
        prev_dead = None
        for layer, p in zip(chain.layers, plan, strict=True):
            mask = layer.weight.mask
            if layer.time == "concat":
                mask = mask[:, :-1]
            core_mask = mask.index_select(0, p["rows"]).index_select(1, p["cols"])
            density = core_mask.sum().item() / core_mask.numel() if core_mask.numel() else 0.0
            layout = conv_layout(config.layout, density)
            layers.append(ConvLayer(layer, p, prev_dead, layout, pool))
            prev_dead = p["dead"]
        self.layers = cast("Sequence[ConvLayer]", nn.ModuleList(layers))
        self.register_buffer("cols0", plan[0]["cols"], persistent=False)
        self.all_cols0 = plan[0]["cols"].numel() == chain.in_channels
        # All cores dense (dense masks, structured pruning): the program runs on PyTorch's
        # [N, C, H, W] maps, transposing nothing; otherwise feature-major [C, N, H, W], the
        # csr kernels' (and dense cores transpose their input and output).
        self.batch_major = all(layer.core.layout == "dense" for layer in self.layers)
        self.bdim = 0 if self.batch_major else 1
        self._kept = list({id(k): k for layer in self.layers
                           for k in layer.kept_tensors()}.values())  # tied ones once

    # -- the per-call program -------------------------------------------------------
    def _program(self, t: torch.Tensor | None, like: torch.Tensor
                 ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The cores' weights and the shifts over their computed channels at time t."""
        h, w = like.shape[2], like.shape[3]
        act = ACT_FNS[self.act]
        values, shifts = [], []
        consts: torch.Tensor | None = None
        for layer in self.layers:
            shift = layer.shift(t, like, h, w)
            if layer.fold_sel is not None and consts is not None:
                shift = shift + layer.fold(consts.expand(-1, 1, h, w))
            consts = None if layer.dead is None else act(shift.index_select(0, layer.dead))
            if not layer.all_rows:
                shift = shift.index_select(0, layer.rows)
            values.append(layer.core.op_value(layer.weight.values))
            shifts.append(shift.transpose(0, 1) if self.batch_major else shift)
        return values, shifts

    def _needs_grad(self, *tensors: torch.Tensor | None) -> bool:
        if not torch.is_grad_enabled():
            return False
        return any(t is not None and t.requires_grad for t in tensors) or any(
            k.values.requires_grad for k in self._kept)

    def _check(self, z: torch.Tensor, what: str = "z") -> None:
        self.check_input(z, self.layers[0].weight.values, what)
        if z.dim() != 4 or z.shape[1] != self.in_channels:
            raise ValueError(f"compiled {type(self.source).__name__} expects {what} of shape "
                             f"[B, {self.in_channels}, H, W], got {list(z.shape)}")

    def _gather(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> the first layer's input channels in the program's orientation."""
        if not self.all_cols0:
            x = x.index_select(1, self.cols0)
        return x if self.batch_major else x.transpose(0, 1).contiguous()

    def _orient(self, y: torch.Tensor) -> torch.Tensor:
        """The program's orientation <-> [B, C, H, W] (a view)."""
        return y if self.batch_major else y.transpose(0, 1)

    def _run_graph(self, t: torch.Tensor | None, z: torch.Tensor) -> torch.Tensor:
        """f by differentiable ops (autograd to any order)."""
        values, shifts = self._program(t, z)
        act = ACT_FNS[self.act]
        x = self._gather(z)
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            a = layer.core.conv(values[i], x, self.backend, self.batch_major) + shifts[i]
            x = a if i == last else act(a)
        return self._orient(x)

    def _run_fused(self, t: torch.Tensor | None, z: torch.Tensor, noise: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        values, shifts = self._program(t, z)
        x0 = self._gather(z)
        probe = self._orient(noise).contiguous()
        v0 = self._gather(noise)
        if self._needs_grad(t, z):
            f, div = _ConvProgram.apply(self, x0, v0, probe, *values, *shifts)
        else:
            f, div, _ = _program_forward(self, values, shifts, x0, v0, probe, save=False)
        return self._orient(f), div

    # -- the contract -------------------------------------------------------------
    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        t, z = self._split_args(args)
        self._check(z)
        if self._needs_grad(t, z):
            return self._run_graph(t, z)
        values, shifts = self._program(t, z)
        f, _, _ = _program_forward(self, values, shifts, self._gather(z), None, None, False)
        return self._orient(f)

    def forward_and_divergence(
        self, t: torch.Tensor | None, z: torch.Tensor, noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        self._check(z)
        if noise is not None:
            self._check(noise, "noise")
            if noise.shape != z.shape:
                raise ValueError(f"noise has shape {list(noise.shape)}, expected z's "
                                 f"{list(z.shape)}")
            return self._run_fused(t, z, noise)
        # The exact trace: one backward pass per state entry (small images only).
        graph = self._needs_grad(t, z)
        with torch.enable_grad():
            zz = z if z.requires_grad else z.detach().requires_grad_(True)
            f = self._run_graph(t, zz)
            div = divergence_exact(f, zz, create_graph=graph)
        return (f, div) if graph else (f.detach(), div.detach())

    def write_back(self) -> None:
        for kept in self._kept:
            kept.write_back()

    def summary(self) -> str:
        lines = [f"FusedConvNet ({self.act}, {len(self.layers)} layers, backend {self.backend})",
                 "| layer | time | layout | shape | core | kept | density | dead folded |",
                 "| --- | --- | --- | --- | --- | ---: | ---: | ---: |"]
        for layer in self.layers:
            core = layer.core
            dead = 0 if layer.dead is None else layer.dead.numel()
            lines.append(
                f"| {layer.name} | {layer.time} | {core.layout} | "
                f"{layer.n_out}x{layer.n_in}x{layer.k}x{layer.k} | "
                f"{core.n_rows}x{core.n_cols} | {core.nnz} | {100 * core.density:.1f}% | {dead} |"
            )
        return "\n".join(lines + self._solve_line())
