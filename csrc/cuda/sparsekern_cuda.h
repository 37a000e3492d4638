/* C ABI of the sparse engine's CUDA kernels (the .cu files beside this header).
 *
 * Plain C types only (raw device pointers, sizes, a cudaStream_t passed as
 * void*), so the kernels build with nvcc alone (CMakeLists.txt) and any caller
 * can use them; csrc/cuda/binding.cpp wraps them for torch. Semantics of every
 * function: sparsekern/ref.py. Layout is feature-major: a batch of N vectors of
 * width n is an [n, N] row-major matrix with leading dimension ld >= N.
 *
 * One entry per operation: its first argument, an sk_dtype, says whether the
 * floating-point pointers (void*) are float or double.
 *
 * Every function returns 0 on success, SK_ERR_UNSUPPORTED when the request is
 * outside what the kernel handles (the caller falls back), SK_ERR_DTYPE for a
 * dtype that is not an sk_dtype, or a cudaError_t code from the launch
 * (sk_error_string names it). Launches are asynchronous on `stream`.
 */
#ifndef SPARSEKERN_CUDA_H_
#define SPARSEKERN_CUDA_H_

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define SK_ERR_UNSUPPORTED (-1)
/* The dtype argument is not an sk_dtype. */
#define SK_ERR_DTYPE (-2)
/* Most layers the fused MLP kernel takes, and its widest layer. */
#define SK_MAX_LAYERS 16
#define SK_FUSED_MAX_WIDTH 256

/* The element type of every floating-point pointer of a call (void* below):
 * float for SK_FLOAT32, double for SK_FLOAT64. Index arrays are int32_t. */
typedef enum sk_dtype { SK_FLOAT32 = 0, SK_FLOAT64 = 1 } sk_dtype;

const char* sk_error_string(int code);

/* y[r, 0:N] = sum_{k in rowptr[r]..rowptr[r+1]} vals[p(k)] * x[col[k], 0:N], with
 * p(k) = vperm[k] (the stored transpose reads W's values in place) or k when
 * vperm is NULL. row_order (optional, [n_rows]) is the order rows are handed to
 * warps: rows sorted by nnz, longest first, balance the load; NULL is 0..n-1.
 * Uses 16-byte vector loads when N, ldx, ldy and the pointers allow it. */
int sk_csr_spmm(sk_dtype dtype, const int32_t* rowptr, const int32_t* col, const int32_t* vperm,
                const int32_t* row_order, const void* vals, const void* x, int64_t ldx, void* y,
                int64_t ldy, int64_t n_rows, int64_t N, void* stream);

/* y = W x for W in the blocked layout (sparsekern/formats.py BlockedPattern):
 * group g holds rows [4g, 4g + 4) (SK_BLOCK_ROWS), its blocks bptr[g]..bptr[g+1]
 * are columns bcol[b] with the four rows' values bvals[4b .. 4b+3] (zero where
 * not kept). Each input row loaded feeds four output rows. group_order
 * (optional) orders groups like row_order does rows. */
#define SK_BLOCK_ROWS 4
int sk_blocked_spmm(sk_dtype dtype, const int32_t* bptr, const int32_t* bcol,
                    const int32_t* group_order, const void* bvals, const void* x, int64_t ldx,
                    void* y, int64_t ldy, int64_t n_rows, int64_t N, void* stream);

/* out[k] = <a[row_k, 0:N], b[col_k, 0:N]> for every kept entry k (the weight
 * gradient of W x at the kept places). */
int sk_csr_sddmm(sk_dtype dtype, const int32_t* rowptr, const int32_t* col,
                 const int32_t* row_order, const void* a, int64_t lda, const void* b, int64_t ldb,
                 void* out, int64_t n_rows, int64_t N, void* stream);

/* Pruned 2-D convolutions on feature-major maps (sparsekern/ref.py conv2d_ref,
 * conv2d_t_ref, conv2d_wgrad_ref). The weight [c_out, c_in, kh, kw] is the CSR
 * matrix [c_out, c_in * kh * kw] whose column ci * kh * kw + ky * kw + kx is one
 * tap (rowptr, col; the stored transpose rowptr_t, col_t, perm). Maps are
 * contiguous [C, N, H, W]: x [c_in, N, H, W], y and g [c_out, N, Ho, Wo] with
 * Ho = (H + 2 padding - kh) / stride + 1, Wo likewise; zero padding, dilation 1.
 * SK_ERR_UNSUPPORTED when a size is negative, kh, kw or stride < 1, padding < 0,
 * Ho or Wo < 1, or a channel (N * H * W or N * Ho * Wo values) has 2^31 or more. */
typedef struct sk_conv_shape {
  int64_t c_out, c_in, N, H, W;
  int64_t kh, kw, stride, padding;
} sk_conv_shape;

