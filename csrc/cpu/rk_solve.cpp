// A whole adaptive Runge-Kutta solve of dy/dt = sign * field(y) in C++, the field
// being the fused MLP program (mlp_fwd, fused_mlp.cpp) called directly: no Python
// and no dispatcher between stages (rk_solve); and the adjoint's backward solve of
// one output interval over the same field (rk_solve_adjoint: the augmented state
// [a_t | y | a_y | a_params] of sparsekern/solver/adjoint.py, its vector-Jacobian
// products by mlp_bwd). One stepping loop (Solver) serves both, templated on the
// derivative it integrates (StateDerivative, AdjointDerivative).
//
// It follows torchdiffeq 0.2.5's RKAdaptiveStepsizeODESolver step for step
// (_impl/rk_common.py, misc.py, interp.py, solvers.py) for a time-independent field:
// the initial step (_select_initial_step), the stages and error estimate
// (_runge_kutta_step), the error ratio (_compute_error_ratio with the mixed RMS
// norm), the step-size update (_optimal_step_size), the interpolation through output
// times (_interp_fit, _interp_evaluate) and the asserts of _adaptive_step and
// _advance. Every state-like quantity is computed in the state's element type T and
// rounded where torchdiffeq's separate tensor ops round (the tableau and dt are cast
// to T before their product, rtol and atol are cast to T, scalars like 0.01 are T);
// time-like quantities (t, dt, the step factors) are double. What is not the same is
// the order of the sums: over stages (j = 0, 1, ... here, torch.sum's own order
// there) and the norm's sum of squares (over this layout, feature-major, accumulated
// in double in fixed blocks so that the result does not depend on the thread count),
// so results agree with torchdiffeq's to rounding, and the step sequence with it.
#include "kernels.h"

#include <ATen/core/grad_mode.h>
#include <c10/util/Exception.h>

#include <atomic>
#include <chrono>
#include <cmath>
#include <limits>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

// No contraction of a * b + c into one fused multiply-add in this file: torchdiffeq
// rounds every product and every sum (separate tensor ops), and so must the loops
// here. (-O3 -mfma would otherwise contract; placed after the includes so that
// only this file's functions are affected.)
#if defined(__clang__)
#pragma clang fp contract(off)
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

