// Torch binding of the CUDA kernels: spmm, spmm_blocked, sddmm, mlp_fwd, mlp_bwd
// with the signatures of sparsekern/ref.py (the "cuda" backend of sparsekern.ops).
// The kernels are reached through their C ABI (sparsekern_cuda.h) only.
//
// Dense products go to cuBLAS (at::mm) with TF32 switched off for the call
// unless allow_tf32 is passed: adaptive ODE solvers need exact fp32 products.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include <tuple>
#include <vector>

#include "../common/mlp_program.h"
#include "sparsekern_cuda.h"

namespace {

using at::Tensor;

void check(int code, const char* what) {
  TORCH_CHECK(code == 0, "sparsekern cuda backend: ", what, " failed: ", sk_error_string(code));
}

void* stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

// Data pointer, or NULL for an undefined or empty tensor (optional C ABI arguments).
template <typename T>
T* ptr(const Tensor& t) {
  return t.defined() && t.numel() ? t.data_ptr<T>() : nullptr;
}

const int32_t* iptr(const Tensor& t) { return ptr<int32_t>(t); }

void check_index(const Tensor& t, const char* name, const Tensor& like) {
  TORCH_CHECK(t.scalar_type() == at::kInt && t.dim() == 1 && t.is_contiguous(),
              "sparsekern cuda backend: CSR ", name, " must be a contiguous 1-D int32 tensor, got ",
              t.scalar_type(), " of shape ", t.sizes());
  TORCH_CHECK(t.device() == like.device(), "sparsekern cuda backend: ", name, " is on ",
              t.device(), ", the data on ", like.device());
}

void check_float(const Tensor& t, const char* name, const Tensor& like) {
  TORCH_CHECK(t.is_cuda(), "sparsekern cuda backend: ", name, " must be a CUDA tensor, got ",
              t.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble,
              "sparsekern cuda backend supports float32 and float64; ", name, " is ",
              t.scalar_type());
  TORCH_CHECK(t.scalar_type() == like.scalar_type() && t.device() == like.device(),
              "sparsekern cuda backend: ", name, " is ", t.scalar_type(), " on ", t.device(),
              ", expected ", like.scalar_type(), " on ", like.device());
}

// Rows by decreasing nnz (stable): the order the SpMM/SDDMM kernels hand rows to
// warps, so that warps of a block get rows of similar length, longest first.
Tensor row_order(const Tensor& rowptr) {
  const int64_t n = rowptr.numel() - 1;
  const Tensor counts = rowptr.narrow(0, 1, n) - rowptr.narrow(0, 0, n);
  return at::argsort(counts, /*stable=*/true, /*dim=*/0, /*descending=*/true).to(at::kInt);
}

// y = A x for a CSR A (rowptr, col; values vals[vperm[k]] or vals[k]). x and y
// may be column slices (unit column stride).
void csr_matmul(const Tensor& rowptr, const Tensor& col, const Tensor* vperm, const Tensor& vals,
                const Tensor& x, Tensor& y) {
  TORCH_INTERNAL_ASSERT(x.size(1) <= 1 || (x.stride(1) == 1 && y.stride(1) == 1));
  const Tensor order = row_order(rowptr);
  const int64_t n_rows = rowptr.numel() - 1, N = x.size(1);
  const int32_t* vp = vperm ? iptr(*vperm) : nullptr;
  if (x.scalar_type() == at::kFloat) {
    check(sk_csr_spmm_f32(iptr(rowptr), iptr(col), vp, iptr(order), ptr<float>(vals),
                          ptr<float>(x), x.stride(0), ptr<float>(y), y.stride(0), n_rows, N,
                          stream()),
          "spmm");
  } else {
    check(sk_csr_spmm_f64(iptr(rowptr), iptr(col), vp, iptr(order), ptr<double>(vals),
                          ptr<double>(x), x.stride(0), ptr<double>(y), y.stride(0), n_rows, N,
                          stream()),
          "spmm");
  }
}

// The zero-filled block storage [n_blocks, SK_BLOCK_ROWS] of CSR values:
// bvals[bslot[k]] = vals[k].
Tensor block_values(const Tensor& vals, const Tensor& bcol, const Tensor& bslot) {
  Tensor bvals = at::zeros({bcol.numel() * SK_BLOCK_ROWS}, vals.options());
  bvals.index_put_({bslot.to(at::kLong)}, vals);
  return bvals;
}

// y = W x for W in the blocked layout (bptr, bcol, bslot over the CSR values vals).
void blocked_matmul(const Tensor& bptr, const Tensor& bcol, const Tensor& bslot,
                    const Tensor& vals, const Tensor& x, Tensor& y) {
  TORCH_INTERNAL_ASSERT(x.size(1) <= 1 || (x.stride(1) == 1 && y.stride(1) == 1));
  const Tensor bvals = block_values(vals, bcol, bslot), order = row_order(bptr);
  const int64_t n_rows = y.size(0), N = x.size(1);
  if (x.scalar_type() == at::kFloat) {
    check(sk_blocked_spmm_f32(iptr(bptr), iptr(bcol), iptr(order), ptr<float>(bvals),
                              ptr<float>(x), x.stride(0), ptr<float>(y), y.stride(0), n_rows, N,
                              stream()),
          "spmm_blocked");
  } else {
    check(sk_blocked_spmm_f64(iptr(bptr), iptr(bcol), iptr(order), ptr<double>(bvals),
                              ptr<double>(x), x.stride(0), ptr<double>(y), y.stride(0), n_rows, N,
                              stream()),
          "spmm_blocked");
  }
}

Tensor sddmm_impl(const Tensor& rowptr, const Tensor& col, const Tensor& a, const Tensor& b) {
  Tensor out = at::zeros({col.numel()}, a.options());
  if (col.numel() == 0) return out;
  const Tensor ac = a.contiguous(), bc = b.contiguous(), order = row_order(rowptr);
  const int64_t n_rows = rowptr.numel() - 1, N = a.size(1);
  if (a.scalar_type() == at::kFloat) {
    check(sk_csr_sddmm_f32(iptr(rowptr), iptr(col), iptr(order), ptr<float>(ac), ac.stride(0),
                           ptr<float>(bc), bc.stride(0), ptr<float>(out), n_rows, N, stream()),
          "sddmm");
  } else {
    check(sk_csr_sddmm_f64(iptr(rowptr), iptr(col), iptr(order), ptr<double>(ac), ac.stride(0),
                           ptr<double>(bc), bc.stride(0), ptr<double>(out), n_rows, N, stream()),
          "sddmm");
  }
  return out;
}

// TF32 off (or on, if asked) for the cuBLAS calls in scope; restored after.
class CublasFp32 {
 public:
  explicit CublasFp32(bool allow_tf32)
      : before_(at::globalContext().allowTF32CuBLAS()), allow_(allow_tf32) {
    if (before_ != allow_) at::globalContext().setAllowTF32CuBLAS(allow_);
  }
  ~CublasFp32() {
    if (before_ != allow_) at::globalContext().setAllowTF32CuBLAS(before_);
  }
  CublasFp32(const CublasFp32&) = delete;
  CublasFp32& operator=(const CublasFp32&) = delete;

