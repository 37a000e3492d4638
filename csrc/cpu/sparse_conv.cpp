// Sparse convolutions: sparsekern::conv2d, conv2d_t (its adjoint w.r.t. the
// input) and conv2d_wgrad (its weight gradient at the kept taps) on
// feature-major maps [C, N, H, W]. References: sparsekern/ref.py conv2d_ref,
// conv2d_t_ref, conv2d_wgrad_ref; the op contract: sparsekern/ops.py.
//
// All three run one loop, a stride-1 correlation over "planes" (struct Corr):
//
//   out[r, n, a, b] = sum over the entries k of row r of
//                     val[k] * plane_{p(k)}[n, a + dy(k), b + dx(k)]
//
// where a plane is one source channel read at rows i * sy + r0 and columns
// j * sx + c0 (zero outside the source). The forward convolution with stride s
// reads, for each input channel, the s x s phase planes (ay, ax) at
// (i * s + ay - pad, j * s + ax - pad): tap (ky, kx) is plane (ky % s, kx % s)
// shifted by (ky / s, kx / s). The transposed convolution is, for each output
// phase (iy % s, ix % s), a stride-1 correlation of g with the taps of that phase,
// flipped; for stride 1 that is one correlation with all taps.
//
// The loop flattens a plane's (image, row, column) into one index with a row
// stride rs and ir rows per image, so that every tap is a constant offset
// dy * rs + dx and a tile of consecutive outputs of one row (output channel)
// is a handful of vector accumulators fed by contiguous loads, whatever the
// image width. Padding columns and rows are shared between neighbouring rows
// and images where every plane is zero there (a 3 x 3 "same" convolution of a
// W-wide map has rs = W + 1, not W + 2). The grid is cut into chunks of rows;
// a task copies its chunk of every plane it reads (with the zero padding) into
// a scratch buffer that stays in L2 while all its output channels sweep it,
// so each input element is read from memory about once per call. Output
// channels without kept taps are written as zeros; planes no tap reads are not
// copied. Each output sums its taps in CSR order, so conv2d and conv2d_t give
// the same bits whatever the thread count; conv2d_wgrad's sums over the batch
// are split among threads (per-thread vector partials, summed in thread order).
#include "kernels.h"

#include <c10/util/Exception.h>

#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace sparsekern {
namespace cpu {

namespace {

constexpr const char* kWho = "sparsekern cpu backend";

// Scratch per task: every plane's chunk together should stay in L2.
constexpr int64_t kBufferBudget = 256 * 1024;
// Vector accumulators per tile: 8 keep two FMA pipes busy through their latency.
constexpr int64_t kUnroll = 8;

template <typename T>
T* align64(T* p) {
  const auto a = reinterpret_cast<std::uintptr_t>(p);
  return reinterpret_cast<T*>((a + 63) / 64 * 64);
}

int64_t ceil_div(int64_t a, int64_t b) { return a >= 0 ? (a + b - 1) / b : -((-a) / b); }

// Rows i >= 0 of a plane read at i * s + r0 that fall before the source: i * s + r0 < 0.
int64_t leading_zeros(int64_t r0, int64_t s) { return r0 < 0 ? ceil_div(-r0, s) : 0; }

// The first i >= 0 with i * s + r0 >= n_src (past the source).
int64_t first_past(int64_t r0, int64_t s, int64_t n_src) {
  return std::max<int64_t>(0, ceil_div(n_src - r0, s));
}

// A stride-1 correlation over planes (file comment); what each op builds.
struct Corr {
  int64_t batch = 0;             // N
  int64_t src_h = 0, src_w = 0;  // the source [C_src, N, src_h, src_w]
  int64_t sy = 1, sx = 1;        // plane (i, j) reads source (i * sy + r0, j * sx + c0)
  std::vector<int64_t> plane_src, plane_r0, plane_c0;  // per plane
  int64_t out_h = 0, out_w = 0;                        // each row's output grid
  int64_t dy_max = 0, dx_max = 0;
  std::vector<int64_t> row_begin;  // row r's entries: [row_begin[r], row_begin[r + 1])
  std::vector<int64_t> e_plane, e_dy, e_dx, e_id;  // per entry; e_id indexes vals (or gw)
  // Where output (r, n, a, b) goes: dst[r, n, a * dst_sy + dst_r0, b * dst_sx + dst_c0].
  int64_t dst_h = 0, dst_w = 0, dst_sy = 1, dst_sx = 1, dst_r0 = 0, dst_c0 = 0;

  int64_t n_rows() const { return static_cast<int64_t>(row_begin.size()) - 1; }
  int64_t n_planes() const { return static_cast<int64_t>(plane_src.size()); }
  int64_t n_entries() const { return static_cast<int64_t>(e_id.size()); }
};

// The flattened grid of a Corr and its chunks.
struct Grid {
  int64_t rs = 0, ir = 0;  // row stride and rows per image
  int64_t rows = 0;        // batch * ir grid rows
  int64_t chunk_rows = 0, n_chunks = 0;
  int64_t tile = 0;         // outputs per vector tile
  int64_t max_len = 0;      // outputs computed per chunk (a multiple of tile)
  int64_t buf_len = 0;      // elements of a plane's chunk
  int64_t plane_stride = 0;  // between the planes of a task's buffer
  std::vector<int64_t> e_off;  // per entry: plane * plane_stride + dy * rs + dx

