// CPU kernels of the sparse engine: CSR x dense, SDDMM and the activation
// functors of the fused MLP program. Feature-major throughout: a batch of N
// vectors of width n is an [n, N] row-major matrix, so every sparse row of W
// streams contiguous batch rows of x and the batch is the vector dimension.
// Plain-PyTorch references of every function here: sparsekern/ref.py.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#if defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>
#endif
#include <cmath>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "../common/mlp_program.h"

namespace sparsekern {
namespace cpu {

using at::Tensor;
using sparsekern::Layer;

// Row blocks of about equal work, counting each row as its nnz plus one (the
// row's output is written even when it is empty), so that threads get equal
// shares when the pattern's rows are uneven.
inline std::vector<int64_t> balanced_row_blocks(const int32_t* rowptr, int64_t n_rows,
                                                int64_t n_blocks) {
  std::vector<int64_t> bounds{0};
  const int64_t total = (n_rows > 0 ? rowptr[n_rows] : 0) + n_rows;
  n_blocks = std::max<int64_t>(1, std::min(n_blocks, n_rows));
  for (int64_t b = 1; b < n_blocks; ++b) {
    const int64_t target = total * b / n_blocks;
    int64_t lo = bounds.back(), hi = n_rows;  // first r with rowptr[r] + r >= target
    while (lo < hi) {
      const int64_t mid = (lo + hi) / 2;
      if (rowptr[mid] + mid < target) lo = mid + 1; else hi = mid;
    }
    if (lo > bounds.back() && lo < n_rows) bounds.push_back(lo);
  }
  bounds.push_back(n_rows);
  return bounds;
}

// Columns per panel: the panel of x (n_in x panel) should stay in L2 while all
// rows of W stream over it.
template <typename T>
inline int64_t panel_width(int64_t n_in, int64_t n_cols, int64_t vec) {
  constexpr int64_t kL2Budget = 384 * 1024;
  int64_t w = kL2Budget / (std::max<int64_t>(n_in, 1) * static_cast<int64_t>(sizeof(T)));
  w = std::max<int64_t>(4 * vec, w / (4 * vec) * (4 * vec));
  return std::min(w, std::max<int64_t>(n_cols, 1));
}

// The CSR and blocked products' work split: column panels of x (panel_width)
// times row blocks of about equal nnz (balanced_row_blocks over rowptr's
// n_rows rows or row groups), about four tasks per thread, in panel-major
// order so that consecutive tasks (one thread's share) share a panel.
// body(j0, j1, r0, r1) computes columns [j0, j1) of rows [r0, r1).
template <typename T, typename Body>
inline void for_panel_tasks(const int32_t* rowptr, int64_t n_rows, int64_t n_in, int64_t N,
                            int64_t vec, const Body& body) {
  const int64_t panel = panel_width<T>(n_in, N, vec);
  const int64_t n_panels = (N + panel - 1) / panel;
  const int64_t threads = at::get_num_threads();
  const int64_t want_blocks = std::max<int64_t>(1, (4 * threads + n_panels - 1) / n_panels);
  const auto bounds = balanced_row_blocks(rowptr, n_rows, want_blocks);
  const int64_t n_blocks = static_cast<int64_t>(bounds.size()) - 1;
  at::parallel_for(0, n_panels * n_blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t j0 = (task / n_blocks) * panel;
      const int64_t blk = task % n_blocks;
      body(j0, std::min(N, j0 + panel), bounds[blk], bounds[blk + 1]);
    }
  });
}

