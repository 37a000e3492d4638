// The layer loops of the fused MLP program, written once for both C++ backends
// (csrc/cpu/fused_mlp.cpp, csrc/cuda/binding.cpp); semantics: sparsekern/ref.py
// (mlp_fwd_ref, mlp_bwd_ref). Each backend supplies its primitives as a class
// `Ops` with these members (inlined: the loops add no call or copy of their own):
//
//   // A layer product's kernels; y has unit column stride, x may be a column slice.
//   void dense_product(const Tensor& w, const Tensor& x, Tensor& y, bool transpose);
//   void csr_product(const Tensor& rowptr, const Tensor& col, const Tensor* perm,
//                    const Tensor& vals, const Tensor& x, Tensor& y);  // perm: transpose
//   void blocked_product(const Layer& layer, const Tensor& x, Tensor& y);
//   // (a b^T) at the kept places, a [rows, N] and b [cols, N] contiguous.
//   Tensor sddmm(const Tensor& rowptr, const Tensor& col, const Tensor& a, const Tensor& b);
//   // (those four, the "products", also serve the single ops: sparse_ops.h)
//
//   // Forward: where layer l's product M and epilogue output X go (X may be M),
//   // the epilogue, and f, div from the last layer's output.
//   std::pair<Tensor, Tensor> fwd_buffers(size_t l, bool last);
//   void epilogue_fwd(size_t l, bool last, const Tensor& m, Tensor& x);
//   std::pair<Tensor, Tensor> finish_fwd(const Tensor& x_last);
//
//   // Backward: the cotangent of the last layer's output (or an undefined tensor
//   // where the backend's last-layer epilogue reads grad_f and grad_div itself),
//   // and one layer's epilogue reverse, which returns Mbar and fills g_scale, g_shift.
//   Tensor seed_bwd();
//   Tensor epilogue_bwd(size_t l, bool last, const Tensor& m, Tensor& xbar, Tensor& g_scale,
//                       Tensor& g_shift);
#pragma once

#include <ATen/ATen.h>

#include <tuple>
#include <utility>
#include <vector>

#include "mlp_program.h"

namespace sparsekern {

// What both backends' program primitives read: the call's per-layer vectors,
// layers, sizes and flags (a base of each backend's Ops class).
struct ProgramState {
  const std::vector<at::Tensor>& scales;
  const std::vector<at::Tensor>& shifts;
  const std::vector<Layer>& layers;
  const ProgramDims& dims;
  int64_t act;
  bool exact, save;
  const at::Tensor& probe;  // contiguous, or empty/undefined (no tangent, or the exact trace)
  at::TensorOptions opt;
};

// [x0 | tan0[0] | ... | tan0[K-1]] as one contiguous [n0, (1+K) B] matrix.
inline at::Tensor stack_columns(const at::Tensor& x0, const at::Tensor& tan0) {
  if (tan0.size(0) == 0) return x0.contiguous();
  return at::cat({x0, tan0.permute({1, 0, 2}).reshape({x0.size(0), tan0.size(0) * x0.size(1)})},
                 1);
}

// y = W x (or W^T x) for one layer: dense, CSR (W^T through the stored
// transpose, reading W's values through perm) or blocked (W^T on its CSR).
template <class Ops>
void layer_product(Ops& ops, const Layer& layer, const at::Tensor& x, at::Tensor& y,
                   bool transpose) {
  if (!layer.sparse()) {
    ops.dense_product(layer.values(), x, y, transpose);
  } else if (transpose) {
    ops.csr_product(layer.rowptr_t(), layer.col_t(), &layer.perm(), layer.values(), x, y);
  } else if (layer.blocked()) {
    ops.blocked_product(layer, x, y);
  } else {
    ops.csr_product(layer.rowptr(), layer.col(), nullptr, layer.values(), x, y);
  }
}

// Forward + JVP: (f [d, B], div [B], saved = M_0..M_{L-1}, X_0..X_{L-2} if save).
template <class Ops>
std::tuple<at::Tensor, at::Tensor, std::vector<at::Tensor>> run_forward(
    Ops& ops, const std::vector<Layer>& layers, const at::Tensor& x0s, bool save) {
  std::vector<at::Tensor> saved_m, saved_x;
  at::Tensor x = x0s;
  for (size_t l = 0; l < layers.size(); ++l) {
    const bool last = l + 1 == layers.size();
    auto [m, out] = ops.fwd_buffers(l, last);
    layer_product(ops, layers[l], x, m, false);
    ops.epilogue_fwd(l, last, m, out);
    if (save) saved_m.push_back(m);
    if (save && !last) saved_x.push_back(out);
    x = out;
  }
  auto [f, div] = ops.finish_fwd(x);
  saved_m.insert(saved_m.end(), saved_x.begin(), saved_x.end());
  return {f, div, saved_m};
}

// Reverse mode: (g_x0, g_values [one per layer, shaped like values], g_scales,
// g_shifts; an empty g_scale where the layer has no scale).
template <class Ops>
std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>>
run_backward(Ops& ops, const std::vector<Layer>& layers, const std::vector<at::Tensor>& scales,
             const at::Tensor& x0, const at::Tensor& tan0, const std::vector<at::Tensor>& saved) {
  const size_t L = layers.size();
  const int64_t B = x0.size(1);
  const auto opt = x0.options();
  std::vector<at::Tensor> g_w(L), g_scale(L), g_shift(L);
  at::Tensor xbar = ops.seed_bwd(), grad_x0;
  for (size_t l = L; l-- > 0;) {
    const Layer& layer = layers[l];
    const at::Tensor m = saved[l].contiguous();
    g_shift[l] = at::empty({layer.n_out}, opt);
    g_scale[l] = at::empty({scales[l].numel() ? layer.n_out : 0}, opt);
    const at::Tensor mbar = ops.epilogue_bwd(l, l + 1 == L, m, xbar, g_scale[l], g_shift[l]);
    // mbar is the cotangent of M = W x_in.
    const at::Tensor x_in = l == 0 ? stack_columns(x0, tan0) : saved[L + l - 1].contiguous();
    g_w[l] = layer.sparse() ? ops.sddmm(layer.rowptr(), layer.col(), mbar, x_in)
                            : at::mm(mbar, x_in.t());
    // The first layer's tangent inputs are constants: only the state columns.
    const at::Tensor src = l == 0 ? mbar.narrow(1, 0, B) : mbar;
    at::Tensor next = at::empty({layer.n_in, src.size(1)}, opt);
    layer_product(ops, layer, src, next, true);
    if (l == 0) {
      grad_x0 = next;
    } else {
      xbar = next;
    }
  }
  return {grad_x0, g_w, g_scale, g_shift};
}

}  // namespace sparsekern