  // Grid rows [R0, R0 + chunk's rows) of chunk c, and its computed length.
  int64_t first_row(int64_t c) const { return c * chunk_rows; }
  int64_t chunk_len(int64_t c) const {
    const int64_t n = std::min(chunk_rows, rows - first_row(c));
    return ceil_div(n * rs, tile) * tile;
  }
};

Grid make_grid(const Corr& c, int64_t tile, int64_t elem_size) {
  Grid g;
  g.tile = tile;
  const int64_t hs = c.out_h + c.dy_max, ws = c.out_w + c.dx_max;
  // Shared padding: m leading columns of every row may lie on the previous row's
  // trailing ones where both are zero in every plane (likewise mr rows between images).
  int64_t m = c.dx_max, mr = c.dy_max;
  for (int64_t p = 0; p < c.n_planes(); ++p) {
    mr = std::min({mr, leading_zeros(c.plane_r0[p], c.sy),
                   std::max<int64_t>(0, hs - first_past(c.plane_r0[p], c.sy, c.src_h))});
    m = std::min({m, leading_zeros(c.plane_c0[p], c.sx),
                  std::max<int64_t>(0, ws - first_past(c.plane_c0[p], c.sx, c.src_w))});
  }
  g.rs = ws - m;
  g.ir = hs - mr;
  g.rows = c.batch * g.ir;
  const int64_t halo = c.dy_max * g.rs + c.dx_max;
  const int64_t planes = std::max<int64_t>(1, c.n_planes());
  const int64_t per_plane = kBufferBudget / (planes * elem_size);
  g.chunk_rows = std::max<int64_t>(std::max<int64_t>(4, 2 * c.dy_max),
                                   (per_plane - halo - tile) / g.rs);
  g.chunk_rows = std::min(g.chunk_rows, std::max<int64_t>(g.rows, 1));
  g.n_chunks = ceil_div(g.rows, g.chunk_rows);
  g.max_len = ceil_div(g.chunk_rows * g.rs, tile) * tile;
  g.buf_len = g.max_len + halo;
  // At least one vector of slack, and an odd number of 64-byte lines: the planes' windows
  // then spread over all L1 sets (a 4 KiB stride put all of them on the same few).
  const int64_t line = std::max<int64_t>(1, 64 / elem_size);
  int64_t lines = ceil_div(g.buf_len + 16, line);
  if (lines % 2 == 0) ++lines;
  g.plane_stride = lines * line;
  g.e_off.resize(c.e_id.size());
  for (size_t k = 0; k < c.e_id.size(); ++k) {
    g.e_off[k] = c.e_plane[k] * g.plane_stride + c.e_dy[k] * g.rs + c.e_dx[k];
  }
  return g;
}

// Work split: chunks times blocks of rows of about equal entries, chunk-major, so
// that one thread's consecutive tasks share a chunk (filled once). More row blocks
// when there are few chunks (a small batch), so every thread has work.
std::vector<int64_t> row_blocks(const Corr& c, int64_t n_chunks) {
  const int64_t rows = c.n_rows();
  const int64_t threads = at::get_num_threads();
  int64_t want = 1;
  if (n_chunks < 4 * threads) want = std::min(rows, ceil_div(4 * threads, n_chunks));
  want = std::max<int64_t>(want, 1);
  std::vector<int64_t> bounds{0};
  const int64_t total = c.n_entries() + rows;
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t done = c.row_begin[r + 1] + r + 1;
    const int64_t blocks = static_cast<int64_t>(bounds.size());
    if (blocks < want && done * want >= total * blocks && r + 1 < rows) bounds.push_back(r + 1);
  }
  bounds.push_back(rows);
  return bounds;
}

// d[0:n] = s[0:n] by whole vectors: writes up to V - 1 elements past d + n (from past
// s + n), so it is for destinations whose next elements are written afterwards.
template <typename T>
inline void copy_over(T* d, const T* s, int64_t n) {
  using Vec = at::vec::Vectorized<T>;
  constexpr int64_t V = Vec::size();
  for (int64_t j = 0; j < n; j += V) Vec::loadu(s + j).store(d + j);
}

template <typename T>
inline void zero_over(T* d, int64_t n) {
  using Vec = at::vec::Vectorized<T>;
  constexpr int64_t V = Vec::size();
  const Vec z(T(0));
  for (int64_t j = 0; j < n; j += V) z.store(d + j);
}

// Copy grid rows [R0, R0 + ...) of every plane, buf_len elements each, into buf. Rows
// are written in order by whole vectors (each row's overrun is overwritten by the next;
// the last one's lies in the plane's slack), except that source rows are read exactly
// where a vector would pass the source's end.
template <typename T>
void fill_chunk(const Corr& c, const Grid& g, const T* src, int64_t src_numel, int64_t R0,
                T* buf) {
  using Vec = at::vec::Vectorized<T>;
  constexpr int64_t V = Vec::size();
  const int64_t n_rows = ceil_div(g.buf_len, g.rs);
  // Image and plane row of each grid row (n = batch past the last image).
  thread_local std::vector<int64_t> image, prow;
  image.resize(static_cast<size_t>(n_rows));
  prow.resize(static_cast<size_t>(n_rows));
  for (int64_t rr = 0; rr < n_rows; ++rr) {
    const int64_t R = R0 + rr, n = std::min(R / g.ir, c.batch);
    image[rr] = n;
    prow[rr] = R - n * g.ir;
  }
  for (int64_t p = 0; p < c.n_planes(); ++p) {
    T* dst = buf + p * g.plane_stride;
    const int64_t r0 = c.plane_r0[p], c0 = c.plane_c0[p];
    const int64_t base = c.plane_src[p] * c.batch * c.src_h * c.src_w;
    for (int64_t rr = 0; rr < n_rows; ++rr) {
      T* d = dst + rr * g.rs;
      const int64_t len = std::min(g.rs, g.buf_len - rr * g.rs);
      const int64_t n = image[rr], sr = prow[rr] * c.sy + r0;
      if (n >= c.batch || sr < 0 || sr >= c.src_h) {
        zero_over<T>(d, len);
        continue;
      }
      const int64_t row = base + (n * c.src_h + sr) * c.src_w;
      const int64_t j0 = std::min(len, leading_zeros(c0, c.sx));
      const int64_t j1 = std::max(j0, std::min(len, first_past(c0, c.sx, c.src_w)));
      zero_over<T>(d, j0);
      if (c.sx == 1) {
        const int64_t from = row + j0 + c0;
        if (from + ceil_div(j1 - j0, V) * V <= src_numel) {
          copy_over<T>(d + j0, src + from, j1 - j0);
        } else {
          std::memcpy(d + j0, src + from, static_cast<size_t>(j1 - j0) * sizeof(T));
        }
      } else {
        const T* s = src + row;
        for (int64_t j = j0; j < j1; ++j) d[j] = s[j * c.sx + c0];
      }
      zero_over<T>(d + j1, len - j1);
    }
  }
}

// The valid outputs of one tile: tile offsets [src, src + len) go to dst, dst + sx, ...
// of an output channel's plane (offsets from its start).
// overrun: the segment may be written by whole vectors, the elements past it in dst
// being the same chunk's (written later by the same task).
struct Segment {
  int64_t src, len, dst;
  bool overrun;
};

// The segments of every tile of a chunk (grid rows [R0, R0 + n_rows), len outputs):
// tile i's are segs[first[i]:first[i + 1]].
struct ChunkSegments {
  std::vector<Segment> segs;
  std::vector<int64_t> first;