// y[r, 0:N] = sum_k vals[p(k)] * x[col[k], 0:N] for k in rowptr[r]:rowptr[r+1],
// with p the identity or ``perm`` (the stored transpose reads W's values in
// place). x has leading dimension ldx, y has ldy.
template <typename T>
void csr_matmul(const int32_t* rowptr, const int32_t* col, const int32_t* perm, const T* vals,
                const T* x, int64_t ldx, T* y, int64_t ldy, int64_t n_rows, int64_t n_in,
                int64_t N) {
  using Vec = at::vec::Vectorized<T>;
  constexpr int64_t V = Vec::size();
  constexpr int64_t U = 4;  // four vector accumulators: enough FMAs in flight to hide latency
  constexpr int64_t TILE = U * V;
  if (n_rows == 0 || N == 0) return;
  for_panel_tasks<T>(rowptr, n_rows, n_in, N, V, [&](int64_t j0, int64_t j1, int64_t ra,
                                                     int64_t rb) {
    for (int64_t r = ra; r < rb; ++r) {
      const int64_t k0 = rowptr[r], k1 = rowptr[r + 1];
      T* yr = y + r * ldy;
      int64_t j = j0;
      for (; j + TILE <= j1; j += TILE) {
        Vec acc[U];
        for (int64_t u = 0; u < U; ++u) acc[u] = Vec(T(0));
        for (int64_t k = k0; k < k1; ++k) {
          const Vec w(vals[perm ? perm[k] : k]);
          const T* xr = x + static_cast<int64_t>(col[k]) * ldx + j;
          for (int64_t u = 0; u < U; ++u) acc[u] = at::vec::fmadd(w, Vec::loadu(xr + u * V), acc[u]);
        }
        for (int64_t u = 0; u < U; ++u) acc[u].store(yr + j + u * V);
      }
      for (; j < j1; j += V) {
        const int64_t n = std::min<int64_t>(V, j1 - j);
        Vec acc(T(0));
        for (int64_t k = k0; k < k1; ++k) {
          const Vec w(vals[perm ? perm[k] : k]);
          acc = at::vec::fmadd(w, Vec::loadu(x + static_cast<int64_t>(col[k]) * ldx + j, n), acc);
        }
        acc.store(yr + j, n);
      }
    }
  });
}

// y = W x for W in the blocked layout (sparsekern/formats.py BlockedPattern):
// groups of kBlockRows rows share a column list, so each load of an input row
// feeds kBlockRows accumulators, where CSR gets one FMA per load. bvals is the
// zero-filled block storage [n_blocks, kBlockRows] (block_values, mlp_program.h).

template <typename T>
void blocked_matmul(const int32_t* bptr, const int32_t* bcol, const T* bvals, const T* x,
                    int64_t ldx, T* y, int64_t ldy, int64_t n_rows, int64_t n_in, int64_t N) {
  using Vec = at::vec::Vectorized<T>;
  constexpr int64_t V = Vec::size();
  constexpr int64_t RB = kBlockRows;
  constexpr int64_t U = 2;  // 4 rows x 2 vectors = 8 accumulators, 2 input vectors in registers
  constexpr int64_t TILE = U * V;
  const int64_t n_groups = (n_rows + RB - 1) / RB;
  if (n_groups == 0 || N == 0) return;
  for_panel_tasks<T>(bptr, n_groups, n_in, N, V, [&](int64_t j0, int64_t j1, int64_t ga,
                                                    int64_t gb) {
    for (int64_t g = ga; g < gb; ++g) {
      const int64_t r0 = g * RB, nr = std::min(RB, n_rows - r0);
      const int64_t b0 = bptr[g], b1 = bptr[g + 1];
      int64_t j = j0;
      for (; j + TILE <= j1; j += TILE) {
        Vec acc[RB][U];
        for (int64_t i = 0; i < RB; ++i)
          for (int64_t u = 0; u < U; ++u) acc[i][u] = Vec(T(0));
        for (int64_t b = b0; b < b1; ++b) {
          const T* xr = x + static_cast<int64_t>(bcol[b]) * ldx + j;
          Vec xv[U];
          for (int64_t u = 0; u < U; ++u) xv[u] = Vec::loadu(xr + u * V);
          const T* w = bvals + b * RB;
          for (int64_t i = 0; i < RB; ++i) {
            const Vec wi(w[i]);
            for (int64_t u = 0; u < U; ++u) acc[i][u] = at::vec::fmadd(wi, xv[u], acc[i][u]);
          }
        }
        for (int64_t i = 0; i < nr; ++i)
          for (int64_t u = 0; u < U; ++u) acc[i][u].store(y + (r0 + i) * ldy + j + u * V);
      }
      for (; j < j1; j += V) {
        const int64_t n = std::min<int64_t>(V, j1 - j);
        Vec acc[RB];
        for (int64_t i = 0; i < RB; ++i) acc[i] = Vec(T(0));
        for (int64_t b = b0; b < b1; ++b) {
          const Vec xv = Vec::loadu(x + static_cast<int64_t>(bcol[b]) * ldx + j, n);
          for (int64_t i = 0; i < RB; ++i) acc[i] = at::vec::fmadd(Vec(bvals[b * RB + i]), xv, acc[i]);
        }
        for (int64_t i = 0; i < nr; ++i) acc[i].store(y + (r0 + i) * ldy + j, n);
      }
    }
  });
}

