"""The generic tier: any vector field, its linear maps on the state path made sparse.

Capture traces a copy of f with torch.fx. Every node that depends on the state
z is on the state path. There, each ``nn.Linear`` call and each
``F.linear(x, <parameter>, ...)`` becomes a ``SparseLinear``, and each
``nn.Conv2d`` call a ``conv.SparseConv2d`` (both differentiable to any order),
so divergences computed with autograd.grad(create_graph=True), as FFJORD's
ODEfunc does, train through them. Everything else stays the PyTorch code it
was. An op on the state path that uses a pruned weight in a way the engine
cannot compile (``F.conv2d`` of a pruned parameter, a dilated or grouped
Conv2d, a matmul with a masked parameter) is an error naming the op and the
submodule, or, with ``fallback="eager"``, runs as it was with a warning.

If f cannot be traced (Python control flow on tensor values), the copy's
``nn.Linear`` and ``nn.Conv2d`` submodules are replaced in place instead, with a warning: the
result is the same function, but capture could not check the state path.
"""

from __future__ import annotations

import copy
import warnings
from typing import cast

import torch
from torch import fx, nn
from torch.nn import functional as F

from sparsekern.autotune import choose_layout
from sparsekern.config import SparseConfig
from sparsekern.conv import SparseConv2d, conv_geometry
from sparsekern.divergence import divergence_exact, divergence_hutchinson
from sparsekern.field import CompiledField
from sparsekern.linear import KeptPool, SparseLinear
from sparsekern.masks import CompileError, masked_tensor
from sparsekern.precision import cuda_matmul_precision, is_reduced, uses_tf32


def _drop_legacy_like(state_dict, prefix, *args) -> None:
    state_dict.pop(prefix + "_like", None)


def _is_pruned(module: nn.Module) -> bool:
    """A module with a weight the engine would have to make sparse."""
    if hasattr(module, "weight_mask") or hasattr(module, "weight_orig"):
        return True
    w = getattr(module, "weight", None)
    return isinstance(w, torch.Tensor) and w.dim() >= 2 and bool((w == 0).any())


def detached_copy(module: nn.Module) -> nn.Module:
    """copy.deepcopy of a module that may hold non-leaf tensors as plain attributes.

    torch.nn.utils.prune keeps ``weight = weight_orig * weight_mask`` as such an
    attribute (recomputed by a forward pre-hook), which deepcopy refuses.
    """
    memo: dict[int, object] = {}
    for m in module.modules():
        for value in vars(m).values():
            if isinstance(value, torch.Tensor) and not value.is_leaf:
                memo[id(value)] = value.detach().clone()
    return copy.deepcopy(module, memo)


def _owner(root: nn.Module, qualname: str) -> tuple[str, nn.Module, str]:
    module_name, _, attr = qualname.rpartition(".")
    return module_name, root.get_submodule(module_name) if module_name else root, attr


def _state_path(graph: fx.Graph, state: fx.Node) -> set[fx.Node]:
    on_path = {state}
    for node in graph.nodes:  # topological order
        if any(isinstance(a, fx.Node) and a in on_path for a in node.all_input_nodes):
            on_path.add(node)
    return on_path


