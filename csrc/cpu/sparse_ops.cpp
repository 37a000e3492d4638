// CSR x dense (W x, W^T x) and SDDMM entry points; references: sparsekern/ref.py.
#include "kernels.h"

#include <c10/util/Exception.h>

namespace sparsekern {
namespace cpu {

namespace {

void check_index(const Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kInt && t.dim() == 1 && t.is_contiguous(),
              "sparsekern: CSR ", name, " must be a contiguous 1-D int32 tensor, got ",
              t.scalar_type(), " of shape ", t.sizes());
  TORCH_CHECK(t.device().is_cpu(), "sparsekern cpu backend: ", name, " is on ", t.device());
}

void check_dense(const Tensor& t, const char* name, at::ScalarType dtype) {
  TORCH_CHECK(t.device().is_cpu(), "sparsekern cpu backend: ", name, " is on ", t.device());
  TORCH_CHECK(t.scalar_type() == dtype, "sparsekern: ", name, " has dtype ", t.scalar_type(),
              ", expected ", dtype);
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble,
              "sparsekern cpu backend supports float32 and float64, got ", t.scalar_type());
}

}  // namespace

Tensor spmm(const Tensor& rowptr, const Tensor& col, const Tensor& rowptr_t, const Tensor& col_t,
            const Tensor& perm, const Tensor& vals, const Tensor& x, bool transpose) {
  check_index(rowptr, "rowptr");
  check_index(col, "col");
  check_index(rowptr_t, "rowptr_t");
  check_index(col_t, "col_t");
  check_index(perm, "perm");
  check_dense(vals, "vals", x.scalar_type());
  check_dense(x, "x", x.scalar_type());
  TORCH_CHECK(x.dim() == 2, "sparsekern::spmm: x must be 2-D [features, N], got ", x.sizes());
  const int64_t n_rows = rowptr.numel() - 1, n_cols = rowptr_t.numel() - 1;
  const int64_t n_in = transpose ? n_rows : n_cols, n_out = transpose ? n_cols : n_rows;
  TORCH_CHECK(vals.numel() == col.numel(), "sparsekern::spmm: vals has ", vals.numel(),
              " entries, the pattern ", col.numel());
  TORCH_CHECK(x.size(0) == n_in, "sparsekern::spmm: x has ", x.size(0), " rows, expected ", n_in);
  const Tensor xc = x.contiguous();
  const Tensor v = vals.contiguous();
  Tensor y = at::empty({n_out, x.size(1)}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "sparsekern_spmm", [&] {
    if (transpose) {
      csr_matmul<scalar_t>(rowptr_t.data_ptr<int32_t>(), col_t.data_ptr<int32_t>(),
                           perm.data_ptr<int32_t>(), v.data_ptr<scalar_t>(),
                           xc.data_ptr<scalar_t>(), xc.size(1), y.data_ptr<scalar_t>(), y.size(1),
                           n_out, n_in, x.size(1));
    } else {
      csr_matmul<scalar_t>(rowptr.data_ptr<int32_t>(), col.data_ptr<int32_t>(), nullptr,
                           v.data_ptr<scalar_t>(), xc.data_ptr<scalar_t>(), xc.size(1),
                           y.data_ptr<scalar_t>(), y.size(1), n_out, n_in, x.size(1));
    }
  });
  return y;
}

Tensor sddmm(const Tensor& rowptr, const Tensor& col, const Tensor& a, const Tensor& b) {
  check_index(rowptr, "rowptr");
  check_index(col, "col");
  check_dense(a, "a", a.scalar_type());
  check_dense(b, "b", a.scalar_type());
  TORCH_CHECK(a.dim() == 2 && b.dim() == 2 && a.size(1) == b.size(1),
              "sparsekern::sddmm: a [R, N] and b [C, N] must share N, got ", a.sizes(), " and ",
              b.sizes());
  TORCH_CHECK(a.size(0) == rowptr.numel() - 1, "sparsekern::sddmm: a has ", a.size(0),
              " rows, the pattern ", rowptr.numel() - 1);
  const Tensor ac = a.contiguous(), bc = b.contiguous();
  Tensor out = at::empty({col.numel()}, a.options());
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "sparsekern_sddmm", [&] {
    csr_sddmm<scalar_t>(rowptr.data_ptr<int32_t>(), col.data_ptr<int32_t>(),
                        ac.data_ptr<scalar_t>(), ac.size(1), bc.data_ptr<scalar_t>(), bc.size(1),
                        out.data_ptr<scalar_t>(), ac.size(0), bc.size(0), ac.size(1));
  });
  return out;
}