  void build(const Corr& c, const Grid& g, int64_t R0, int64_t n_rows, int64_t len, int64_t vec) {
    segs.clear();
    first.assign(1, 0);
    for (int64_t q = 0; q < len; q += g.tile) {
      const int64_t q1 = q + g.tile;
      for (int64_t rr = q / g.rs; rr < n_rows && rr * g.rs < q1; ++rr) {
        const int64_t R = R0 + rr, n = R / g.ir, a = R - n * g.ir;
        if (a >= c.out_h) continue;
        const int64_t b0 = std::max<int64_t>(0, q - rr * g.rs);
        const int64_t b1 = std::min<int64_t>(c.out_w, q1 - rr * g.rs);
        if (b0 >= b1) continue;
        segs.push_back({rr * g.rs + b0 - q, b1 - b0,
                        (n * c.dst_h + a * c.dst_sy + c.dst_r0) * c.dst_w + b0 * c.dst_sx +
                            c.dst_c0,
                        true});
      }
      first.push_back(static_cast<int64_t>(segs.size()));
    }
    // A chunk's outputs are one contiguous span of each channel's plane (rows, then
    // images): a segment may overrun by whole vectors (of vec elements) within it. Past
    // it lie the next chunk's outputs (or the next channel's), another task's.
    if (segs.empty()) return;
    const int64_t end = segs.back().dst + segs.back().len;
    for (Segment& s : segs) s.overrun = s.dst + ceil_div(s.len, vec) * vec <= end;
  }
};

// One tile: out[0:U vectors] = sum_k val[k] * buf[off[k] + q + ...].
template <typename T, int64_t U>
inline void sweep_tile(const T* buf, const int64_t* off, const T* val, int64_t n_e, int64_t q,
                       T* out) {
  using Vec = at::vec::Vectorized<T>;
  constexpr int64_t V = Vec::size();
  Vec acc[U];
  for (int64_t u = 0; u < U; ++u) acc[u] = Vec(T(0));
  for (int64_t k = 0; k < n_e; ++k) {
    const Vec w(val[k]);
    const T* x = buf + off[k] + q;
    for (int64_t u = 0; u < U; ++u) acc[u] = at::vec::fmadd(w, Vec::loadu(x + u * V), acc[u]);
  }
  for (int64_t u = 0; u < U; ++u) acc[u].store(out + u * V);
}

// One tile: part[k] += gt[0:U vectors] * buf[off[k] + q + ...] lane-wise.
template <typename T, int64_t U>
inline void sweep_tile_wgrad(const T* buf, const int64_t* off, int64_t n_e, const T* gt,
                             int64_t q, at::vec::Vectorized<T>* part) {
  using Vec = at::vec::Vectorized<T>;
  constexpr int64_t V = Vec::size();
  Vec gv[U];
  for (int64_t u = 0; u < U; ++u) gv[u] = Vec::loadu(gt + u * V);
  for (int64_t k = 0; k < n_e; ++k) {
    const T* x = buf + off[k] + q;
    Vec p = part[k];
    for (int64_t u = 0; u < U; ++u) p = at::vec::fmadd(gv[u], Vec::loadu(x + u * V), p);
    part[k] = p;
  }
}

// Zeros at every output of row r in the chunk from grid row R0.
template <typename T>
void zero_rows(const Corr& c, const Grid& g, int64_t r, int64_t R0, int64_t n_rows, T* dst) {
  for (int64_t rr = 0; rr < n_rows; ++rr) {
    const int64_t R = R0 + rr, n = R / g.ir, a = R - n * g.ir;
    if (a >= c.out_h) continue;
    T* d = dst + ((r * c.batch + n) * c.dst_h + a * c.dst_sy + c.dst_r0) * c.dst_w + c.dst_c0;
    for (int64_t b = 0; b < c.out_w; ++b) d[b * c.dst_sx] = T(0);
  }
}

// dst = the correlation of src with the entries' values vals[e_id]. A task sweeps its
// chunk tile by tile and, per tile, all its rows: the tile's window of the planes
// (dy_max + 1 grid rows of each) stays in L1 while the rows read it.
template <typename T>
void run_corr(const Corr& c, const T* src, int64_t src_numel, const T* vals, T* dst) {
  using Vec = at::vec::Vectorized<T>;
  constexpr int64_t U = kUnroll;
  if (c.batch == 0 || c.n_rows() == 0 || c.out_h == 0 || c.out_w == 0) return;
  const Grid g = make_grid(c, U * Vec::size(), sizeof(T));
  std::vector<T> val(c.e_id.size());
  for (size_t k = 0; k < val.size(); ++k) val[k] = vals[c.e_id[k]];
  const std::vector<int64_t> blocks = row_blocks(c, g.n_chunks);
  const int64_t n_blk = static_cast<int64_t>(blocks.size()) - 1;
  const int64_t plane = c.batch * c.dst_h * c.dst_w;
  at::parallel_for(0, g.n_chunks * n_blk, 1, [&](int64_t t0, int64_t t1) {
    std::vector<T> scratch(static_cast<size_t>(std::max<int64_t>(1, c.n_planes()) * g.plane_stride + 64));
    T* buf = align64(scratch.data());
    alignas(64) T out[(U + 1) * Vec::size()];
    ChunkSegments cs;
    int64_t filled = -1;
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t chunk = t / n_blk, blk = t % n_blk;
      const int64_t R0 = g.first_row(chunk), n_rows = std::min(g.chunk_rows, g.rows - R0);
      const int64_t len = g.chunk_len(chunk);
      const int64_t ra = blocks[blk], rb = blocks[blk + 1];
      bool any = false;
      for (int64_t r = ra; r < rb; ++r) {
        if (c.row_begin[r] == c.row_begin[r + 1]) {
          zero_rows<T>(c, g, r, R0, n_rows, dst);
        } else {
          any = true;
        }
      }
      if (!any) continue;
      if (filled != chunk) {
        fill_chunk<T>(c, g, src, src_numel, R0, buf);
        cs.build(c, g, R0, n_rows, len, Vec::size());
        filled = chunk;
      }
      for (int64_t i = 0, q = 0; q < len; ++i, q += g.tile) {
        const Segment* s0 = cs.segs.data() + cs.first[i];
        const Segment* s1 = cs.segs.data() + cs.first[i + 1];
        if (s0 == s1) continue;
        for (int64_t r = ra; r < rb; ++r) {
          const int64_t k0 = c.row_begin[r], k1 = c.row_begin[r + 1];
          if (k0 == k1) continue;
          sweep_tile<T, U>(buf, g.e_off.data() + k0, val.data() + k0, k1 - k0, q, out);
          T* d = dst + r * plane;
          for (const Segment* s = s0; s < s1; ++s) {
            if (c.dst_sx != 1) {
              for (int64_t b = 0; b < s->len; ++b) d[s->dst + b * c.dst_sx] = out[s->src + b];
            } else if (s->overrun) {
              copy_over<T>(d + s->dst, out + s->src, s->len);
            } else {
              std::memcpy(d + s->dst, out + s->src, static_cast<size_t>(s->len) * sizeof(T));
            }
          }
        }
      }
    }
  });
}

