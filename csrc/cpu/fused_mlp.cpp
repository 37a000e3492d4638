// The fused MLP program: forward pass and JVP in one sweep over the layers, and
// its hand-written reverse mode. Reference and notation: sparsekern/ref.py
// (mlp_fwd_ref, mlp_bwd_ref). Columns of every activation matrix are
// [h | v_1 | ... | v_K], B each, so one product with W_l serves the state and
// all K tangents.
#include "kernels.h"

#include <c10/util/Exception.h>

#include "../common/mlp_loop.h"

namespace sparsekern {
namespace cpu {

namespace {

using sparsekern::Layer;

constexpr const char* kWho = "sparsekern cpu backend";

// Scratch memory for the intermediate activations of a forward that saves
// nothing: fresh multi-megabyte buffers on every call cost page faults and cache
// misses that, at high sparsity, exceed the products themselves. One pool per
// thread (autograd may run the op on its own threads); it holds the largest
// buffers asked for. Nothing returned by an op ever aliases it.
Tensor scratch(int slot, int64_t rows, int64_t cols, const at::TensorOptions& opt) {
  static thread_local std::vector<Tensor> pool(2);
  Tensor& buf = pool[slot];
  const int64_t need = std::max<int64_t>(rows * cols, 1);
  if (!buf.defined() || buf.numel() < need || buf.scalar_type() != opt.dtype().toScalarType()) {
    buf = at::empty({need}, opt);
  }
  return buf.narrow(0, 0, rows * cols).view({rows, cols});
}

// X = [sigma(a) | sigma'(a) * u] with a = s * M_h + c, u = s * M_v (identity on
// the last layer). X may alias M.
template <typename T>
void epilogue_fwd(const T* M, T* X, const T* scale, const T* shift, int64_t rows, int64_t B,
                  int64_t K, int64_t act, bool last) {
  using Vec = at::vec::Vectorized<T>;
  constexpr int64_t V = Vec::size();
  const int64_t ld = (1 + K) * B;
  at::parallel_for(0, rows, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const Vec s(scale ? scale[r] : T(1)), c(shift[r]);
      const T* m = M + r * ld;
      T* x = X + r * ld;
      for (int64_t j = 0; j < B; j += V) {
        const int64_t n = std::min<int64_t>(V, B - j);
        const Vec a = s * Vec::loadu(m + j, n) + c;
        Vec h = a, d1(T(1));
        if (!last) ActVec<T>::value_d1(act, a, h, d1);
        for (int64_t k = 1; k <= K; ++k) {
          const Vec u = s * Vec::loadu(m + k * B + j, n);
          (last ? u : d1 * u).store(x + k * B + j, n);
        }
        h.store(x + j, n);
      }
    }
  });
}

// Reverse of epilogue_fwd. Xbar (the cotangent of X) is overwritten with
// Mbar = s * G, G being the cotangent of the scaled pre-activations [a | u].
// Per row: g_shift = sum G_h, g_scale = sum G * M.
template <typename T>
void epilogue_bwd(const T* M, T* Xbar, const T* scale, const T* shift, T* g_scale, T* g_shift,
                  int64_t rows, int64_t B, int64_t K, int64_t act, bool last) {
  using Vec = at::vec::Vectorized<T>;
  constexpr int64_t V = Vec::size();
  const int64_t ld = (1 + K) * B;
  auto sum = [](Vec& p, Vec& q) { return p + q; };
  at::parallel_for(0, rows, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const Vec s(scale ? scale[r] : T(1)), c(shift[r]);
      const T* m = M + r * ld;
      T* xb = Xbar + r * ld;
      Vec acc_shift(T(0)), acc_scale(T(0));
      for (int64_t j = 0; j < B; j += V) {
        const int64_t n = std::min<int64_t>(V, B - j);
        const Vec mh = Vec::loadu(m + j, n);
        Vec gh = Vec::loadu(xb + j, n);
        if (!last) {
          Vec d1, d2;
          ActVec<T>::d1_d2(act, s * mh + c, d1, d2);
          Vec t(T(0));
          for (int64_t k = 1; k <= K; ++k) {
            const Vec vb = Vec::loadu(xb + k * B + j, n);
            t = t + vb * (s * Vec::loadu(m + k * B + j, n));
            const Vec gv = vb * d1;
            acc_scale = acc_scale + gv * Vec::loadu(m + k * B + j, n);
            (s * gv).store(xb + k * B + j, n);
          }
          gh = gh * d1 + t * d2;
        } else {
          for (int64_t k = 1; k <= K; ++k) {
            const Vec gv = Vec::loadu(xb + k * B + j, n);
            acc_scale = acc_scale + gv * Vec::loadu(m + k * B + j, n);
            (s * gv).store(xb + k * B + j, n);
          }
        }
        // Partial loads are zero-filled beyond n, so the padded lanes add zeros.
        acc_shift = acc_shift + gh;
        acc_scale = acc_scale + gh * mh;
        (s * gh).store(xb + j, n);
      }
      g_shift[r] = at::vec::vec_reduce_all<T>(sum, acc_shift);
      if (g_scale) g_scale[r] = at::vec::vec_reduce_all<T>(sum, acc_scale);
    }
  });
}