namespace sparsekern {
namespace cpu {

namespace {

using Clock = std::chrono::steady_clock;
inline double seconds_since(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

constexpr const char* kWho = "sparsekern rk_solve: ";
constexpr const char* kWhoAdjoint = "sparsekern rk_solve_adjoint: ";
constexpr int64_t kGrain = 8192;      // elements per task of the elementwise loops
constexpr int64_t kChunk = 1024;      // elements per inner pass (stays in L1 across stages)
constexpr int64_t kSumBlock = 4096;   // elements per partial sum of the norm (fixed: deterministic)

// torch.maximum / torch.minimum / clamp: NaN in, NaN out.
template <typename S>
inline S max_nan(S a, S b) {
  return (std::isnan(a) || std::isnan(b)) ? std::numeric_limits<S>::quiet_NaN() : (a < b ? b : a);
}
template <typename S>
inline S min_nan(S a, S b) {
  return (std::isnan(a) || std::isnan(b)) ? std::numeric_limits<S>::quiet_NaN() : (b < a ? b : a);
}

// torch.pow(T tensor, python float) on a 0-d tensor: sqrt, rsqrt and reciprocal for
// 0.5, -0.5 and -1, products for 2, 3 and -2, else std::pow(T, double) (PowKernel.cpp;
// float's base is promoted to double there and the result rounded back).
template <typename T>
inline T pow_scalar(T x, double e) {
  if (e == 0.0) return T(1);
  if (e == 1.0) return x;
  if (e == 0.5) return std::sqrt(x);
  if (e == -0.5) return T(1) / std::sqrt(x);
  if (e == -1.0) return T(1) / x;
  if (e == 2.0) return x * x;
  if (e == 3.0) return x * x * x;
  if (e == -2.0) return T(1) / (x * x);
  return static_cast<T>(std::pow(x, e));
}

// The stepping's inputs: output times (solver time, increasing), the tableau, the
// step control and the error norm's slices of the integrated vector.
struct Stepping {
  const Tensor& times;  // contiguous float64
  const Tensor& a;
  const Tensor& c_sol;
  const Tensor& c_err;
  const Tensor& c_mid;
  int64_t order;
  double rtol, atol, first_step, safety, ifactor, dfactor;
  int64_t max_num_steps;
  const std::vector<int64_t>& segments;
};

// The field's inputs: the fused program (mlp_fwd's arguments), the forward system's
// sign and its state's layout (z feature-major [d, B], then B log-densities).
struct FieldArgs {
  double sign;
  int64_t d, B;
  bool has_logp;
  const Tensor& cols0;
  const Tensor& tan0;
  const Tensor& probe;
  const std::vector<Tensor>& values;
  const std::vector<Tensor>& index;
  const std::vector<Tensor>& scales;
  const std::vector<Tensor>& shifts;
  const std::vector<int64_t>& layouts;
  int64_t act;
  bool exact;
};

// The fused field on the forward system's state y [N] = [z (d*B) | logp (B)].
template <typename T>
class FusedField {
 public:
  struct Eval {
    Tensor x0, f, div;  // the kernel's input (z or its rows cols0), f [d, B], div [B]
    std::vector<Tensor> saved;
  };

  FusedField(const FieldArgs& p, const char* who, const at::TensorOptions& options)
      : p_(p), who_(who), dB_(p.d * p.B), N_(dB_ + (p.has_logp ? p.B : 0)) {
    if (p.cols0.numel() > 0) x0_ = at::empty({p.cols0.numel(), p.B}, options);
  }

  const FieldArgs& args() const { return p_; }
  const char* who() const { return who_; }
  // Seconds inside the field's kernels (mlp_fwd, and the adjoint's mlp_bwd): the
  // solve's model time; the rest is the solver's.
  double model_seconds = 0.0;
  int64_t size() const { return N_; }

  // One fused-program evaluation at y (a contiguous [N] vector, a view is fine);
  // ``save``: keep what mlp_bwd needs.
  Eval forward(const Tensor& y, bool save) {
    const Tensor z = y.narrow(0, 0, dB_).view({p_.d, p_.B});
    Tensor x0 = z;
    if (x0_.defined()) {
      at::index_select_out(x0_, z, 0, p_.cols0);
      x0 = x0_;
    }
    const auto start = Clock::now();
    auto [f, div, saved] = mlp_fwd(x0, p_.tan0, p_.probe, p_.values, p_.index, p_.scales,
                                   p_.shifts, p_.layouts, p_.act, p_.exact, save);
    model_seconds += seconds_since(start);
    const auto dtype = c10::CppTypeToScalarType<T>::value;
    TORCH_CHECK(f.dim() == 2 && f.size(0) == p_.d && f.size(1) == p_.B, who_,
                "the field's output has shape ", f.sizes(), ", expected the state's [d, B] = [",
                p_.d, ", ", p_.B, "]");
    TORCH_CHECK(f.scalar_type() == dtype, who_, "the field's output is ", f.scalar_type(),
                ", the state ", dtype);
    if (p_.has_logp) {
      TORCH_CHECK(div.numel() == p_.B && div.scalar_type() == dtype, who_,
                  "the field's divergence has shape ", div.sizes(), " and dtype ",
                  div.scalar_type(), ", expected [", p_.B, "] ", dtype,
                  " (has_logp needs tan0 with tangents, or exact)");
      div = div.contiguous();
    }
    return {x0, f.contiguous(), div, std::move(saved)};
  }

  // out[0:N] = mul * [f | -div] (mul = +-1: exact, as torchdiffeq's negations are).
  void write(const Eval& e, T mul, T* out) const {
    const T* fp = e.f.template data_ptr<T>();
    at::parallel_for(0, dB_, kGrain, [&](int64_t b, int64_t end) {
      for (int64_t n = b; n < end; ++n) out[n] = mul * fp[n];
    });
    if (p_.has_logp) {
      const T* dp = e.div.template data_ptr<T>();
      for (int64_t b = 0; b < p_.B; ++b) out[dB_ + b] = mul * (-dp[b]);
    }
  }

 private:
  const FieldArgs& p_;
  const char* who_;
  const int64_t dB_, N_;
  Tensor x0_;  // the gathered rows cols0 of z, when the first layer reads only those
};

// rk_solve's derivative: k = sign * [f | -div] of the state y.
template <typename T>
class StateDerivative {
 public:
  explicit StateDerivative(FusedField<T>& field) : field_(field) {}
  void operator()(const Tensor& y, Tensor& k) {
    field_.write(field_.forward(y, /*save=*/false), static_cast<T>(field_.args().sign),
                 k.data_ptr<T>());
  }

 private:
  FusedField<T>& field_;
};

// rk_solve_adjoint's derivative, in the backward solve's time s = -t (torchdiffeq's
// reversal negates the augmented dynamics): of aug = [a_t | y | a_y | a_params],
//   D(aug) = -[0 | F_s(y) | G_y | G_params],
// F_s = sign * [f | -div] the forward system's derivative and (G_y, G_params) its
// vector-Jacobian product at y with the cotangent c = -a_y, by one mlp_fwd (save) and
// one mlp_bwd: as _Augmented over FusedSystem.vjp (sparsekern/solver/adjoint.py,
// native.py) computes it, every negation exact.
template <typename T>
class AdjointDerivative {
 public:
  AdjointDerivative(FusedField<T>& field, std::vector<int64_t> param_sizes,
                    const at::TensorOptions& options)
      : field_(field), sizes_(std::move(param_sizes)) {
    const FieldArgs& p = field.args();
    grad_f_ = at::empty({p.d, p.B}, options);
    grad_div_ = at::zeros({p.B}, options);
  }

  void operator()(const Tensor& aug, Tensor& k) {
    const FieldArgs& p = field_.args();
    const char* who = field_.who();
    const int64_t N = field_.size(), dB = p.d * p.B, B = p.B;
    const auto e = field_.forward(aug.narrow(0, 1, N), /*save=*/true);
    T* kp = k.data_ptr<T>();
    const T sign = static_cast<T>(p.sign);
    kp[0] = -T(0);                   // a_t: the field reads no time
    field_.write(e, -sign, kp + 1);  // -F_s(y)

    // The cotangent -a_y pulled back through F_s = sign * [f | -div]:
    // grad_f = sign * (-a_z), grad_div = -sign * (-a_logp) = sign * a_logp.
    const T* az = aug.data_ptr<T>() + 1 + N;
    T* gf = grad_f_.data_ptr<T>();
    at::parallel_for(0, dB, kGrain, [&](int64_t b, int64_t end) {
      for (int64_t n = b; n < end; ++n) gf[n] = sign * (-az[n]);
    });
    if (p.has_logp) {
      T* gd = grad_div_.data_ptr<T>();
      for (int64_t b = 0; b < B; ++b) gd[b] = sign * az[dB + b];
    }
    const auto start = Clock::now();
    const auto bwd = mlp_bwd(grad_f_, grad_div_, e.x0, p.tan0, p.probe, p.values, p.index,
                             p.scales, p.shifts, p.layouts, p.act, p.exact, e.saved);
    field_.model_seconds += seconds_since(start);
    Tensor g_x0 = std::get<0>(bwd);
    const std::vector<Tensor>& g_values = std::get<1>(bwd);
    const std::vector<Tensor>& g_scales = std::get<2>(bwd);
    const std::vector<Tensor>& g_shifts = std::get<3>(bwd);

    // -G_y: g_x0 into the rows cols0 of z (every row without cols0), zero elsewhere;
    // the log-densities never enter the field.
    const int64_t n0 = p.cols0.numel() > 0 ? p.cols0.numel() : p.d;
    TORCH_CHECK(g_x0.dim() == 2 && g_x0.size(0) == n0 && g_x0.size(1) == B &&
                    g_x0.scalar_type() == c10::CppTypeToScalarType<T>::value,
                who, "mlp_bwd's g_x0 has shape ", g_x0.sizes(), " and dtype ",
                g_x0.scalar_type(), ", expected [", n0, ", ", B, "]");
    g_x0 = g_x0.contiguous();
    const T* gx = g_x0.data_ptr<T>();
    T* gy = kp + 1 + N;
    if (p.cols0.numel() == 0) {
      at::parallel_for(0, dB, kGrain, [&](int64_t b, int64_t end) {
        for (int64_t n = b; n < end; ++n) gy[n] = -gx[n];
      });
    } else {
      // -0 - g = -g exactly, and repeated columns would sum (index_select's adjoint).
      std::fill(gy, gy + dB, -T(0));
      const int64_t* cols = p.cols0.data_ptr<int64_t>();
      for (int64_t i = 0; i < n0; ++i) {
        T* row = gy + cols[i] * B;
        const T* src = gx + i * B;
        for (int64_t b = 0; b < B; ++b) row[b] = row[b] - src[b];
      }
    }
    for (int64_t b = dB; b < N; ++b) gy[b] = -T(0);

    // -G_params: values, then scales, then shifts, each flattened.
    T* gp = kp + 1 + 2 * N;
    size_t j = 0;
    for (const auto* group : {&g_values, &g_scales, &g_shifts}) {
      for (const Tensor& g0 : *group) {
        TORCH_CHECK(j < sizes_.size() && g0.numel() == sizes_[j], who,
                    "mlp_bwd's parameter gradient ", j, " has ", g0.numel(),
                    " entries, expected ", j < sizes_.size() ? sizes_[j] : -1,
                    " (values, then scales, then shifts)");
        const Tensor g = g0.contiguous();
        const T* src = g.data_ptr<T>();
        const int64_t m = g.numel();
        at::parallel_for(0, m, kGrain, [&](int64_t b, int64_t end) {
          for (int64_t n = b; n < end; ++n) gp[n] = -src[n];
        });
        gp += m;
        ++j;
      }
    }
    TORCH_CHECK(j == sizes_.size(), who, "mlp_bwd returned ", j, " parameter gradients, expected ",
                sizes_.size());
  }

 private:
  FusedField<T>& field_;
  const std::vector<int64_t> sizes_;  // numel of each values, scales, shifts tensor
  Tensor grad_f_, grad_div_;
};

// torchdiffeq's RKAdaptiveStepsizeODESolver on the flat vector y0 [N] with the
// derivative deriv(y, k) (k = dy/ds at y; one call is one evaluation).
template <typename T, typename Derivative>
class Solver {
 public:
  Solver(const Stepping& p, const Tensor& y0, Derivative& deriv, const char* who)
      : p_(p),
        y0_(y0),
        deriv_(deriv),
        who_(who),
        N_(y0.numel()),
        S_(p.c_sol.numel()),
        rtol_(static_cast<T>(p.rtol)),
        atol_(static_cast<T>(p.atol)) {
    const double* a = p.a.data_ptr<double>();
    a_.assign(a, a + (S_ - 1) * (S_ - 1));
    c_sol_.assign(p.c_sol.data_ptr<double>(), p.c_sol.data_ptr<double>() + S_);
    c_err_.assign(p.c_err.data_ptr<double>(), p.c_err.data_ptr<double>() + S_);
    c_mid_.assign(p.c_mid.data_ptr<double>(), p.c_mid.data_ptr<double>() + S_);
    // torchdiffeq's shortcut: y1 is the last stage's state when c_sol is the last row
    // of the tableau and the last stage's weight is zero (Dormand-Prince, Bogacki-Shampine).
    fsal_ = c_sol_[S_ - 1] == 0.0;
    for (int64_t j = 0; j + 1 < S_; ++j) fsal_ = fsal_ && c_sol_[j] == a_[(S_ - 2) * (S_ - 1) + j];
    for (size_t s = 0; s < p.segments.size(); s += 2) segs_.emplace_back(p.segments[s], p.segments[s + 1]);

    // One allocation for the solve: the stages, the current and trial states, the
    // stage state, the error, the five interpolation coefficients.
    const int64_t rows = S_ + 4 + 5;
    work_ = at::empty({rows, N_}, y0.options());
    int64_t r = 0;
    for (int64_t s = 0; s < S_; ++s) k_.push_back(work_[r++]);
    y_ = work_[r++];
    y_new_ = work_[r++];
    y_stage_ = work_[r++];
    err_ = work_[r++];
    for (int i = 0; i < 5; ++i) coeff_.push_back(work_[r++]);
  }

  std::tuple<Tensor, int64_t, int64_t, int64_t> run() {
    const double* times = p_.times.data_ptr<double>();
    const int64_t n_times = p_.times.numel();
    Tensor solution = at::empty({n_times, N_}, y0_.options());
    solution[0].copy_(y0_);
    y_.copy_(y0_);

    evaluate(y_, k_[0]);  // f0
    double dt = p_.first_step > 0 ? p_.first_step : initial_step();
    double t0 = times[0], t1 = times[0];
    for (auto& c : coeff_) c.copy_(y_);  // torchdiffeq's [y0] * 5, never read before a step

    for (int64_t i = 1; i < n_times; ++i) {
      const double next_t = times[i];
      int64_t n_steps = 0;
      while (next_t > t1) {
        TORCH_CHECK(n_steps < p_.max_num_steps, who_, "max_num_steps exceeded (", n_steps, ">=",
                    p_.max_num_steps, ") before t = ", next_t, " (solver time; ", accepted_,
                    " steps accepted, ", rejected_, " rejected so far)");
        adaptive_step(t0, t1, dt);
        ++n_steps;
      }
      interp_evaluate(t0, t1, next_t, solution[i]);
    }
    return {solution, nfe_, accepted_, rejected_};
  }

 private:
  void evaluate(const Tensor& y, Tensor& k) {
    ++nfe_;
    deriv_(y, k);
  }

  // out = base + sum_{j < m} k_j * coef_j (base may be null), each product and each
  // partial sum rounded to T in the order j = 0, 1, ...
  void lincomb(Tensor& out, const Tensor* base, const std::vector<T>& coef, int64_t m) {
    std::vector<const T*> rows(m);
    for (int64_t j = 0; j < m; ++j) rows[j] = k_[j].data_ptr<T>();
    T* op = out.data_ptr<T>();
    const T* bp = base ? base->data_ptr<T>() : nullptr;
    at::parallel_for(0, N_, kGrain, [&](int64_t b, int64_t e) {
      for (int64_t c0 = b; c0 < e; c0 += kChunk) {
        const int64_t c1 = std::min(e, c0 + kChunk);
        const T* r0 = rows[0];
        const T w0 = coef[0];
        for (int64_t n = c0; n < c1; ++n) op[n] = r0[n] * w0;
        for (int64_t j = 1; j < m; ++j) {
          const T* rj = rows[j];
          const T wj = coef[j];
          for (int64_t n = c0; n < c1; ++n) op[n] = op[n] + rj[n] * wj;
        }
        if (bp)
          for (int64_t n = c0; n < c1; ++n) op[n] = bp[n] + op[n];
      }
    });
  }

  // (dt * c_j) as torchdiffeq forms it: both cast to T, their product rounded in T.
  std::vector<T> scaled(const double* c, int64_t m, T dt) const {
    std::vector<T> out(m);
    for (int64_t j = 0; j < m; ++j) out[j] = static_cast<T>(c[j]) * dt;
    return out;
  }

  // The mixed RMS norm of x(n): max over segments (Python's max: the first, replaced by
  // a later one only if greater) of sqrt(mean(x^2)), squares in T, sums in double in
  // fixed blocks, mean and sqrt in T.
  template <typename Elem>
  T norm(const Elem& x) const {
    T best = T(0);
    bool first = true;
    for (const auto& [start, len] : segs_) {
      const int64_t n_blocks = (len + kSumBlock - 1) / kSumBlock;
      std::vector<double> part(n_blocks, 0.0);
      at::parallel_for(0, n_blocks, 4, [&](int64_t b0, int64_t b1) {
        for (int64_t blk = b0; blk < b1; ++blk) {
          const int64_t e = std::min(len, (blk + 1) * kSumBlock);
          double s = 0.0;
          for (int64_t n = blk * kSumBlock; n < e; ++n) {
            const T v = x(start + n);
            s += static_cast<double>(v * v);
          }
          part[blk] = s;
        }
      });
      double total = 0.0;
      for (double s : part) total += s;
      const T rms = std::sqrt(static_cast<T>(total) / static_cast<T>(len));
      if (first || rms > best) best = rms;
      first = false;
    }
    return std::abs(best);
  }

  // torchdiffeq's _select_initial_step (Hairer, Norsett, Wanner II.4), with f0 = k_0,
  // order - 1 as torchdiffeq passes it; quantities in T, the result as double.
  double initial_step() {
    const T* y0 = y_.data_ptr<T>();
    const T* f0 = k_[0].data_ptr<T>();
    const T rtol = rtol_, atol = atol_;
    auto scale = [=](int64_t n) { return atol + std::abs(y0[n]) * rtol; };
    const T d0 = norm([&](int64_t n) { return y0[n] / scale(n); });
    const T d1 = norm([&](int64_t n) { return f0[n] / scale(n); });
    T h0;
    if (d0 < static_cast<T>(1e-5) || d1 < static_cast<T>(1e-5)) {
      h0 = static_cast<T>(1e-6);
    } else {
      h0 = (d0 * static_cast<T>(0.01)) / d1;
    }
    h0 = std::abs(h0);
    T* y1 = y_stage_.data_ptr<T>();
    at::parallel_for(0, N_, kGrain, [&](int64_t b, int64_t e) {
      for (int64_t n = b; n < e; ++n) y1[n] = y0[n] + h0 * f0[n];
    });
    evaluate(y_stage_, k_[1]);
    const T* f1 = k_[1].data_ptr<T>();
    const T d2 = std::abs(norm([&](int64_t n) { return (f1[n] - f0[n]) / scale(n); }) / h0);
    T h1;
    if (d1 <= static_cast<T>(1e-15) && d2 <= static_cast<T>(1e-15)) {
      h1 = max_nan(static_cast<T>(1e-6), h0 * static_cast<T>(1e-3));
    } else {
      const T m = d2 > d1 ? d2 : d1;  // Python's max(d1, d2)
      // 0.01 / m is Tensor.__rtruediv__: m.reciprocal() * 0.01.
      const T r = (T(1) / m) * static_cast<T>(0.01);
      const int64_t ord = p_.order - 1;
      h1 = pow_scalar(r, 1.0 / static_cast<double>(ord + 1));
    }
    h1 = std::abs(h1);
    return static_cast<double>(min_nan(static_cast<T>(100) * h0, h1));
  }

  // torchdiffeq's _optimal_step_size, in double.
  double optimal_step(double dt, T error_ratio) const {
    if (error_ratio == T(0)) return dt * p_.ifactor;
    const double dfactor = error_ratio < T(1) ? 1.0 : p_.dfactor;
    const double er = static_cast<double>(error_ratio);
    const double exponent = 1.0 / static_cast<double>(p_.order);
    const double factor = min_nan(p_.ifactor, max_nan(p_.safety / std::pow(er, exponent), dfactor));
    return dt * factor;
  }

  // One attempt of RKAdaptiveStepsizeODESolver._adaptive_step from the current time t1
  // (torchdiffeq's local t0); on success (t0, t1) becomes the accepted interval.
  void adaptive_step(double& t0, double& t1, double& dt) {
    const double t_start = t1;
    if (!std::isfinite(dt)) dt = 0.0;  // min_step
    dt = std::max(dt, 0.0);            // clamp(min_step = 0, max_step = inf)
    const double t_end = t_start + dt;
    TORCH_CHECK(t_end > t_start, who_, "dt underflow: step size ", dt, " at t = ", t_start,
                " (solver time) does not advance time (torchdiffeq: 'underflow in dt'); the "
                "error estimate was probably not finite, or the step became too small");
    check_finite(t_start);

    const T dtT = static_cast<T>(dt);
    Tensor* y1 = fsal_ ? &y_new_ : &y_stage_;  // where the last stage's state goes
    for (int64_t i = 0; i + 1 < S_; ++i) {
      Tensor& yi = (i + 2 == S_) ? *y1 : y_stage_;
      lincomb(yi, &y_, scaled(&a_[i * (S_ - 1)], i + 1, dtT), i + 1);
      evaluate(yi, k_[i + 1]);
    }
    if (!fsal_) lincomb(y_new_, &y_, scaled(c_sol_.data(), S_, dtT), S_);
    lincomb(err_, nullptr, scaled(c_err_.data(), S_, dtT), S_);

    const T* y0p = y_.data_ptr<T>();
    const T* y1p = y_new_.data_ptr<T>();
    const T* ep = err_.data_ptr<T>();
    const T rtol = rtol_, atol = atol_;
    const T error_ratio = norm([&](int64_t n) {
      return ep[n] / (atol + rtol * max_nan(std::abs(y0p[n]), std::abs(y1p[n])));
    });
    const bool accept = error_ratio <= T(1) || dt <= 0.0;  // dt <= min_step always accepts
    if (accept) {
      interp_fit(dtT);
      std::swap(y_, y_new_);
      std::swap(k_[0], k_[S_ - 1]);  // f1 = k[..., -1]
      t0 = t_start;
      t1 = t_end;
      ++accepted_;
    } else {
      t0 = t_start;  // torchdiffeq's state after a rejection: (t0, t0)
      t1 = t_start;
      ++rejected_;
    }
    dt = optimal_step(dt, error_ratio);
    if (!std::isnan(dt)) dt = std::max(dt, 0.0);
  }

  void check_finite(double t) const {
    const T* y = y_.data_ptr<T>();
    std::atomic<bool> bad{false};
    at::parallel_for(0, N_, kGrain, [&](int64_t b, int64_t e) {
      bool local = false;
      for (int64_t n = b; n < e; ++n) local = local || !std::isfinite(y[n]);
      if (local) bad.store(true, std::memory_order_relaxed);
    });
    if (bad.load()) {
      int64_t first = 0;
      while (first < N_ && std::isfinite(y[first])) ++first;
      TORCH_CHECK(false, who_, "non-finite values in the state y at t = ", t,
                  " (solver time; torchdiffeq: 'non-finite values in state `y`'), first at flat "
                  "index ", first, ": ", static_cast<double>(y[first]));
    }
  }

  // torchdiffeq's _interp_fit of the accepted step (y0 = y_, y1 = y_new_), with
  // y_mid = y0 + sum k_j (dt c_mid_j); coefficients [e, d, c, b, a] of the quartic.
  void interp_fit(T dt) {
    lincomb(y_stage_, &y_, scaled(c_mid_.data(), S_, dt), S_);
    const T* y0 = y_.data_ptr<T>();
    const T* y1 = y_new_.data_ptr<T>();
    const T* ym = y_stage_.data_ptr<T>();
    const T* f0 = k_[0].data_ptr<T>();
    const T* f1 = k_[S_ - 1].data_ptr<T>();
    T* ce = coeff_[0].data_ptr<T>();
    T* cd = coeff_[1].data_ptr<T>();
    T* cc = coeff_[2].data_ptr<T>();
    T* cb = coeff_[3].data_ptr<T>();
    T* ca = coeff_[4].data_ptr<T>();
    const T dt2 = T(2) * dt;
    at::parallel_for(0, N_, kGrain, [&](int64_t b, int64_t e) {
      for (int64_t n = b; n < e; ++n) {
        // a = 2 dt (f1 - f0) - 8 (y1 + y0) + 16 y_mid
        ca[n] = (dt2 * (f1[n] - f0[n]) - T(8) * (y1[n] + y0[n])) + T(16) * ym[n];
        // b = dt (5 f0 - 3 f1) + 18 y0 + 14 y1 - 32 y_mid
        cb[n] = ((dt * (T(5) * f0[n] - T(3) * f1[n]) + T(18) * y0[n]) + T(14) * y1[n]) -
                T(32) * ym[n];
        // c = dt (f1 - 4 f0) - 11 y0 - 5 y1 + 16 y_mid
        cc[n] = ((dt * (f1[n] - T(4) * f0[n]) - T(11) * y0[n]) - T(5) * y1[n]) + T(16) * ym[n];
        cd[n] = dt * f0[n];
        ce[n] = y0[n];
      }
    });
  }

  // torchdiffeq's _interp_evaluate: x = (t - t0) / (t1 - t0) in double, then T.
  void interp_evaluate(double t0, double t1, double t, Tensor out) const {
    TORCH_CHECK(t0 <= t && t <= t1, who_, "invalid interpolation, fails t0 <= t <= t1: ", t0,
                ", ", t, ", ", t1);
    const T x = static_cast<T>((t - t0) / (t1 - t0));
    const T x2 = x * x, x3 = x2 * x, x4 = x3 * x;
    const T* ce = coeff_[0].data_ptr<T>();
    const T* cd = coeff_[1].data_ptr<T>();
    const T* cc = coeff_[2].data_ptr<T>();
    const T* cb = coeff_[3].data_ptr<T>();
    const T* ca = coeff_[4].data_ptr<T>();
    T* op = out.data_ptr<T>();
    at::parallel_for(0, N_, kGrain, [&](int64_t b, int64_t e) {
      for (int64_t n = b; n < e; ++n) {
        T total = ce[n] + x * cd[n];
        total = total + x2 * cc[n];
        total = total + x3 * cb[n];
        op[n] = total + x4 * ca[n];
      }
    });
  }

  const Stepping& p_;
  const Tensor& y0_;
  Derivative& deriv_;
  const char* who_;
  const int64_t N_, S_;
  const T rtol_, atol_;
  std::vector<double> a_, c_sol_, c_err_, c_mid_;
  std::vector<std::pair<int64_t, int64_t>> segs_;
  bool fsal_ = false;
  Tensor work_, y_, y_new_, y_stage_, err_;
  std::vector<Tensor> k_, coeff_;
  int64_t nfe_ = 0, accepted_ = 0, rejected_ = 0;
};

// The state vector: a contiguous 1-D float32/float64 CPU tensor.
void check_state_tensor(const char* who, const char* name, const Tensor& x, const char* layout) {
  TORCH_CHECK(x.device().is_cpu(), who, name, " is on ", x.device(), ", expected the CPU");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, who, name,
              " must be float32 or float64, got ", x.scalar_type());
  TORCH_CHECK(x.dim() == 1 && x.is_contiguous(), who, name, " must be a contiguous 1-D tensor (",
              layout, "), got shape ", x.sizes(), " with strides ", x.strides());
}

void check_dims(const char* who, const FieldArgs& f) {
  TORCH_CHECK(f.d >= 1 && f.B >= 1, who, "d and B must be positive, got d = ", f.d, ", B = ",
              f.B);
}

// The times, the tableau, the controls and the norm's slices of a state of n entries.
void check_stepping(const char* who, const Stepping& p, double sign, int64_t n) {
  const Tensor& t = p.times;
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kDouble && t.dim() == 1, who,
              "times must be a 1-D float64 CPU tensor, got ", t.scalar_type(), " of shape ",
              t.sizes(), " on ", t.device());
  TORCH_CHECK(t.numel() >= 2, who, "times needs at least 2 entries, got ", t.numel());
  const Tensor tc = t.contiguous();
  const double* tp = tc.data_ptr<double>();
  for (int64_t i = 1; i < tc.numel(); ++i)
    TORCH_CHECK(tp[i] > tp[i - 1], who, "times must be strictly increasing (negate a "
                "backward solve's times and pass sign = -1), but times[", i, "] = ", tp[i],
                " <= times[", i - 1, "] = ", tp[i - 1]);
  TORCH_CHECK(sign == 1.0 || sign == -1.0, who, "sign must be +1 or -1, got ", sign);