 private:
  bool before_, allow_;
};

using sparsekern::Layer;

constexpr const char* kWho = "sparsekern cuda backend";

// The shared structural parse, then what this backend needs: CUDA tensors of the
// input's dtype, contiguous values.
std::vector<Layer> parse_layers(const std::vector<Tensor>& weights,
                                const std::vector<int64_t>& layouts, const Tensor& x0) {
  std::vector<Layer> layers = sparsekern::parse_layers(weights, layouts, x0.size(0), kWho);
  const char* names[] = {"rowptr", "col", "rowptr_t", "col_t", "perm", "", "bptr", "bcol",
                         "bslot"};
  for (Layer& layer : layers) {
    check_float(layer.values(), "layer weights", x0);
    layer.values() = layer.values().contiguous();
    if (layer.sparse()) {
      for (size_t k = 0; k < layer.t.size(); ++k) {
        if (k != 5) check_index(layer.t[k], names[k], x0);
      }
    }
  }
  return layers;
}

void check_vectors(const std::vector<Tensor>& v, const std::vector<Layer>& layers,
                   const char* what, bool allow_empty, const Tensor& x0) {
  sparsekern::check_vectors(v, layers, what, allow_empty, kWho);
  for (const Tensor& t : v) {
    if (t.numel()) check_float(t, what, x0);
  }
}

Tensor stack_columns(const Tensor& x0, const Tensor& tan0) {
  if (tan0.size(0) == 0) return x0.contiguous();
  return at::cat({x0, tan0.permute({1, 0, 2}).reshape({x0.size(0), -1})}, 1).contiguous();
}

// y = W x (or W^T x) for one layer, into y (unit column stride).
void layer_matmul(const Layer& layer, const Tensor& x, Tensor& y, bool transpose) {
  if (!layer.sparse()) {
    at::mm_out(y, transpose ? layer.t[0].t() : layer.t[0], x);
    return;
  }
  if (layer.blocked() && !transpose) {
    blocked_matmul(layer.t[6], layer.t[7], layer.t[8], layer.values(), x, y);
  } else if (transpose) {
    csr_matmul(layer.t[2], layer.t[3], &layer.t[4], layer.values(), x, y);
  } else {
    csr_matmul(layer.t[0], layer.t[1], nullptr, layer.values(), x, y);
  }
}

bool fused_takes(const std::vector<Layer>& layers, const Tensor& x0) {
  if (layers.size() > SK_MAX_LAYERS || x0.size(0) > SK_FUSED_MAX_WIDTH) return false;
  for (const Layer& l : layers) {
    if (l.sparse() || l.n_out > SK_FUSED_MAX_WIDTH) return false;
  }
  return true;
}

}  // namespace

