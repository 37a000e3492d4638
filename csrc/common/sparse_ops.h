// The single sparse ops of the registry (sparsekern::spmm, spmm_blocked, sddmm;
// references: sparsekern/ref.py) over a backend's products (mlp_loop.h): their
// operands are decoded and checked as one layer of a program (mlp_program.h),
// once for both backends. Each backend checks its device type and dispatches.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <vector>

#include "mlp_loop.h"

namespace sparsekern {

// The data operands: float32 or float64 matrices of one dtype and device.
inline void check_matrix(const at::Tensor& t, const char* name, const at::Tensor& like,
                         const char* op, const char* who) {
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, who,
              " supports float32 and float64; ", name, " is ", t.scalar_type());
  TORCH_CHECK(t.scalar_type() == like.scalar_type() && t.device() == like.device(), op, ": ",
              name, " has dtype ", t.scalar_type(), " on ", t.device(), ", expected ",
              like.scalar_type(), " on ", like.device());
  TORCH_CHECK(t.dim() == 2, op, ": ", name, " must be 2-D [features, N], got ", t.sizes());
}

// A CSR (kLayoutCsr: rowptr, col, rowptr_t, col_t, perm) or blocked
// (kLayoutBlocked: those, then bptr, bcol, bslot) matrix with its values, checked
// against the dtype and device of x.
inline Layer matrix_layer(int64_t layout, const std::vector<at::Tensor>& index,
                          const at::Tensor& vals, const at::Tensor& x, const char* who) {
  const int64_t n_cols = index.size() > 2 ? index[2].numel() - 1 : 0;
  std::vector<Layer> layers = parse_layers({vals}, index, {layout}, n_cols, who);
  check_layers(layers, x, who);
  return layers[0];
}

// y = W x, or W^T x (CSR only) through the stored transpose.
template <class Ops>
at::Tensor spmm_op(Ops& ops, const Layer& w, const at::Tensor& x, bool transpose,
                   const char* op, const char* who) {
  check_matrix(x, "x", x, op, who);
  TORCH_CHECK(!transpose || !w.blocked(), op, ": the blocked product has no transpose");
  const int64_t n_in = transpose ? w.n_out : w.n_in, n_out = transpose ? w.n_in : w.n_out;
  TORCH_CHECK(x.size(0) == n_in, op, ": x has ", x.size(0), " rows, expected ", n_in);
  const at::Tensor xc = x.contiguous();
  at::Tensor y = at::empty({n_out, x.size(1)}, x.options());
  layer_product(ops, w, xc, y, transpose);
  return y;
}

// (a b^T) at the kept places of the pattern (rowptr, col): a [R, N], b [C, N].
template <class Ops>
at::Tensor sddmm_op(Ops& ops, const at::Tensor& rowptr, const at::Tensor& col,
                    const at::Tensor& a, const at::Tensor& b, const char* op, const char* who) {
  check_matrix(a, "a", a, op, who);
  check_matrix(b, "b", a, op, who);
  for (const auto& [t, name] : {std::pair{&rowptr, "rowptr"}, std::pair{&col, "col"}}) {
    TORCH_CHECK(t->scalar_type() == at::kInt && t->dim() == 1 && t->is_contiguous() &&
                    t->device() == a.device(),
                op, ": ", name, " must be a contiguous 1-D int32 tensor on ", a.device(),
                ", got ", t->scalar_type(), " of shape ", t->sizes(), " on ", t->device());
  }
  TORCH_CHECK(a.size(1) == b.size(1), op, ": a [R, N] and b [C, N] must share N, got ",
              a.sizes(), " and ", b.sizes());
  TORCH_CHECK(a.size(0) == rowptr.numel() - 1, op, ": a has ", a.size(0), " rows, the pattern ",
              rowptr.numel() - 1);
  return ops.sddmm(rowptr, col, a.contiguous(), b.contiguous());
}

}  // namespace sparsekern
