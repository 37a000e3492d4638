// Device helpers shared by the .cu files: activations with first and second
// derivatives (formulas of sparsekern/activations.py, act_ref), vector loads,
// warp reductions. Included from .cu files only.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "sparsekern_cuda.h"

namespace sparsekern {
namespace cuda {

// Activation ids: sparsekern/activations.py ACT_IDS.
enum Act : int { kIdentity = 0, kTanh = 1, kSigmoid = 2, kSoftplus = 3, kRelu = 4, kElu = 5,
                 kSwish = 6 };

constexpr int kWarp = 32;
constexpr unsigned kFullMask = 0xffffffffu;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The C ABI's one entry per operation: fn(T()) with T the element type that
// dtype names (float or double), or SK_ERR_DTYPE.
template <typename Fn>
int dispatch_dtype(sk_dtype dtype, Fn&& fn) {
  switch (dtype) {
    case SK_FLOAT32:
      return fn(float());
    case SK_FLOAT64:
      return fn(double());
  }
  return SK_ERR_DTYPE;
}

// The typed view of a C ABI pointer (the dtype says which T).
template <typename T>
const T* typed(const void* p) {
  return static_cast<const T*>(p);
}
template <typename T>
T* typed(void* p) {
  return static_cast<T*>(p);
}

// Precise libm functions per type (no fast-math intrinsics: the adaptive ODE
// solvers downstream need the accuracy of the CPU reference).
template <typename T>
struct Math;

template <>
struct Math<float> {
  __device__ static float exp(float x) { return expf(x); }
  __device__ static float expm1(float x) { return expm1f(x); }
  __device__ static float log1p(float x) { return log1pf(x); }
  __device__ static float tanh(float x) { return tanhf(x); }
};

template <>
struct Math<double> {
  __device__ static double exp(double x) { return ::exp(x); }
  __device__ static double expm1(double x) { return ::expm1(x); }
  __device__ static double log1p(double x) { return ::log1p(x); }
  __device__ static double tanh(double x) { return ::tanh(x); }
};

template <typename T>
__device__ inline T sigmoid(T a) {
  return T(1) / (T(1) + Math<T>::exp(-a));
}

// Softplus is the identity above this (torch.nn.Softplus default threshold).
constexpr double kSoftplusThreshold = 20.0;

// h = sigma(a), d1 = sigma'(a).
template <typename T>
__device__ inline void act_d1(int act, T a, T& h, T& d1) {
  switch (act) {
    case kTanh:
      h = Math<T>::tanh(a);
      d1 = T(1) - h * h;
      return;
    case kSigmoid:
      h = sigmoid(a);
      d1 = h * (T(1) - h);
      return;
    case kSoftplus: {
      const bool lin = a > T(kSoftplusThreshold);
      h = lin ? a : Math<T>::log1p(Math<T>::exp(a));
      d1 = lin ? T(1) : sigmoid(a);
      return;
    }
    case kRelu:
      h = a > T(0) ? a : T(0);
      d1 = a > T(0) ? T(1) : T(0);
      return;
    case kElu:
      h = a > T(0) ? a : Math<T>::expm1(a);
      d1 = a > T(0) ? T(1) : Math<T>::exp(a);
      return;
    case kSwish: {
      const T s = sigmoid(a);
      h = a * s;
      d1 = s * (T(1) + a * (T(1) - s));
      return;
    }
    default:
      h = a;
      d1 = T(1);
  }
}

// d1 = sigma'(a), d2 = sigma''(a).
template <typename T>
__device__ inline void act_d1_d2(int act, T a, T& d1, T& d2) {
  switch (act) {
    case kTanh: {
      const T h = Math<T>::tanh(a);
      d1 = T(1) - h * h;
      d2 = T(-2) * h * d1;
      return;
    }
    case kSigmoid: {
      const T h = sigmoid(a);
      d1 = h * (T(1) - h);
      d2 = d1 * (T(1) - T(2) * h);
      return;
    }
    case kSoftplus: {
      const bool lin = a > T(kSoftplusThreshold);
      const T s = sigmoid(a);
      d1 = lin ? T(1) : s;
      d2 = lin ? T(0) : s * (T(1) - s);
      return;
    }
    case kRelu:
      d1 = a > T(0) ? T(1) : T(0);
      d2 = T(0);
      return;
    case kElu: {
      const T e = Math<T>::exp(a < T(0) ? a : T(0));
      d1 = a > T(0) ? T(1) : e;
      d2 = a > T(0) ? T(0) : e;
      return;
    }
    case kSwish: {
      const T s = sigmoid(a);
      d1 = s * (T(1) + a * (T(1) - s));
      d2 = s * (T(1) - s) * (T(2) + a * (T(1) - T(2) * s));
      return;
    }
    default:
      d1 = T(1);
      d2 = T(0);
  }
}

template <typename T>
__device__ inline T warp_sum(T v) {
  for (int off = kWarp / 2; off > 0; off /= 2) v += __shfl_xor_sync(kFullMask, v, off);
  return v;
}

// VEC consecutive elements through one 16-byte load when VEC * sizeof(T) == 16
// (the caller guarantees alignment), else one element.
template <typename T, int VEC>
struct Vec;

template <typename T>
struct Vec<T, 1> {
  __device__ static void load(const T* p, T* v) { v[0] = __ldg(p); }
  __device__ static void store(T* p, const T* v) { p[0] = v[0]; }
};

template <>
struct Vec<float, 4> {
  __device__ static void load(const float* p, float* v) {
    const float4 t = __ldg(reinterpret_cast<const float4*>(p));
    v[0] = t.x, v[1] = t.y, v[2] = t.z, v[3] = t.w;
  }
  __device__ static void store(float* p, const float* v) {
    *reinterpret_cast<float4*>(p) = make_float4(v[0], v[1], v[2], v[3]);
  }
};

template <>
struct Vec<double, 2> {
  __device__ static void load(const double* p, double* v) {
    const double2 t = __ldg(reinterpret_cast<const double2*>(p));
    v[0] = t.x, v[1] = t.y;
  }
  __device__ static void store(double* p, const double* v) {
    *reinterpret_cast<double2*>(p) = make_double2(v[0], v[1]);
  }
};

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

}  // namespace cuda
}  // namespace sparsekern
