"""The Triton backend of the op registry (``sparsekern.ops``, backend="triton").

The entry points (spmm, spmm_blocked, sddmm, conv2d, conv2d_t, conv2d_wgrad,
mlp_fwd, mlp_bwd) have the signatures of their references in ``sparsekern.ref``
(without the ``_ref`` suffix); the MLP ones take a keyword-only ``precision``
(``sparsekern.precision``; default "ieee": fp32 products are exact IEEE, as adaptive
solvers need). Kernels live in
``k_spmm`` (CSR and blocked x dense), ``k_sddmm`` (weight gradient at the kept
places), ``k_conv`` (pruned convolutions on feature-major maps: the convolution,
its input adjoint through the stored transpose, its weight gradient at the kept
taps), ``k_fused_mlp`` (the fused forward + JVP program and its backward in one
launch each) and ``k_mlp_layers`` (the same per layer, for sparse or wide layers),
the last two sharing ``epilogue``'s jit math; ``launch`` holds the launch rules
and the ahead-of-time signatures. They run compiled on CUDA
tensors; on CPU tensors only under Triton's interpreter (``TRITON_INTERPRET=1``
set before triton is imported), which is how the CPU test suite checks them
against the references.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from sparsekern.triton.launch import AotVariant

__all__ = ["aot_compile", "aot_variants", "available", "conv2d", "conv2d_t", "conv2d_wgrad",
           "interpreting", "mlp_bwd", "mlp_fwd", "sddmm", "spmm", "spmm_blocked"]


def interpreting() -> bool:
    """Whether triton.jit builds interpreted kernels in this process (``TRITON_INTERPRET=1``).

    Then the kernels run on CPU tensors too, through the op registry as anywhere.
    """
    return os.environ.get("TRITON_INTERPRET") == "1"


def available() -> bool:
    """Whether the Triton kernels can run here: triton imports, and CUDA or the interpreter."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available() or interpreting()


def spmm(rowptr: torch.Tensor, col: torch.Tensor, rowptr_t: torch.Tensor, col_t: torch.Tensor,
         perm: torch.Tensor, vals: torch.Tensor, x: torch.Tensor, transpose: bool) -> torch.Tensor:
    """W x (W^T x with ``transpose``) for W [R, C] in CSR: ``sparsekern.ref.spmm_ref``.

    Args:
        rowptr, col, rowptr_t, col_t, perm: int32 index tensors of the pattern.
        vals: [nnz] kept values. x: [C, N] ([R, N] if transpose), feature-major.

    Returns:
        A fresh contiguous [R, N] ([C, N]) tensor.
    """
    from sparsekern.triton import k_spmm

    return k_spmm.spmm(rowptr, col, rowptr_t, col_t, perm, vals, x, transpose)