Tensor spmm(const Tensor& rowptr, const Tensor& col, const Tensor& rowptr_t, const Tensor& col_t,
            const Tensor& perm, const Tensor& vals, const Tensor& x, bool transpose) {
  check_float(x, "x", x);
  check_float(vals, "vals", x);
  check_index(rowptr, "rowptr", x);
  check_index(col, "col", x);
  check_index(rowptr_t, "rowptr_t", x);
  check_index(col_t, "col_t", x);
  check_index(perm, "perm", x);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t n_rows = rowptr.numel() - 1, n_cols = rowptr_t.numel() - 1;
  const int64_t n_in = transpose ? n_rows : n_cols, n_out = transpose ? n_cols : n_rows;
  TORCH_CHECK(x.dim() == 2 && x.size(0) == n_in, "sparsekern::spmm: x must be [", n_in,
              ", N], got ", x.sizes());
  TORCH_CHECK(vals.numel() == col.numel(), "sparsekern::spmm: vals has ", vals.numel(),
              " entries, the pattern ", col.numel());
  const Tensor xc = x.contiguous(), v = vals.contiguous();
  Tensor y = at::empty({n_out, x.size(1)}, x.options());
  if (transpose) {
    csr_matmul(rowptr_t, col_t, &perm, v, xc, y);
  } else {
    csr_matmul(rowptr, col, nullptr, v, xc, y);
  }
  return y;
}

Tensor spmm_blocked(const Tensor& rowptr, const Tensor& col, const Tensor& rowptr_t,
                    const Tensor& col_t, const Tensor& perm, const Tensor& vals, const Tensor& bptr,
                    const Tensor& bcol, const Tensor& bslot, const Tensor& x) {
  check_float(x, "x", x);
  check_float(vals, "vals", x);
  check_index(rowptr, "rowptr", x);
  check_index(col, "col", x);
  check_index(rowptr_t, "rowptr_t", x);
  check_index(col_t, "col_t", x);
  check_index(perm, "perm", x);
  check_index(bptr, "bptr", x);
  check_index(bcol, "bcol", x);
  check_index(bslot, "bslot", x);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t n_rows = rowptr.numel() - 1, n_cols = rowptr_t.numel() - 1;
  TORCH_CHECK(x.dim() == 2 && x.size(0) == n_cols, "sparsekern::spmm_blocked: x must be [",
              n_cols, ", N], got ", x.sizes());
  TORCH_CHECK(vals.numel() == col.numel() && bslot.numel() == col.numel(),
              "sparsekern::spmm_blocked: vals and bslot need the pattern's ", col.numel(),
              " entries, got ", vals.numel(), " and ", bslot.numel());
  TORCH_CHECK(bptr.numel() == (n_rows + SK_BLOCK_ROWS - 1) / SK_BLOCK_ROWS + 1,
              "sparsekern::spmm_blocked: bptr has ", bptr.numel(), " entries for ", n_rows,
              " rows in groups of ", SK_BLOCK_ROWS);
  Tensor y = at::empty({n_rows, x.size(1)}, x.options());
  blocked_matmul(bptr, bcol, bslot, vals.contiguous(), x.contiguous(), y);
  return y;
}