// y = W x for a dense W [n_rows, n_in] with a handful of inputs (a flow's first
// layer reads the d state dimensions): BLAS spends most of its time packing
// when K is tiny, a direct loop does not.
template <typename T>
void small_k_matmul(const T* w, int64_t ldw, const T* x, int64_t ldx, T* y, int64_t ldy,
                    int64_t n_rows, int64_t n_in, int64_t N) {
  using Vec = at::vec::Vectorized<T>;
  constexpr int64_t V = Vec::size();
  at::parallel_for(0, n_rows, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const T* wr = w + r * ldw;
      T* yr = y + r * ldy;
      for (int64_t j = 0; j < N; j += V) {
        const int64_t n = std::min<int64_t>(V, N - j);
        Vec acc(T(0));
        for (int64_t c = 0; c < n_in; ++c) {
          acc = at::vec::fmadd(Vec(wr[c]), Vec::loadu(x + c * ldx + j, n), acc);
        }
        acc.store(yr + j, n);
      }
    }
  });
}
constexpr int64_t kSmallK = 8;

// out[k] = sum_j a[row_k, j] * b[col_k, j] over j < N: (a b^T) at the kept places.
// For row r a tile of a (4 vectors) stays in registers while the row's entries
// sweep it, each adding into its own vector partial in an L1 buffer; one
// horizontal sum per entry and panel. (Reloading a per entry, or reducing per
// tile, costs more than the FMAs.)
template <typename T>
void csr_sddmm(const int32_t* rowptr, const int32_t* col, const T* a, int64_t lda, const T* b,
               int64_t ldb, T* out, int64_t n_rows, int64_t n_in, int64_t N) {
  using Vec = at::vec::Vectorized<T>;
  constexpr int64_t V = Vec::size();
  constexpr int64_t U = 4;
  constexpr int64_t TILE = U * V;
  const int64_t nnz = n_rows > 0 ? rowptr[n_rows] : 0;
  if (nnz == 0) return;
  std::fill(out, out + nnz, T(0));
  if (N == 0) return;
  int64_t max_row = 0;
  for (int64_t r = 0; r < n_rows; ++r) max_row = std::max<int64_t>(max_row, rowptr[r + 1] - rowptr[r]);
  const int64_t panel = panel_width<T>(n_in, N, V);
  const auto bounds = balanced_row_blocks(rowptr, n_rows, 4 * at::get_num_threads());
  const int64_t n_blocks = static_cast<int64_t>(bounds.size()) - 1;
  auto sum = [](Vec& p, Vec& q) { return p + q; };
  at::parallel_for(0, n_blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<Vec> partial(static_cast<size_t>(max_row));
    for (int64_t blk = begin; blk < end; ++blk) {
      // Panels outside rows: b's panel stays cached across the block's rows.
      for (int64_t j0 = 0; j0 < N; j0 += panel) {
        const int64_t j1 = std::min(N, j0 + panel);
        for (int64_t r = bounds[blk]; r < bounds[blk + 1]; ++r) {
          const int64_t k0 = rowptr[r], n = rowptr[r + 1] - k0;
          if (n == 0) continue;
          std::fill(partial.begin(), partial.begin() + n, Vec(T(0)));
          const T* ar = a + r * lda;
          int64_t j = j0;
          for (; j + TILE <= j1; j += TILE) {
            Vec av[U];
            for (int64_t u = 0; u < U; ++u) av[u] = Vec::loadu(ar + j + u * V);
            for (int64_t i = 0; i < n; ++i) {
              const T* br = b + static_cast<int64_t>(col[k0 + i]) * ldb + j;
              Vec p = partial[i];
              for (int64_t u = 0; u < U; ++u) p = at::vec::fmadd(av[u], Vec::loadu(br + u * V), p);
              partial[i] = p;
            }
          }
          for (; j < j1; j += V) {
            const int64_t w = std::min<int64_t>(V, j1 - j);
            const Vec av = Vec::loadu(ar + j, w);  // zero-filled beyond w
            for (int64_t i = 0; i < n; ++i) {
              const T* br = b + static_cast<int64_t>(col[k0 + i]) * ldb + j;
              partial[i] = at::vec::fmadd(av, Vec::loadu(br, w), partial[i]);
            }
          }
          for (int64_t i = 0; i < n; ++i) out[k0 + i] += at::vec::vec_reduce_all<T>(sum, partial[i]);
        }
      }
    }
  });
}