Tensor spmm_blocked(const Tensor& rowptr, const Tensor& col, const Tensor& rowptr_t,
                    const Tensor& col_t, const Tensor& perm, const Tensor& vals, const Tensor& bptr,
                    const Tensor& bcol, const Tensor& bslot, const Tensor& x) {
  check_index(rowptr, "rowptr");
  check_index(col, "col");
  check_index(rowptr_t, "rowptr_t");
  check_index(bptr, "bptr");
  check_index(bcol, "bcol");
  check_index(bslot, "bslot");
  check_dense(vals, "vals", x.scalar_type());
  check_dense(x, "x", x.scalar_type());
  const int64_t n_rows = rowptr.numel() - 1, n_cols = rowptr_t.numel() - 1;
  TORCH_CHECK(x.dim() == 2 && x.size(0) == n_cols, "sparsekern::spmm_blocked: x must be [",
              n_cols, ", N], got ", x.sizes());
  TORCH_CHECK(bptr.numel() - 1 == (n_rows + kBlockRows - 1) / kBlockRows &&
                  bslot.numel() == vals.numel(),
              "sparsekern::spmm_blocked: the blocks do not match the pattern");
  const Tensor xc = x.contiguous();
  const Tensor bvals = block_values(vals.contiguous(), bcol, bslot);
  Tensor y = at::empty({n_rows, x.size(1)}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "sparsekern_spmm_blocked", [&] {
    blocked_matmul<scalar_t>(bptr.data_ptr<int32_t>(), bcol.data_ptr<int32_t>(),
                             bvals.data_ptr<scalar_t>(), xc.data_ptr<scalar_t>(), xc.size(1),
                             y.data_ptr<scalar_t>(), y.size(1), n_rows, n_cols, x.size(1));
  });
  return y;
}

void layer_matmul(const std::vector<Tensor>& layer, const Tensor& x, Tensor& y, bool transpose) {
  // The kernels address element (r, j) as r * stride(0) + j. A column stride only means
  // something with two or more columns and a row: the transpose of a [1, n] state is a
  // "contiguous" [n, 1] matrix whose stride(1) is n, and an empty one may have any
  // strides, so B = 0 and 1 and zero-width layers must not be refused (sample(1) was).
  auto unit_columns = [](const Tensor& t) {
    return t.numel() == 0 || t.size(1) <= 1 || t.stride(1) == 1;
  };
  TORCH_CHECK(unit_columns(x) && unit_columns(y),
              "sparsekern cpu backend: layer product operands need unit column stride, got x ",
              x.sizes(), " with strides ", x.strides(), " and y ", y.sizes(), " with strides ",
              y.strides());
  if (layer.size() == 1) {
    const Tensor& w = layer[0];
    if (!transpose && w.size(1) <= kSmallK && w.is_contiguous()) {
      AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "sparsekern_small_k", [&] {
        small_k_matmul<scalar_t>(w.data_ptr<scalar_t>(), w.size(1), x.data_ptr<scalar_t>(),
                                 x.stride(0), y.data_ptr<scalar_t>(), y.stride(0), w.size(0),
                                 w.size(1), x.size(1));
      });
      return;
    }
    at::mm_out(y, transpose ? w.t() : w, x);
    return;
  }
  const Tensor &rowptr = layer[0], &col = layer[1], &rowptr_t = layer[2], &col_t = layer[3],
               &perm = layer[4], &vals = layer[5];
  const int64_t n_rows = rowptr.numel() - 1, n_cols = rowptr_t.numel() - 1;
  if (layer.size() == 9 && !transpose) {
    const Tensor bvals = block_values(vals, layer[7], layer[8]);
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "sparsekern_layer_blocked", [&] {
      blocked_matmul<scalar_t>(layer[6].data_ptr<int32_t>(), layer[7].data_ptr<int32_t>(),
                               bvals.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), x.stride(0),
                               y.data_ptr<scalar_t>(), y.stride(0), n_rows, n_cols, x.size(1));
    });
    return;
  }
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "sparsekern_layer_matmul", [&] {
    if (transpose) {
      csr_matmul<scalar_t>(rowptr_t.data_ptr<int32_t>(), col_t.data_ptr<int32_t>(),
                           perm.data_ptr<int32_t>(), vals.data_ptr<scalar_t>(),
                           x.data_ptr<scalar_t>(), x.stride(0), y.data_ptr<scalar_t>(),
                           y.stride(0), n_cols, n_rows, x.size(1));
    } else {
      csr_matmul<scalar_t>(rowptr.data_ptr<int32_t>(), col.data_ptr<int32_t>(), nullptr,
                           vals.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), x.stride(0),
                           y.data_ptr<scalar_t>(), y.stride(0), n_rows, n_cols, x.size(1));
    }
  });
}

}  // namespace cpu
}  // namespace sparsekern