Tensor sddmm(const Tensor& rowptr, const Tensor& col, const Tensor& a, const Tensor& b) {
  check_float(a, "a", a);
  check_float(b, "b", a);
  check_index(rowptr, "rowptr", a);
  check_index(col, "col", a);
  TORCH_CHECK(a.dim() == 2 && b.dim() == 2 && a.size(1) == b.size(1),
              "sparsekern::sddmm: a [R, N] and b [C, N] must share N, got ", a.sizes(), " and ",
              b.sizes());
  TORCH_CHECK(a.size(0) == rowptr.numel() - 1, "sparsekern::sddmm: a has ", a.size(0),
              " rows, the pattern ", rowptr.numel() - 1);
  const c10::cuda::CUDAGuard guard(a.device());
  return sddmm_impl(rowptr, col, a, b);
}

std::tuple<Tensor, Tensor, std::vector<Tensor>> mlp_fwd(
    const Tensor& x0, const Tensor& tan0, const Tensor& probe, const std::vector<Tensor>& weights,
    const std::vector<Tensor>& scales, const std::vector<Tensor>& shifts,
    const std::vector<int64_t>& layouts, int64_t act, bool exact, bool save, bool allow_tf32) {
  check_float(x0, "x0", x0);
  TORCH_CHECK(x0.dim() == 2, "sparsekern::mlp_fwd: x0 must be [n0, B], got ", x0.sizes());
  TORCH_CHECK(tan0.dim() == 3 && tan0.size(1) == x0.size(0) && tan0.size(2) == x0.size(1),
              "sparsekern::mlp_fwd: tan0 must be [K, ", x0.size(0), ", ", x0.size(1), "], got ",
              tan0.sizes());
  TORCH_CHECK(act >= 0 && act <= 6, "sparsekern::mlp_fwd: unknown activation id ", act,
              " (sparsekern/activations.py ACT_IDS)");
  const c10::cuda::CUDAGuard guard(x0.device());
  const CublasFp32 precision(allow_tf32);
  const auto layers = parse_layers(weights, layouts, x0);
  check_vectors(scales, layers, "scale", true, x0);
  check_vectors(shifts, layers, "shift", false, x0);
  const int64_t B = x0.size(1), K = tan0.size(0), d = layers.back().n_out, L = layers.size();
  TORCH_CHECK(!exact || K == d, "sparsekern::mlp_fwd: the exact trace needs K = d = ", d,
              " unit tangents, got K = ", K);
  TORCH_CHECK(exact || K == 0 || (probe.dim() == 3 && probe.size(0) == K && probe.size(1) == d &&
                                  probe.size(2) == B),
              "sparsekern::mlp_fwd: probe must be [", K, ", ", d, ", ", B, "], got ",
              probe.sizes());
  const Tensor pc = (K > 0 && !exact) ? probe.contiguous() : Tensor();
  const Tensor x = stack_columns(x0, tan0);
  const int64_t cols = x.size(1);
  Tensor f = at::empty({d, B}, x0.options()), div = at::zeros({B}, x0.options());
  std::vector<Tensor> saved_m, saved_x;
  if (save) {
    for (const Layer& l : layers) saved_m.push_back(at::empty({l.n_out, cols}, x0.options()));
    for (int64_t l = 0; l + 1 < L; ++l) {
      saved_x.push_back(at::empty({layers[l].n_out, cols}, x0.options()));
    }
  }
  const bool f32 = x0.scalar_type() == at::kFloat;
  if (fused_takes(layers, x0) && B > 0) {
    sk_mlp_program prog{};
    prog.n_layers = static_cast<int32_t>(L);
    prog.widths[0] = static_cast<int32_t>(x0.size(0));
    std::vector<Tensor> keep;  // contiguous copies stay alive until the launch is queued
    for (int64_t l = 0; l < L; ++l) {
      keep.push_back(layers[l].t[0].contiguous());
      prog.widths[l + 1] = static_cast<int32_t>(layers[l].n_out);
      prog.weight[l] = keep.back().data_ptr();
      prog.scale[l] = scales[l].numel() ? scales[l].data_ptr() : nullptr;
      prog.shift[l] = shifts[l].data_ptr();
      prog.m_out[l] = save ? saved_m[l].data_ptr() : nullptr;
      prog.x_out[l] = save && l + 1 < L ? saved_x[l].data_ptr() : nullptr;
    }
    const int rc = f32 ? sk_fused_mlp_fwd_f32(&prog, ptr<float>(x), ptr<float>(pc),
                                              ptr<float>(f), ptr<float>(div), B, K, int(act),
                                              exact, stream())
                       : sk_fused_mlp_fwd_f64(&prog, ptr<double>(x), ptr<double>(pc),
                                              ptr<double>(f), ptr<double>(div), B, K, int(act),
                                              exact, stream());
    if (rc != SK_ERR_UNSUPPORTED) {
      check(rc, "fused mlp_fwd");
      saved_m.insert(saved_m.end(), saved_x.begin(), saved_x.end());
      return {f, div, saved_m};
    }
  }
  // Per layer: product, then the epilogue kernel (in place into M without save).
  Tensor cur = x;
  for (int64_t l = 0; l < L; ++l) {
    const Layer& layer = layers[l];
    Tensor m = save ? saved_m[l] : at::empty({layer.n_out, cols}, x0.options());
    layer_matmul(layer, cur, m, false);
    const bool last = l + 1 == L;
    if (last) {
      check(f32 ? sk_mlp_head_fwd_f32(ptr<float>(m), ptr<float>(f), ptr<float>(div),
                                      ptr<float>(pc), ptr<float>(scales[l]),
                                      ptr<float>(shifts[l]), d, B, K, exact, stream())
                : sk_mlp_head_fwd_f64(ptr<double>(m), ptr<double>(f), ptr<double>(div),
                                      ptr<double>(pc), ptr<double>(scales[l]),
                                      ptr<double>(shifts[l]), d, B, K, exact, stream()),
            "mlp head");
    } else {
      Tensor out = save ? saved_x[l] : m;
      check(f32 ? sk_mlp_epilogue_fwd_f32(ptr<float>(m), ptr<float>(out), ptr<float>(scales[l]),
                                          ptr<float>(shifts[l]), layer.n_out, B, K, int(act),
                                          stream())
                : sk_mlp_epilogue_fwd_f64(ptr<double>(m), ptr<double>(out),
                                          ptr<double>(scales[l]), ptr<double>(shifts[l]),
                                          layer.n_out, B, K, int(act), stream()),
            "mlp epilogue");
      cur = out;
    }
  }
  saved_m.insert(saved_m.end(), saved_x.begin(), saved_x.end());
  return {f, div, saved_m};
}