// exp for the activations. float on AVX2: an inline Cephes-style polynomial
// (2^n p(r), |r| <= ln2/2, about 1 ulp), twice as fast as the out-of-line Sleef
// call behind Vectorized<float>::exp, which the epilogues of small layers are
// bound by. Elsewhere (double, no AVX2): Vectorized::exp.
template <typename T>
inline at::vec::Vectorized<T> vexp(const at::vec::Vectorized<T>& x) {
  return x.exp();
}
#if defined(CPU_CAPABILITY_AVX2)
template <>
inline at::vec::Vectorized<float> vexp<float>(const at::vec::Vectorized<float>& v) {
  __m256 x = v;
  // exp overflows above 88.72; below -87.34 it is subnormal, flushed to 0 here
  // (an absolute error under 1.2e-38). The clamps keep 2^n finite; NaN is put
  // back at the end (min/max would turn it into a bound).
  const __m256 in = x;
  const __m256 big = _mm256_cmp_ps(x, _mm256_set1_ps(88.72283905206835f), _CMP_GT_OQ);
  const __m256 tiny = _mm256_cmp_ps(x, _mm256_set1_ps(-87.33654475055310f), _CMP_LT_OQ);
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.33654475055310f)),
                    _mm256_set1_ps(88.72283905206835f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  // ln2 split in two so that r = x - n ln2 is exact to float precision.
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500E-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507E-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073E-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894E-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459E-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201E-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  // 2^n in two halves: n can reach 128, one past the largest float exponent.
  const __m256i ni = _mm256_cvtps_epi32(n);
  const __m256i half = _mm256_srai_epi32(ni, 1);
  const __m256 s1 = _mm256_castsi256_ps(
      _mm256_slli_epi32(_mm256_add_epi32(half, _mm256_set1_epi32(127)), 23));
  const __m256 s2 = _mm256_castsi256_ps(_mm256_slli_epi32(
      _mm256_add_epi32(_mm256_sub_epi32(ni, half), _mm256_set1_epi32(127)), 23));
  const __m256 out = _mm256_mul_ps(_mm256_mul_ps(p, s1), s2);
  const __m256 sat = _mm256_blendv_ps(_mm256_blendv_ps(out, _mm256_set1_ps(INFINITY), big),
                                      _mm256_setzero_ps(), tiny);
  return _mm256_blendv_ps(sat, in, _mm256_cmp_ps(in, in, _CMP_UNORD_Q));
}
#endif