  auto check_f64 = [who](const Tensor& x, const char* name) {
    TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kDouble && x.is_contiguous(), who,
                name, " must be a contiguous float64 CPU tensor, got ", x.scalar_type(), " on ",
                x.device());
  };
  check_f64(p.c_sol, "c_sol");
  check_f64(p.c_err, "c_err");
  check_f64(p.c_mid, "c_mid");
  check_f64(p.a, "a");
  TORCH_CHECK(p.c_sol.dim() == 1 && p.c_sol.numel() >= 2, who,
              "c_sol must be 1-D with S >= 2 stage weights, got shape ", p.c_sol.sizes());
  const int64_t S = p.c_sol.numel();
  TORCH_CHECK(p.c_err.dim() == 1 && p.c_err.numel() == S && p.c_mid.dim() == 1 &&
                  p.c_mid.numel() == S,
              who, "c_err and c_mid must have c_sol's S = ", S, " entries, got shapes ",
              p.c_err.sizes(), " and ", p.c_mid.sizes());
  TORCH_CHECK(p.a.dim() == 2 && p.a.size(0) == S - 1 && p.a.size(1) == S - 1, who,
              "a must be [S-1, S-1] = [", S - 1, ", ", S - 1, "] for S = ", S,
              " stages (c_sol's size), got ", p.a.sizes());
  TORCH_CHECK(p.order >= 1, who, "order must be positive, got ", p.order);

