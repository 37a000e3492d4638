// Per-layer epilogues of the fused MLP program and their reverse (the general
// path of the CUDA backend: products by cuBLAS or the CSR kernels, these in
// between). References: sparsekern/ref.py mlp_fwd_ref, mlp_bwd_ref. Columns of
// every activation matrix are [h | v_1 | ... | v_K], B each; ld = (1 + K) B.
#include "device_common.h"
#include "sparsekern_cuda.h"

namespace sparsekern {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 65535 * 8;

// One thread per (row, batch column); it reads every column group of its
// element before writing it, so x may be m.
template <typename T>
__global__ void epilogue_fwd_kernel(const T* m, T* x, const T* __restrict__ scale,
                                    const T* __restrict__ shift, int64_t n, int64_t B, int64_t K,
                                    int act) {
  const int64_t ld = (K + 1) * B;
  for (int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; idx < n * B;
       idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = idx / B, j = idx % B;
    const T s = scale ? scale[r] : T(1);
    const T* mr = m + r * ld + j;
    T* xr = x + r * ld + j;
    T h, d1;
    act_d1(act, s * mr[0] + shift[r], h, d1);
    for (int64_t k = 1; k <= K; ++k) xr[k * B] = d1 * (s * mr[k * B]);
    xr[0] = h;
  }
}

template <typename T>
__global__ void head_f_kernel(const T* __restrict__ m, T* __restrict__ f,
                              const T* __restrict__ scale, const T* __restrict__ shift, int64_t d,
                              int64_t B, int64_t K) {
  const int64_t ld = (K + 1) * B;
  for (int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; idx < d * B;
       idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = idx / B, j = idx % B;
    f[idx] = (scale ? scale[r] : T(1)) * m[r * ld + j] + shift[r];
  }
}

// One thread per batch column: div_j = sum_k sum_r probe[k, r, j] * scale_r * m[r, (1+k) B + j].
template <typename T>
__global__ void head_div_kernel(const T* __restrict__ m, T* __restrict__ div,
                                const T* __restrict__ probe, const T* __restrict__ scale,
                                int64_t d, int64_t B, int64_t K, int exact) {
  const int64_t ld = (K + 1) * B;
  for (int64_t j = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; j < B;
       j += int64_t(gridDim.x) * blockDim.x) {
    T acc = T(0);
    for (int64_t k = 0; k < K; ++k) {
      const T* v = m + (k + 1) * B + j;
      if (exact) {
        if (k < d) acc += (scale ? scale[k] : T(1)) * v[k * ld];
      } else {
        for (int64_t r = 0; r < d; ++r) {
          acc = fma(probe[(k * d + r) * B + j], (scale ? scale[r] : T(1)) * v[r * ld], acc);
        }
      }
    }
    div[j] = acc;
  }
}

// One block per row: the row's shift and scale gradients are block sums in a
// fixed order (deterministic, no atomics). mbar may be xbar: every element is
// read before it is written, by the same thread.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    epilogue_bwd_kernel(const T* __restrict__ m, const T* xbar, const T* __restrict__ grad_f,
                        const T* __restrict__ grad_div, const T* __restrict__ probe, T* mbar,
                        const T* __restrict__ scale, const T* __restrict__ shift, T* g_scale,
                        T* g_shift, int64_t n, int64_t B, int64_t K, int act, int last,
                        int exact) {
  __shared__ T red_shift[kThreads];
  __shared__ T red_scale[kThreads];
  const int64_t ld = (K + 1) * B;
  for (int64_t r = blockIdx.x; r < n; r += gridDim.x) {
    const T s = scale ? scale[r] : T(1);
    const T c = shift[r];
    const T* mr = m + r * ld;
    T acc_shift = T(0), acc_scale = T(0);
    for (int64_t j = threadIdx.x; j < B; j += kThreads) {
      const T mh = mr[j];
      T gh, gm = T(0), d1 = T(1), d2 = T(0), t = T(0);
      if (!last) act_d1_d2(act, s * mh + c, d1, d2);
      for (int64_t k = 0; k < K; ++k) {
        const int64_t off = r * ld + (k + 1) * B + j;
        const T mv = m[off];
        T gv;
        if (last) {
          gv = exact ? (r == k ? grad_div[j] : T(0)) : grad_div[j] * probe[(k * n + r) * B + j];
        } else {
          const T vbar = xbar[off];
          t += vbar * (s * mv);
          gv = vbar * d1;
        }
        gm += gv * mv;
        mbar[off] = s * gv;
      }
      gh = last ? grad_f[r * B + j] : xbar[r * ld + j] * d1 + t * d2;
      gm += gh * mh;
      mbar[r * ld + j] = s * gh;
      acc_shift += gh;
      acc_scale += gm;
    }
    red_shift[threadIdx.x] = acc_shift;
    red_scale[threadIdx.x] = acc_scale;
    __syncthreads();
    for (int w = kThreads / 2; w > 0; w /= 2) {
      if (threadIdx.x < w) {
        red_shift[threadIdx.x] += red_shift[threadIdx.x + w];
        red_scale[threadIdx.x] += red_scale[threadIdx.x + w];
      }
      __syncthreads();
    }
    if (threadIdx.x == 0) {
      g_shift[r] = red_shift[0];
      if (g_scale) g_scale[r] = red_scale[0];
    }
    __syncthreads();  // red_* are reused by the next row
  }
}

