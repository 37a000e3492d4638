// Torch binding of the CUDA kernels: spmm, spmm_blocked, sddmm, conv2d, conv2d_t,
// conv2d_wgrad, mlp_fwd, mlp_bwd with the signatures of sparsekern/ref.py (the "cuda"
// backend of sparsekern.ops).
// The kernels are reached through their C ABI (sparsekern_cuda.h) only.
//
// Dense products go to cuBLAS (at::mm) with TF32 switched off for the call
// unless allow_tf32 is passed: adaptive ODE solvers need exact fp32 products.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include <algorithm>
#include <tuple>
#include <utility>
#include <vector>

#include "../common/mlp_loop.h"
#include "../common/sparse_ops.h"
#include "sparsekern_cuda.h"

namespace {

using at::Tensor;

void check(int code, const char* what) {
  TORCH_CHECK(code == 0, "sparsekern cuda backend: ", what, " failed: ", sk_error_string(code));
}

void* stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

// Data pointer, or NULL for an undefined or empty tensor (optional C ABI arguments).
void* ptr(const Tensor& t) { return t.defined() && t.numel() ? t.data_ptr() : nullptr; }

const int32_t* iptr(const Tensor& t) {
  return t.defined() && t.numel() ? t.data_ptr<int32_t>() : nullptr;
}

// The C ABI's name for a float32 or float64 tensor's element type.
sk_dtype dtype_of(const Tensor& t) {
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble,
              "sparsekern cuda backend supports float32 and float64, got ", t.scalar_type());
  return t.scalar_type() == at::kFloat ? SK_FLOAT32 : SK_FLOAT64;
}

// The device type; dtypes and devices beyond it are the shared checks'.
void check_cuda(const Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), "sparsekern cuda backend: ", name, " must be a CUDA tensor, got ",
              t.device());
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
  check(sk_csr_spmm(dtype_of(x), iptr(rowptr), iptr(col), vperm ? iptr(*vperm) : nullptr,
                    iptr(row_order(rowptr)), ptr(vals), ptr(x), x.stride(0), ptr(y), y.stride(0),
                    rowptr.numel() - 1, x.size(1), stream()),
        "spmm");
}

static_assert(SK_BLOCK_ROWS == sparsekern::kBlockRows, "one blocked layout for both backends");

// y = W x for W in the blocked layout (bptr, bcol, bslot over the CSR values).
void blocked_matmul(const sparsekern::Layer& layer, const Tensor& x, Tensor& y) {
  TORCH_INTERNAL_ASSERT(x.size(1) <= 1 || (x.stride(1) == 1 && y.stride(1) == 1));
  const Tensor bvals = sparsekern::block_values(layer);
  check(sk_blocked_spmm(dtype_of(x), iptr(layer.bptr()), iptr(layer.bcol()),
                        iptr(row_order(layer.bptr())), ptr(bvals), ptr(x), x.stride(0), ptr(y),
                        y.stride(0), y.size(0), x.size(1), stream()),
        "spmm_blocked");
}