class GenericField(CompiledField):
    """A vector field compiled by the generic tier (see the module docstring).

    ``forward`` is the traced (or module-swapped) copy of f; ``forward_and_divergence``
    computes the divergence by autograd through it (exact or Hutchinson).
    """

    tier = "generic"

    def __init__(self, source: nn.Module, config: SparseConfig) -> None:
        if is_reduced(config.precision):
            # Computing exactly instead would quietly ignore what was asked for.
            why = ("tier='generic' was requested" if config.tier == "generic" else
                   f"{type(source).__name__} is not a recognised MLP (sparsekern.protocol), "
                   "so it compiles to the generic tier")
            raise CompileError(
                f"SparseConfig.precision={config.precision!r} rounds the products of the fused "
                f"tier; {why}, whose products are exact float32: use precision='ieee' (or "
                "'tf32')" + (", or tier='auto'" if config.tier == "generic" else "")
            )
        super().__init__(source, config)
        self.sparse: dict[str, SparseLinear | SparseConv2d] = {}
        self.eager_ops: list[str] = []
        # One KeptTensor per source Parameter, one SparseLinear per source module: a
        # module called twice, or a weight shared by two modules, stays tied.
        self._pool = KeptPool()
        self._linears: dict[tuple[str, str | None], SparseLinear | SparseConv2d] = {}
        self._added: dict[int, str] = {}  # SparseLinear -> its submodule name in the graph
        work = detached_copy(source)
        try:
            traced = fx.symbolic_trace(work)
        except Exception as exc:  # fx raises TraceError, TypeError, ... on dynamic code
            warnings.warn(
                f"sparsekern: torch.fx could not trace {type(source).__name__} "
                f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
                "compiling it by replacing its nn.Linear submodules instead",
                stacklevel=3,
            )
            self.module = self._swap_linears(work, source)
            self.traced = False
        else:
            self.module = self._rewrite(traced, source)
            self.traced = True
        self._check_untied(source)
        # State dicts written while a reference tensor was (by mistake) registered as the
        # parameter "_like" still load.
        self._register_load_state_dict_pre_hook(_drop_legacy_like)

    # -- capture -------------------------------------------------------------------
    def _make_linear(self, source_root: nn.Module, name: str, weight_name: str,
                     bias_name: str | None, conv: tuple[int, int] | None = None
                     ) -> SparseLinear | SparseConv2d:
        """The sparse map of a linear map's weight and bias (a ``SparseConv2d`` of
        ``conv`` = (stride, padding) for a convolution), one per operand pair (tied)."""
        key = (weight_name, bias_name)
        if key in self._linears:  # the same module (or F.linear operands) used again: tied
            return self._linears[key]
        owner_name, owner, attr = _owner(source_root, weight_name)
        weight = masked_tensor(owner, owner_name, attr.removesuffix("_orig"))
        # weight_name is a parameter of source_root (an nn.Linear's weight, or F.linear's
        # get_attr operand), so its owner has it: masked_tensor returns None only without one.
        assert weight is not None
        bias = None
        if bias_name is not None:
            b_owner_name, b_owner, b_attr = _owner(source_root, bias_name)
            bias = masked_tensor(b_owner, b_owner_name, b_attr.removesuffix("_orig"),
                                 zeros_are_pruned=False)
        if conv is not None:
            sconv = SparseConv2d(weight, bias, self.config.layout, self._backend, *conv,
                                 self._pool)
            self.sparse[name if name not in self.sparse else f"{name}#{len(self.sparse)}"] = sconv
            self._linears[key] = sconv
            return sconv
        if weight.value.dim() != 2:
            raise CompileError(f"{weight.name} is not a matrix (shape {list(weight.value.shape)})")
        layout: str = self.config.layout
        if layout == "auto":
            core = weight.mask[weight.mask.any(1)][:, weight.mask.any(0)]
            layout = choose_layout(core, self.config.batch_hint, weight.value.dtype,
                                   self.backend, self.config.autotune)
        lin = SparseLinear(weight, bias, layout, self._backend, self._pool)
        # One weight with two biases (F.linear): two maps, sharing the weight's KeptTensor.
        self.sparse[name if name not in self.sparse else f"{name}#{len(self.sparse)}"] = lin
        self._linears[key] = lin
        return lin

    def _check_untied(self, source: nn.Module) -> None:
        """Refuse a compiled Parameter that the compiled module also still holds densely.

        E.g. a weight used by a linear map on the state path and, as a plain tensor,
        elsewhere: the two copies would train apart and write back over each other.
        """
        compiled = self._pool.targets()
        src = dict(source.named_parameters(remove_duplicate=False))
        for name, _ in self.module.named_parameters(remove_duplicate=False):
            if name.startswith("sparse_") or ".sparse_" in name:
                continue
            p = src.get(name)
            if p is not None and id(p) in compiled:
                raise CompileError(
                    f"parameter '{name}' of {type(source).__name__} is compiled as the sparse "
                    f"weight '{compiled[id(p)]}' and also used as a dense tensor (tied "
                    "weights): the two would train apart; use it in linear maps only "
                    "(nn.Linear / F.linear), or give the other use its own Parameter"
                )

    def _unsupported(self, what: str, where: str) -> None:
        msg = (f"sparsekern cannot compile {what} in submodule '{where}' on the state path: "
               "it uses a pruned weight outside a linear map")
        if self.config.fallback == "error":
            raise CompileError(msg + "; pass SparseConfig(fallback='eager') to run it dense")
        warnings.warn(msg + "; it runs dense (fallback='eager')", stacklevel=4)
        self.eager_ops.append(f"{what} ({where})")

    def _rewrite(self, gm: fx.GraphModule, source: nn.Module) -> fx.GraphModule:
        graph = gm.graph
        placeholders = [n for n in graph.nodes if n.op == "placeholder"]
        state = placeholders[self.arity - 1]
        on_path = _state_path(graph, state)
        params = dict(gm.named_parameters())
        derived = self._pruned_derived(gm, source, on_path, params)
        count = 0
        for node in list(graph.nodes):
            if node not in on_path:
                continue
            if node.op == "call_module":
                mod = gm.get_submodule(node.target)
                conv = self._conv_geometry(mod, node.target)
                if type(mod) is nn.Linear or conv is not None:
                    bias = f"{node.target}.bias" if mod.bias is not None else None
                    lin = self._make_linear(source, node.target, f"{node.target}.weight", bias,
                                            conv)
                    node.target = self._add(gm, lin, count)
                    count += 1
                elif _is_pruned(mod) and type(mod) is not nn.Conv2d:  # that one has warned
                    self._unsupported(type(mod).__name__, node.target)
            elif node.op == "call_function" and node.target is F.linear:
                w = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
                b = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
                if (isinstance(w, fx.Node) and w.op == "get_attr" and w.target in params and
                        (b is None or (isinstance(b, fx.Node) and b.op == "get_attr"))):
                    # A get_attr node's target is the attribute's qualified name.
                    lin = self._make_linear(source, w.target, w.target,
                                            None if b is None else cast(str, b.target))
                    with graph.inserting_after(node):
                        call = graph.call_module(self._add(gm, lin, count), (node.args[0],))
                    count += 1
                    node.replace_all_uses_with(call)
                    graph.erase_node(node)
                else:
                    self._check_param_uses(node, derived)
            elif node.op in ("call_function", "call_method"):
                self._check_param_uses(node, derived)
        # Drop what the replacements left unread: the dense weights must not stay
        # parameters of the compiled module (the optimiser sees kept values only).
        for node in list(graph.nodes):
            if node.op == "get_attr" and not node.users:
                graph.erase_node(node)
        graph.lint()
        gm.recompile()
        gm.delete_all_unused_submodules()
        for name in [n for n, _ in gm.named_parameters() if n in params]:
            owner_name, owner, attr = _owner(gm, name)
            if not any(n.op == "get_attr" and n.target == name for n in graph.nodes) and not any(
                n.op == "call_module" and (n.target == owner_name or
                                           n.target.startswith(owner_name + "."))
                for n in graph.nodes
            ):
                delattr(owner, attr)
        return gm

    def _conv_geometry(self, mod: nn.Module, where: str) -> tuple[int, int] | None:
        """(stride, padding) of an ``nn.Conv2d`` the kernels run; None for another module,
        or for a convolution they cannot run (reported, if pruned, by ``_unsupported``)."""
        if type(mod) is not nn.Conv2d:
            return None
        geometry = conv_geometry(mod)
        if isinstance(geometry, str):
            if _is_pruned(mod):
                self._unsupported(f"Conv2d with {geometry}", where)
            return None
        return geometry

    def _add(self, gm: fx.GraphModule, lin: SparseLinear | SparseConv2d, index: int) -> str:
        if id(lin) in self._added:  # a tied map: every call goes to one submodule
            return self._added[id(lin)]
        name = self._added[id(lin)] = f"sparse_{index}"
        gm.add_submodule(name, lin)
        return name

    def _check_param_uses(self, node: fx.Node, derived: dict[fx.Node, str]) -> None:
        for arg in node.all_input_nodes:
            if arg in derived:
                what = getattr(node.target, "__name__", str(node.target))
                self._unsupported(what, derived[arg])
                return

    @staticmethod
    def _pruned_derived(gm: fx.GraphModule, source: nn.Module, on_path: set[fx.Node],
                        params: dict) -> dict[fx.Node, str]:
        """Nodes off the state path computed from a pruned parameter -> its owner's name.

        ``z @ self.lin.weight.t()`` reaches the state path through ``t()``, not
        through the parameter itself.
        """
        derived: dict[fx.Node, str] = {}
        for node in gm.graph.nodes:
            if node in on_path:
                continue
            if node.op == "get_attr" and node.target in params:
                # The traced module copies the parameter alone; its mask lives on
                # the source module of the same name.
                owner_name, owner, _ = _owner(source, node.target)
                if _is_pruned(owner):
                    derived[node] = owner_name or type(source).__name__
            else:
                for arg in node.all_input_nodes:
                    if arg in derived:
                        derived[node] = derived[arg]
                        break
        return derived

    def _swap_linears(self, work: nn.Module, source: nn.Module) -> nn.Module:
        first_name: dict[int, str] = {}
        # Every slot, shared modules included: a module held twice is swapped in both
        # places, for one SparseLinear (named by its first slot).
        for name, mod in list(work.named_modules(remove_duplicate=False)):
            if not name:
                continue
            conv = self._conv_geometry(mod, name)
            if type(mod) is nn.Linear or conv is not None:
                name_of = first_name.setdefault(id(mod), name)
                lin = self._make_linear(source, name_of, f"{name_of}.weight",
                                        f"{name_of}.bias" if mod.bias is not None else None,
                                        conv)
                parent_name, _, child = name.rpartition(".")
                parent = work.get_submodule(parent_name) if parent_name else work
                setattr(parent, child, lin)
            elif _is_pruned(mod) and type(mod) is not nn.Conv2d:
                self._unsupported(type(mod).__name__, name)
        if type(work) in (nn.Linear, nn.Conv2d):
            raise CompileError(f"a bare nn.{type(work).__name__} is not a vector field of the "
                               "generic tier")
        return work

    # -- the contract --------------------------------------------------------------
    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        _, z = self._split_args(args)
        like = self._first_tensor()
        if like is not None:
            self.check_input(z, like)
        # Dense cores and eager ops multiply with torch's matmul: TF32 only if configured.
        with cuda_matmul_precision(z.device, uses_tf32(self.config.precision)):
            return self.module(*args)

    def forward_and_divergence(
        self, t: torch.Tensor | None, z: torch.Tensor, noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        create_graph = torch.is_grad_enabled()
        # The divergence's own products (autograd through the field) under the same rule.
        with torch.enable_grad(), cuda_matmul_precision(z.device,
                                                        uses_tf32(self.config.precision)):
            # Without a graph to extend, z becomes a leaf of its own: a z that requires
            # grad but was viewed under no_grad has no path back to itself (zero trace).
            zz = z if create_graph and z.requires_grad else z.detach().requires_grad_(True)
            args = (zz,) if self.arity == 1 else (t, zz)
            dz = self(*args)
            if noise is None:
                div = divergence_exact(dz, zz, create_graph=create_graph)
            else:
                div = divergence_hutchinson(dz, zz, noise, create_graph=create_graph)
        if not create_graph:
            dz, div = dz.detach(), div.detach()
        return dz, div

    @torch.no_grad()
    def write_back(self) -> None:
        for lin in self.sparse.values():  # a tied KeptTensor writes the same values twice
            lin.write_back()
        # Parameters and buffers the engine did not replace (hypernetworks, norms)
        # trained in the copy; copy them back by name.
        src_params = dict(self.source.named_parameters())
        src_buffers = dict(self.source.named_buffers())
        replaced = {f"{n}." for n in self.sparse}
        for name, p in self.module.named_parameters():
            if name.startswith("sparse_") or any(name.startswith(r) for r in replaced):
                continue
            if name in src_params:
                src_params[name].copy_(p)
        for name, b in self.module.named_buffers():
            if name in src_buffers and not name.startswith("sparse_") and not name.endswith(
                ("_mask",)
            ):
                src_buffers[name].copy_(b)

    def summary(self) -> str:
        lines = [f"GenericField ({'fx-traced' if self.traced else 'module-swapped'}, "
                 f"{len(self.sparse)} sparse linear maps)",
                 "| linear | layout | shape | core | kept | density |",
                 "| --- | --- | --- | --- | ---: | ---: |"]
        for name, lin in self.sparse.items():
            c = lin.core
            shape = "x".join(map(str, lin.weight.shape))
            lines.append(f"| {name} | {c.layout} | {shape} | "
                         f"{c.n_rows}x{c.n_cols} | {c.nnz} | {100 * c.density:.1f}% |")
        if self.eager_ops:
            lines.append("Run dense (fallback='eager'): " + ", ".join(self.eager_ops))
        return "\n".join(lines + self._solve_line())
