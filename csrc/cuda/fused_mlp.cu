// The fused forward + JVP program of a small dense MLP in one launch.
// Reference: sparsekern/ref.py mlp_fwd_ref. C ABI: sparsekern_cuda.h.
//
// A block owns BT batch columns and all G = 1 + K column groups (the state and
// the K tangents). Its activations live in shared memory for the whole network
// ([G][width][BT], two buffers, in and out); each layer's weights pass through
// shared memory in chunks of OC rows. A thread owns one batch column b and
// kRowsPerThread rows of a chunk: it computes the products of those rows for
// every group (reusing each activation it reads kRowsPerThread times), then
// applies the activation and its JVP to its own elements, so no barrier is
// needed between the product and the epilogue. In a warp all lanes share the
// rows (BT = 32) and differ in b: weight reads are broadcasts, activation reads
// hit distinct banks. Products are fp32/fp64 FMAs (exact IEEE, no tensor cores).
#include "device_common.h"
#include "sparsekern_cuda.h"

namespace sparsekern {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kRowsPerThread = 4;
constexpr int kBatchTiles[] = {32, 16};

template <typename T>
__global__ void __launch_bounds__(kThreads)
    fused_mlp_fwd_kernel(const sk_mlp_program prog, const T* __restrict__ x0s,
                         const T* __restrict__ probe, T* __restrict__ f, T* __restrict__ div,
                         int64_t B, int64_t K, int act, int exact, int bt, int wmax) {
  extern __shared__ unsigned char smem_raw[];
  T* smem = reinterpret_cast<T*>(smem_raw);
  const int G = static_cast<int>(K) + 1;
  const int64_t group_stride = int64_t(wmax) * bt;  // one column group in a buffer
  T* const buf0 = smem;
  T* const buf1 = smem + G * group_stride;
  T* const ws = smem + 2 * G * group_stride;  // [oc][n_in] weight chunk
  const int tid = threadIdx.x;
  const int b = tid % bt, og = tid / bt;
  const int oc = (kThreads / bt) * kRowsPerThread;
  const int64_t b0 = int64_t(blockIdx.x) * bt, col = b0 + b;
  const bool valid = col < B;
  const int64_t ld = G * B;

  int n_in = prog.widths[0];
  for (int64_t idx = tid; idx < int64_t(G) * n_in * bt; idx += kThreads) {
    const int64_t g = idx / (int64_t(n_in) * bt), i = (idx / bt) % n_in, bb = idx % bt;
    buf0[g * group_stride + i * bt + bb] =
        b0 + bb < B ? x0s[i * ld + g * B + b0 + bb] : T(0);
  }
  __syncthreads();

  bool cur = false;  // which buffer holds the current layer's input
  for (int l = 0; l < prog.n_layers; ++l) {
    const bool last = l + 1 == prog.n_layers;
    const int n_out = prog.widths[l + 1];
    const T* __restrict__ w = static_cast<const T*>(prog.weight[l]);
    const T* __restrict__ scale = static_cast<const T*>(prog.scale[l]);
    const T* __restrict__ shift = static_cast<const T*>(prog.shift[l]);
    T* m_out = static_cast<T*>(prog.m_out[l]);
    T* x_out = last ? nullptr : static_cast<T*>(prog.x_out[l]);
    const T* in = cur ? buf1 : buf0;
    T* out = cur ? buf0 : buf1;
    for (int c0 = 0; c0 < n_out; c0 += oc) {
      const int rows = min(oc, n_out - c0);
      __syncthreads();  // the previous chunk's readers of ws are done
      for (int idx = tid; idx < rows * n_in; idx += kThreads) {
        ws[idx] = w[int64_t(c0) * n_in + idx];
      }
      __syncthreads();
      const int lr = og * kRowsPerThread;  // this thread's rows within the chunk
      for (int g = 0; g < G; ++g) {
        // Fully unrolled loops over r keep acc in registers (a data-dependent
        // trip count would put it in local memory).
        T acc[kRowsPerThread];
#pragma unroll
        for (int r = 0; r < kRowsPerThread; ++r) acc[r] = T(0);
        const T* x = in + g * group_stride + b;
        // Rows past the chunk read stale ws entries; their results are never stored.
        for (int i = 0; i < n_in; ++i) {
          const T xv = x[i * bt];
#pragma unroll
          for (int r = 0; r < kRowsPerThread; ++r) {
            acc[r] = fma(ws[(lr + r) * n_in + i], xv, acc[r]);
          }
        }
#pragma unroll
        for (int r = 0; r < kRowsPerThread; ++r) {
          if (lr + r >= rows) continue;
          const int o = c0 + lr + r;
          out[g * group_stride + o * bt + b] = acc[r];
          if (m_out && valid) m_out[o * ld + g * B + col] = acc[r];
        }
      }
      for (int r = 0; r < kRowsPerThread; ++r) {
        if (lr + r >= rows) continue;
        const int o = c0 + lr + r;
        const T s = scale ? scale[o] : T(1);
        T* e = out + o * bt + b;
        const T a = s * e[0] + shift[o];
        if (last) {
          e[0] = a;
          if (valid) f[o * B + col] = a;
          for (int g = 1; g < G; ++g) e[g * group_stride] *= s;
          continue;
        }
        T h, d1;
        act_d1(act, a, h, d1);
        e[0] = h;
        if (x_out && valid) x_out[o * ld + col] = h;
        for (int g = 1; g < G; ++g) {
          const T v = d1 * (s * e[g * group_stride]);
          e[g * group_stride] = v;
          if (x_out && valid) x_out[o * ld + g * B + col] = v;
        }
      }
    }
    __syncthreads();  // the next layer reads every row of out
    cur = !cur;
    n_in = n_out;
  }

  // The current buffer now holds [f | u_1 .. u_K] of the last layer (n_in = d rows).
  if (tid < bt && b0 + tid < B) {
    const T* u = (cur ? buf1 : buf0) + tid;
    T acc = T(0);
    for (int k = 0; k < K; ++k) {
      const T* uk = u + (k + 1) * group_stride;
      if (exact) {
        if (k < n_in) acc += uk[k * bt];
      } else {
        for (int o = 0; o < n_in; ++o) acc = fma(probe[(int64_t(k) * n_in + o) * B + b0 + tid],
                                                 uk[o * bt], acc);
      }
    }
    div[b0 + tid] = acc;
  }
}

template <typename T>
int64_t shared_bytes(int64_t G, int wmax, int bt) {
  const int64_t oc = (kThreads / bt) * kRowsPerThread;
  return (2 * G * wmax * bt + oc * wmax) * int64_t(sizeof(T));
}

template <typename T>
int fused_fwd(const sk_mlp_program* prog, const T* x0s, const T* probe, T* f, T* div, int64_t B,
              int64_t K, int act, int exact, void* stream) {
  if (prog->n_layers < 1 || prog->n_layers > SK_MAX_LAYERS || K < 0) return SK_ERR_UNSUPPORTED;
  int wmax = 0;
  for (int l = 0; l <= prog->n_layers; ++l) wmax = std::max(wmax, int(prog->widths[l]));
  if (wmax > SK_FUSED_MAX_WIDTH) return SK_ERR_UNSUPPORTED;
  if (B <= 0) return 0;
  int dev = 0, optin = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err == cudaSuccess) {
    err = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
  }
  if (err != cudaSuccess) return static_cast<int>(err);
  for (const int bt : kBatchTiles) {
    const int64_t bytes = shared_bytes<T>(K + 1, wmax, bt);
    if (bytes > optin) continue;
    // Above 48 KB a kernel must opt in to the larger dynamic shared memory.
    err = cudaFuncSetAttribute(fused_mlp_fwd_kernel<T>,
                               cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes));
    if (err != cudaSuccess) return static_cast<int>(err);
    const unsigned blocks = static_cast<unsigned>(ceil_div(B, bt));
    fused_mlp_fwd_kernel<T><<<blocks, kThreads, bytes, static_cast<cudaStream_t>(stream)>>>(
        *prog, x0s, probe, f, div, B, K, act, exact, bt, wmax);
    return static_cast<int>(cudaGetLastError());
  }
  return SK_ERR_UNSUPPORTED;
}

}  // namespace
}  // namespace cuda
}  // namespace sparsekern

extern "C" {

int sk_fused_mlp_fwd(sk_dtype dtype, const sk_mlp_program* prog, const void* x0s,
                     const void* probe, void* f, void* div, int64_t B, int64_t K, int act,
                     int exact, void* stream) {
  namespace skc = sparsekern::cuda;
  return skc::dispatch_dtype(dtype, [&](auto t) {
    using T = decltype(t);
    return skc::fused_fwd(prog, skc::typed<T>(x0s), skc::typed<T>(probe), skc::typed<T>(f),
                          skc::typed<T>(div), B, K, act, exact, stream);
  });
}

}  // extern "C"