Tensor sddmm_impl(const Tensor& rowptr, const Tensor& col, const Tensor& a, const Tensor& b) {
  Tensor out = at::zeros({col.numel()}, a.options());
  if (col.numel() == 0) return out;
  const Tensor ac = a.contiguous(), bc = b.contiguous();
  check(sk_csr_sddmm(dtype_of(a), iptr(rowptr), iptr(col), iptr(row_order(rowptr)), ptr(ac),
                     ac.stride(0), ptr(bc), bc.stride(0), ptr(out), rowptr.numel() - 1, a.size(1),
                     stream()),
        "sddmm");
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

bool fused_takes(const std::vector<Layer>& layers, const Tensor& x0) {
  if (layers.size() > SK_MAX_LAYERS || x0.size(0) > SK_FUSED_MAX_WIDTH) return false;
  for (const Layer& l : layers) {
    if (l.sparse() || l.n_out > SK_FUSED_MAX_WIDTH) return false;
  }
  return true;
}

// The CUDA products of the shared loops and single ops (csrc/common/mlp_loop.h,
// sparse_ops.h): cuBLAS for dense products, the C ABI's kernels for the rest.
struct CudaProducts {
  void dense_product(const Tensor& w, const Tensor& x, Tensor& y, bool transpose) {
    at::mm_out(y, transpose ? w.t() : w, x);
  }
  void csr_product(const Tensor& rowptr, const Tensor& col, const Tensor* perm, const Tensor& vals,
                   const Tensor& x, Tensor& y) {
    csr_matmul(rowptr, col, perm, vals, x, y);
  }
  void blocked_product(const Layer& layer, const Tensor& x, Tensor& y) {
    blocked_matmul(layer, x, y);
  }
  Tensor sddmm(const Tensor& rowptr, const Tensor& col, const Tensor& a, const Tensor& b) {
    return sddmm_impl(rowptr, col, a, b);
  }
};

// The CUDA program primitives of the shared layer loops: the products, the
// epilogue kernels, and the fused kernel for small dense programs.
struct CudaProgram : sparsekern::ProgramState, CudaProducts {
  sk_dtype dtype;
  // Forward: f, div, and the saved buffers (allocated ahead for the fused kernel).
  Tensor f, div;
  std::vector<Tensor> saved_m, saved_x;
  // Backward: the cotangents, contiguous.
  Tensor grad_f, grad_div;

  void allocate_fwd() {
    f = at::empty({dims.d, dims.B}, opt);
    div = at::zeros({dims.B}, opt);
    if (!save) return;
    for (size_t l = 0; l < layers.size(); ++l) {
      saved_m.push_back(at::empty({layers[l].n_out, dims.cols}, opt));
      if (l + 1 < layers.size()) saved_x.push_back(at::empty({layers[l].n_out, dims.cols}, opt));
    }
  }

  // The whole program in one launch where the fused kernel takes it; false where
  // it does not (the per-layer loop runs instead).
  bool fused_fwd(const Tensor& x0s) {
    if (!fused_takes(layers, x0s) || dims.B == 0) return false;
    sk_mlp_program prog{};
    prog.n_layers = static_cast<int32_t>(layers.size());
    prog.widths[0] = static_cast<int32_t>(x0s.size(0));
    for (size_t l = 0; l < layers.size(); ++l) {
      prog.widths[l + 1] = static_cast<int32_t>(layers[l].n_out);
      prog.weight[l] = layers[l].values().data_ptr();
      prog.scale[l] = ptr(scales[l]);
      prog.shift[l] = shifts[l].data_ptr();
      prog.m_out[l] = save ? saved_m[l].data_ptr() : nullptr;
      prog.x_out[l] = save && l + 1 < layers.size() ? saved_x[l].data_ptr() : nullptr;
    }
    const int rc = sk_fused_mlp_fwd(dtype, &prog, ptr(x0s), ptr(probe), ptr(f), ptr(div), dims.B,
                                    dims.K, int(act), exact, stream());
    if (rc == SK_ERR_UNSUPPORTED) return false;
    check(rc, "fused mlp_fwd");
    return true;
  }

  // Without save, the epilogue overwrites M in place.
  std::pair<Tensor, Tensor> fwd_buffers(size_t l, bool last) {
    Tensor m = save ? saved_m[l] : at::empty({layers[l].n_out, dims.cols}, opt);
    return {m, save && !last ? saved_x[l] : m};
  }

  void epilogue_fwd(size_t l, bool last, const Tensor& m, Tensor& out) {
    if (last) {
      check(sk_mlp_head_fwd(dtype, ptr(m), ptr(f), ptr(div), ptr(probe), ptr(scales[l]),
                            ptr(shifts[l]), dims.d, dims.B, dims.K, exact, stream()),
            "mlp head");
    } else {
      check(sk_mlp_epilogue_fwd(dtype, ptr(m), ptr(out), ptr(scales[l]), ptr(shifts[l]),
                                layers[l].n_out, dims.B, dims.K, int(act), stream()),
            "mlp epilogue");
    }
  }

  std::pair<Tensor, Tensor> finish_fwd(const Tensor& /*x_last*/) { return {f, div}; }

  // The last layer's epilogue reads grad_f and grad_div itself.
  Tensor seed_bwd() { return Tensor(); }

  // In place (mbar over xbar) but on the last layer, which has no xbar.
  Tensor epilogue_bwd(size_t l, bool last, const Tensor& m, Tensor& xbar, Tensor& g_scale,
                      Tensor& g_shift) {
    Tensor mbar = last ? at::empty({layers[l].n_out, dims.cols}, opt) : xbar;
    check(sk_mlp_epilogue_bwd(dtype, ptr(m), last ? nullptr : ptr(xbar), ptr(grad_f),
                              ptr(grad_div), ptr(probe), ptr(mbar), ptr(scales[l]),
                              ptr(shifts[l]), ptr(g_scale), ptr(g_shift), layers[l].n_out,
                              dims.B, dims.K, int(act), last, exact, stream()),
          "mlp epilogue backward");
    return mbar;
  }
};

// ------------------------------------------------------------ convolutions
//
// The pruned convolution weight [C_out, C_in, kh, kw] as the CSR matrix
// [C_out, C_in kh kw] (column ci kh kw + ky kw + kx is one tap); maps are
// feature-major [C, N, H, W] (sparsekern/ops.py conv2d).

constexpr int64_t kConvChannelLimit = int64_t(1) << 31;

// Checks the pattern against `like` (the data's device) and the convolution's
// parameters; returns the C ABI shape (N, H, W left to the caller).
sk_conv_shape conv_pattern(const Tensor& rowptr, const Tensor& col, const Tensor& rowptr_t,
                           const Tensor& col_t, const Tensor& perm, int64_t kh, int64_t kw,
                           int64_t stride, int64_t padding, const Tensor& like, const char* op) {
  TORCH_CHECK(kh >= 1 && kw >= 1, op, ": kernel size must be >= 1, got ", kh, " x ", kw);
  TORCH_CHECK(stride >= 1, op, ": stride must be >= 1, got ", stride);
  TORCH_CHECK(padding >= 0, op, ": padding must be >= 0, got ", padding);
  TORCH_CHECK(kh < kConvChannelLimit && kw < kConvChannelLimit &&
                  kh * kw < kConvChannelLimit && stride < kConvChannelLimit &&
                  padding < kConvChannelLimit,
              op, ": kernel ", kh, " x ", kw, ", stride ", stride, " and padding ", padding,
              " do not fit the kernels' int32 sizes");
  for (const auto& [t, name] : {std::pair{&rowptr, "rowptr"}, std::pair{&col, "col"},
                                std::pair{&rowptr_t, "rowptr_t"}, std::pair{&col_t, "col_t"},
                                std::pair{&perm, "perm"}}) {
    TORCH_CHECK(t->scalar_type() == at::kInt && t->dim() == 1 && t->is_contiguous() &&
                    t->device() == like.device(),
                op, ": ", name, " must be a contiguous 1-D int32 tensor on ", like.device(),
                ", got ", t->scalar_type(), " of shape ", t->sizes(), " on ", t->device());
  }
  TORCH_CHECK(rowptr.numel() >= 1 && rowptr_t.numel() >= 1, op,
              ": rowptr and rowptr_t need at least one entry");
  const int64_t nnz = col.numel();
  TORCH_CHECK(col_t.numel() == nnz && perm.numel() == nnz, op,
              ": col, col_t and perm must have one entry per kept tap, got ", nnz, ", ",
              col_t.numel(), " and ", perm.numel());
  const int64_t taps = rowptr_t.numel() - 1;
  TORCH_CHECK(taps % (kh * kw) == 0, op, ": rowptr_t has ", rowptr_t.numel(),
              " entries, expected C_in * ", kh, " * ", kw, " + 1 (one column per tap)");
  sk_conv_shape s{};
  s.c_out = rowptr.numel() - 1;
  s.c_in = taps / (kh * kw);
  s.kh = kh, s.kw = kw, s.stride = stride, s.padding = padding;
  return s;
}

// A float32/float64 [C, N, H, W] map of `like`'s dtype and device.
void check_map(const Tensor& t, const char* name, const Tensor& like, const char* op) {
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, kWho,
              " supports float32 and float64; ", name, " is ", t.scalar_type());
  TORCH_CHECK(t.scalar_type() == like.scalar_type() && t.device() == like.device(), op, ": ",
              name, " has dtype ", t.scalar_type(), " on ", t.device(), ", expected ",
              like.scalar_type(), " on ", like.device());
  TORCH_CHECK(t.dim() == 4, op, ": ", name, " must be 4-D [C, N, H, W] (feature-major), got ",
              t.sizes());
}