// gw[e_id[k]] = sum over the grid of gsrc[r(k)] * (plane p(k) shifted by (dy, dx)):
// gsrc [n_rows, N, out_h, out_w] is the cotangent of run_corr's output (dst_* of c
// describe it: forward_corr's). Tile by tile as run_corr, with one vector partial per
// entry and thread group, summed at the end in group order.
template <typename T>
void run_corr_wgrad(const Corr& c, const T* src, int64_t src_numel, const T* gsrc, T* gw) {
  using Vec = at::vec::Vectorized<T>;
  constexpr int64_t U = kUnroll;
  constexpr int64_t TILE = U * Vec::size();
  const int64_t nnz = c.n_entries();
  if (nnz == 0) return;
  std::fill(gw, gw + nnz, T(0));
  if (c.batch == 0) return;
  const Grid g = make_grid(c, TILE, sizeof(T));
  const std::vector<int64_t> blocks = row_blocks(c, g.n_chunks);
  const int64_t n_blk = static_cast<int64_t>(blocks.size()) - 1;
  const int64_t n_tasks = g.n_chunks * n_blk;
  const int64_t n_groups = std::min<int64_t>(at::get_num_threads(), n_tasks);
  const int64_t plane = c.batch * c.dst_h * c.dst_w;
  std::vector<T> sums(static_cast<size_t>(n_groups * nnz), T(0));
  auto add = [](Vec& p, Vec& q) { return p + q; };
  at::parallel_for(0, n_groups, 1, [&](int64_t g0, int64_t g1) {
    std::vector<T> scratch(static_cast<size_t>(std::max<int64_t>(1, c.n_planes()) * g.plane_stride + 64));
    T* buf = align64(scratch.data());
    alignas(64) T gt[TILE];
    ChunkSegments cs;
    for (int64_t grp = g0; grp < g1; ++grp) {
      std::vector<Vec> part(static_cast<size_t>(nnz), Vec(T(0)));
      int64_t filled = -1;
      for (int64_t t = grp * n_tasks / n_groups; t < (grp + 1) * n_tasks / n_groups; ++t) {
        const int64_t chunk = t / n_blk, blk = t % n_blk;
        const int64_t R0 = g.first_row(chunk), n_rows = std::min(g.chunk_rows, g.rows - R0);
        const int64_t len = g.chunk_len(chunk);
        const int64_t ra = blocks[blk], rb = blocks[blk + 1];
        if (c.row_begin[ra] == c.row_begin[rb]) continue;
        if (filled != chunk) {
          fill_chunk<T>(c, g, src, src_numel, R0, buf);
          cs.build(c, g, R0, n_rows, len, Vec::size());
          filled = chunk;
        }
        for (int64_t i = 0, q = 0; q < len; ++i, q += TILE) {
          const Segment* s0 = cs.segs.data() + cs.first[i];
          const Segment* s1 = cs.segs.data() + cs.first[i + 1];
          if (s0 == s1) continue;
          for (int64_t r = ra; r < rb; ++r) {
            const int64_t k0 = c.row_begin[r], k1 = c.row_begin[r + 1];
            if (k0 == k1) continue;
            // The tile of the cotangent's row r, zero off the outputs.
            std::fill(gt, gt + TILE, T(0));
            const T* gr = gsrc + r * plane;
            for (const Segment* s = s0; s < s1; ++s) {
              std::memcpy(gt + s->src, gr + s->dst, static_cast<size_t>(s->len) * sizeof(T));
            }
            sweep_tile_wgrad<T, U>(buf, g.e_off.data() + k0, k1 - k0, gt, q,
                                   part.data() + k0);
          }
        }
      }
      T* out = sums.data() + grp * nnz;
      for (int64_t k = 0; k < nnz; ++k) out[k] = at::vec::vec_reduce_all<T>(add, part[k]);
    }
  });
  for (int64_t grp = 0; grp < n_groups; ++grp) {
    const T* s = sums.data() + grp * nnz;
    for (int64_t k = 0; k < nnz; ++k) gw[c.e_id[k]] += s[k];
  }
}

