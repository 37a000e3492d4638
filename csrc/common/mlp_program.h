// The layers of the fused MLP program as both C++ backends (csrc/cpu, csrc/cuda)
// take them from the op registry (sparsekern/ops.py, sparsekern/formats.py):
//
//   values:  one tensor per layer: the [n_out, n_in] matrix of a dense layer, the
//            [nnz] kept values (CSR order) of a csr or blocked layer;
//   index:   the layers' index tensors, concatenated: none for dense, 5 for csr
//            (rowptr, col, rowptr_t, col_t, perm), 8 for blocked (those 5, then
//            bptr, bcol, bslot: W x from the blocks, W^T g and the weight
//            gradient on the CSR);
//   layouts: one code per layer, 0 dense, 1 csr, 2 blocked.
//
// This is the one place C++ decodes that ABI. Structure, counts and shapes are
// checked here, and the float inputs' dtypes and devices against x0 (the Python eager
// path leaves the whole check to this header for the C++ backends, sparsekern/ops.py).
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <cstddef>
#include <vector>

namespace sparsekern {

enum LayoutCode : int64_t { kLayoutDense = 0, kLayoutCsr = 1, kLayoutBlocked = 2 };

// Rows per group of the blocked layout (sparsekern/formats.py BlockedPattern;
// SK_BLOCK_ROWS of the CUDA C ABI).
constexpr int64_t kBlockRows = 4;

// Index tensors per layout code (dense, csr, blocked).
constexpr size_t kIndexCount[3] = {0, 5, 8};

// The names of the index tensors, in their order in ``index``.
constexpr const char* kIndexNames[8] = {"rowptr", "col",  "rowptr_t", "col_t",
                                        "perm",   "bptr", "bcol",     "bslot"};

struct Layer {
  int64_t layout = kLayoutDense;
  at::Tensor w;                   // values: the dense matrix or the [nnz] kept values
  std::vector<at::Tensor> index;  // 0, 5 or 8 int32 tensors (kIndexNames)
  int64_t n_out = 0, n_in = 0;