// Fills in N, H, W and checks the output size and the kernels' int32 positions;
// returns (Ho, Wo).
std::pair<int64_t, int64_t> conv_sizes(sk_conv_shape& s, int64_t n, int64_t h, int64_t w,
                                       const char* op) {
  s.N = n, s.H = h, s.W = w;
  TORCH_CHECK(h < kConvChannelLimit && w < kConvChannelLimit, op, ": a ", h, " x ", w,
              " map does not fit the kernels' int32 positions");
  // Python's floor division: the output size of sparsekern/ops.py, also when negative.
  const auto out = [&](int64_t size, int64_t k) {
    const int64_t span = size + 2 * s.padding - k;
    return (span >= 0 ? span / s.stride : -((-span + s.stride - 1) / s.stride)) + 1;
  };
  const int64_t ho = out(h, s.kh), wo = out(w, s.kw);
  TORCH_CHECK(ho >= 1 && wo >= 1, op, ": a ", h, " x ", w, " input with a ", s.kh, " x ", s.kw,
              " kernel, stride ", s.stride, " and padding ", s.padding, " has output size ", ho,
              " x ", wo, "; both must be >= 1");
  TORCH_CHECK(n * h * w < kConvChannelLimit && n * ho * wo < kConvChannelLimit, op,
              ": a channel of ", std::max(n * h * w, n * ho * wo),
              " values (N * H * W) does not fit the kernels' int32 positions");
  return {ho, wo};
}