// A fresh output tensor. A large one is new memory from the kernel (malloc maps it), and
// touching it page by page costs about as much as a 95%-pruned convolution writing it
// (some 10 ms per 40 MB): its 2 MiB-aligned interior is advised to be backed by
// transparent huge pages (what PyTorch's THP_MEM_ALLOC_ENABLE does for every large
// allocation), so it faults 512 times less often. Advice only: where the kernel has no
// THP, or refuses, nothing changes.
Tensor new_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  Tensor t = at::empty(sizes, options);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr std::uintptr_t kHuge = std::uintptr_t{2} << 20;
  const std::uintptr_t a = reinterpret_cast<std::uintptr_t>(t.data_ptr());
  const std::uintptr_t lo = (a + kHuge - 1) / kHuge * kHuge;
  const std::uintptr_t hi = (a + t.nbytes()) / kHuge * kHuge;
  if (hi > lo) madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE);
#endif
  return t;
}

// ------------------------------------------------------------------------ checks

struct ConvPattern {
  int64_t c_out = 0, c_in = 0, taps = 0, nnz = 0;
  const int32_t *rowptr = nullptr, *col = nullptr, *rowptr_t = nullptr, *col_t = nullptr,
                *perm = nullptr;
};

void check_index(const Tensor& t, const char* name, const char* op) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " is on ", t.device(), "; ", kWho,
              " runs on CPU tensors");
  TORCH_CHECK(t.scalar_type() == at::kInt && t.dim() == 1 && t.is_contiguous(), op, ": ", name,
              " must be a contiguous 1-D int32 tensor, got ", t.scalar_type(), " of shape ",
              t.sizes(), t.is_contiguous() ? "" : " (not contiguous)");
}

