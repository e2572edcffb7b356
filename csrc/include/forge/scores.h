// Attention-score normalisers: the formulas shared by the CPU and CUDA kernels.
//
// Numerics follow forge_dist/ops/reference/softmax_variants.py (the truth); the layout of the
// float constants each variant receives is built in forge_dist/ops/dispatch.py (_score_consts).
// Every kernel evaluates the functor at visible keys only and writes 0 elsewhere, so a hidden key
// gives exactly 0 with a 0 gradient, as the references do by filling hidden scores before the formula.
#pragma once

#include "forge/math.h"

namespace forge {

// Which keys query row i sees (forge_dist/model/mask.py MaskSpec, applied without a mask tensor):
// the first n_sink columns always; then columns c = n_sink + j with lo <= j <= hi, where causal gives
// hi = i + q_offset and a window gives lo = i + q_offset - window. Hidden scores of -inf are the
// caller's own mask and are hidden too (checked per element).
struct MaskArgs {
  int32_t enabled, causal, window, q_offset, n_sink;  // window < 0: none
};

struct ColRange {
  int64_t sink_end, lo, hi;  // visible: [0, sink_end) and [lo, hi)
};

FORGE_HD ColRange visible_cols(const MaskArgs& m, int64_t i, int64_t n_cols) {
  if (!m.enabled) return {0, 0, n_cols};
  int64_t ns = m.n_sink < n_cols ? m.n_sink : n_cols;
  int64_t pos = i + m.q_offset;
  int64_t lo = ns + (m.window >= 0 ? pos - m.window : 0);
  int64_t hi = m.causal ? ns + pos + 1 : n_cols;
  lo = lo < ns ? ns : lo;
  hi = hi > n_cols ? n_cols : hi;
  if (hi < lo) hi = lo;
  return {ns, lo, hi};
}

// ---- elementwise family: y = f(x) * scale, no sum over keys -------------------------------------
// grad(x, dy) returns dL/dx and the row's contributions to the gradients of the (up to two)
// learnable per-head parameters p0 = beta, p1 = gamma.
template <class A>
struct ElemGrad {
  A dx, dp0, dp1;
};

enum ElemKind : int32_t {
  CONSMAX = 0, SATURATING_CONSMAX = 1, POLYMAX = 2, EXPPOLYMAX = 3, RELUMAX = 4, RELU2MAX = 5,
  SIGMOIDMAX = 6, SOFTPLUS = 7, SQUAREPLUS = 8,
};

// consmax / consmax_v2: b^{min(x - beta, clamp)} / gamma, as e^{u ln b}.  consts: [ln b, clamp]
template <class A>
struct Consmax {
  A lb, clampv, beta, gamma;
  FORGE_HD Consmax(const double* c, A beta_, A gamma_, A) : lb(c[0]), clampv(c[1]), beta(beta_), gamma(gamma_) {}
  FORGE_HD A value(A x) const { return fm::exp(fm::fmin(x - beta, clampv) * lb) / gamma; }
  FORGE_HD ElemGrad<A> grad(A x, A dy) const {
    A y = value(x), g = x - beta <= clampv ? dy * lb * y : A(0);  // clamp passes the gradient at u <= c
    return {g, -g, -dy * y / gamma};
  }
};

// saturatingconsmax: (b^{x - beta} for x < x_sat, else x_sat) / gamma / L.  consts: [ln b, x_sat, 1/L]
template <class A>
struct SaturatingConsmax {
  A lb, xs, inv_l, beta, gamma;
  FORGE_HD SaturatingConsmax(const double* c, A beta_, A gamma_, A)
      : lb(c[0]), xs(c[1]), inv_l(c[2]), beta(beta_), gamma(gamma_) {}
  FORGE_HD A branch(A x) const { return x < xs ? fm::exp((x - beta) * lb) : xs; }
  FORGE_HD A value(A x) const { return branch(x) / gamma * inv_l; }
  FORGE_HD ElemGrad<A> grad(A x, A dy) const {
    A v = branch(x), g = x < xs ? dy * lb * v / gamma * inv_l : A(0);
    return {g, -g, -dy * v / gamma * inv_l / gamma};
  }
};

// x^p and its derivative for x > 0; Square: p = 2 (the default power) by multiplication, which a
// vectorised loop needs (the general form costs an exp and a log per element).
template <bool Square, class A>
FORGE_HD A power(A x, A p) { return Square ? x * x : fm::pow_pos(x, p); }
template <bool Square, class A>
FORGE_HD A dpower(A x, A p) { return Square ? A(2) * x : p * fm::pow_pos(x, p - A(1)); }

// polymax / vpolymax: 0 below x0, slope x + y0 on [x0, 0], x^p + y0 above 0; * scale.
// consts: [x0, y0, p, slope, scale] (slope = -y0/x0 for polymax, y0/x0 for vpolymax)
template <class A, bool Square = false>
struct Polymax {
  A x0, y0, p, slope, scale;
  FORGE_HD Polymax(const double* c, A, A, A) : x0(c[0]), y0(c[1]), p(c[2]), slope(c[3]), scale(c[4]) {}
  FORGE_HD A value(A x) const {
    A poly = power<Square>(x > A(0) ? x : A(1), p) + y0;
    return (x < x0 ? A(0) : x > A(0) ? poly : slope * x + y0) * scale;
  }
  FORGE_HD ElemGrad<A> grad(A x, A dy) const {
    A d = dpower<Square>(x > A(0) ? x : A(1), p);
    return {dy * scale * (x < x0 ? A(0) : x > A(0) ? d : slope), A(0), A(0)};
  }
};

// exppolymax: b^x below 0, (x + s)^p + y0 from 0; * scale.  consts: [ln b, p, y0, s, scale]
template <class A, bool Square = false>
struct ExpPolymax {
  A lb, p, y0, s, scale;
  FORGE_HD ExpPolymax(const double* c, A, A, A) : lb(c[0]), p(c[1]), y0(c[2]), s(c[3]), scale(c[4]) {}
  FORGE_HD A value(A x) const {
    bool neg = x < A(0);
    A expo = fm::exp((neg ? x : A(0)) * lb), poly = power<Square>((neg ? A(1) : x) + s, p) + y0;
    return (neg ? expo : poly) * scale;
  }
  FORGE_HD ElemGrad<A> grad(A x, A dy) const {
    bool neg = x < A(0);
    A dexp = lb * fm::exp((neg ? x : A(0)) * lb), dpoly = dpower<Square>((neg ? A(1) : x) + s, p);
    return {dy * scale * (neg ? dexp : dpoly), A(0), A(0)};
  }
};

// The fixed curves f(x) * scale.  consts: [scale, b] (b: squareplus only)
template <class A>
struct Relumax {
  A scale;
  FORGE_HD Relumax(const double* c, A, A, A) : scale(c[0]) {}
  FORGE_HD A value(A x) const { return fm::fmax(x, A(0)) * scale; }
  FORGE_HD ElemGrad<A> grad(A x, A dy) const { return {x > A(0) ? dy * scale : A(0), A(0), A(0)}; }
};

template <class A>
struct Relu2max {
  A scale;
  FORGE_HD Relu2max(const double* c, A, A, A) : scale(c[0]) {}
  FORGE_HD A value(A x) const { A r = fm::fmax(x, A(0)); return r * r * scale; }
  FORGE_HD ElemGrad<A> grad(A x, A dy) const { return {A(2) * fm::fmax(x, A(0)) * dy * scale, A(0), A(0)}; }
};

template <class A>
struct Sigmoidmax {
  A scale;
  FORGE_HD Sigmoidmax(const double* c, A, A, A) : scale(c[0]) {}
  FORGE_HD A value(A x) const { return fm::sigmoid(x) * scale; }
  FORGE_HD ElemGrad<A> grad(A x, A dy) const {
    A s = fm::sigmoid(x);
    return {dy * scale * s * (A(1) - s), A(0), A(0)};
  }
};

// softplus with torch's threshold: x above 20 is returned as is (F.softplus(beta=1, threshold=20))
template <class A>
struct Softplus {
  A scale;
  FORGE_HD Softplus(const double* c, A, A, A) : scale(c[0]) {}
  FORGE_HD A value(A x) const { return (x > A(20) ? x : fm::log1p(fm::exp(fm::fmin(x, A(20))))) * scale; }
  FORGE_HD ElemGrad<A> grad(A x, A dy) const {
    return {dy * scale * (x > A(20) ? A(1) : fm::sigmoid(x)), A(0), A(0)};
  }
};

// squareplus (Barron 2021): (x + sqrt(x^2 + b)) / 2
template <class A>
struct Squareplus {
  A scale, b;
  FORGE_HD Squareplus(const double* c, A, A, A) : scale(c[0]), b(c[1]) {}
  FORGE_HD A value(A x) const { return A(0.5) * (x + fm::sqrt(x * x + b)) * scale; }
  FORGE_HD ElemGrad<A> grad(A x, A dy) const {
    return {dy * scale * A(0.5) * (A(1) + x / fm::sqrt(x * x + b)), A(0), A(0)};
  }
};

// pfla_softmax: a learned piecewise-linear curve through knots (x_k, v_k), stored as v = sqrt(y)
// (forge_dist/ops/reference/softmax_variants.py pfla_curve): "linear" y = lerp(x; x_k, v_k^2),
// "quadratic" y = x lerp(x; x_k, v_k)^2; the first segment extends left, the last value holds right
// of x_{n-1}; / gamma (the learned divisor, else 1). Non-finite scores give 0.
// consts: [quadratic]; its parameter row is a table, [beta (unused), gamma, x_0..x_{n-1}, v_0..v_{n-1}],
// and grad() adds the gradients of the whole row (gamma, every knot position and value) into drow.
// Not in dispatch_elem: only the attention kernel reads a table (the normaliser kernels take the
// reference path for pfla_softmax).
enum : int32_t { PFLA = 9 };

template <class A>
struct Pfla {
  static constexpr bool kTable = true;
  const A *xk, *vk;
  int64_t n;
  bool quad;
  A gamma;
  FORGE_HD Pfla(const double* c, const A* row, int64_t width)
      : xk(row + 2), vk(row + 2 + (width - 2) / 2), n((width - 2) / 2), quad(c[0] != 0.0), gamma(row[1]) {}
  struct Seg {
    int64_t k;
    A t, inv_w;
    bool held;  // x >= x_{n-1}: the last value, no slope
  };
  // the segment [x_k, x_k+1] holding min(x, x_{n-1}) (searchsorted right, clamped to [0, n - 2])
  FORGE_HD Seg seg(A x) const {
    const bool held = !(x < xk[n - 1]);
    const A xi = held ? xk[n - 1] : x;
    int64_t lo = 0, hi = n;
    while (lo < hi) {
      const int64_t mid = (lo + hi) / 2;
      if (xk[mid] <= xi) lo = mid + 1;
      else hi = mid;
    }
    const int64_t k = lo - 1 < 0 ? 0 : lo - 1 > n - 2 ? n - 2 : lo - 1;
    const A inv_w = A(1) / (xk[k + 1] - xk[k]);
    return {k, (xi - xk[k]) * inv_w, inv_w, held};
  }
  FORGE_HD A curve(A x, const Seg& g) const {
    const A v0 = vk[g.k], v1 = vk[g.k + 1];
    if (quad) {
      const A l = v0 + (v1 - v0) * g.t;
      return x * l * l;
    }
    return v0 * v0 + (v1 * v1 - v0 * v0) * g.t;
  }
  FORGE_HD A value(A x) const {
    if (!(x - x == A(0))) return A(0);  // inf or nan
    return curve(x, seg(x)) / gamma;
  }
  // dL/dx for dL/dvalue = dy; drow (the row's gradient) += the table's gradients
  FORGE_HD A grad(A x, A dy, A* drow) const {
    if (!(x - x == A(0))) return A(0);
    const Seg g = seg(x);
    const A v0 = vk[g.k], v1 = vk[g.k + 1], gy = dy / gamma;
    drow[1] -= gy * curve(x, g) / gamma;
    A dv0, dv1, dt;  // d curve / d v_k, d v_k+1, d t
    A dx;
    if (quad) {
      const A l = v0 + (v1 - v0) * g.t, two_xl = A(2) * x * l;
      dv0 = two_xl * (A(1) - g.t);
      dv1 = two_xl * g.t;
      dt = two_xl * (v1 - v0);
      dx = l * l;
    } else {
      dv0 = A(2) * v0 * (A(1) - g.t);
      dv1 = A(2) * v1 * g.t;
      dt = v1 * v1 - v0 * v0;
      dx = A(0);
    }
    A* dv = drow + 2 + n;
    dv[g.k] += gy * dv0;
    dv[g.k + 1] += gy * dv1;
    if (!g.held) {  // t = (x - x_k) / (x_k+1 - x_k): dt/dx = 1/w, dt/dx_k = -(1 - t)/w, dt/dx_k+1 = -t/w
      dx += dt * g.inv_w;
      drow[2 + g.k] -= gy * dt * (A(1) - g.t) * g.inv_w;
      drow[2 + g.k + 1] -= gy * dt * g.t * g.inv_w;
    }
    return gy * dx;
  }
};

// Calls fn(Functor<A>-type tag) for a runtime kind; the kernels are templated on the functor.
template <class A, class Fn>
inline void dispatch_elem(int32_t kind, const double* consts, Fn&& fn) {
  switch (kind) {
    case CONSMAX: fn(static_cast<Consmax<A>*>(nullptr)); break;
    case SATURATING_CONSMAX: fn(static_cast<SaturatingConsmax<A>*>(nullptr)); break;
    case POLYMAX:
      if (consts[2] == 2.0) fn(static_cast<Polymax<A, true>*>(nullptr));
      else fn(static_cast<Polymax<A>*>(nullptr));
      break;
    case EXPPOLYMAX:
      if (consts[1] == 2.0) fn(static_cast<ExpPolymax<A, true>*>(nullptr));
      else fn(static_cast<ExpPolymax<A>*>(nullptr));
      break;
    case RELUMAX: fn(static_cast<Relumax<A>*>(nullptr)); break;
    case RELU2MAX: fn(static_cast<Relu2max<A>*>(nullptr)); break;
    case SIGMOIDMAX: fn(static_cast<Sigmoidmax<A>*>(nullptr)); break;
    case SOFTPLUS: fn(static_cast<Softplus<A>*>(nullptr)); break;
    case SQUAREPLUS: fn(static_cast<Squareplus<A>*>(nullptr)); break;
    default: break;
  }
}

// ---- row-normalised family ---------------------------------------------------------------------
// t = T(x) is the value whose row max m is taken; the exponent is a = (t - m) c; r = e^a;
// y = r / (obo + sum_visible r) (or y = r without division), times post = 1/D (/L).
// softmax: T = x, c = 1; softermax: T = x, c = ln 2; strongermax: T = min(x, clamp), c = ln S / tau;
// sigsoftmax: T = u + ln sigma(u), u = x ln b, c = 1 (a softmax of z, Kanai et al. 2018).
enum RowTransform : int32_t { IDENTITY = 0, CLAMP = 1, SIGSOFT = 2 };
enum ShiftMode : int32_t { SHIFT_NONE = 0, SHIFT_MAX = 1, SHIFT_GUESS = 2, SHIFT_GUESS_OR_MAX = 3 };

template <int32_t Kind, class A>
struct RowT {
  A p;  // clamp value (CLAMP) or ln b (SIGSOFT)
  FORGE_HD A t(A x) const {
    if (Kind == CLAMP) return fm::fmin(x, p);
    if (Kind == SIGSOFT) { A u = x * p; return u + fm::log_sigmoid(u); }
    return x;
  }
  FORGE_HD A dt(A x) const {  // d t / d x
    if (Kind == CLAMP) return x <= p ? A(1) : A(0);
    if (Kind == SIGSOFT) return p * (A(2) - fm::sigmoid(x * p));  // 1 + sigma(-u)
    return A(1);
  }
};

// Calls fn(RowT<kind, A>-type tag) for a runtime transform (a compile-time one inside the kernels,
// so a vectorised loop never evaluates the formulas of the other transforms).
template <class A, class Fn>
inline void dispatch_transform(int32_t kind, Fn&& fn) {
  switch (kind) {
    case CLAMP: fn(static_cast<RowT<CLAMP, A>*>(nullptr)); break;
    case SIGSOFT: fn(static_cast<RowT<SIGSOFT, A>*>(nullptr)); break;
    default: fn(static_cast<RowT<IDENTITY, A>*>(nullptr)); break;
  }
}

struct RowArgs {
  int32_t transform, shift_mode, divide;
  double tparam, guess, overflow, post;
};

// The constants of one elementwise variant (layout per functor above), passed by value to kernels.
struct ElemConsts {
  double c[8];
};

// The row's shift from its visible max mx (the dtype's lowest value when the row is fully hidden).
template <class A>
FORGE_HD A row_shift(const RowArgs& a, A mx, bool* uses_max) {
  bool use = a.shift_mode == SHIFT_MAX || (a.shift_mode == SHIFT_GUESS_OR_MAX && mx - A(a.guess) > A(a.overflow));
  *uses_max = use;
  return use ? mx : a.shift_mode == SHIFT_NONE ? A(0) : A(a.guess);
}

}  // namespace forge