std::tuple<Tensor, std::vector<Tensor>, std::vector<Tensor>, std::vector<Tensor>> mlp_bwd(
    const Tensor& grad_f, const Tensor& grad_div, const Tensor& x0, const Tensor& tan0,
    const Tensor& probe, const std::vector<Tensor>& weights, const std::vector<Tensor>& scales,
    const std::vector<Tensor>& shifts, const std::vector<int64_t>& layouts, int64_t act,
    bool exact, const std::vector<Tensor>& saved, bool allow_tf32) {
  check_float(x0, "x0", x0);
  TORCH_CHECK(act >= 0 && act <= 6, "sparsekern::mlp_bwd: unknown activation id ", act,
              " (sparsekern/activations.py ACT_IDS)");
  const c10::cuda::CUDAGuard guard(x0.device());
  const CublasFp32 precision(allow_tf32);
  const auto layers = parse_layers(weights, layouts, x0);
  const int64_t L = layers.size();
  check_vectors(scales, layers, "scale", true, x0);
  check_vectors(shifts, layers, "shift", false, x0);
  TORCH_CHECK(static_cast<int64_t>(saved.size()) == 2 * L - 1, "sparsekern::mlp_bwd: expected ",
              2 * L - 1, " saved tensors (mlp_fwd with save=True), got ", saved.size());
  const int64_t B = x0.size(1), K = tan0.size(0), d = layers.back().n_out, cols = (1 + K) * B;
  TORCH_CHECK(grad_f.dim() == 2 && grad_f.size(0) == d && grad_f.size(1) == B &&
                  grad_div.dim() == 1 && grad_div.size(0) == B,
              "sparsekern::mlp_bwd: grad_f must be [", d, ", ", B, "] and grad_div [", B, "]");
  check_float(grad_f, "grad_f", x0);
  check_float(grad_div, "grad_div", x0);
  for (const Tensor& t : saved) check_float(t, "saved", x0);
  const Tensor gf = grad_f.contiguous(), gd = grad_div.contiguous();
  const Tensor pc = (K > 0 && !exact) ? probe.contiguous() : Tensor();
  const bool f32 = x0.scalar_type() == at::kFloat;
  std::vector<Tensor> g_w(L), g_scale(L), g_shift(L);
  Tensor xbar, grad_x0;
  for (int64_t l = L - 1; l >= 0; --l) {
    const Layer& layer = layers[l];
    const bool last = l + 1 == L;
    const Tensor m = saved[l].contiguous();
    TORCH_CHECK(m.size(0) == layer.n_out && m.size(1) == cols, "sparsekern::mlp_bwd: saved[", l,
                "] has shape ", m.sizes(), ", expected [", layer.n_out, ", ", cols, "]");
    // The epilogue reads each xbar element before writing mbar there: in place.
    Tensor mbar = last ? at::empty({layer.n_out, cols}, x0.options()) : xbar;
    g_shift[l] = at::empty({layer.n_out}, x0.options());
    g_scale[l] = at::empty({scales[l].numel() ? layer.n_out : 0}, x0.options());
    check(f32 ? sk_mlp_epilogue_bwd_f32(ptr<float>(m), last ? nullptr : ptr<float>(xbar),
                                        ptr<float>(gf), ptr<float>(gd), ptr<float>(pc),
                                        ptr<float>(mbar), ptr<float>(scales[l]),
                                        ptr<float>(shifts[l]), ptr<float>(g_scale[l]),
                                        ptr<float>(g_shift[l]), layer.n_out, B, K, int(act), last,
                                        exact, stream())
              : sk_mlp_epilogue_bwd_f64(ptr<double>(m), last ? nullptr : ptr<double>(xbar),
                                        ptr<double>(gf), ptr<double>(gd), ptr<double>(pc),
                                        ptr<double>(mbar), ptr<double>(scales[l]),
                                        ptr<double>(shifts[l]), ptr<double>(g_scale[l]),
                                        ptr<double>(g_shift[l]), layer.n_out, B, K, int(act),
                                        last, exact, stream()),
          "mlp epilogue backward");
    const Tensor x_in = l == 0 ? stack_columns(x0, tan0) : saved[L + l - 1].contiguous();
    if (layer.sparse()) {
      g_w[l] = sddmm_impl(layer.t[0], layer.t[1], mbar, x_in);
    } else {
      g_w[l] = at::mm(mbar, x_in.t());
    }
    // The first layer's tangent inputs are constants: only the state columns.
    const Tensor src = l == 0 ? mbar.narrow(1, 0, B) : mbar;
    Tensor next = at::empty({layer.n_in, src.size(1)}, x0.options());
    layer_matmul(layer, src, next, true);
    if (l == 0) {
      grad_x0 = next;
    } else {
      xbar = next;
    }
  }
  return {grad_x0, g_w, g_scale, g_shift};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "sparsekern CUDA kernels (csrc/cuda); semantics: sparsekern/ref.py";
  m.def("spmm", &spmm, "W x or W^T x for W in CSR", py::arg("rowptr"), py::arg("col"),
        py::arg("rowptr_t"), py::arg("col_t"), py::arg("perm"), py::arg("vals"), py::arg("x"),
        py::arg("transpose"));
  m.def("spmm_blocked", &spmm_blocked, "W x for W in the blocked layout", py::arg("rowptr"),
        py::arg("col"), py::arg("rowptr_t"), py::arg("col_t"), py::arg("perm"), py::arg("vals"),
        py::arg("bptr"), py::arg("bcol"), py::arg("bslot"), py::arg("x"));
  m.def("sddmm", &sddmm, "(a b^T) at the kept places", py::arg("rowptr"), py::arg("col"),
        py::arg("a"), py::arg("b"));
  m.def("mlp_fwd", &mlp_fwd, "fused MLP forward + JVP", py::arg("x0"), py::arg("tan0"),
        py::arg("probe"), py::arg("weights"), py::arg("scales"), py::arg("shifts"),
        py::arg("layouts"), py::arg("act"), py::arg("exact"), py::arg("save"),
        py::arg("allow_tf32") = false);
  m.def("mlp_bwd", &mlp_bwd, "reverse mode of mlp_fwd", py::arg("grad_f"), py::arg("grad_div"),
        py::arg("x0"), py::arg("tan0"), py::arg("probe"), py::arg("weights"), py::arg("scales"),
        py::arg("shifts"), py::arg("layouts"), py::arg("act"), py::arg("exact"), py::arg("saved"),
        py::arg("allow_tf32") = false);
}