// A CSR pointer array of n + 1 entries from 0 to nnz, never decreasing.
void check_rowptr(const int32_t* p, int64_t n, int64_t nnz, const char* name, const char* op) {
  TORCH_CHECK(p[0] == 0 && p[n] == nnz, op, ": ", name, " must run from 0 to nnz = ", nnz,
              ", got ", p[0], " to ", p[n]);
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK(p[i] <= p[i + 1], op, ": ", name, " decreases at ", i);
  }
}

void check_range(const int32_t* v, int64_t n, int64_t hi, const char* name, const char* op) {
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK(v[i] >= 0 && v[i] < hi, op, ": ", name, "[", i, "] = ", v[i],
                " is outside [0, ", hi, ")");
  }
}

ConvPattern check_pattern(const char* op, const Tensor& rowptr, const Tensor& col,
                          const Tensor& rowptr_t, const Tensor& col_t, const Tensor& perm,
                          int64_t kh, int64_t kw, int64_t stride, int64_t padding) {
  TORCH_CHECK(kh >= 1 && kw >= 1, op, ": kernel size must be >= 1, got ", kh, " x ", kw);
  TORCH_CHECK(stride >= 1, op, ": stride must be >= 1, got ", stride);
  TORCH_CHECK(padding >= 0, op, ": padding must be >= 0, got ", padding);
  check_index(rowptr, "rowptr", op);
  check_index(col, "col", op);
  check_index(rowptr_t, "rowptr_t", op);
  check_index(col_t, "col_t", op);
  check_index(perm, "perm", op);
  TORCH_CHECK(rowptr.numel() >= 1 && rowptr_t.numel() >= 1, op,
              ": rowptr and rowptr_t need at least one entry");
  ConvPattern p;
  p.c_out = rowptr.numel() - 1;
  p.taps = rowptr_t.numel() - 1;
  p.nnz = col.numel();
  TORCH_CHECK(p.taps % (kh * kw) == 0, op, ": rowptr_t has ", rowptr_t.numel(),
              " entries, expected C_in * ", kh, " * ", kw, " + 1 (one column per tap)");
  p.c_in = p.taps / (kh * kw);
  TORCH_CHECK(col_t.numel() == p.nnz && perm.numel() == p.nnz, op,
              ": col, col_t and perm must have one entry per kept tap, got ", p.nnz, ", ",
              col_t.numel(), " and ", perm.numel());
  p.rowptr = rowptr.data_ptr<int32_t>();
  p.col = col.data_ptr<int32_t>();
  p.rowptr_t = rowptr_t.data_ptr<int32_t>();
  p.col_t = col_t.data_ptr<int32_t>();
  p.perm = perm.data_ptr<int32_t>();
  check_rowptr(p.rowptr, p.c_out, p.nnz, "rowptr", op);
  check_rowptr(p.rowptr_t, p.taps, p.nnz, "rowptr_t", op);
  check_range(p.col, p.nnz, p.taps, "col", op);
  check_range(p.col_t, p.nnz, p.c_out, "col_t", op);
  check_range(p.perm, p.nnz, p.nnz, "perm", op);
  return p;
}

// A float32 / float64 CPU feature map [C, N, H, W] with C channels (and dtype of like).
void check_map(const char* op, const Tensor& t, const char* name, int64_t channels,
               const Tensor* like) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " is on ", t.device(), "; ", kWho,
              " runs on CPU tensors");
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, op, ": ", kWho,
              " supports float32 and float64; ", name, " is ", t.scalar_type());
  if (like != nullptr) {
    TORCH_CHECK(t.scalar_type() == like->scalar_type(), op, ": ", name, " has dtype ",
                t.scalar_type(), ", expected ", like->scalar_type());
  }
  TORCH_CHECK(t.dim() == 4, op, ": ", name, " must be 4-D [C, N, H, W] (feature-major), got ",
              t.sizes());
  TORCH_CHECK(t.size(0) == channels, op, ": ", name, " has ", t.size(0),
              " channels, the pattern has ", channels);
}

void check_vals(const char* op, const Tensor& vals, const Tensor& like, int64_t nnz) {
  TORCH_CHECK(vals.device().is_cpu(), op, ": vals is on ", vals.device());
  TORCH_CHECK(vals.scalar_type() == like.scalar_type(), op, ": vals has dtype ",
              vals.scalar_type(), ", expected ", like.scalar_type());
  TORCH_CHECK(vals.dim() == 1 && vals.numel() == nnz, op, ": vals must have shape [", nnz,
              "] (one value per kept tap), got ", vals.sizes());
}

