// The layers of the fused MLP program as both C++ backends (csrc/cpu, csrc/cuda)
// take them from the op registry: one flat weights list and a layout code per
// layer (sparsekern/formats.py). Structure and shapes are checked here; each
// backend checks devices and dtypes itself.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <vector>

namespace sparsekern {

// [W] dense; rowptr, col, rowptr_t, col_t, perm, vals for CSR; the same then
// bptr, bcol, bslot for blocked (W x from the blocks, W^T g and the weight
// gradient on the CSR).
struct Layer {
  std::vector<at::Tensor> t;
  int64_t n_out = 0, n_in = 0;
  bool sparse() const { return t.size() >= 6; }
  bool blocked() const { return t.size() == 9; }
  const at::Tensor& values() const { return t[t.size() == 1 ? 0 : 5]; }
  at::Tensor& values() { return t[t.size() == 1 ? 0 : 5]; }
};

// Splits ``weights`` into layers; the first reads n_in features. ``who`` starts
// every message ("sparsekern cpu backend", ...).
inline std::vector<Layer> parse_layers(const std::vector<at::Tensor>& weights,
                                       const std::vector<int64_t>& layouts, int64_t n_in,
                                       const char* who) {
  std::vector<Layer> layers;
  size_t i = 0;
  for (size_t l = 0; l < layouts.size(); ++l) {
    TORCH_CHECK(layouts[l] >= 0 && layouts[l] <= 2, who, ": layer ", l,
                " has unknown layout code ", layouts[l]);
    const size_t n = layouts[l] == 0 ? 1 : layouts[l] == 1 ? 6 : 9;
    TORCH_CHECK(i + n <= weights.size(), who, ": weights list ends inside layer ", l);
    Layer layer;
    layer.t.assign(weights.begin() + i, weights.begin() + i + n);
    layer.n_in = n_in;
    if (n == 1) {
      const at::Tensor& w = layer.t[0];
      TORCH_CHECK(w.dim() == 2 && w.size(1) == n_in, who, ": layer ", l,
                  " is a dense matrix of shape ", w.sizes(), ", expected [*, ", n_in, "]");
      layer.n_out = w.size(0);
    } else {
      for (size_t k = 0; k < n; ++k) {
        if (k == 5) continue;  // the values
        TORCH_CHECK(layer.t[k].scalar_type() == at::kInt && layer.t[k].dim() == 1, who,
                    ": layer ", l, " index tensor ", k, " must be 1-D int32, got ",
                    layer.t[k].scalar_type(), " of shape ", layer.t[k].sizes());
      }
      layer.n_out = layer.t[0].numel() - 1;
      TORCH_CHECK(layer.t[2].numel() - 1 == n_in, who, ": layer ", l, " reads ",
                  layer.t[2].numel() - 1, " inputs, the previous layer gives ", n_in);
      TORCH_CHECK(layer.values().numel() == layer.t[1].numel(), who, ": layer ", l, " has ",
                  layer.values().numel(), " values for ", layer.t[1].numel(), " kept places");
    }
    n_in = layer.n_out;
    layers.push_back(std::move(layer));
    i += n;
  }
  TORCH_CHECK(i == weights.size(), who, ": ", weights.size() - i,
              " weight tensors beyond the last layer");
  TORCH_CHECK(!layers.empty(), who, ": the MLP program has no layer");
  return layers;
}

// Per-layer vectors (scales, shifts): [n_out] each, or empty where allowed.
inline void check_vectors(const std::vector<at::Tensor>& v, const std::vector<Layer>& layers,
                          const char* what, bool allow_empty, const char* who) {
  TORCH_CHECK(v.size() == layers.size(), who, ": ", v.size(), " ", what, " for ", layers.size(),
              " layers");
  for (size_t l = 0; l < v.size(); ++l) {
    if (allow_empty && v[l].numel() == 0) continue;
    TORCH_CHECK(v[l].dim() == 1 && v[l].numel() == layers[l].n_out && v[l].is_contiguous(), who,
                ": layer ", l, " ", what, " has shape ", v[l].sizes(), ", expected a contiguous [",
                layers[l].n_out, "]");
  }
}

}  // namespace sparsekern
