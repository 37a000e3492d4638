// CSR x dense (W x, W^T x through the stored transpose), blocked x dense, and
// SDDMM, feature-major. References: sparsekern/ref.py spmm_ref, spmm_blocked_ref,
// sddmm_ref. C ABI: sparsekern_cuda.h.
//
// SpMM: one warp per sparse row and per tile of 32 * VEC batch columns. The
// warp reads 32 of the row's (col, value) pairs at once, one per lane, and
// broadcasts them with shuffles; every lane then streams VEC contiguous columns
// of x's row col (16-byte loads when aligned), so x is read coalesced and W's
// entries once per tile. Rows reach warps in `row_order` (longest first):
// neighbouring warps of a block get rows of similar length and the long rows
// start first, which balances skewed patterns without splitting rows (no
// atomics, deterministic sums).
#include <type_traits>

#include "device_common.h"
#include "sparsekern_cuda.h"

namespace sparsekern {
namespace cuda {
namespace {

constexpr int kWarpsPerBlock = 8;
constexpr int64_t kMaxGridY = 65535;

template <typename T, int VEC>
__global__ void __launch_bounds__(kWarp* kWarpsPerBlock)
    csr_spmm_kernel(const int32_t* __restrict__ rowptr, const int32_t* __restrict__ col,
                    const int32_t* __restrict__ vperm, const int32_t* __restrict__ row_order,
                    const T* __restrict__ vals, const T* __restrict__ x, int64_t ldx,
                    T* __restrict__ y, int64_t ldy, int64_t n_rows, int64_t N) {
  const int64_t slot = int64_t(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp;
  if (slot >= n_rows) return;  // warp-uniform: the shuffles below see full warps
  const int lane = threadIdx.x % kWarp;
  const int64_t r = row_order ? row_order[slot] : slot;
  const int32_t k0 = rowptr[r], k1 = rowptr[r + 1];
  for (int64_t j = (int64_t(blockIdx.y) * kWarp + lane) * VEC; j - lane * VEC < N;
       j += int64_t(gridDim.y) * kWarp * VEC) {
    const bool active = j < N;
    T acc[VEC];
    for (int u = 0; u < VEC; ++u) acc[u] = T(0);
    for (int32_t kb = k0; kb < k1; kb += kWarp) {
      const int32_t kk = kb + lane;
      int32_t c = 0;
      T v = T(0);
      if (kk < k1) {
        c = col[kk];
        v = vals[vperm ? vperm[kk] : kk];
      }
      const int n = min(kWarp, k1 - kb);
      for (int t = 0; t < n; ++t) {
        const int32_t ct = __shfl_sync(kFullMask, c, t);
        const T vt = __shfl_sync(kFullMask, v, t);
        if (active) {
          T xv[VEC];
          Vec<T, VEC>::load(x + int64_t(ct) * ldx + j, xv);
          for (int u = 0; u < VEC; ++u) acc[u] = fma(vt, xv[u], acc[u]);
        }
      }
    }
    if (active) Vec<T, VEC>::store(y + r * ldy + j, acc);
  }
}

// Blocked layout: as the CSR kernel, one warp per group of SK_BLOCK_ROWS rows;
// each broadcast block carries a column and four values, so every x element
// loaded feeds four accumulators.
template <typename T, int VEC>
__global__ void __launch_bounds__(kWarp* kWarpsPerBlock)
    blocked_spmm_kernel(const int32_t* __restrict__ bptr, const int32_t* __restrict__ bcol,
                        const int32_t* __restrict__ group_order, const T* __restrict__ bvals,
                        const T* __restrict__ x, int64_t ldx, T* __restrict__ y, int64_t ldy,
                        int64_t n_rows, int64_t n_groups, int64_t N) {
  constexpr int R = SK_BLOCK_ROWS;
  const int64_t slot = int64_t(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp;
  if (slot >= n_groups) return;  // warp-uniform
  const int lane = threadIdx.x % kWarp;
  const int64_t g = group_order ? group_order[slot] : slot;
  const int32_t k0 = bptr[g], k1 = bptr[g + 1];
  for (int64_t j = (int64_t(blockIdx.y) * kWarp + lane) * VEC; j - lane * VEC < N;
       j += int64_t(gridDim.y) * kWarp * VEC) {
    const bool active = j < N;
    T acc[R][VEC];
#pragma unroll
    for (int i = 0; i < R; ++i)
#pragma unroll
      for (int u = 0; u < VEC; ++u) acc[i][u] = T(0);
    for (int32_t kb = k0; kb < k1; kb += kWarp) {
      const int32_t kk = kb + lane;
      int32_t c = 0;
      T w[R];
#pragma unroll
      for (int i = 0; i < R; ++i) w[i] = kk < k1 ? bvals[int64_t(kk) * R + i] : T(0);
      if (kk < k1) c = bcol[kk];
      const int n = min(kWarp, k1 - kb);
      for (int t = 0; t < n; ++t) {
        const int32_t ct = __shfl_sync(kFullMask, c, t);
        T wt[R];
#pragma unroll
        for (int i = 0; i < R; ++i) wt[i] = __shfl_sync(kFullMask, w[i], t);
        if (active) {
          T xv[VEC];
          Vec<T, VEC>::load(x + int64_t(ct) * ldx + j, xv);
#pragma unroll
          for (int i = 0; i < R; ++i)
#pragma unroll
            for (int u = 0; u < VEC; ++u) acc[i][u] = fma(wt[i], xv[u], acc[i][u]);
        }
      }
    }
    if (active) {
#pragma unroll
      for (int i = 0; i < R; ++i) {
        if (g * R + i < n_rows) Vec<T, VEC>::store(y + (g * R + i) * ldy + j, acc[i]);
      }
    }
  }
}

// SDDMM, one warp per row (in row_order). Wide batches: the lanes split the
// batch of each entry and reduce with shuffles. Narrow batches (N < 32): each
// lane takes whole entries, so lanes are not idle.
template <typename T, int VEC, bool LANES_OVER_ENTRIES>
__global__ void __launch_bounds__(kWarp* kWarpsPerBlock)
    csr_sddmm_kernel(const int32_t* __restrict__ rowptr, const int32_t* __restrict__ col,
                     const int32_t* __restrict__ row_order, const T* __restrict__ a, int64_t lda,
                     const T* __restrict__ b, int64_t ldb, T* __restrict__ out, int64_t n_rows,
                     int64_t N) {
  const int64_t slot = int64_t(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp;
  if (slot >= n_rows) return;
  const int lane = threadIdx.x % kWarp;
  const int64_t r = row_order ? row_order[slot] : slot;
  const T* ar = a + r * lda;
  const int32_t k0 = rowptr[r], k1 = rowptr[r + 1];
  if constexpr (LANES_OVER_ENTRIES) {
    for (int32_t k = k0 + lane; k < k1; k += kWarp) {
      const T* br = b + int64_t(col[k]) * ldb;
      T acc = T(0);
      for (int64_t j = 0; j < N; ++j) acc = fma(ar[j], br[j], acc);
      out[k] = acc;
    }
  } else {
    for (int32_t k = k0; k < k1; ++k) {
      const T* br = b + int64_t(col[k]) * ldb;
      T acc = T(0);
      for (int64_t j = int64_t(lane) * VEC; j < N; j += kWarp * VEC) {
        T av[VEC], bv[VEC];
        Vec<T, VEC>::load(ar + j, av);
        Vec<T, VEC>::load(br + j, bv);
        for (int u = 0; u < VEC; ++u) acc = fma(av[u], bv[u], acc);
      }
      acc = warp_sum(acc);
      if (lane == 0) out[k] = acc;
    }
  }
}

// The launch of a product with one warp per row (or row group) of n_units and
// per tile of 32 * VEC batch columns: VEC = 16 / sizeof(T) (16-byte loads) when N,
// ldx, ldy and the pointers allow it, else 1. launch(vec, grid, block) queues
// the kernel, vec a std::integral_constant<int, VEC>.
template <typename T, typename Launch>
int launch_row_product(int64_t n_units, int64_t N, const T* x, int64_t ldx, const T* y,
                       int64_t ldy, Launch&& launch) {
  if (n_units <= 0 || N <= 0) return 0;
  constexpr int V = 16 / sizeof(T);
  const bool vec = N % V == 0 && ldx % V == 0 && ldy % V == 0 && aligned16(x) && aligned16(y);
  const int width = kWarp * (vec ? V : 1);
  const dim3 grid(static_cast<unsigned>(ceil_div(n_units, kWarpsPerBlock)),
                  static_cast<unsigned>(std::min(ceil_div(N, width), kMaxGridY)));
  const dim3 block(kWarp * kWarpsPerBlock);
  if (vec) {
    launch(std::integral_constant<int, V>(), grid, block);
  } else {
    launch(std::integral_constant<int, 1>(), grid, block);
  }
  return static_cast<int>(cudaGetLastError());
}

template <typename T>
int spmm(const int32_t* rowptr, const int32_t* col, const int32_t* vperm,
         const int32_t* row_order, const T* vals, const T* x, int64_t ldx, T* y, int64_t ldy,
         int64_t n_rows, int64_t N, void* stream) {
  return launch_row_product(n_rows, N, x, ldx, y, ldy, [&](auto vec, dim3 grid, dim3 block) {
    csr_spmm_kernel<T, decltype(vec)::value><<<grid, block, 0, static_cast<cudaStream_t>(stream)>>>(
        rowptr, col, vperm, row_order, vals, x, ldx, y, ldy, n_rows, N);
  });
}

template <typename T>
int blocked_spmm(const int32_t* bptr, const int32_t* bcol, const int32_t* group_order,
                 const T* bvals, const T* x, int64_t ldx, T* y, int64_t ldy, int64_t n_rows,
                 int64_t N, void* stream) {
  const int64_t n_groups = ceil_div(n_rows, SK_BLOCK_ROWS);
  return launch_row_product(n_groups, N, x, ldx, y, ldy, [&](auto vec, dim3 grid, dim3 block) {
    blocked_spmm_kernel<T, decltype(vec)::value>
        <<<grid, block, 0, static_cast<cudaStream_t>(stream)>>>(bptr, bcol, group_order, bvals,
                                                                 x, ldx, y, ldy, n_rows, n_groups,
                                                                 N);
  });
}

template <typename T>
int sddmm(const int32_t* rowptr, const int32_t* col, const int32_t* row_order, const T* a,
          int64_t lda, const T* b, int64_t ldb, T* out, int64_t n_rows, int64_t N,
          void* stream) {
  if (n_rows <= 0) return 0;
  constexpr int V = 16 / sizeof(T);
  const dim3 grid(static_cast<unsigned>(ceil_div(n_rows, kWarpsPerBlock)));
  const dim3 block(kWarp * kWarpsPerBlock);
  auto s = static_cast<cudaStream_t>(stream);
  if (N < kWarp) {
    csr_sddmm_kernel<T, 1, true><<<grid, block, 0, s>>>(rowptr, col, row_order, a, lda, b, ldb,
                                                        out, n_rows, N);
  } else if (N % V == 0 && lda % V == 0 && ldb % V == 0 && aligned16(a) && aligned16(b)) {
    csr_sddmm_kernel<T, V, false><<<grid, block, 0, s>>>(rowptr, col, row_order, a, lda, b, ldb,
                                                         out, n_rows, N);
  } else {
    csr_sddmm_kernel<T, 1, false><<<grid, block, 0, s>>>(rowptr, col, row_order, a, lda, b, ldb,
                                                         out, n_rows, N);
  }
  return static_cast<int>(cudaGetLastError());
}

}  // namespace
}  // namespace cuda
}  // namespace sparsekern

using sparsekern::cuda::blocked_spmm;
using sparsekern::cuda::dispatch_dtype;
using sparsekern::cuda::sddmm;
using sparsekern::cuda::spmm;
using sparsekern::cuda::typed;

extern "C" {

const char* sk_error_string(int code) {
  if (code == SK_ERR_UNSUPPORTED) return "not supported by this kernel";
  if (code == SK_ERR_DTYPE) return "unknown sk_dtype (SK_FLOAT32 or SK_FLOAT64)";
  return cudaGetErrorString(static_cast<cudaError_t>(code));
}

int sk_csr_spmm(sk_dtype dtype, const int32_t* rowptr, const int32_t* col, const int32_t* vperm,
                const int32_t* row_order, const void* vals, const void* x, int64_t ldx, void* y,
                int64_t ldy, int64_t n_rows, int64_t N, void* stream) {
  return dispatch_dtype(dtype, [&](auto t) {
    using T = decltype(t);
    return spmm(rowptr, col, vperm, row_order, typed<T>(vals), typed<T>(x), ldx, typed<T>(y),
                ldy, n_rows, N, stream);
  });
}

int sk_blocked_spmm(sk_dtype dtype, const int32_t* bptr, const int32_t* bcol,
                    const int32_t* group_order, const void* bvals, const void* x, int64_t ldx,
                    void* y, int64_t ldy, int64_t n_rows, int64_t N, void* stream) {
  return dispatch_dtype(dtype, [&](auto t) {
    using T = decltype(t);
    return blocked_spmm(bptr, bcol, group_order, typed<T>(bvals), typed<T>(x), ldx, typed<T>(y),
                        ldy, n_rows, N, stream);
  });
}

int sk_csr_sddmm(sk_dtype dtype, const int32_t* rowptr, const int32_t* col,
                 const int32_t* row_order, const void* a, int64_t lda, const void* b, int64_t ldb,
                 void* out, int64_t n_rows, int64_t N, void* stream) {
  return dispatch_dtype(dtype, [&](auto t) {
    using T = decltype(t);
    return sddmm(rowptr, col, row_order, typed<T>(a), lda, typed<T>(b), ldb, typed<T>(out),
                 n_rows, N, stream);
  });
}

}  // extern "C"