// softplus and its derivative from one exp: with e = exp(-|a|) in (0, 1],
// softplus(a) = max(a, 0) + log1p(e) and sigmoid(a) = (a >= 0 ? 1 : e) / (1 + e).
// Above 20 both are linear, as torch's softplus (sparsekern/activations.py).
template <typename T>
inline void vsoftplus_d1(const at::vec::Vectorized<T>& a, at::vec::Vectorized<T>& h,
                         at::vec::Vectorized<T>& d1) {
  using Vec = at::vec::Vectorized<T>;
  const Vec one(T(1)), lin = a > Vec(T(20));
  const Vec e = vexp<T>(at::vec::minimum(a, a.neg()));
  h = Vec::blendv(at::vec::maximum(a, Vec(T(0))) + e.log1p(), a, lin);
  d1 = Vec::blendv(Vec::blendv(e, one, a >= Vec(T(0))) / (one + e), one, lin);
}
#if defined(CPU_CAPABILITY_AVX2)
// float: log1p(e) = 2 atanh(s) with s = e / (2 + e) in (0, 1/3], summed as the
// odd series s + s^3/3 + ... + s^13/13 (the next term is below 2e-8 s), so no
// out-of-line Sleef log1p, which cost more than the products at 98% sparsity.
template <>
inline void vsoftplus_d1<float>(const at::vec::Vectorized<float>& a,
                                at::vec::Vectorized<float>& h, at::vec::Vectorized<float>& d1) {
  const __m256 x = a, one = _mm256_set1_ps(1.0f);
  const __m256 absx = _mm256_andnot_ps(_mm256_set1_ps(-0.0f), x);
  const __m256 e = vexp<float>(at::vec::Vectorized<float>(_mm256_sub_ps(_mm256_setzero_ps(), absx)));
  const __m256 ope = _mm256_add_ps(one, e);
  const __m256 s = _mm256_div_ps(e, _mm256_add_ps(ope, one));
  const __m256 s2 = _mm256_mul_ps(s, s);
  __m256 p = _mm256_set1_ps(1.0f / 13);
  p = _mm256_fmadd_ps(p, s2, _mm256_set1_ps(1.0f / 11));
  p = _mm256_fmadd_ps(p, s2, _mm256_set1_ps(1.0f / 9));
  p = _mm256_fmadd_ps(p, s2, _mm256_set1_ps(1.0f / 7));
  p = _mm256_fmadd_ps(p, s2, _mm256_set1_ps(1.0f / 5));
  p = _mm256_fmadd_ps(p, s2, _mm256_set1_ps(1.0f / 3));
  const __m256 l = _mm256_mul_ps(_mm256_set1_ps(2.0f), _mm256_fmadd_ps(_mm256_mul_ps(s, s2), p, s));
  const __m256 lin = _mm256_cmp_ps(x, _mm256_set1_ps(20.0f), _CMP_GT_OQ);
  h = _mm256_blendv_ps(_mm256_add_ps(_mm256_max_ps(x, _mm256_setzero_ps()), l), x, lin);
  const __m256 num = _mm256_blendv_ps(e, one, _mm256_cmp_ps(x, _mm256_setzero_ps(), _CMP_GE_OQ));
  d1 = _mm256_blendv_ps(_mm256_div_ps(num, ope), one, lin);
}
#endif

// tanh. float on AVX2: (1 - e) / (1 + e) with e = exp(-2|a|), signed, where
// |a| >= 1/2 (no cancellation there); below, its Taylor series to a^17 (the
// next term is below 1e-9 |a|). Elsewhere: Vectorized::tanh (Sleef, out of line).
template <typename T>
inline at::vec::Vectorized<T> vtanh(const at::vec::Vectorized<T>& a) {
  return a.tanh();
}
#if defined(CPU_CAPABILITY_AVX2)
template <>
inline at::vec::Vectorized<float> vtanh<float>(const at::vec::Vectorized<float>& v) {
  const __m256 x = v, one = _mm256_set1_ps(1.0f), sign = _mm256_set1_ps(-0.0f);
  const __m256 absx = _mm256_andnot_ps(sign, x);
  const __m256 e = vexp<float>(at::vec::Vectorized<float>(_mm256_mul_ps(_mm256_set1_ps(-2.0f), absx)));
  const __m256 far = _mm256_div_ps(_mm256_sub_ps(one, e), _mm256_add_ps(one, e));
  const __m256 z = _mm256_mul_ps(x, x);
  __m256 p = _mm256_set1_ps(6404582.0f / 10854718875.0f);
  p = _mm256_fmadd_ps(p, z, _mm256_set1_ps(-929569.0f / 638512875.0f));
  p = _mm256_fmadd_ps(p, z, _mm256_set1_ps(21844.0f / 6081075.0f));
  p = _mm256_fmadd_ps(p, z, _mm256_set1_ps(-1382.0f / 155925.0f));
  p = _mm256_fmadd_ps(p, z, _mm256_set1_ps(62.0f / 2835.0f));
  p = _mm256_fmadd_ps(p, z, _mm256_set1_ps(-17.0f / 315.0f));
  p = _mm256_fmadd_ps(p, z, _mm256_set1_ps(2.0f / 15.0f));
  p = _mm256_fmadd_ps(p, z, _mm256_set1_ps(-1.0f / 3.0f));
  const __m256 near = _mm256_fmadd_ps(_mm256_mul_ps(x, z), p, x);
  const __m256 is_far = _mm256_cmp_ps(absx, _mm256_set1_ps(0.5f), _CMP_GE_OQ);
  return _mm256_blendv_ps(near, _mm256_or_ps(far, _mm256_and_ps(sign, x)), is_far);
}
#endif