  TORCH_CHECK(!p.segments.empty() && p.segments.size() % 2 == 0, who,
              "segments must be [start0, len0, start1, len1, ...] with at least one segment, "
              "got ", p.segments.size(), " entries");
  for (size_t s = 0; s < p.segments.size(); s += 2) {
    const int64_t start = p.segments[s], len = p.segments[s + 1];
    TORCH_CHECK(start >= 0 && len >= 1 && start + len <= n, who, "norm segment ", s / 2,
                " (start ", start, ", length ", len, ") is not a non-empty range of the ", n,
                " state entries");
  }
}

// The field's dtype (the state's) and its input rows.
void check_field(const char* who, const FieldArgs& p, const char* name, at::ScalarType dtype) {
  for (size_t i = 0; i < p.values.size(); ++i)
    TORCH_CHECK(p.values[i].scalar_type() == dtype, who, "values[", i, "] is ",
                p.values[i].scalar_type(), ", ", name, " ", dtype,
                ": the field and the state must have one dtype");
  TORCH_CHECK(p.tan0.scalar_type() == dtype, who, "tan0 is ", p.tan0.scalar_type(), ", ", name,
              " ", dtype, ": the field and the state must have one dtype");

  const Tensor& c0 = p.cols0;
  TORCH_CHECK(c0.device().is_cpu() && c0.scalar_type() == at::kLong && c0.dim() == 1, who,
              "cols0 must be a 1-D int64 CPU tensor (empty: every state dimension), got ",
              c0.scalar_type(), " of shape ", c0.sizes());
  if (c0.numel() > 0) {
    TORCH_CHECK(c0.is_contiguous(), who, "cols0 must be contiguous");
    const int64_t* cp = c0.data_ptr<int64_t>();
    for (int64_t i = 0; i < c0.numel(); ++i)
      TORCH_CHECK(cp[i] >= 0 && cp[i] < p.d, who, "cols0[", i, "] = ", cp[i],
                  " is not a state dimension (d = ", p.d, ")");
  }
}

template <typename T>
SolveResult solve_state(const Stepping& s, const FieldArgs& f, const Tensor& y0) {
  FusedField<T> field(f, kWho, y0.options());
  StateDerivative<T> deriv(field);
  auto [sol, nfe, accepted, rejected] = Solver<T, StateDerivative<T>>(s, y0, deriv, kWho).run();
  return {sol, nfe, accepted, rejected, field.model_seconds};
}

template <typename T>
SolveResult solve_adjoint(const Stepping& s, const FieldArgs& f, const Tensor& aug0,
                          std::vector<int64_t> sizes) {
  FusedField<T> field(f, kWhoAdjoint, aug0.options());
  AdjointDerivative<T> deriv(field, std::move(sizes), aug0.options());
  auto [sol, nfe, accepted, rejected] =
      Solver<T, AdjointDerivative<T>>(s, aug0, deriv, kWhoAdjoint).run();
  return {sol, nfe, accepted, rejected, field.model_seconds};
}

}  // namespace