// div_b = sum_k <probe_k[:, b], V_k[:, b]>, or sum_k V_k[k, b] for unit probes.
// Column chunks with a local accumulator, so every row is read contiguously.
template <typename T>
void contract_divergence(const T* X, const T* probe, T* div, int64_t d, int64_t B, int64_t K,
                         bool exact) {
  using Vec = at::vec::Vectorized<T>;
  constexpr int64_t V = Vec::size();
  constexpr int64_t CHUNK = 256;
  const int64_t ld = (1 + K) * B;
  at::parallel_for(0, (B + CHUNK - 1) / CHUNK, 1, [&](int64_t c0, int64_t c1) {
    T acc[CHUNK];
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t j0 = c * CHUNK, width = std::min(CHUNK, B - j0);
      std::fill(acc, acc + width, T(0));
      for (int64_t k = 0; k < K; ++k) {
        for (int64_t i = exact ? k : 0; i < (exact ? k + 1 : d); ++i) {
          const T* v = X + i * ld + (1 + k) * B + j0;
          const T* p = exact ? nullptr : probe + (k * d + i) * B + j0;
          for (int64_t j = 0; j < width; j += V) {
            const int64_t n = std::min<int64_t>(V, width - j);
            const Vec term = exact ? Vec::loadu(v + j, n)
                                   : Vec::loadu(p + j, n) * Vec::loadu(v + j, n);
            (Vec::loadu(acc + j, n) + term).store(acc + j, n);
          }
        }
      }
      std::copy(acc, acc + width, div + j0);
    }
  });
}

// The cotangent of the last layer's tangent columns: grad_div * probe.
template <typename T>
void probe_cotangent(const T* grad_div, const T* probe, T* Xbar, int64_t d, int64_t B, int64_t K,
                     bool exact) {
  const int64_t ld = (1 + K) * B;
  at::parallel_for(0, d, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      for (int64_t k = 0; k < K; ++k) {
        T* xb = Xbar + i * ld + (1 + k) * B;
        if (exact) {
          for (int64_t j = 0; j < B; ++j) xb[j] = i == k ? grad_div[j] : T(0);
        } else {
          const T* p = probe + (k * d + i) * B;
          for (int64_t j = 0; j < B; ++j) xb[j] = grad_div[j] * p[j];
        }
      }
    }
  });
}

template <typename T>
const T* optional_ptr(const Tensor& t) {
  return t.numel() ? t.data_ptr<T>() : nullptr;
}

// The CPU program primitives of the shared layer loops (csrc/common/mlp_loop.h):
// the products (CpuProducts, kernels.h), epilogues, the divergence contraction.
template <typename T>
struct CpuProgram : sparsekern::ProgramState, CpuProducts<T> {
  const Tensor* grad_f = nullptr;
  const Tensor* grad_div = nullptr;

  // Without a backward to feed, the activations overwrite M in place, in the
  // thread's scratch buffers. (Fusing the epilogue into the CSR product was
  // measured: no faster, the products are bound by their gathers, not by this
  // extra pass.)
  std::pair<Tensor, Tensor> fwd_buffers(size_t l, bool /*last*/) {
    const int64_t n_out = layers[l].n_out;
    if (!save) {
      Tensor out = scratch(static_cast<int>(l % 2), n_out, dims.cols, opt);
      return {out, out};
    }
    return {at::empty({n_out, dims.cols}, opt), at::empty({n_out, dims.cols}, opt)};
  }

  void epilogue_fwd(size_t l, bool last, const Tensor& m, Tensor& out) {
    cpu::epilogue_fwd<T>(m.data_ptr<T>(), out.data_ptr<T>(), optional_ptr<T>(scales[l]),
                         shifts[l].data_ptr<T>(), layers[l].n_out, dims.B, dims.K, act, last);
  }