int64_t out_size(const char* op, int64_t h, int64_t w, int64_t kh, int64_t kw, int64_t stride,
                 int64_t padding, bool rows) {
  const int64_t ho = (h + 2 * padding - kh) / stride + 1, wo = (w + 2 * padding - kw) / stride + 1;
  const bool ok = h + 2 * padding >= kh && w + 2 * padding >= kw;
  TORCH_CHECK(ok, op, ": a ", h, " x ", w, " input with a ", kh, " x ", kw, " kernel, stride ",
              stride, " and padding ", padding, " has no output (Ho and Wo must be >= 1)");
  return rows ? ho : wo;
}

// ------------------------------------------------------------- correlations

// conv2d (and conv2d_wgrad): planes (ci, ky % s, kx % s) of x, rows = output channels.
Corr forward_corr(const ConvPattern& p, int64_t N, int64_t H, int64_t W, int64_t ho, int64_t wo,
                  int64_t kh, int64_t kw, int64_t s, int64_t pad) {
  Corr c;
  c.batch = N;
  c.src_h = H;
  c.src_w = W;
  c.sy = c.sx = s;
  c.out_h = ho;
  c.out_w = wo;
  c.dy_max = (kh - 1) / s;
  c.dx_max = (kw - 1) / s;
  c.dst_h = ho;
  c.dst_w = wo;
  c.row_begin.assign(p.rowptr, p.rowptr + p.c_out + 1);
  std::vector<int64_t> slot(static_cast<size_t>(p.c_in * s * s), -1);
  c.e_plane.resize(p.nnz);
  c.e_dy.resize(p.nnz);
  c.e_dx.resize(p.nnz);
  c.e_id.resize(p.nnz);
  const int64_t kk = kh * kw;
  for (int64_t e = 0; e < p.nnz; ++e) {
    const int64_t ci = p.col[e] / kk, t = p.col[e] % kk, ky = t / kw, kx = t % kw;
    const int64_t ay = ky % s, ax = kx % s, key = (ci * s + ay) * s + ax;
    if (slot[key] < 0) {
      slot[key] = c.n_planes();
      c.plane_src.push_back(ci);
      c.plane_r0.push_back(ay - pad);
      c.plane_c0.push_back(ax - pad);
    }
    c.e_plane[e] = slot[key];
    c.e_dy[e] = ky / s;
    c.e_dx[e] = kx / s;
    c.e_id[e] = e;
  }
  return c;
}

// conv2d_t, output phase (ry, rx): gx[ci, n, a * s + ry, b * s + rx] from the taps
// ky = (ry + pad) % s (mod s), kx likewise, through the stored transpose; planes are
// g's channels, flipped taps (dy = Ty - ky / s) reading g at rows i + (ry + pad) / s - Ty.
Corr transpose_corr(const ConvPattern& p, int64_t N, int64_t ho, int64_t wo, int64_t h,
                    int64_t w, int64_t kh, int64_t kw, int64_t s, int64_t pad, int64_t ry,
                    int64_t rx) {
  Corr c;
  c.batch = N;
  c.src_h = ho;
  c.src_w = wo;
  c.out_h = ceil_div(h - ry, s);
  c.out_w = ceil_div(w - rx, s);
  c.dst_h = h;
  c.dst_w = w;
  c.dst_sy = c.dst_sx = s;
  c.dst_r0 = ry;
  c.dst_c0 = rx;
  const int64_t kry = (ry + pad) % s, krx = (rx + pad) % s;
  const int64_t ty = kry < kh ? (kh - 1 - kry) / s : 0, tx = krx < kw ? (kw - 1 - krx) / s : 0;
  c.dy_max = ty;
  c.dx_max = tx;
  const int64_t r0 = (ry + pad) / s - ty, c0 = (rx + pad) / s - tx;
  std::vector<int64_t> slot(static_cast<size_t>(p.c_out), -1);
  const int64_t kk = kh * kw;
  c.row_begin.reserve(p.c_in + 1);
  c.row_begin.push_back(0);
  for (int64_t ci = 0; ci < p.c_in; ++ci) {
    for (int64_t t = 0; t < kk; ++t) {
      const int64_t ky = t / kw, kx = t % kw;
      if (ky % s != kry || kx % s != krx) continue;
      for (int64_t j = p.rowptr_t[ci * kk + t]; j < p.rowptr_t[ci * kk + t + 1]; ++j) {
        const int64_t co = p.col_t[j];
        if (slot[co] < 0) {
          slot[co] = c.n_planes();
          c.plane_src.push_back(co);
          c.plane_r0.push_back(r0);
          c.plane_c0.push_back(c0);
        }
        c.e_plane.push_back(slot[co]);
        c.e_dy.push_back(ty - ky / s);
        c.e_dx.push_back(tx - kx / s);
        c.e_id.push_back(p.perm[j]);
      }
    }
    c.row_begin.push_back(c.n_entries());
  }
  return c;
}

}  // namespace