void check_vals(const Tensor& vals, const Tensor& col, const Tensor& like, const char* op) {
  TORCH_CHECK(vals.scalar_type() == like.scalar_type() && vals.device() == like.device(), op,
              ": vals has dtype ", vals.scalar_type(), " on ", vals.device(), ", expected ",
              like.scalar_type(), " on ", like.device());
  TORCH_CHECK(vals.dim() == 1 && vals.numel() == col.numel(), op, ": vals must have shape [",
              col.numel(), "] (one value per kept tap), got ", vals.sizes());
}

}  // namespace

Tensor conv2d(const Tensor& rowptr, const Tensor& col, const Tensor& rowptr_t,
              const Tensor& col_t, const Tensor& perm, const Tensor& vals, const Tensor& x,
              int64_t c_out, int64_t kh, int64_t kw, int64_t stride, int64_t padding) {
  constexpr const char* kOp = "sparsekern::conv2d";
  check_cuda(x, "x");
  const c10::cuda::CUDAGuard guard(x.device());
  check_map(x, "x", x, kOp);
  sk_conv_shape s = conv_pattern(rowptr, col, rowptr_t, col_t, perm, kh, kw, stride, padding, x,
                                 kOp);
  TORCH_CHECK(s.c_out == c_out, kOp, ": rowptr has ", rowptr.numel(),
              " entries, expected C_out + 1 = ", c_out + 1);
  check_vals(vals, col, x, kOp);
  TORCH_CHECK(x.size(0) == s.c_in, kOp, ": x has ", x.size(0), " channels, the pattern ",
              s.c_in, " (rowptr_t over C_in * ", kh, " * ", kw, " taps)");
  const auto [ho, wo] = conv_sizes(s, x.size(1), x.size(2), x.size(3), kOp);
  const Tensor xc = x.contiguous(), vc = vals.contiguous();
  Tensor y = at::empty({c_out, x.size(1), ho, wo}, x.options());
  check(sk_conv2d(dtype_of(x), &s, iptr(rowptr), iptr(col), ptr(vc), ptr(xc), ptr(y), stream()),
        "conv2d");
  return y;
}

Tensor conv2d_t(const Tensor& rowptr, const Tensor& col, const Tensor& rowptr_t,
                const Tensor& col_t, const Tensor& perm, const Tensor& vals, const Tensor& g,
                int64_t c_in, int64_t h, int64_t w, int64_t kh, int64_t kw, int64_t stride,
                int64_t padding) {
  constexpr const char* kOp = "sparsekern::conv2d_t";
  check_cuda(g, "g");
  const c10::cuda::CUDAGuard guard(g.device());
  check_map(g, "g", g, kOp);
  sk_conv_shape s = conv_pattern(rowptr, col, rowptr_t, col_t, perm, kh, kw, stride, padding, g,
                                 kOp);
  TORCH_CHECK(s.c_in == c_in, kOp, ": rowptr_t has ", rowptr_t.numel(),
              " entries, expected C_in * ", kh, " * ", kw, " + 1 = ", c_in * kh * kw + 1);
  TORCH_CHECK(h >= 0 && w >= 0, kOp, ": the input size must be >= 0, got ", h, " x ", w);
  check_vals(vals, col, g, kOp);
  const int64_t n = g.size(1);
  const auto [ho, wo] = conv_sizes(s, n, h, w, kOp);
  TORCH_CHECK(g.size(0) == s.c_out && g.size(2) == ho && g.size(3) == wo, kOp, ": g has shape ",
              g.sizes(), ", expected [", s.c_out, ", ", n, ", ", ho, ", ", wo, "]");
  const Tensor gc = g.contiguous(), vc = vals.contiguous();
  Tensor gx = at::empty({c_in, n, h, w}, g.options());
  check(sk_conv2d_t(dtype_of(g), &s, iptr(rowptr_t), iptr(col_t), iptr(perm), ptr(vc), ptr(gc),
                    ptr(gx), stream()),
        "conv2d_t");
  return gx;
}