SolveResult rk_solve(
    const Tensor& y0, const Tensor& times, double sign, const Tensor& a, const Tensor& c_sol,
    const Tensor& c_err, const Tensor& c_mid, int64_t order, double rtol, double atol,
    double first_step, double safety, double ifactor, double dfactor, int64_t max_num_steps,
    const std::vector<int64_t>& segments, int64_t d, int64_t B, bool has_logp, const Tensor& cols0,
    const Tensor& tan0, const Tensor& probe, const std::vector<Tensor>& values,
    const std::vector<Tensor>& index, const std::vector<Tensor>& scales,
    const std::vector<Tensor>& shifts, const std::vector<int64_t>& layouts, int64_t act,
    bool exact) {
  const Tensor times_c = times.contiguous();
  const Tensor cols0_c = cols0.contiguous();
  const Stepping s{times_c, a,       c_sol,   c_err,   c_mid,         order,   rtol,
                   atol,    first_step, safety, ifactor, dfactor, max_num_steps, segments};
  const FieldArgs f{sign,   d,     B,      has_logp, cols0_c, tan0,    probe,
                    values, index, scales, shifts,   layouts, act,     exact};
  check_state_tensor(kWho, "y0", y0, "z feature-major, then log-densities");
  check_dims(kWho, f);
  const int64_t N = d * B + (has_logp ? B : 0);
  TORCH_CHECK(y0.numel() == N, kWho, "y0 has ", y0.numel(), " entries, expected d*B",
              has_logp ? " + B" : "", " = ", N, " (d = ", d, ", B = ", B, ")");
  check_stepping(kWho, s, sign, N);
  check_field(kWho, f, "y0", y0.scalar_type());
  // Not differentiable: the kernels' out= products refuse inputs that require grad
  // (a field's kept values are parameters), and nothing here records a graph.
  at::NoGradGuard no_grad;
  if (y0.scalar_type() == at::kDouble) return solve_state<double>(s, f, y0);
  return solve_state<float>(s, f, y0);
}