// Activation ids: sparsekern/activations.py ACT_IDS.
enum Act : int64_t { kIdentity = 0, kTanh = 1, kSigmoid = 2, kSoftplus = 3, kRelu = 4, kElu = 5, kSwish = 6 };

template <typename T>
struct ActVec {
  using Vec = at::vec::Vectorized<T>;

  static Vec sigmoid(const Vec& a) { return (Vec(T(1)) + vexp<T>(a.neg())).reciprocal(); }

  // sigma(a) and sigma'(a) = e / (1 + e)^2 from e = exp(-|a|): no overflow, and
  // sigma' without the cancellation of sigma (1 - sigma) for large |a|.
  static void sigmoid_d1(const Vec& a, Vec& h, Vec& d1) {
    const Vec e = vexp<T>(at::vec::minimum(a, a.neg()));
    const Vec r = (Vec(T(1)) + e).reciprocal();
    h = Vec::blendv(e * r, r, a >= Vec(T(0)));
    d1 = e * r * r;
  }

  // h = sigma(a), d1 = sigma'(a); the formulas follow sparsekern/activations.py.
  static void value_d1(int64_t act, const Vec& a, Vec& h, Vec& d1) {
    const Vec one(T(1)), zero(T(0));
    switch (act) {
      case kTanh:
        h = vtanh<T>(a);
        d1 = one - h * h;
        return;
      case kSigmoid:
        sigmoid_d1(a, h, d1);
        return;
      case kSoftplus:
        vsoftplus_d1<T>(a, h, d1);
        return;
      case kRelu: {
        const Vec pos = a > zero;
        h = at::vec::maximum(a, zero);
        d1 = Vec::blendv(zero, one, pos);
        return;
      }
      case kElu: {
        const Vec pos = a > zero;
        const Vec neg = at::vec::minimum(a, zero);
        h = Vec::blendv(neg.expm1(), a, pos);
        d1 = Vec::blendv(neg.exp(), one, pos);
        return;
      }
      case kSwish: {
        const Vec s = sigmoid(a);
        h = a * s;
        d1 = s * (one + a * (one - s));
        return;
      }
      default:
        h = a;
        d1 = one;
    }
  }

  // d1 = sigma'(a), d2 = sigma''(a).
  static void d1_d2(int64_t act, const Vec& a, Vec& d1, Vec& d2) {
    const Vec one(T(1)), zero(T(0)), two(T(2));
    switch (act) {
      case kTanh: {
        const Vec h = vtanh<T>(a);
        d1 = one - h * h;
        d2 = Vec(T(-2)) * h * d1;
        return;
      }
      case kSigmoid: {
        const Vec h = sigmoid(a);
        d1 = h * (one - h);
        d2 = d1 * (one - two * h);
        return;
      }
      case kSoftplus: {
        const Vec lin = a > Vec(T(20));
        const Vec s = sigmoid(a);
        d1 = Vec::blendv(s, one, lin);
        d2 = Vec::blendv(s * (one - s), zero, a >= Vec(T(20)));
        return;
      }
      case kRelu:
        d1 = Vec::blendv(zero, one, a > zero);
        d2 = zero;
        return;
      case kElu: {
        const Vec pos = a > zero;
        const Vec e = at::vec::minimum(a, zero).exp();
        d1 = Vec::blendv(e, one, pos);
        d2 = Vec::blendv(zero, e, a < zero);
        return;
      }
      case kSwish: {
        const Vec s = sigmoid(a);
        d1 = s * (one + a * (one - s));
        d2 = s * (one - s) * (two + a * (one - two * s));
        return;
      }
      default:
        d1 = one;
        d2 = zero;
    }
  }
};

// Entry points (sparse_ops.cpp, fused_mlp.cpp); semantics in sparsekern/ref.py.
Tensor spmm(const Tensor& rowptr, const Tensor& col, const Tensor& rowptr_t, const Tensor& col_t,
            const Tensor& perm, const Tensor& vals, const Tensor& x, bool transpose);