Tensor conv2d_wgrad(const Tensor& rowptr, const Tensor& col, const Tensor& rowptr_t,
                    const Tensor& col_t, const Tensor& perm, const Tensor& g, const Tensor& x,
                    int64_t kh, int64_t kw, int64_t stride, int64_t padding) {
  constexpr const char* kOp = "sparsekern::conv2d_wgrad";
  check_cuda(x, "x");
  const c10::cuda::CUDAGuard guard(x.device());
  check_map(x, "x", x, kOp);
  check_map(g, "g", x, kOp);
  sk_conv_shape s = conv_pattern(rowptr, col, rowptr_t, col_t, perm, kh, kw, stride, padding, x,
                                 kOp);
  TORCH_CHECK(x.size(0) == s.c_in, kOp, ": x has ", x.size(0), " channels, the pattern ",
              s.c_in, " (rowptr_t over C_in * ", kh, " * ", kw, " taps)");
  const int64_t n = x.size(1);
  const auto [ho, wo] = conv_sizes(s, n, x.size(2), x.size(3), kOp);
  TORCH_CHECK(g.size(0) == s.c_out && g.size(1) == n && g.size(2) == ho && g.size(3) == wo, kOp,
              ": g has shape ", g.sizes(), ", expected [", s.c_out, ", ", n, ", ", ho, ", ", wo,
              "]");
  const Tensor gc = g.contiguous(), xc = x.contiguous();
  Tensor gw = at::empty({col.numel()}, x.options());
  check(sk_conv2d_wgrad(dtype_of(x), &s, iptr(rowptr), iptr(col), col.numel(), ptr(gc), ptr(xc),
                        ptr(gw), stream()),
        "conv2d_wgrad");
  return gw;
}

Tensor spmm(const Tensor& rowptr, const Tensor& col, const Tensor& rowptr_t, const Tensor& col_t,
            const Tensor& perm, const Tensor& vals, const Tensor& x, bool transpose) {
  check_cuda(x, "x");
  const c10::cuda::CUDAGuard guard(x.device());
  const Layer w = sparsekern::matrix_layer(sparsekern::kLayoutCsr,
                                           {rowptr, col, rowptr_t, col_t, perm}, vals, x, kWho);
  CudaProducts products;
  return sparsekern::spmm_op(products, w, x, transpose, "sparsekern::spmm", kWho);
}

Tensor spmm_blocked(const Tensor& rowptr, const Tensor& col, const Tensor& rowptr_t,
                    const Tensor& col_t, const Tensor& perm, const Tensor& vals, const Tensor& bptr,
                    const Tensor& bcol, const Tensor& bslot, const Tensor& x) {
  check_cuda(x, "x");
  const c10::cuda::CUDAGuard guard(x.device());
  const Layer w = sparsekern::matrix_layer(
      sparsekern::kLayoutBlocked, {rowptr, col, rowptr_t, col_t, perm, bptr, bcol, bslot}, vals,
      x, kWho);
  CudaProducts products;
  return sparsekern::spmm_op(products, w, x, false, "sparsekern::spmm_blocked", kWho);
}

Tensor sddmm(const Tensor& rowptr, const Tensor& col, const Tensor& a, const Tensor& b) {
  check_cuda(a, "a");
  const c10::cuda::CUDAGuard guard(a.device());
  CudaProducts products;
  return sparsekern::sddmm_op(products, rowptr, col, a, b, "sparsekern::sddmm", kWho);
}

