// The fused MLP program: forward pass and JVP in one sweep over the layers, and
// its hand-written reverse mode. Reference and notation: sparsekern/ref.py
// (mlp_fwd_ref, mlp_bwd_ref). Columns of every activation matrix are
// [h | v_1 | ... | v_K], B each, so one product with W_l serves the state and
// all K tangents.
#include "kernels.h"

#include <c10/util/Exception.h>

#include "../common/mlp_program.h"

namespace sparsekern {
namespace cpu {

namespace {

using sparsekern::Layer;

constexpr const char* kWho = "sparsekern cpu backend";

// The shared structural parse, then what this backend needs: CPU tensors of the
// input's dtype, contiguous.
std::vector<Layer> parse_layers(const std::vector<Tensor>& weights,
                                const std::vector<int64_t>& layouts, const Tensor& x0) {
  std::vector<Layer> layers = sparsekern::parse_layers(weights, layouts, x0.size(0), kWho);
  for (size_t l = 0; l < layers.size(); ++l) {
    for (const Tensor& t : layers[l].t) {
      TORCH_CHECK(t.device() == x0.device() && t.is_contiguous(), kWho, ": layer ", l,
                  " tensors must be contiguous and on ", x0.device());
    }
    const Tensor& w = layers[l].values();
    TORCH_CHECK(w.scalar_type() == x0.scalar_type(), kWho, ": layer ", l, " weights are ",
                w.scalar_type(), ", the input is ", x0.scalar_type());
  }
  return layers;
}

// [x0 | tan0[0] | ... | tan0[K-1]] as one [n0, (1+K) B] matrix.
Tensor stack_columns(const Tensor& x0, const Tensor& tan0) {
  if (tan0.size(0) == 0) return x0;
  return at::cat({x0, tan0.permute({1, 0, 2}).reshape({x0.size(0), tan0.size(0) * x0.size(1)})}, 1);
}

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

const Tensor* optional_ptr(const Tensor& t) { return t.numel() ? &t : nullptr; }

}  // namespace

std::tuple<Tensor, Tensor, std::vector<Tensor>> mlp_fwd(
    const Tensor& x0, const Tensor& tan0, const Tensor& probe, const std::vector<Tensor>& weights,
    const std::vector<Tensor>& scales, const std::vector<Tensor>& shifts,
    const std::vector<int64_t>& layouts, int64_t act, bool exact, bool save) {
  TORCH_CHECK(x0.dim() == 2 && x0.is_contiguous(), "sparsekern::mlp_fwd: x0 must be a contiguous ",
              "[n0, B] matrix, got ", x0.sizes());
  TORCH_CHECK(x0.scalar_type() == at::kFloat || x0.scalar_type() == at::kDouble,
              "sparsekern cpu backend supports float32 and float64, got ", x0.scalar_type());
  TORCH_CHECK(tan0.dim() == 3 && tan0.size(1) == x0.size(0) && tan0.size(2) == x0.size(1),
              "sparsekern::mlp_fwd: tan0 must be [K, ", x0.size(0), ", ", x0.size(1), "], got ",
              tan0.sizes());
  const auto layers = parse_layers(weights, layouts, x0);
  sparsekern::check_vectors(scales, layers, "scale", true, kWho);
  sparsekern::check_vectors(shifts, layers, "shift", false, kWho);
  const int64_t B = x0.size(1), K = tan0.size(0), d = layers.back().n_out;
  TORCH_CHECK(!exact || K == d, "sparsekern::mlp_fwd: the exact trace needs K = d = ", d,
              " unit tangents, got K = ", K);
  TORCH_CHECK(exact || K == 0 || (probe.dim() == 3 && probe.size(0) == K && probe.size(1) == d &&
                                  probe.size(2) == B),
              "sparsekern::mlp_fwd: probe must be [", K, ", ", d, ", ", B, "], got ",
              probe.sizes());
  std::vector<Tensor> saved_m, saved_x;
  Tensor x = stack_columns(x0, tan0);
  const int64_t cols = (1 + K) * B;
  for (size_t l = 0; l < layers.size(); ++l) {
    const bool last = l + 1 == layers.size();
    const int64_t n_out = layers[l].n_out;
    Tensor out = save ? at::empty({n_out, cols}, x0.options())
                      : scratch(static_cast<int>(l % 2), n_out, cols, x0.options());
    const Tensor* s = optional_ptr(scales[l]);
    // Without a backward to feed, the activations overwrite M in place. (Fusing
    // the epilogue into the CSR product was measured: no faster, the products
    // are bound by their gathers, not by this extra pass.)
    Tensor m = save ? at::empty({n_out, cols}, x0.options()) : out;
    layer_matmul(layers[l].t, x, m, false);
    AT_DISPATCH_FLOATING_TYPES(x0.scalar_type(), "sparsekern_mlp_fwd", [&] {
      epilogue_fwd<scalar_t>(m.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
                             s ? s->data_ptr<scalar_t>() : nullptr,
                             shifts[l].data_ptr<scalar_t>(), n_out, B, K, act, last);
    });
    if (save) saved_m.push_back(m);
    if (save && !last) saved_x.push_back(out);
    x = out;
  }
  // Without save, x is the thread's scratch buffer (reused by the next call). contiguous()
  // would return that very storage whenever the narrow is already contiguous (no tangent,
  // or B = 1), and the next call would overwrite f: always copy out of it.
  Tensor f = save ? x.narrow(1, 0, B).contiguous()
                  : x.narrow(1, 0, B).clone(at::MemoryFormat::Contiguous);
  Tensor div = at::zeros({B}, x0.options());
  if (K > 0) {
    const Tensor pc = probe.contiguous();
    AT_DISPATCH_FLOATING_TYPES(x0.scalar_type(), "sparsekern_mlp_div", [&] {
      contract_divergence<scalar_t>(x.data_ptr<scalar_t>(),
                                    exact ? nullptr : pc.data_ptr<scalar_t>(),
                                    div.data_ptr<scalar_t>(), d, B, K, exact);
    });
  }
  saved_m.insert(saved_m.end(), saved_x.begin(), saved_x.end());
  return {f, div, saved_m};
}

std::tuple<Tensor, std::vector<Tensor>, std::vector<Tensor>, std::vector<Tensor>> mlp_bwd(
    const Tensor& grad_f, const Tensor& grad_div, const Tensor& x0, const Tensor& tan0,
    const Tensor& probe, const std::vector<Tensor>& weights, const std::vector<Tensor>& scales,
    const std::vector<Tensor>& shifts, const std::vector<int64_t>& layouts, int64_t act, bool exact,
    const std::vector<Tensor>& saved) {
  const auto layers = parse_layers(weights, layouts, x0);
  const size_t L = layers.size();
  sparsekern::check_vectors(scales, layers, "scale", true, kWho);
  sparsekern::check_vectors(shifts, layers, "shift", false, kWho);
  TORCH_CHECK(saved.size() == 2 * L - 1, "sparsekern::mlp_bwd: expected ", 2 * L - 1,
              " saved tensors (mlp_fwd with save=True), got ", saved.size());
  const int64_t B = x0.size(1), K = tan0.size(0), d = layers.back().n_out;
  TORCH_CHECK(grad_f.sizes() == at::IntArrayRef({d, B}) && grad_div.sizes() == at::IntArrayRef({B}),
              "sparsekern::mlp_bwd: grad_f must be [", d, ", ", B, "] and grad_div [", B, "]");
  Tensor xbar = at::empty({d, (1 + K) * B}, x0.options());
  xbar.narrow(1, 0, B).copy_(grad_f);
  if (K > 0) {
    const Tensor pc = probe.contiguous(), gd = grad_div.contiguous();
    AT_DISPATCH_FLOATING_TYPES(x0.scalar_type(), "sparsekern_mlp_probe", [&] {
      probe_cotangent<scalar_t>(gd.data_ptr<scalar_t>(), exact ? nullptr : pc.data_ptr<scalar_t>(),
                                xbar.data_ptr<scalar_t>(), d, B, K, exact);
    });
  }
  std::vector<Tensor> g_w(L), g_scale(L), g_shift(L);
  Tensor grad_x0;
  for (size_t li = L; li-- > 0;) {
    const Layer& layer = layers[li];
    const bool last = li + 1 == L;
    const Tensor& m = saved[li];
    const Tensor x_in = li == 0 ? stack_columns(x0, tan0) : saved[L + li - 1];
    g_shift[li] = at::empty({layer.n_out}, x0.options());
    g_scale[li] = scales[li].numel() ? at::empty({layer.n_out}, x0.options())
                                     : at::empty({0}, x0.options());
    AT_DISPATCH_FLOATING_TYPES(x0.scalar_type(), "sparsekern_mlp_bwd", [&] {
      const Tensor* s = optional_ptr(scales[li]);
      epilogue_bwd<scalar_t>(m.data_ptr<scalar_t>(), xbar.data_ptr<scalar_t>(),
                             s ? s->data_ptr<scalar_t>() : nullptr, shifts[li].data_ptr<scalar_t>(),
                             s ? g_scale[li].data_ptr<scalar_t>() : nullptr,
                             g_shift[li].data_ptr<scalar_t>(), layer.n_out, B, K, act, last);
    });
    // xbar now holds Mbar, the cotangent of M = W x_in.
    if (layer.sparse()) {
      g_w[li] = sddmm(layer.t[0], layer.t[1], xbar, x_in);
    } else {
      g_w[li] = at::mm(xbar, x_in.t());
    }
    // The first layer's tangent inputs are constants: only the state columns.
    const Tensor mbar = li == 0 ? xbar.narrow(1, 0, B) : xbar;
    Tensor next = at::empty({layer.n_in, mbar.size(1)}, x0.options());
    layer_matmul(layer.t, mbar, next, true);
    if (li == 0) {
      grad_x0 = next;
    } else {
      xbar = next;
    }
  }
  return {grad_x0, g_w, g_scale, g_shift};
}

}  // namespace cpu
}  // namespace sparsekern
