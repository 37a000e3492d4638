// Pruned 2-D convolutions on feature-major maps: the convolution, its adjoint
// w.r.t. the input, and its weight gradient at the kept taps. References:
// sparsekern/ref.py conv2d_ref, conv2d_t_ref, conv2d_wgrad_ref. C ABI:
// sparsekern_cuda.h (sk_conv2d, sk_conv2d_t, sk_conv2d_wgrad).
//
// The weight [C_out, C_in, KH, KW] is the CSR matrix [C_out, C_in KH KW]; column
// c = ci KH KW + ky KW + kx is one tap. Maps are [C, N, H, W], so a channel is one
// contiguous run of N H W values, batch and positions flattened together; one
// thread owns one flattened position (int32 within a channel, int64 across).
//
// conv2d: a block owns one output channel and 256 consecutive output positions.
// The row's kept taps are staged 256 at a time in shared memory (input-channel
// offset, ky, kx, value) and read by every thread as broadcasts; each thread
// adds value * x at its shifted input place (skipped outside the image: the
// zero padding). Consecutive threads read consecutive x (for stride 1).
//
// conv2d_t: a block owns one input channel and 256 input positions, and walks
// the channel's KH KW taps (rows ci KH KW + t of the stored transpose). For a
// tap, a thread's output place oy = (iy + padding - ky) / stride is computed
// once (none where the stride does not divide or it falls outside); the tap's
// entries (output channel col_t, value vals[perm]) are staged like conv2d's
// and gather the cotangent there. No atomics.
//
// conv2d_wgrad: a warp (few output positions) or a whole block (many) per
// kept entry, lanes striding over the output positions, then a fixed-order
// warp and block reduction: deterministic.
#include <algorithm>

#include "device_common.h"
#include "sparsekern_cuda.h"