/* y[co, n, oy, ox] = sum_{k in row co} vals[k] * x[ci, n, oy*stride + ky - padding,
 * ox*stride + kx - padding] (zero outside the image), col[k] = (ci, ky, kx). */
int sk_conv2d(sk_dtype dtype, const sk_conv_shape* shape, const int32_t* rowptr,
              const int32_t* col, const void* vals, const void* x, void* y, void* stream);

/* The adjoint w.r.t. x: gx [c_in, N, H, W] from g [c_out, N, Ho, Wo], reading W
 * through the stored transpose (its values vals[perm[k]]): no atomics. */
int sk_conv2d_t(sk_dtype dtype, const sk_conv_shape* shape, const int32_t* rowptr_t,
                const int32_t* col_t, const int32_t* perm, const void* vals, const void* g,
                void* gx, void* stream);

/* The weight gradient at the kept taps: gw[k] = sum_{n, oy, ox} g[co, n, oy, ox] *
 * x[ci, n, oy*stride + ky - padding, ox*stride + kx - padding] for each of the nnz
 * entries k of row co. Deterministic (fixed-order sums, no atomics). */
int sk_conv2d_wgrad(sk_dtype dtype, const sk_conv_shape* shape, const int32_t* rowptr,
                    const int32_t* col, int64_t nnz, const void* g, const void* x, void* gw,
                    void* stream);

/* Per-layer epilogues of the fused MLP program (sparsekern/ref.py, mlp_fwd_ref).
 * Activation matrices are [n, (1 + K) B] with columns [h | v_1 | ... | v_K];
 * scale may be NULL (no gate); act is an id of sparsekern/activations.py.
 *
 * Hidden layer: x = [sigma(a) | sigma'(a) * u], a = scale * m_h + shift,
 * u = scale * m_v. x may equal m. */
int sk_mlp_epilogue_fwd(sk_dtype dtype, const void* m, void* x, const void* scale,
                        const void* shift, int64_t n, int64_t B, int64_t K, int act,
                        void* stream);

/* Last layer: f = scale * m_h + shift ([d, B]) and div[b] = sum_k <probe_k[:, b],
 * scale * m_{v_k}[:, b]> (probe [K, d, B]; with exact, the unit probes: the trace). */
int sk_mlp_head_fwd(sk_dtype dtype, const void* m, void* f, void* div, const void* probe,
                    const void* scale, const void* shift, int64_t d, int64_t B, int64_t K,
                    int exact, void* stream);

/* Reverse of one layer's epilogue (mlp_bwd_ref): from the saved m and the
 * cotangent of the layer output (xbar; on the last layer grad_f [d, B] and
 * grad_div [B] with probe instead), writes mbar = scale * G ([n, (1+K) B]; may
 * equal xbar) and per row g_shift = sum G_h, g_scale = sum G * m (g_scale may be
 * NULL). One block per row: deterministic sums. */
int sk_mlp_epilogue_bwd(sk_dtype dtype, const void* m, const void* xbar, const void* grad_f,
                        const void* grad_div, const void* probe, void* mbar, const void* scale,
                        const void* shift, void* g_scale, void* g_shift, int64_t n, int64_t B,
                        int64_t K, int act, int last, int exact, void* stream);

/* A dense MLP for the fused kernel: layer l maps widths[l] to widths[l+1]
 * features with weight[l] ([widths[l+1], widths[l]] row-major), an optional
 * scale[l] and shift[l] ([widths[l+1]]). m_out/x_out, when not NULL, receive
 * the saved M_l and X_l (l < n_layers - 1) as [widths[l+1], (1+K) B]. */
typedef struct sk_mlp_program {
  int32_t n_layers;
  int32_t widths[SK_MAX_LAYERS + 1];
  const void* weight[SK_MAX_LAYERS];
  const void* scale[SK_MAX_LAYERS];
  const void* shift[SK_MAX_LAYERS];
  void* m_out[SK_MAX_LAYERS];
  void* x_out[SK_MAX_LAYERS];
} sk_mlp_program;

/* The whole forward + JVP program in one launch: f [d, B], div [B] from
 * x0s = [x0 | tan0_1 | ... | tan0_K] ([n0, (1+K) B]). Each block keeps its batch
 * columns' activations and a chunk of the current layer's weights in shared
 * memory. SK_ERR_UNSUPPORTED when a width exceeds SK_FUSED_MAX_WIDTH, there are
 * more than SK_MAX_LAYERS layers, or the activations do not fit the device's
 * shared memory. */
int sk_fused_mlp_fwd(sk_dtype dtype, const sk_mlp_program* prog, const void* x0s,
                     const void* probe, void* f, void* div, int64_t B, int64_t K, int act,
                     int exact, void* stream);

#ifdef __cplusplus
}
#endif

#endif /* SPARSEKERN_CUDA_H_ */