  std::pair<Tensor, Tensor> finish_fwd(const Tensor& x) {
    // Without save, x is the thread's scratch buffer (reused by the next call).
    // contiguous() would return that very storage whenever the narrow is already
    // contiguous (no tangent, or B = 1), and the next call would overwrite f:
    // always copy out of it.
    const Tensor h = x.narrow(1, 0, dims.B);
    Tensor f = save ? h.contiguous() : h.clone(at::MemoryFormat::Contiguous);
    Tensor div = at::zeros({dims.B}, opt);
    if (dims.K > 0) {
      contract_divergence<T>(x.data_ptr<T>(), exact ? nullptr : probe.data_ptr<T>(),
                             div.data_ptr<T>(), dims.d, dims.B, dims.K, exact);
    }
    return {f, div};
  }

  Tensor seed_bwd() {
    Tensor xbar = at::empty({dims.d, dims.cols}, opt);
    xbar.narrow(1, 0, dims.B).copy_(*grad_f);
    if (dims.K > 0) {
      const Tensor gd = grad_div->contiguous();
      probe_cotangent<T>(gd.data_ptr<T>(), exact ? nullptr : probe.data_ptr<T>(),
                         xbar.data_ptr<T>(), dims.d, dims.B, dims.K, exact);
    }
    return xbar;
  }

  // In place: xbar (the cotangent of X) becomes Mbar.
  Tensor epilogue_bwd(size_t l, bool last, const Tensor& m, Tensor& xbar, Tensor& g_scale,
                      Tensor& g_shift) {
    const T* s = optional_ptr<T>(scales[l]);
    cpu::epilogue_bwd<T>(m.data_ptr<T>(), xbar.data_ptr<T>(), s, shifts[l].data_ptr<T>(),
                         s ? g_scale.data_ptr<T>() : nullptr, g_shift.data_ptr<T>(),
                         layers[l].n_out, dims.B, dims.K, act, last);
    return xbar;
  }
};

}  // namespace

std::tuple<Tensor, Tensor, std::vector<Tensor>> mlp_fwd(
    const Tensor& x0, const Tensor& tan0, const Tensor& probe, const std::vector<Tensor>& values,
    const std::vector<Tensor>& index, const std::vector<Tensor>& scales,
    const std::vector<Tensor>& shifts, const std::vector<int64_t>& layouts, int64_t act,
    bool exact, bool save) {
  TORCH_CHECK(x0.device().is_cpu(), kWho, ": x0 is on ", x0.device());
  const auto call = sparsekern::decode_call(x0, tan0, probe, values, index, layouts, scales,
                                            shifts, act, exact, "sparsekern::mlp_fwd", kWho);
  std::tuple<Tensor, Tensor, std::vector<Tensor>> out;
  AT_DISPATCH_FLOATING_TYPES(x0.scalar_type(), "sparsekern_mlp_fwd", [&] {
    CpuProgram<scalar_t> ops{
        {scales, shifts, call.layers, call.dims, act, exact, save, call.probe, x0.options()}, {}};
    out = sparsekern::run_forward(ops, call.layers, sparsekern::stack_columns(x0, tan0), save);
  });
  return out;
}

std::tuple<Tensor, std::vector<Tensor>, std::vector<Tensor>, std::vector<Tensor>> mlp_bwd(
    const Tensor& grad_f, const Tensor& grad_div, const Tensor& x0, const Tensor& tan0,
    const Tensor& probe, const std::vector<Tensor>& values, const std::vector<Tensor>& index,
    const std::vector<Tensor>& scales, const std::vector<Tensor>& shifts,
    const std::vector<int64_t>& layouts, int64_t act, bool exact,
    const std::vector<Tensor>& saved) {
  constexpr const char* kOp = "sparsekern::mlp_bwd";
  TORCH_CHECK(x0.device().is_cpu(), kWho, ": x0 is on ", x0.device());
  const auto call = sparsekern::decode_call(x0, tan0, probe, values, index, layouts, scales,
                                            shifts, act, exact, kOp, kWho);
  sparsekern::check_backward(grad_f, grad_div, saved, call.layers, call.dims, x0, kOp);
  std::tuple<Tensor, std::vector<Tensor>, std::vector<Tensor>, std::vector<Tensor>> out;
  AT_DISPATCH_FLOATING_TYPES(x0.scalar_type(), "sparsekern_mlp_bwd", [&] {
    CpuProgram<scalar_t> ops{
        {scales, shifts, call.layers, call.dims, act, exact, true, call.probe, x0.options()},
        {},
        &grad_f,
        &grad_div};
    out = sparsekern::run_backward(ops, call.layers, scales, x0, tan0, saved);
  });
  return out;
}

}  // namespace cpu
}  // namespace sparsekern