namespace sparsekern {
namespace cuda {
namespace {

constexpr int kThreads = 256;
// Blocks an SM should hold (64 registers a thread): without the hint ptxas keeps the
// adjoint to 32 registers and spills on sm_80.
constexpr int kMinBlocks = 4;
constexpr int64_t kMaxGridY = 65535;
// Output positions from which conv2d_wgrad gives each entry a block, not a warp.
constexpr int64_t kBlockPerEntryFrom = 4096;

// The sizes a kernel needs, checked and derived on the host.
struct Dims {
  int32_t H, W, Ho, Wo, KW, KK, stride, padding;
  int32_t PX, PO;  // values per channel: N H W (input), N Ho Wo (output)
  int64_t c_out, c_in;
};

// The checked dims of a call, or false (SK_ERR_UNSUPPORTED).
bool make_dims(const sk_conv_shape* s, Dims& d) {
  if (s == nullptr || s->c_out < 0 || s->c_in < 0 || s->N < 0 || s->H < 0 || s->W < 0 ||
      s->kh < 1 || s->kw < 1 || s->stride < 1 || s->padding < 0) {
    return false;
  }
  constexpr int64_t kLimit = int64_t(1) << 31;
  // Padded sizes, kernel and stride in int32 (the kernels' position arithmetic).
  if (s->padding >= kLimit || s->H + 2 * s->padding >= kLimit ||
      s->W + 2 * s->padding >= kLimit || s->kh >= kLimit || s->kw >= kLimit ||
      s->kh * s->kw >= kLimit || s->stride >= kLimit) {
    return false;
  }
  const int64_t ho = (s->H + 2 * s->padding - s->kh) / s->stride + 1;
  const int64_t wo = (s->W + 2 * s->padding - s->kw) / s->stride + 1;
  if (s->H + 2 * s->padding < s->kh || s->W + 2 * s->padding < s->kw || ho < 1 || wo < 1) {
    return false;
  }
  // Channels of fewer than 2^31 values (each factor is then below it too).
  if (s->N > 0 && (s->H * s->W >= kLimit / s->N || ho * wo >= kLimit / s->N)) return false;
  d.H = int32_t(s->H), d.W = int32_t(s->W), d.Ho = int32_t(ho), d.Wo = int32_t(wo);
  d.KW = int32_t(s->kw), d.KK = int32_t(s->kh * s->kw);
  d.stride = int32_t(s->stride), d.padding = int32_t(s->padding);
  d.PX = int32_t(s->N * s->H * s->W), d.PO = int32_t(s->N * ho * wo);
  d.c_out = s->c_out, d.c_in = s->c_in;
  return true;
}

// One block per (channel, tile of kThreads positions); channels beyond grid.y
// loop over it.
dim3 channel_grid(int64_t positions, int64_t channels) {
  return dim3(static_cast<unsigned>(ceil_div(positions, kThreads)),
              static_cast<unsigned>(std::min(channels, kMaxGridY)));
}

template <typename T>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
    conv2d_kernel(const int32_t* __restrict__ rowptr, const int32_t* __restrict__ col,
                  const T* __restrict__ vals, const T* __restrict__ x, T* __restrict__ y,
                  Dims d) {
  __shared__ int64_t s_chan[kThreads];
  __shared__ int32_t s_ky[kThreads], s_kx[kThreads];
  __shared__ T s_val[kThreads];
  const int32_t p = int32_t(blockIdx.x) * kThreads + int32_t(threadIdx.x);
  const bool active = p < d.PO;
  const int32_t hw_o = d.Ho * d.Wo;
  const int32_t n = active ? p / hw_o : 0;
  const int32_t rem = active ? p - n * hw_o : 0;
  const int32_t oy = rem / d.Wo, ox = rem - (rem / d.Wo) * d.Wo;
  const int32_t iy0 = oy * d.stride - d.padding, ix0 = ox * d.stride - d.padding;
  const int32_t x_pos = n * (d.H * d.W);
  // Block-uniform loops: every thread reaches every __syncthreads.
  for (int64_t co = blockIdx.y; co < d.c_out; co += gridDim.y) {
    const int32_t k0 = rowptr[co], k1 = rowptr[co + 1];
    T acc = T(0);
    for (int32_t kb = k0; kb < k1; kb += kThreads) {
      __syncthreads();  // the previous chunk has been read
      const int32_t k = kb + int32_t(threadIdx.x);
      if (k < k1) {
        const int32_t c = col[k];
        const int32_t ci = c / d.KK, tap = c - (c / d.KK) * d.KK;
        s_chan[threadIdx.x] = int64_t(ci) * d.PX;
        s_ky[threadIdx.x] = tap / d.KW;
        s_kx[threadIdx.x] = tap - (tap / d.KW) * d.KW;
        s_val[threadIdx.x] = vals[k];
      }
      __syncthreads();
      const int m = min(kThreads, k1 - kb);
      if (active) {
        for (int e = 0; e < m; ++e) {
          const int32_t iy = iy0 + s_ky[e], ix = ix0 + s_kx[e];
          if (iy >= 0 && iy < d.H && ix >= 0 && ix < d.W) {
            acc = fma(s_val[e], __ldg(x + s_chan[e] + (x_pos + iy * d.W + ix)), acc);
          }
        }
      }
    }
    if (active) y[co * d.PO + p] = acc;
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
    conv2d_t_kernel(const int32_t* __restrict__ rowptr_t, const int32_t* __restrict__ col_t,
                    const int32_t* __restrict__ perm, const T* __restrict__ vals,
                    const T* __restrict__ g, T* __restrict__ gx, Dims d) {
  __shared__ int64_t s_chan[kThreads];
  __shared__ T s_val[kThreads];
  const int32_t p = int32_t(blockIdx.x) * kThreads + int32_t(threadIdx.x);
  const bool active = p < d.PX;
  const int32_t hw = d.H * d.W;
  const int32_t n = active ? p / hw : 0;
  const int32_t rem = active ? p - n * hw : 0;
  const int32_t iy = rem / d.W, ix = rem - (rem / d.W) * d.W;
  const int32_t g_pos = n * (d.Ho * d.Wo);
  for (int64_t ci = blockIdx.y; ci < d.c_in; ci += gridDim.y) {
    T acc = T(0);
    for (int32_t tap = 0; tap < d.KK; ++tap) {
      const int32_t ky = tap / d.KW, kx = tap - (tap / d.KW) * d.KW;
      // The output place reaching (iy, ix) through this tap, if there is one.
      const int32_t ny = iy + d.padding - ky, nx = ix + d.padding - kx;
      const int32_t oy = ny >= 0 ? ny / d.stride : 0, ox = nx >= 0 ? nx / d.stride : 0;
      const bool hit = active && ny >= 0 && nx >= 0 && oy * d.stride == ny &&
                       ox * d.stride == nx && oy < d.Ho && ox < d.Wo;
      const int32_t g_off = g_pos + oy * d.Wo + ox;
      const int64_t r = ci * d.KK + tap;
      const int32_t k0 = rowptr_t[r], k1 = rowptr_t[r + 1];
      for (int32_t kb = k0; kb < k1; kb += kThreads) {
        __syncthreads();
        const int32_t k = kb + int32_t(threadIdx.x);
        if (k < k1) {
          s_chan[threadIdx.x] = int64_t(col_t[k]) * d.PO;
          s_val[threadIdx.x] = vals[perm[k]];
        }
        __syncthreads();
        const int m = min(kThreads, k1 - kb);
        if (hit) {
          for (int e = 0; e < m; ++e) acc = fma(s_val[e], __ldg(g + s_chan[e] + g_off), acc);
        }
      }
    }
    if (active) gx[ci * d.PX + p] = acc;
  }
}

// First r in [0, n_rows) with rowptr[r + 1] > k: the row of entry k.
__device__ inline int64_t row_of(const int32_t* __restrict__ rowptr, int64_t n_rows, int64_t k) {
  int64_t lo = 0, hi = n_rows - 1;
  while (lo < hi) {
    const int64_t mid = (lo + hi) / 2;
    if (rowptr[mid + 1] <= k) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  return lo;
}

// TPE threads per entry (kWarp or kThreads), kThreads / TPE entries per block.
template <typename T, int TPE>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
    conv2d_wgrad_kernel(const int32_t* __restrict__ rowptr, const int32_t* __restrict__ col,
                        int64_t nnz, const T* __restrict__ g, const T* __restrict__ x,
                        T* __restrict__ gw, Dims d) {
  static_assert(TPE == kWarp || TPE == kThreads, "a warp or a block per entry");
  constexpr int kPerBlock = kThreads / TPE;
  const int64_t k = int64_t(blockIdx.x) * kPerBlock + threadIdx.x / TPE;
  if (k >= nnz) return;  // uniform over the entry's threads (a warp, or the block)
  const int lane = threadIdx.x % TPE;
  const int64_t co = row_of(rowptr, d.c_out, k);
  const int32_t c = col[k];
  const int32_t ci = c / d.KK, tap = c - (c / d.KK) * d.KK;
  const int32_t ky = tap / d.KW, kx = tap - (tap / d.KW) * d.KW;
  const T* gr = g + co * d.PO;
  const T* xr = x + int64_t(ci) * d.PX;
  const int32_t hw_o = d.Ho * d.Wo, hw = d.H * d.W;
  T acc = T(0);
  for (int32_t p = lane; p < d.PO; p += TPE) {
    const int32_t n = p / hw_o, rem = p - (p / hw_o) * hw_o;
    const int32_t oy = rem / d.Wo, ox = rem - (rem / d.Wo) * d.Wo;
    const int32_t iy = oy * d.stride - d.padding + ky, ix = ox * d.stride - d.padding + kx;
    if (iy >= 0 && iy < d.H && ix >= 0 && ix < d.W) {
      acc = fma(__ldg(gr + p), __ldg(xr + (n * hw + iy * d.W + ix)), acc);
    }
  }
  acc = warp_sum(acc);
  if constexpr (TPE == kWarp) {
    if (lane == 0) gw[k] = acc;
  } else {
    __shared__ T s_part[kThreads / kWarp];
    if (lane % kWarp == 0) s_part[lane / kWarp] = acc;
    __syncthreads();
    if (lane == 0) {
      T total = T(0);
      for (int i = 0; i < kThreads / kWarp; ++i) total += s_part[i];
      gw[k] = total;
    }
  }
}

template <typename T>
int conv2d(const sk_conv_shape* shape, const int32_t* rowptr, const int32_t* col, const T* vals,
           const T* x, T* y, void* stream) {
  Dims d;
  if (!make_dims(shape, d)) return SK_ERR_UNSUPPORTED;
  if (d.c_out == 0 || d.PO == 0) return 0;
  conv2d_kernel<T><<<channel_grid(d.PO, d.c_out), kThreads, 0,
                     static_cast<cudaStream_t>(stream)>>>(rowptr, col, vals, x, y, d);
  return static_cast<int>(cudaGetLastError());
}

template <typename T>
int conv2d_t(const sk_conv_shape* shape, const int32_t* rowptr_t, const int32_t* col_t,
             const int32_t* perm, const T* vals, const T* g, T* gx, void* stream) {
  Dims d;
  if (!make_dims(shape, d)) return SK_ERR_UNSUPPORTED;
  if (d.c_in == 0 || d.PX == 0) return 0;
  conv2d_t_kernel<T><<<channel_grid(d.PX, d.c_in), kThreads, 0,
                       static_cast<cudaStream_t>(stream)>>>(rowptr_t, col_t, perm, vals, g, gx,
                                                            d);
  return static_cast<int>(cudaGetLastError());
}

template <typename T>
int conv2d_wgrad(const sk_conv_shape* shape, const int32_t* rowptr, const int32_t* col,
                 int64_t nnz, const T* g, const T* x, T* gw, void* stream) {
  Dims d;
  if (!make_dims(shape, d) || nnz < 0) return SK_ERR_UNSUPPORTED;
  if (nnz == 0) return 0;
  auto s = static_cast<cudaStream_t>(stream);
  if (d.PO == 0) return static_cast<int>(cudaMemsetAsync(gw, 0, nnz * sizeof(T), s));
  if (d.PO >= kBlockPerEntryFrom) {
    conv2d_wgrad_kernel<T, kThreads><<<static_cast<unsigned>(nnz), kThreads, 0, s>>>(
        rowptr, col, nnz, g, x, gw, d);
  } else {
    constexpr int kPerBlock = kThreads / kWarp;
    conv2d_wgrad_kernel<T, kWarp><<<static_cast<unsigned>(ceil_div(nnz, kPerBlock)), kThreads,
                                    0, s>>>(rowptr, col, nnz, g, x, gw, d);
  }
  return static_cast<int>(cudaGetLastError());
}

}  // namespace
}  // namespace cuda
}  // namespace sparsekern

using sparsekern::cuda::dispatch_dtype;
using sparsekern::cuda::typed;

extern "C" {

int sk_conv2d(sk_dtype dtype, const sk_conv_shape* shape, const int32_t* rowptr,
              const int32_t* col, const void* vals, const void* x, void* y, void* stream) {
  return dispatch_dtype(dtype, [&](auto t) {
    using T = decltype(t);
    return sparsekern::cuda::conv2d(shape, rowptr, col, typed<T>(vals), typed<T>(x), typed<T>(y),
                                    stream);
  });
}

int sk_conv2d_t(sk_dtype dtype, const sk_conv_shape* shape, const int32_t* rowptr_t,
                const int32_t* col_t, const int32_t* perm, const void* vals, const void* g,
                void* gx, void* stream) {
  return dispatch_dtype(dtype, [&](auto t) {
    using T = decltype(t);
    return sparsekern::cuda::conv2d_t(shape, rowptr_t, col_t, perm, typed<T>(vals), typed<T>(g),
                                      typed<T>(gx), stream);
  });
}

int sk_conv2d_wgrad(sk_dtype dtype, const sk_conv_shape* shape, const int32_t* rowptr,
                    const int32_t* col, int64_t nnz, const void* g, const void* x, void* gw,
                    void* stream) {
  return dispatch_dtype(dtype, [&](auto t) {
    using T = decltype(t);
    return sparsekern::cuda::conv2d_wgrad(shape, rowptr, col, nnz, typed<T>(g), typed<T>(x),
                                          typed<T>(gw), stream);
  });
}

}  // extern "C"