Tensor conv2d(const Tensor& rowptr, const Tensor& col, const Tensor& rowptr_t,
              const Tensor& col_t, const Tensor& perm, const Tensor& vals, const Tensor& x,
              int64_t c_out, int64_t kh, int64_t kw, int64_t stride, int64_t padding) {
  const char* op = "sparsekern::conv2d";
  const ConvPattern p =
      check_pattern(op, rowptr, col, rowptr_t, col_t, perm, kh, kw, stride, padding);
  TORCH_CHECK(p.c_out == c_out, op, ": rowptr has ", rowptr.numel(),
              " entries, expected C_out + 1 = ", c_out + 1);
  check_map(op, x, "x", p.c_in, nullptr);
  check_vals(op, vals, x, p.nnz);
  const int64_t N = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t ho = out_size(op, H, W, kh, kw, stride, padding, true);
  const int64_t wo = out_size(op, H, W, kh, kw, stride, padding, false);
  Tensor y = new_output({c_out, N, ho, wo}, x.options());
  if (y.numel() == 0) return y;
  if (p.nnz == 0) return y.zero_();
  const Tensor xc = x.contiguous(), vc = vals.contiguous();
  const Corr c = forward_corr(p, N, H, W, ho, wo, kh, kw, stride, padding);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "sparsekern_conv2d", [&] {
    run_corr<scalar_t>(c, xc.data_ptr<scalar_t>(), xc.numel(), vc.data_ptr<scalar_t>(),
                       y.data_ptr<scalar_t>());
  });
  return y;
}

Tensor conv2d_t(const Tensor& rowptr, const Tensor& col, const Tensor& rowptr_t,
                const Tensor& col_t, const Tensor& perm, const Tensor& vals, const Tensor& g,
                int64_t c_in, int64_t h, int64_t w, int64_t kh, int64_t kw, int64_t stride,
                int64_t padding) {
  const char* op = "sparsekern::conv2d_t";
  const ConvPattern p =
      check_pattern(op, rowptr, col, rowptr_t, col_t, perm, kh, kw, stride, padding);
  TORCH_CHECK(p.c_in == c_in, op, ": rowptr_t has ", rowptr_t.numel(),
              " entries, expected C_in * ", kh, " * ", kw, " + 1 = ", c_in * kh * kw + 1);
  check_map(op, g, "g", p.c_out, nullptr);
  check_vals(op, vals, g, p.nnz);
  const int64_t ho = out_size(op, h, w, kh, kw, stride, padding, true);
  const int64_t wo = out_size(op, h, w, kh, kw, stride, padding, false);
  const int64_t N = g.size(1);
  TORCH_CHECK(g.size(2) == ho && g.size(3) == wo, op, ": g has shape ", g.sizes(),
              ", expected [", p.c_out, ", ", N, ", ", ho, ", ", wo, "] for a ", h, " x ", w,
              " input");
  Tensor gx = new_output({c_in, N, h, w}, g.options());
  if (gx.numel() == 0) return gx;
  if (p.nnz == 0) return gx.zero_();
  const Tensor gc = g.contiguous(), vc = vals.contiguous();
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "sparsekern_conv2d_t", [&] {
    // One correlation per output phase; each writes every place of its phase.
    for (int64_t ry = 0; ry < std::min(stride, h); ++ry) {
      for (int64_t rx = 0; rx < std::min(stride, w); ++rx) {
        const Corr c = transpose_corr(p, N, ho, wo, h, w, kh, kw, stride, padding, ry, rx);
        run_corr<scalar_t>(c, gc.data_ptr<scalar_t>(), gc.numel(), vc.data_ptr<scalar_t>(),
                           gx.data_ptr<scalar_t>());
      }
    }
  });
  return gx;
}

Tensor conv2d_wgrad(const Tensor& rowptr, const Tensor& col, const Tensor& rowptr_t,
                    const Tensor& col_t, const Tensor& perm, const Tensor& g, const Tensor& x,
                    int64_t kh, int64_t kw, int64_t stride, int64_t padding) {
  const char* op = "sparsekern::conv2d_wgrad";
  const ConvPattern p =
      check_pattern(op, rowptr, col, rowptr_t, col_t, perm, kh, kw, stride, padding);
  check_map(op, x, "x", p.c_in, nullptr);
  check_map(op, g, "g", p.c_out, &x);
  const int64_t N = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t ho = out_size(op, H, W, kh, kw, stride, padding, true);
  const int64_t wo = out_size(op, H, W, kh, kw, stride, padding, false);
  TORCH_CHECK(g.size(1) == N && g.size(2) == ho && g.size(3) == wo, op, ": g has shape ",
              g.sizes(), ", expected [", p.c_out, ", ", N, ", ", ho, ", ", wo,
              "] (conv2d's output for x of shape ", x.sizes(), ")");
  Tensor gw = at::empty({p.nnz}, x.options());
  if (p.nnz == 0) return gw;
  const Tensor xc = x.contiguous(), gc = g.contiguous();
  const Corr c = forward_corr(p, N, H, W, ho, wo, kh, kw, stride, padding);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "sparsekern_conv2d_wgrad", [&] {
    run_corr_wgrad<scalar_t>(c, xc.data_ptr<scalar_t>(), xc.numel(), gc.data_ptr<scalar_t>(),
                             gw.data_ptr<scalar_t>());
  });
  return gw;
}

}  // namespace cpu
}  // namespace sparsekern