unsigned blocks_for(int64_t work) {
  const int64_t blocks = std::min(ceil_div(work, kThreads), kMaxBlocks);
  return static_cast<unsigned>(std::max<int64_t>(1, blocks));
}

template <typename T>
int epilogue_fwd(const T* m, T* x, const T* scale, const T* shift, int64_t n, int64_t B,
                 int64_t K, int act, void* stream) {
  if (n <= 0 || B <= 0) return 0;
  epilogue_fwd_kernel<T><<<blocks_for(n * B), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      m, x, scale, shift, n, B, K, act);
  return static_cast<int>(cudaGetLastError());
}

template <typename T>
int head_fwd(const T* m, T* f, T* div, const T* probe, const T* scale, const T* shift, int64_t d,
             int64_t B, int64_t K, int exact, void* stream) {
  if (B <= 0) return 0;
  auto s = static_cast<cudaStream_t>(stream);
  if (d > 0) head_f_kernel<T><<<blocks_for(d * B), kThreads, 0, s>>>(m, f, scale, shift, d, B, K);
  head_div_kernel<T><<<blocks_for(B), kThreads, 0, s>>>(m, div, probe, scale, d, B, K, exact);
  return static_cast<int>(cudaGetLastError());
}

template <typename T>
int epilogue_bwd(const T* m, const T* xbar, const T* grad_f, const T* grad_div, const T* probe,
                 T* mbar, const T* scale, const T* shift, T* g_scale, T* g_shift, int64_t n,
                 int64_t B, int64_t K, int act, int last, int exact, void* stream) {
  if (n <= 0) return 0;
  const unsigned blocks = static_cast<unsigned>(std::min<int64_t>(n, kMaxBlocks));
  epilogue_bwd_kernel<T><<<blocks, kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      m, xbar, grad_f, grad_div, probe, mbar, scale, shift, g_scale, g_shift, n, B, K, act, last,
      exact);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace
}  // namespace cuda
}  // namespace sparsekern

namespace skc = sparsekern::cuda;

extern "C" {

int sk_mlp_epilogue_fwd(sk_dtype dtype, const void* m, void* x, const void* scale,
                        const void* shift, int64_t n, int64_t B, int64_t K, int act,
                        void* stream) {
  return skc::dispatch_dtype(dtype, [&](auto t) {
    using T = decltype(t);
    return skc::epilogue_fwd(skc::typed<T>(m), skc::typed<T>(x), skc::typed<T>(scale),
                             skc::typed<T>(shift), n, B, K, act, stream);
  });
}

int sk_mlp_head_fwd(sk_dtype dtype, const void* m, void* f, void* div, const void* probe,
                    const void* scale, const void* shift, int64_t d, int64_t B, int64_t K,
                    int exact, void* stream) {
  return skc::dispatch_dtype(dtype, [&](auto t) {
    using T = decltype(t);
    return skc::head_fwd(skc::typed<T>(m), skc::typed<T>(f), skc::typed<T>(div),
                         skc::typed<T>(probe), skc::typed<T>(scale), skc::typed<T>(shift), d, B,
                         K, exact, stream);
  });
}

int sk_mlp_epilogue_bwd(sk_dtype dtype, const void* m, const void* xbar, const void* grad_f,
                        const void* grad_div, const void* probe, void* mbar, const void* scale,
                        const void* shift, void* g_scale, void* g_shift, int64_t n, int64_t B,
                        int64_t K, int act, int last, int exact, void* stream) {
  return skc::dispatch_dtype(dtype, [&](auto t) {
    using T = decltype(t);
    return skc::epilogue_bwd(skc::typed<T>(m), skc::typed<T>(xbar), skc::typed<T>(grad_f),
                             skc::typed<T>(grad_div), skc::typed<T>(probe), skc::typed<T>(mbar),
                             skc::typed<T>(scale), skc::typed<T>(shift), skc::typed<T>(g_scale),
                             skc::typed<T>(g_shift), n, B, K, act, last, exact, stream);
  });
}

}  // extern "C"