SolveResult rk_solve_adjoint(
    const Tensor& aug0, const Tensor& times, double sign, const Tensor& a, const Tensor& c_sol,
    const Tensor& c_err, const Tensor& c_mid, int64_t order, double rtol, double atol,
    double first_step, double safety, double ifactor, double dfactor, int64_t max_num_steps,
    const std::vector<int64_t>& segments, int64_t d, int64_t B, bool has_logp, const Tensor& cols0,
    const Tensor& tan0, const Tensor& probe, const std::vector<Tensor>& values,
    const std::vector<Tensor>& index, const std::vector<Tensor>& scales,
    const std::vector<Tensor>& shifts, const std::vector<int64_t>& layouts, int64_t act,
    bool exact) {
  const Tensor times_c = times.contiguous();
  const Tensor cols0_c = cols0.contiguous();
  const Stepping s{times_c, a,       c_sol,   c_err,   c_mid,         order,   rtol,
                   atol,    first_step, safety, ifactor, dfactor, max_num_steps, segments};
  const FieldArgs f{sign,   d,     B,      has_logp, cols0_c, tan0,    probe,
                    values, index, scales, shifts,   layouts, act,     exact};
  check_state_tensor(kWhoAdjoint, "aug0", aug0,
                     "a_t, y, a_y (z feature-major, then log-densities), then the parameter "
                     "adjoints");
  check_dims(kWhoAdjoint, f);
  const int64_t N = d * B + (has_logp ? B : 0);
  std::vector<int64_t> sizes;
  int64_t P = 0;
  for (const auto* group : {&values, &scales, &shifts})
    for (const Tensor& x : *group) {
      sizes.push_back(x.numel());
      P += x.numel();
    }
  TORCH_CHECK(aug0.numel() == 1 + 2 * N + P, kWhoAdjoint, "aug0 has ", aug0.numel(),
              " entries, expected 1 + 2N + P = ", 1 + 2 * N + P, " (N = d*B",
              has_logp ? " + B" : "", " = ", N, " for d = ", d, ", B = ", B, "; P = ", P,
              " entries of values, scales and shifts)");
  TORCH_CHECK(values.size() == scales.size() && values.size() == shifts.size(), kWhoAdjoint,
              "values, scales and shifts must have one entry per layer, got ", values.size(),
              ", ", scales.size(), " and ", shifts.size());
  check_stepping(kWhoAdjoint, s, sign, aug0.numel());
  check_field(kWhoAdjoint, f, "aug0", aug0.scalar_type());
  for (const auto* group : {&scales, &shifts})
    for (const Tensor& x : *group)
      TORCH_CHECK(x.scalar_type() == aug0.scalar_type(), kWhoAdjoint, "a scale or shift is ",
                  x.scalar_type(), ", aug0 ", aug0.scalar_type(),
                  ": the field and the state must have one dtype");
  at::NoGradGuard no_grad;
  if (aug0.scalar_type() == at::kDouble) return solve_adjoint<double>(s, f, aug0, sizes);
  return solve_adjoint<float>(s, f, aug0, sizes);
}

}  // namespace cpu
}  // namespace sparsekern