def spmm_blocked(rowptr: torch.Tensor, col: torch.Tensor, rowptr_t: torch.Tensor,
                 col_t: torch.Tensor, perm: torch.Tensor, vals: torch.Tensor, bptr: torch.Tensor,
                 bcol: torch.Tensor, bslot: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """W x for W [R, C] in the blocked layout: ``sparsekern.ref.spmm_blocked_ref``.

    Args:
        rowptr, col, rowptr_t, col_t, perm: the CSR pattern the blocks come from.
        vals: [nnz] kept values (CSR order). bptr, bcol, bslot: the blocks
            (``formats.BlockedPattern``). x: [C, N].

    Returns:
        A fresh contiguous [R, N] tensor.
    """
    from sparsekern.triton import k_spmm

    return k_spmm.spmm_blocked(rowptr, col, rowptr_t, col_t, perm, vals, bptr, bcol, bslot, x)


def sddmm(rowptr: torch.Tensor, col: torch.Tensor, a: torch.Tensor, b: torch.Tensor
          ) -> torch.Tensor:
    """(a b^T) at the kept places: ``sparsekern.ref.sddmm_ref``. a [R, N], b [C, N] -> [nnz]."""
    from sparsekern.triton import k_sddmm

    return k_sddmm.sddmm(rowptr, col, a, b)


def conv2d(rowptr: torch.Tensor, col: torch.Tensor, rowptr_t: torch.Tensor,
           col_t: torch.Tensor, perm: torch.Tensor, vals: torch.Tensor, x: torch.Tensor,
           c_out: int, kh: int, kw: int, stride: int, padding: int) -> torch.Tensor:
    """The pruned convolution of feature-major x: ``sparsekern.ref.conv2d_ref``.

    Args:
        rowptr, col, rowptr_t, col_t, perm: int32 pattern of the weight as the matrix
            [C_out, C_in * kh * kw] (column ci * kh * kw + ky * kw + kx is one tap).
        vals: [nnz] kept values. x: [C_in, N, H, W]. c_out: C_out. kh, kw: kernel
            size; stride (>= 1), padding (>= 0, zeros): square.

    Returns:
        A fresh contiguous [C_out, N, Ho, Wo] tensor.

    Raises:
        TypeError: a dtype other than float32/float64, or index tensors not int32.
        ValueError: shapes that do not fit the pattern, an output size below 1.
    """
    from sparsekern.triton import k_conv

    return k_conv.conv2d(rowptr, col, rowptr_t, col_t, perm, vals, x, c_out, kh, kw, stride,
                         padding)


def conv2d_t(rowptr: torch.Tensor, col: torch.Tensor, rowptr_t: torch.Tensor,
             col_t: torch.Tensor, perm: torch.Tensor, vals: torch.Tensor, g: torch.Tensor,
             c_in: int, h: int, w: int, kh: int, kw: int, stride: int, padding: int
             ) -> torch.Tensor:
    """The adjoint of ``conv2d`` w.r.t. its input: ``sparsekern.ref.conv2d_t_ref``.

    g [C_out, N, Ho, Wo] (Ho, Wo those of an h x w input) -> a fresh contiguous
    [c_in, N, h, w] tensor; W is read through the stored transpose (no atomics).
    """
    from sparsekern.triton import k_conv

    return k_conv.conv2d_t(rowptr, col, rowptr_t, col_t, perm, vals, g, c_in, h, w, kh, kw,
                           stride, padding)


def conv2d_wgrad(rowptr: torch.Tensor, col: torch.Tensor, rowptr_t: torch.Tensor,
                 col_t: torch.Tensor, perm: torch.Tensor, g: torch.Tensor, x: torch.Tensor,
                 kh: int, kw: int, stride: int, padding: int) -> torch.Tensor:
    """The weight gradient of ``conv2d`` at the kept taps: ``sparsekern.ref.conv2d_wgrad_ref``.

    g [C_out, N, Ho, Wo], x [C_in, N, H, W] -> a fresh [nnz] tensor in CSR order.
    """
    from sparsekern.triton import k_conv

    return k_conv.conv2d_wgrad(rowptr, col, rowptr_t, col_t, perm, g, x, kh, kw, stride,
                               padding)


def mlp_fwd(x0: torch.Tensor, tan0: torch.Tensor, probe: torch.Tensor,
            values: list[torch.Tensor], index: list[torch.Tensor], scales: list[torch.Tensor],
            shifts: list[torch.Tensor], layouts: list[int], act: int, exact: bool, save: bool, *,
            precision: str = "ieee") -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """The fused forward + JVP program: ``sparsekern.ref.mlp_fwd_ref``.

    Dense programs whose widths are all <= 256 run as one fused launch
    (``k_fused_mlp``); others (csr or blocked layers, wider layers) per layer
    (``k_mlp_layers``). Returns f [d, B], div [B] and, with ``save``,
    [M_1..M_L, X_1..X_{L-1}] (each [n_l, (1 + K) B]).
    """
    from sparsekern.formats import decode_program
    from sparsekern.triton import k_fused_mlp, k_mlp_layers
    from sparsekern.triton.launch import check_mlp

    check_mlp(x0, tan0, probe, values, index, scales, shifts, layouts, act, exact)
    layers = decode_program(values, index, layouts)
    run = (k_fused_mlp.fused_forward if k_fused_mlp.fused_eligible(x0, layers)
           else k_mlp_layers.layers_forward)
    return run(x0, tan0, probe, layers, scales, shifts, act, exact, save, precision=precision)


def mlp_bwd(grad_f: torch.Tensor, grad_div: torch.Tensor, x0: torch.Tensor, tan0: torch.Tensor,
            probe: torch.Tensor, values: list[torch.Tensor], index: list[torch.Tensor],
            scales: list[torch.Tensor], shifts: list[torch.Tensor], layouts: list[int], act: int,
            exact: bool, saved: list[torch.Tensor], *, precision: str = "ieee"
            ) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """Reverse mode of ``mlp_fwd``: ``sparsekern.ref.mlp_bwd_ref``, on the same path.

    Returns grad_x0 [n0, B], and per layer the gradient of its values ([n_l, n_{l-1}],
    or [nnz] for csr and blocked), the scale gradient (empty where there is no scale)
    and the shift gradient [n_l].
    """
    from sparsekern.formats import decode_program
    from sparsekern.triton import k_fused_mlp, k_mlp_layers
    from sparsekern.triton.launch import check_mlp

    check_mlp(x0, tan0, probe, values, index, scales, shifts, layouts, act, exact,
              grad_f=grad_f, grad_div=grad_div, saved=saved)
    layers = decode_program(values, index, layouts)
    run = (k_fused_mlp.fused_backward if k_fused_mlp.fused_eligible(x0, layers)
           else k_mlp_layers.layers_backward)
    return run(grad_f, grad_div, x0, tan0, probe, layers, scales, shifts, act, exact, saved,
               precision=precision)


def aot_variants(dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.float64),
                 acts: tuple[int, ...] | None = None, precision: str = "ieee"
                 ) -> list[AotVariant]:
    """(kernel, signature, constexprs) of every Triton kernel as the wrappers launch it.

    Each module lists its kernels' constexpr variants; the signatures are derived
    from the kernels' own parameters (``launch.aot_variant``).

    Args:
        dtypes: element types to build each kernel for.
        acts: activation ids for the activation-dependent kernels (default: tanh).
        precision: ``SparseConfig.precision``: the fused kernels' ``tl.dot``
            input precision ("tf32" or "ieee") and operand type (bf16, fp16)
            as launched for it on a GPU (float32 only; float64 stays IEEE).
    """
    from sparsekern.activations import ACT_IDS
    from sparsekern.triton import k_conv, k_fused_mlp, k_mlp_layers, k_sddmm, k_spmm

    acts = (ACT_IDS["tanh"],) if acts is None else acts
    return [v for dtype in dtypes for v in (*k_spmm.aot_variants(dtype),
                                            *k_sddmm.aot_variants(dtype),
                                            *k_conv.aot_variants(dtype),
                                            *k_fused_mlp.aot_variants(dtype, acts, precision),
                                            *k_mlp_layers.aot_variants(dtype, acts))]


def aot_compile(arch: int, variants: list[AotVariant] | None = None
                ) -> dict[str, object]:
    """Compile Triton kernels ahead of time for ``sm_<arch>``; no GPU or driver is needed.

    Args:
        arch: compute capability as an int (80: A100, 90: H100).
        variants: what to compile (default ``aot_variants()``: every kernel in
            float32 and float64).

    Returns:
        {"<kernel>[<dtype>, <constexprs>]": CompiledKernel}; each has ``asm``
        with "ttgir", "ptx" and "cubin" (Triton's bundled ptxas assembles it).
    """
    import triton
    from triton.backends.compiler import GPUTarget

    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("aot_compile needs compiled kernels; unset TRITON_INTERPRET")
    target = GPUTarget("cuda", arch, 32)
    out: dict[str, object] = {}
    for kernel, signature, constexprs in aot_variants() if variants is None else variants:
        src = triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
        dtype = next(t for t in signature.values() if t.startswith("*f"))[1:]
        key = f"{kernel.__name__}[{dtype}, {constexprs}]"
        # Fp fusion on (Triton's default), said explicitly: Triton 3.9 warns when implied.
        out[key] = triton.compile(src, target=target,
                                  options={"enable_fp_fusion": True, "num_warps": 4})
    return out