std::tuple<Tensor, Tensor, std::vector<Tensor>> mlp_fwd(
    const Tensor& x0, const Tensor& tan0, const Tensor& probe, const std::vector<Tensor>& values,
    const std::vector<Tensor>& index, const std::vector<Tensor>& scales,
    const std::vector<Tensor>& shifts, const std::vector<int64_t>& layouts, int64_t act,
    bool exact, bool save, bool allow_tf32) {
  check_cuda(x0, "x0");
  const c10::cuda::CUDAGuard guard(x0.device());
  const CublasFp32 precision(allow_tf32);
  const auto call = sparsekern::decode_call(x0, tan0, probe, values, index, layouts, scales,
                                            shifts, act, exact, "sparsekern::mlp_fwd", kWho);
  const Tensor x0s = sparsekern::stack_columns(x0, tan0);
  CudaProgram ops{
      {scales, shifts, call.layers, call.dims, act, exact, save, call.probe, x0.options()},
      {},
      dtype_of(x0)};
  ops.allocate_fwd();
  if (ops.fused_fwd(x0s)) {
    std::vector<Tensor> saved = ops.saved_m;
    saved.insert(saved.end(), ops.saved_x.begin(), ops.saved_x.end());
    return {ops.f, ops.div, saved};
  }
  return sparsekern::run_forward(ops, call.layers, x0s, save);
}

std::tuple<Tensor, std::vector<Tensor>, std::vector<Tensor>, std::vector<Tensor>> mlp_bwd(
    const Tensor& grad_f, const Tensor& grad_div, const Tensor& x0, const Tensor& tan0,
    const Tensor& probe, const std::vector<Tensor>& values, const std::vector<Tensor>& index,
    const std::vector<Tensor>& scales, const std::vector<Tensor>& shifts,
    const std::vector<int64_t>& layouts, int64_t act, bool exact, const std::vector<Tensor>& saved,
    bool allow_tf32) {
  constexpr const char* kOp = "sparsekern::mlp_bwd";
  check_cuda(x0, "x0");
  const c10::cuda::CUDAGuard guard(x0.device());
  const CublasFp32 precision(allow_tf32);
  const auto call = sparsekern::decode_call(x0, tan0, probe, values, index, layouts, scales,
                                            shifts, act, exact, kOp, kWho);
  sparsekern::check_backward(grad_f, grad_div, saved, call.layers, call.dims, x0, kOp);
  CudaProgram ops{
      {scales, shifts, call.layers, call.dims, act, exact, true, call.probe, x0.options()},
      {},
      dtype_of(x0)};
  ops.grad_f = grad_f.contiguous();
  ops.grad_div = grad_div.contiguous();
  return sparsekern::run_backward(ops, call.layers, scales, x0, tan0, saved);
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
  m.def("conv2d", &conv2d, "pruned 2-D convolution of feature-major maps", py::arg("rowptr"),
        py::arg("col"), py::arg("rowptr_t"), py::arg("col_t"), py::arg("perm"), py::arg("vals"),
        py::arg("x"), py::arg("c_out"), py::arg("kh"), py::arg("kw"), py::arg("stride"),
        py::arg("padding"));
  m.def("conv2d_t", &conv2d_t, "adjoint of conv2d w.r.t. its input", py::arg("rowptr"),
        py::arg("col"), py::arg("rowptr_t"), py::arg("col_t"), py::arg("perm"), py::arg("vals"),
        py::arg("g"), py::arg("c_in"), py::arg("h"), py::arg("w"), py::arg("kh"), py::arg("kw"),
        py::arg("stride"), py::arg("padding"));
  m.def("conv2d_wgrad", &conv2d_wgrad, "weight gradient of conv2d at the kept taps",
        py::arg("rowptr"), py::arg("col"), py::arg("rowptr_t"), py::arg("col_t"),
        py::arg("perm"), py::arg("g"), py::arg("x"), py::arg("kh"), py::arg("kw"),
        py::arg("stride"), py::arg("padding"));
  m.def("mlp_fwd", &mlp_fwd, "fused MLP forward + JVP", py::arg("x0"), py::arg("tan0"),
        py::arg("probe"), py::arg("values"), py::arg("index"), py::arg("scales"),
        py::arg("shifts"), py::arg("layouts"), py::arg("act"), py::arg("exact"), py::arg("save"),
        py::arg("allow_tf32") = false);
  m.def("mlp_bwd", &mlp_bwd, "reverse mode of mlp_fwd", py::arg("grad_f"), py::arg("grad_div"),
        py::arg("x0"), py::arg("tan0"), py::arg("probe"), py::arg("values"), py::arg("index"),
        py::arg("scales"), py::arg("shifts"), py::arg("layouts"), py::arg("act"),
        py::arg("exact"), py::arg("saved"), py::arg("allow_tf32") = false);
}