Tensor sddmm(const Tensor& rowptr, const Tensor& col, const Tensor& a, const Tensor& b);
Tensor spmm_blocked(const Tensor& rowptr, const Tensor& col, const Tensor& rowptr_t,
                    const Tensor& col_t, const Tensor& perm, const Tensor& vals, const Tensor& bptr,
                    const Tensor& bcol, const Tensor& bslot, const Tensor& x);

// Sparse convolutions on feature-major maps [C, N, H, W] (sparse_conv.cpp; contract:
// sparsekern/ops.py conv2d, conv2d_t, conv2d_wgrad; references: sparsekern/ref.py). The
// pattern is that of the weight as the matrix [C_out, C_in * kh * kw].
Tensor conv2d(const Tensor& rowptr, const Tensor& col, const Tensor& rowptr_t,
              const Tensor& col_t, const Tensor& perm, const Tensor& vals, const Tensor& x,
              int64_t c_out, int64_t kh, int64_t kw, int64_t stride, int64_t padding);
Tensor conv2d_t(const Tensor& rowptr, const Tensor& col, const Tensor& rowptr_t,
                const Tensor& col_t, const Tensor& perm, const Tensor& vals, const Tensor& g,
                int64_t c_in, int64_t h, int64_t w, int64_t kh, int64_t kw, int64_t stride,
                int64_t padding);
Tensor conv2d_wgrad(const Tensor& rowptr, const Tensor& col, const Tensor& rowptr_t,
                    const Tensor& col_t, const Tensor& perm, const Tensor& g, const Tensor& x,
                    int64_t kh, int64_t kw, int64_t stride, int64_t padding);

// The CPU products of the shared loops and single ops (csrc/common/mlp_loop.h,
// sparse_ops.h), for element type T.
template <typename T>
struct CpuProducts {
  // The kernels address element (r, j) as r * stride(0) + j. A column stride only means
  // something with two or more columns and a row: the transpose of a [1, n] state is a
  // "contiguous" [n, 1] matrix whose stride(1) is n, and an empty one may have any
  // strides, so B = 0 and 1 and zero-width layers must not be refused (sample(1) was).
  static void check_operands(const Tensor& x, const Tensor& y) {
    auto unit_columns = [](const Tensor& t) {
      return t.numel() == 0 || t.size(1) <= 1 || t.stride(1) == 1;
    };
    TORCH_CHECK(unit_columns(x) && unit_columns(y),
                "sparsekern cpu backend: layer product operands need unit column stride, got x ",
                x.sizes(), " with strides ", x.strides(), " and y ", y.sizes(), " with strides ",
                y.strides());
  }

  void dense_product(const Tensor& w, const Tensor& x, Tensor& y, bool transpose) {
    check_operands(x, y);
    if (!transpose && w.size(1) <= kSmallK) {
      small_k_matmul<T>(w.data_ptr<T>(), w.size(1), x.data_ptr<T>(), x.stride(0),
                        y.data_ptr<T>(), y.stride(0), w.size(0), w.size(1), x.size(1));
    } else {
      at::mm_out(y, transpose ? w.t() : w, x);
    }
  }

  void csr_product(const Tensor& rowptr, const Tensor& col, const Tensor* perm, const Tensor& vals,
                   const Tensor& x, Tensor& y) {
    check_operands(x, y);
    csr_matmul<T>(rowptr.data_ptr<int32_t>(), col.data_ptr<int32_t>(),
                  perm ? perm->data_ptr<int32_t>() : nullptr, vals.data_ptr<T>(), x.data_ptr<T>(),
                  x.stride(0), y.data_ptr<T>(), y.stride(0), rowptr.numel() - 1, x.size(0),
                  x.size(1));
  }

  void blocked_product(const Layer& layer, const Tensor& x, Tensor& y) {
    check_operands(x, y);
    const Tensor bvals = sparsekern::block_values(layer);
    blocked_matmul<T>(layer.bptr().data_ptr<int32_t>(), layer.bcol().data_ptr<int32_t>(),
                      bvals.data_ptr<T>(), x.data_ptr<T>(), x.stride(0), y.data_ptr<T>(),
                      y.stride(0), layer.n_out, layer.n_in, x.size(1));
  }

