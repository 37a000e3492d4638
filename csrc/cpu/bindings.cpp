// Python bindings of the CPU backend; the ops registry (sparsekern/ops.py) calls these.
#include <torch/extension.h>

#include "kernels.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "sparsekern CPU kernels (feature-major CSR products, sparse convolutions and the fused MLP program)";
  m.def("spmm", &sparsekern::cpu::spmm, "W x or W^T x for CSR W");
  m.def("sddmm", &sparsekern::cpu::sddmm, "a b^T at the kept places");
  m.def("spmm_blocked", &sparsekern::cpu::spmm_blocked, "W x for W in the blocked layout");
  m.def("conv2d", &sparsekern::cpu::conv2d, "pruned convolution of a feature-major map");
  m.def("conv2d_t", &sparsekern::cpu::conv2d_t, "adjoint of conv2d w.r.t. its input");
  m.def("conv2d_wgrad", &sparsekern::cpu::conv2d_wgrad, "weight gradient of conv2d at the kept taps");
  m.def("mlp_fwd", &sparsekern::cpu::mlp_fwd, "fused MLP forward + JVP");
  m.def("mlp_bwd", &sparsekern::cpu::mlp_bwd, "reverse mode of mlp_fwd");
  m.def("rk_solve", &sparsekern::cpu::rk_solve,
        "adaptive Runge-Kutta solve (torchdiffeq's algorithm) with the fused MLP as the field");
  m.def("rk_solve_adjoint", &sparsekern::cpu::rk_solve_adjoint,
        "the adjoint's backward solve of one interval (rk_solve's loop, mlp_bwd's VJPs)");
}
