// CSR x dense (W x, W^T x), blocked x dense and SDDMM entry points: the shared
// checks and dispatch (csrc/common/sparse_ops.h) over the CPU products
// (CpuProducts, kernels.h). References: sparsekern/ref.py.
#include "kernels.h"

#include <c10/util/Exception.h>

#include "../common/sparse_ops.h"

namespace sparsekern {
namespace cpu {

namespace {

constexpr const char* kWho = "sparsekern cpu backend";

void check_cpu(const Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), kWho, ": ", name, " is on ", t.device());
}

}  // namespace

Tensor spmm(const Tensor& rowptr, const Tensor& col, const Tensor& rowptr_t, const Tensor& col_t,
            const Tensor& perm, const Tensor& vals, const Tensor& x, bool transpose) {
  check_cpu(x, "x");
  const Layer w = sparsekern::matrix_layer(sparsekern::kLayoutCsr,
                                           {rowptr, col, rowptr_t, col_t, perm}, vals, x, kWho);
  Tensor y;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "sparsekern_spmm", [&] {
    CpuProducts<scalar_t> products;
    y = sparsekern::spmm_op(products, w, x, transpose, "sparsekern::spmm", kWho);
  });
  return y;
}

Tensor spmm_blocked(const Tensor& rowptr, const Tensor& col, const Tensor& rowptr_t,
                    const Tensor& col_t, const Tensor& perm, const Tensor& vals, const Tensor& bptr,
                    const Tensor& bcol, const Tensor& bslot, const Tensor& x) {
  check_cpu(x, "x");
  const Layer w = sparsekern::matrix_layer(
      sparsekern::kLayoutBlocked, {rowptr, col, rowptr_t, col_t, perm, bptr, bcol, bslot}, vals,
      x, kWho);
  Tensor y;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "sparsekern_spmm_blocked", [&] {
    CpuProducts<scalar_t> products;
    y = sparsekern::spmm_op(products, w, x, false, "sparsekern::spmm_blocked", kWho);
  });
  return y;
}

Tensor sddmm(const Tensor& rowptr, const Tensor& col, const Tensor& a, const Tensor& b) {
  check_cpu(a, "a");
  Tensor out;
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "sparsekern_sddmm", [&] {
    CpuProducts<scalar_t> products;
    out = sparsekern::sddmm_op(products, rowptr, col, a, b, "sparsekern::sddmm", kWho);
  });
  return out;
}

}  // namespace cpu
}  // namespace sparsekern