  bool sparse() const { return layout != kLayoutDense; }
  bool blocked() const { return layout == kLayoutBlocked; }
  const at::Tensor& values() const { return w; }
  at::Tensor& values() { return w; }
  const at::Tensor& rowptr() const { return index[0]; }
  const at::Tensor& col() const { return index[1]; }
  const at::Tensor& rowptr_t() const { return index[2]; }
  const at::Tensor& col_t() const { return index[3]; }
  const at::Tensor& perm() const { return index[4]; }
  const at::Tensor& bptr() const { return index[5]; }
  const at::Tensor& bcol() const { return index[6]; }
  const at::Tensor& bslot() const { return index[7]; }
};

// Decodes (values, index, layouts) into layers; the first reads n_in features.
// ``who`` starts every message ("sparsekern cpu backend", ...).
inline std::vector<Layer> parse_layers(const std::vector<at::Tensor>& values,
                                       const std::vector<at::Tensor>& index,
                                       const std::vector<int64_t>& layouts, int64_t n_in,
                                       const char* who) {
  TORCH_CHECK(!layouts.empty(), who, ": the MLP program has no layer");
  TORCH_CHECK(values.size() == layouts.size(), who, ": ", values.size(),
              " value tensors for ", layouts.size(),
              " layers (values has exactly one tensor per layer)");
  size_t expected = 0;
  for (size_t l = 0; l < layouts.size(); ++l) {
    TORCH_CHECK(layouts[l] >= kLayoutDense && layouts[l] <= kLayoutBlocked, who, ": layer ", l,
                " has unknown layout code ", layouts[l], " (0 dense, 1 csr, 2 blocked)");
    expected += kIndexCount[layouts[l]];
  }
  TORCH_CHECK(index.size() == expected, who, ": ", index.size(), " index tensors for layouts ",
              at::IntArrayRef(layouts), ", expected ", expected,
              " (0 per dense, 5 per csr, 8 per blocked layer)");
  std::vector<Layer> layers;
  layers.reserve(layouts.size());
  size_t i = 0;
  for (size_t l = 0; l < layouts.size(); ++l) {
    Layer layer;
    layer.layout = layouts[l];
    layer.w = values[l];
    layer.n_in = n_in;
    const size_t n = kIndexCount[layer.layout];
    layer.index.assign(index.begin() + i, index.begin() + i + n);
    i += n;
    if (!layer.sparse()) {
      TORCH_CHECK(layer.w.dim() == 2 && layer.w.size(1) == n_in, who, ": layer ", l,
                  " is a dense matrix of shape ", layer.w.sizes(), ", expected [*, ", n_in, "]");
      layer.n_out = layer.w.size(0);
    } else {
      for (size_t k = 0; k < n; ++k) {
        const at::Tensor& t = layer.index[k];
        TORCH_CHECK(t.scalar_type() == at::kInt && t.dim() == 1, who, ": layer ", l, " ",
                    kIndexNames[k], " must be a 1-D int32 tensor, got ", t.scalar_type(),
                    " of shape ", t.sizes());
      }
      layer.n_out = layer.rowptr().numel() - 1;
      TORCH_CHECK(layer.rowptr_t().numel() - 1 == n_in, who, ": layer ", l, " reads ",
                  layer.rowptr_t().numel() - 1, " inputs, the previous layer gives ", n_in);
      TORCH_CHECK(layer.w.dim() == 1 && layer.w.numel() == layer.col().numel(), who, ": layer ",
                  l, " values have shape ", layer.w.sizes(), ", expected [",
                  layer.col().numel(), "] (its kept places)");
      TORCH_CHECK(!layer.blocked() || layer.bslot().numel() == layer.col().numel(), who,
                  ": layer ", l, " bslot has ", layer.bslot().numel(), " entries for ",
                  layer.col().numel(), " kept places");
      TORCH_CHECK(!layer.blocked() ||
                      layer.bptr().numel() == (layer.n_out + kBlockRows - 1) / kBlockRows + 1,
                  who, ": layer ", l, " bptr has ", layer.bptr().numel(), " entries for ",
                  layer.n_out, " rows in groups of ", kBlockRows);
    }
    n_in = layer.n_out;
    layers.push_back(std::move(layer));
  }
  return layers;
}

// Devices and dtypes: every tensor on x0's device, the values of x0's dtype; index
// tensors contiguous. Values are made contiguous here (a no-op when they are).
inline void check_layers(std::vector<Layer>& layers, const at::Tensor& x0, const char* who) {
  for (size_t l = 0; l < layers.size(); ++l) {
    Layer& layer = layers[l];
    TORCH_CHECK(layer.w.device() == x0.device() && layer.w.scalar_type() == x0.scalar_type(),
                who, ": layer ", l, " values have dtype ", layer.w.scalar_type(), " on ",
                layer.w.device(), ", the input has dtype ", x0.scalar_type(), " on ",
                x0.device());
    layer.w = layer.w.contiguous();
    for (size_t k = 0; k < layer.index.size(); ++k) {
      const at::Tensor& t = layer.index[k];
      TORCH_CHECK(t.device() == x0.device() && t.is_contiguous(), who, ": layer ", l, " ",
                  kIndexNames[k], " must be contiguous and on ", x0.device(), ", got ",
                  t.device());
    }
  }
}

// The whole decode as both backends use it: parse_layers, then check_layers.
inline std::vector<Layer> program_layers(const std::vector<at::Tensor>& values,
                                         const std::vector<at::Tensor>& index,
                                         const std::vector<int64_t>& layouts,
                                         const at::Tensor& x0, const char* who) {
  std::vector<Layer> layers = parse_layers(values, index, layouts, x0.size(0), who);
  check_layers(layers, x0, who);
  return layers;
}

// The zero-filled block storage [n_blocks, kBlockRows] of a blocked layer's CSR
// values: bvals[bslot[k]] = vals[k].
inline at::Tensor block_values(const Layer& layer) {
  at::Tensor bvals = at::zeros({layer.bcol().numel() * kBlockRows}, layer.values().options());
  bvals.index_put_({layer.bslot().to(at::kLong)}, layer.values());
  return bvals;
}

// Per-layer vectors (scales, shifts): [n_out] each of x0's dtype and device, or
// empty where allowed.
inline void check_vectors(const std::vector<at::Tensor>& v, const std::vector<Layer>& layers,
                          const char* what, bool allow_empty, const at::Tensor& x0,
                          const char* who) {
  TORCH_CHECK(v.size() == layers.size(), who, ": ", v.size(), " ", what, " for ", layers.size(),
              " layers");
  for (size_t l = 0; l < v.size(); ++l) {
    if (allow_empty && v[l].numel() == 0) continue;
    TORCH_CHECK(v[l].dim() == 1 && v[l].numel() == layers[l].n_out && v[l].is_contiguous(), who,
                ": layer ", l, " ", what, " has shape ", v[l].sizes(), ", expected a contiguous [",
                layers[l].n_out, "]");
    TORCH_CHECK(v[l].scalar_type() == x0.scalar_type() && v[l].device() == x0.device(), who,
                ": layer ", l, " ", what, " is ", v[l].scalar_type(), " on ", v[l].device(),
                ", expected ", x0.scalar_type(), " on ", x0.device());
  }
}

// The sizes of one call: B batch columns, K tangents, d outputs; every
// activation matrix has cols = (1 + K) B columns.
struct ProgramDims {
  int64_t B = 0, K = 0, d = 0, cols = 0;
};

// The checks of mlp_fwd and mlp_bwd on the inputs, before and after the decode.
// Act ids: sparsekern/activations.py ACT_IDS.
constexpr int64_t kMaxActId = 6;

inline void check_inputs(const at::Tensor& x0, const at::Tensor& tan0, int64_t act,
                         const char* op, const char* who) {
  TORCH_CHECK(x0.dim() == 2, op, ": x0 must be a [n0, B] matrix, got ", x0.sizes());
  TORCH_CHECK(x0.scalar_type() == at::kFloat || x0.scalar_type() == at::kDouble, who,
              " supports float32 and float64, got ", x0.scalar_type());
  TORCH_CHECK(tan0.dim() == 3 && tan0.size(1) == x0.size(0) && tan0.size(2) == x0.size(1), op,
              ": tan0 must be [K, ", x0.size(0), ", ", x0.size(1), "], got ", tan0.sizes());
  // The kernels read every float input through x0's element type (void* in the CUDA
  // ABI): another dtype would be reinterpreted, not converted.
  TORCH_CHECK(tan0.scalar_type() == x0.scalar_type() && tan0.device() == x0.device(), op,
              ": tan0 is ", tan0.scalar_type(), " on ", tan0.device(), ", expected x0's ",
              x0.scalar_type(), " on ", x0.device());
  TORCH_CHECK(act >= 0 && act <= kMaxActId, op, ": unknown activation id ", act,
              " (sparsekern/activations.py ACT_IDS)");
}

inline ProgramDims check_program(const at::Tensor& x0, const at::Tensor& tan0,
                                 const at::Tensor& probe, const std::vector<Layer>& layers,
                                 const std::vector<at::Tensor>& scales,
                                 const std::vector<at::Tensor>& shifts, bool exact,
                                 const char* op, const char* who) {
  check_vectors(scales, layers, "scale", true, x0, who);
  check_vectors(shifts, layers, "shift", false, x0, who);
  ProgramDims dims;
  dims.B = x0.size(1);
  dims.K = tan0.size(0);
  dims.d = layers.back().n_out;
  dims.cols = (1 + dims.K) * dims.B;
  TORCH_CHECK(!exact || dims.K == dims.d, op, ": the exact trace needs K = d = ", dims.d,
              " unit tangents, got K = ", dims.K);
  TORCH_CHECK(exact || dims.K == 0 ||
                  (probe.dim() == 3 && probe.size(0) == dims.K && probe.size(1) == dims.d &&
                   probe.size(2) == dims.B),
              op, ": probe must be [", dims.K, ", ", dims.d, ", ", dims.B, "], got ",
              probe.sizes());
  TORCH_CHECK(exact || dims.K == 0 ||
                  (probe.scalar_type() == x0.scalar_type() && probe.device() == x0.device()),
              op, ": probe is ", probe.scalar_type(), " on ", probe.device(), ", expected x0's ",
              x0.scalar_type(), " on ", x0.device());
  return dims;
}

// One call of mlp_fwd or mlp_bwd decoded and checked (after the backend's own
// device check): its layers, sizes, and the probe, contiguous where it is read
// (tangents without the exact trace), else undefined.
struct ProgramCall {
  std::vector<Layer> layers;
  ProgramDims dims;
  at::Tensor probe;
};

inline ProgramCall decode_call(const at::Tensor& x0, const at::Tensor& tan0,
                               const at::Tensor& probe, const std::vector<at::Tensor>& values,
                               const std::vector<at::Tensor>& index,
                               const std::vector<int64_t>& layouts,
                               const std::vector<at::Tensor>& scales,
                               const std::vector<at::Tensor>& shifts, int64_t act, bool exact,
                               const char* op, const char* who) {
  check_inputs(x0, tan0, act, op, who);
  ProgramCall call;
  call.layers = program_layers(values, index, layouts, x0, who);
  call.dims = check_program(x0, tan0, probe, call.layers, scales, shifts, exact, op, who);
  if (call.dims.K > 0 && !exact) call.probe = probe.contiguous();
  return call;
}

// mlp_bwd's cotangents and the tensors mlp_fwd saved: M_0..M_{L-1}, then X_0..X_{L-2}.
inline void check_backward(const at::Tensor& grad_f, const at::Tensor& grad_div,
                           const std::vector<at::Tensor>& saved,
                           const std::vector<Layer>& layers, const ProgramDims& dims,
                           const at::Tensor& x0, const char* op) {
  const size_t L = layers.size();
  TORCH_CHECK(grad_f.dim() == 2 && grad_f.size(0) == dims.d && grad_f.size(1) == dims.B &&
                  grad_div.dim() == 1 && grad_div.size(0) == dims.B,
              op, ": grad_f must be [", dims.d, ", ", dims.B, "] and grad_div [", dims.B,
              "], got ", grad_f.sizes(), " and ", grad_div.sizes());
  TORCH_CHECK(saved.size() == 2 * L - 1, op, ": expected ", 2 * L - 1,
              " saved tensors (mlp_fwd with save=True), got ", saved.size());
  for (size_t i = 0; i < saved.size(); ++i) {
    const int64_t rows = layers[i < L ? i : i - L].n_out;
    TORCH_CHECK(saved[i].dim() == 2 && saved[i].size(0) == rows && saved[i].size(1) == dims.cols,
                op, ": saved[", i, "] has shape ", saved[i].sizes(), ", expected [", rows, ", ",
                dims.cols, "]");
  }
  for (const at::Tensor* t : {&grad_f, &grad_div}) {
    TORCH_CHECK(t->scalar_type() == x0.scalar_type() && t->device() == x0.device(), op,
                ": the cotangents must be ", x0.scalar_type(), " on ", x0.device(), ", got ",
                t->scalar_type(), " on ", t->device());
  }
  for (const at::Tensor& t : saved) {
    TORCH_CHECK(t.scalar_type() == x0.scalar_type() && t.device() == x0.device(), op,
                ": the saved tensors must be ", x0.scalar_type(), " on ", x0.device(), ", got ",
                t.scalar_type(), " on ", t.device());
  }
}

}  // namespace sparsekern