  Tensor sddmm(const Tensor& rowptr, const Tensor& col, const Tensor& a, const Tensor& b) {
    Tensor out = at::empty({col.numel()}, a.options());
    csr_sddmm<T>(rowptr.data_ptr<int32_t>(), col.data_ptr<int32_t>(), a.data_ptr<T>(), a.size(1),
                 b.data_ptr<T>(), b.size(1), out.data_ptr<T>(), a.size(0), b.size(0), a.size(1));
    return out;
  }
};

// The fused program's ABI: sparsekern/ops.py, csrc/common/mlp_program.h.
std::tuple<Tensor, Tensor, std::vector<Tensor>> mlp_fwd(
    const Tensor& x0, const Tensor& tan0, const Tensor& probe, const std::vector<Tensor>& values,
    const std::vector<Tensor>& index, const std::vector<Tensor>& scales,
    const std::vector<Tensor>& shifts, const std::vector<int64_t>& layouts, int64_t act,
    bool exact, bool save);

std::tuple<Tensor, std::vector<Tensor>, std::vector<Tensor>, std::vector<Tensor>> mlp_bwd(
    const Tensor& grad_f, const Tensor& grad_div, const Tensor& x0, const Tensor& tan0,
    const Tensor& probe, const std::vector<Tensor>& values, const std::vector<Tensor>& index,
    const std::vector<Tensor>& scales, const std::vector<Tensor>& shifts,
    const std::vector<int64_t>& layouts, int64_t act, bool exact,
    const std::vector<Tensor>& saved);

// A whole adaptive Runge-Kutta solve (torchdiffeq's RKAdaptiveStepsizeODESolver) of
// dy/dt = sign * [f(z) | -div f(z)] with the fused program above as the
// time-independent field f, called directly (rk_solve.cpp). y0: z feature-major
// ([d, B] flat), then B log-densities if has_logp. Returns (solution [T, N], nfe,
// accepted steps, rejected steps, seconds inside the field's kernels: the model time).
using SolveResult = std::tuple<Tensor, int64_t, int64_t, int64_t, double>;

SolveResult rk_solve(
    const Tensor& y0, const Tensor& times, double sign, const Tensor& a, const Tensor& c_sol,
    const Tensor& c_err, const Tensor& c_mid, int64_t order, double rtol, double atol,
    double first_step, double safety, double ifactor, double dfactor, int64_t max_num_steps,
    const std::vector<int64_t>& segments, int64_t d, int64_t B, bool has_logp, const Tensor& cols0,
    const Tensor& tan0, const Tensor& probe, const std::vector<Tensor>& values,
    const std::vector<Tensor>& index, const std::vector<Tensor>& scales,
    const std::vector<Tensor>& shifts, const std::vector<int64_t>& layouts, int64_t act,
    bool exact);

// The adjoint's backward solve of one output interval (sparsekern/solver/adjoint.py) with
// the same loop and field (rk_solve.cpp). aug0 [1 + 2N + P]: a_t, y (rk_solve's layout),
// a_y (the same), then the adjoints of the op's values, scales and shifts (each
// flattened, in that order). times: the backward solve's own increasing times s = -t;
// sign: the forward system's. Its derivative is -[0 | F(y) | G_y | G_params], F the
// forward system's derivative and G its vector-Jacobian product with -a_y (mlp_bwd).
// Returns (solution [T, 1 + 2N + P], nfe, accepted steps, rejected steps, model seconds).
SolveResult rk_solve_adjoint(
    const Tensor& aug0, const Tensor& times, double sign, const Tensor& a, const Tensor& c_sol,
    const Tensor& c_err, const Tensor& c_mid, int64_t order, double rtol, double atol,
    double first_step, double safety, double ifactor, double dfactor, int64_t max_num_steps,
    const std::vector<int64_t>& segments, int64_t d, int64_t B, bool has_logp, const Tensor& cols0,
    const Tensor& tan0, const Tensor& probe, const std::vector<Tensor>& values,
    const std::vector<Tensor>& index, const std::vector<Tensor>& scales,
    const std::vector<Tensor>& shifts, const std::vector<int64_t>& layouts, int64_t act,
    bool exact);

}  // namespace cpu
}  // namespace sparsekern
