// Attention-score normalisers on the CPU, with the mask applied from MaskArgs (no mask tensor).
//
// scores (..., Tq, Tk) is walked as rows of Tk; row r is query i = r % Tq of head h = (r / Tq) % H.
// Each row visits its visible column ranges only (forge/scores.h visible_cols) and writes zeros
// elsewhere. The formulas are the functors of forge/scores.h, shared with the CUDA kernels.
#include <array>

#include "common.h"
#include "forge/scores.h"

namespace forge {
namespace cpu {
namespace {

struct RowGeom {
  int64_t rows, tq, tk, heads;
  FORGE_HD int64_t query(int64_t r) const { return r % tq; }
  FORGE_HD int64_t head(int64_t r) const { return heads == 1 ? 0 : (r / tq) % heads; }
};

RowGeom geometry(const at::Tensor& s, int64_t n_params) {
  const int64_t tk = s.size(-1), tq = s.dim() >= 2 ? s.size(-2) : 1;
  const int64_t heads = s.dim() >= 3 ? s.size(-3) : 1;
  TORCH_CHECK(n_params == 1 || n_params == heads, "per-head parameters: ", n_params, " values for ", heads,
              " heads");
  return {tk ? s.numel() / tk : 0, tq, tk, n_params == 1 ? 1 : heads};
}

MaskArgs mask_args(c10::IntArrayRef m) {
  TORCH_CHECK(m.size() == 5, "mask must be [enabled, causal, window, q_offset, n_sink]");
  return {int32_t(m[0]), int32_t(m[1]), int32_t(m[2]), int32_t(m[3]), int32_t(m[4])};
}

template <class A>
FORGE_HD bool is_visible(A x) { return x != -fm::inf<A>(); }

// The two visible column ranges of a row: the sink columns, then the causal / window range.
struct Segment {
  int64_t lo, hi;
};
inline std::array<Segment, 2> segments(const ColRange& c) { return {Segment{0, c.sink_end}, Segment{c.lo, c.hi}}; }

// Zeros the hidden columns [sink_end, lo) and [hi, n) of an output row.
template <class T>
void zero_hidden(T* row, const ColRange& c, int64_t n) {
  std::fill(row + c.sink_end, row + c.lo, store<T>(0.f));
  std::fill(row + c.hi, row + n, store<T>(0.f));
}

// ---- elementwise -------------------------------------------------------------------------------
// Every inner loop reads only locals of its row (pointers, functor, accumulators): a captured
// reference makes GCC's `omp simd` code gather element by element (measured 3x slower).
template <class F, class T, class O, class A>
void elem_fwd(const T* s, const A* params, O* y, const double* consts, MaskArgs mask, RowGeom g) {
  parallel_rows(g.rows, g.tk, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t h = g.head(r);
      const F f(consts, params[2 * h], params[2 * h + 1], A(0));
      const ColRange c = visible_cols(mask, g.query(r), g.tk);
      const T* sr = s + r * g.tk;
      O* yr = y + r * g.tk;
      for (const Segment sg : segments(c)) {
        for (int64_t j = sg.lo; j < sg.hi; ++j) {
          A x = load(sr[j]);
          bool v = is_visible(x);
          A val = f.value(v ? x : A(0));
          yr[j] = store<O>(v ? val : A(0));
        }
      }
      zero_hidden(yr, c, g.tk);
    }
  });
}

template <class F, class T, class G, class A>
void elem_bwd(const G* dy, const T* s, const A* params, T* dx, A* dparams, const double* consts, MaskArgs mask,
              RowGeom g) {
  PerThread<A> acc(dparams ? 2 * g.heads : 0);
  parallel_rows(g.rows, g.tk, [&](int64_t begin, int64_t end) {
    A* mine = dparams ? acc.mine() : nullptr;
    for (int64_t r = begin; r < end; ++r) {
      const int64_t h = g.head(r);
      const F f(consts, params[2 * h], params[2 * h + 1], A(0));
      const ColRange c = visible_cols(mask, g.query(r), g.tk);
      const T* sr = s + r * g.tk;
      const G* gr = dy + r * g.tk;
      T* dr = dx + r * g.tk;
      A p0 = A(0), p1 = A(0);
      for (const Segment sg : segments(c)) {
#pragma omp simd reduction(+ : p0, p1)
        for (int64_t j = sg.lo; j < sg.hi; ++j) {
          A x = load(sr[j]);
          bool v = is_visible(x);
          ElemGrad<A> e = f.grad(v ? x : A(0), load(gr[j]));
          dr[j] = store<T>(v ? e.dx : A(0));
          p0 += v ? e.dp0 : A(0);
          p1 += v ? e.dp1 : A(0);
        }
      }
      zero_hidden(dr, c, g.tk);
      if (mine) {
        mine[2 * h] += p0;
        mine[2 * h + 1] += p1;
      }
    }
  });
  if (dparams) {
    auto sum = acc.sum();
    std::copy(sum.begin(), sum.end(), dparams);
  }
}

at::ScalarType acc_dtype(const at::Tensor& x) { return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

at::Tensor elementwise_fwd(const at::Tensor& scores_, const at::Tensor& params_, int64_t kind,
                           c10::ArrayRef<double> consts_, c10::IntArrayRef mask_,
                           c10::optional<at::ScalarType> out_dtype) {
  at::Tensor s = scores_.contiguous();
  at::Tensor params = params_.to(acc_dtype(s)).contiguous();
  const RowGeom g = geometry(s, params.size(0));
  const MaskArgs mask = mask_args(mask_);
  std::vector<double> consts(consts_.begin(), consts_.end());
  consts.resize(8, 0.0);
  at::Tensor y = at::empty(s.sizes(), s.options().dtype(out_dtype.value_or(s.scalar_type())));
  dispatch_io(s.scalar_type(), y.scalar_type(), "score_elementwise_fwd", [&](auto t_in, auto t_out) {
    using T = decltype(t_in);
    using O = decltype(t_out);
    using A = acc_t<T>;
    dispatch_elem<A>(int32_t(kind), consts.data(), [&](auto* tag) {
      using F = std::remove_pointer_t<decltype(tag)>;
      elem_fwd<F, T, O, A>(s.const_data_ptr<T>(), params.const_data_ptr<A>(), y.data_ptr<O>(), consts.data(),
                           mask, g);
    });
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor> elementwise_bwd(const at::Tensor& grad_, const at::Tensor& scores_,
                                                   const at::Tensor& params_, int64_t kind,
                                                   c10::ArrayRef<double> consts_, c10::IntArrayRef mask_,
                                                   bool need_dparams) {
  at::Tensor s = scores_.contiguous(), grad = grad_.contiguous();
  const auto acc = acc_dtype(s);
  at::Tensor params = params_.to(acc).contiguous();
  const RowGeom g = geometry(s, params.size(0));
  const MaskArgs mask = mask_args(mask_);
  std::vector<double> consts(consts_.begin(), consts_.end());
  consts.resize(8, 0.0);
  at::Tensor dx = at::empty_like(s);
  at::Tensor dparams = at::zeros(params.sizes(), params.options());
  dispatch_io(s.scalar_type(), grad.scalar_type(), "score_elementwise_bwd", [&](auto t_in, auto t_grad) {
    using T = decltype(t_in);
    using G = decltype(t_grad);
    using A = acc_t<T>;
    dispatch_elem<A>(int32_t(kind), consts.data(), [&](auto* tag) {
      using F = std::remove_pointer_t<decltype(tag)>;
      elem_bwd<F, T, G, A>(grad.const_data_ptr<G>(), s.const_data_ptr<T>(), params.const_data_ptr<A>(),
                           dx.data_ptr<T>(), need_dparams ? dparams.data_ptr<A>() : nullptr, consts.data(), mask, g);
    });
  });
  return {dx, dparams.to(params_.scalar_type())};
}

// ---- row-normalised ----------------------------------------------------------------------------
// Forward, per row: t_j = T(x_j) into a buffer, the shift m from the visible max, r_j = e^{(t_j - m) c},
// den = obo + sum r (1 when 0, so a fully hidden row stays 0), y = r / den * post.
template <class Tr, class T, class O, class A>
void rownorm_fwd(const T* s, A c_, const A* obo, O* y, A* stats, RowArgs a, MaskArgs mask, RowGeom g) {
  parallel_rows(g.rows, g.tk, [&](int64_t begin, int64_t end) {
    const Tr tr{A(a.tparam)};
    const A c = c_;
    std::vector<A> tbuf(g.tk);
    A* t = tbuf.data();
    for (int64_t r = begin; r < end; ++r) {
      const ColRange cr = visible_cols(mask, g.query(r), g.tk);
      const T* sr = s + r * g.tk;
      O* yr = y + r * g.tk;
      A mx = fm::lowest<A>();
      for (const Segment sg : segments(cr)) {
#pragma omp simd reduction(max : mx)
        for (int64_t j = sg.lo; j < sg.hi; ++j) {
          A x = load(sr[j]);
          bool v = is_visible(x);
          A tj = tr.t(v ? x : A(0));
          t[j] = tj;
          mx = v ? fm::fmax(mx, tj) : mx;
        }
      }
      bool uses_max;
      const A m = row_shift(a, mx, &uses_max);
      A sum = A(0);
      for (const Segment sg : segments(cr)) {
#pragma omp simd reduction(+ : sum)
        for (int64_t j = sg.lo; j < sg.hi; ++j) {
          bool v = is_visible(load(sr[j]));
          A e = fm::exp((v ? t[j] - m : A(0)) * c);
          t[j] = v ? e : A(0);
          sum += t[j];
        }
      }
      A den = a.divide ? sum + obo[g.head(r)] : A(1);
      den = den == A(0) ? A(1) : den;
      const A scale = A(a.post) / den;
      for (const Segment sg : segments(cr))
        for (int64_t j = sg.lo; j < sg.hi; ++j) yr[j] = store<O>(t[j] * scale);
      zero_hidden(yr, cr, g.tk);
      stats[3 * r] = m;
      stats[3 * r + 1] = den;
      stats[3 * r + 2] = uses_max ? A(1) : A(0);
    }
  });
}

// Backward, per row, recomputing r from x: q = r / den (or r), gy = dy * post,
// divide: S = sum gy q, da_j = (gy_j - S) q_j, d obo = -S / den;  else da_j = gy_j r_j;
// dt_j = c da_j, plus, when m is the row max, the shift's gradient dm = -c sum da shared evenly by
// the maximal entries (as amax's gradient); dx_j = dt_j T'(x_j); dc = sum da_j (t_j - m).
// sum da = sum gy q - S sum q is known after the first pass, so dx is written once, unrounded.
template <class Tr, class T, class G, class A>
void rownorm_bwd(const G* dy, const T* s, A c_, const A* stats, T* dx, A* dc_out, A* dobo_out, RowArgs a,
                 MaskArgs mask, RowGeom g) {
  PerThread<A> acc_c(dc_out ? 1 : 0), acc_o(dobo_out ? g.heads : 0);
  parallel_rows(g.rows, g.tk, [&](int64_t begin, int64_t end) {
    const Tr tr{A(a.tparam)};
    const A c = c_, post = A(a.post);
    std::vector<A> qbuf(g.tk);
    A* q = qbuf.data();
    A* my_c = dc_out ? acc_c.mine() : nullptr;
    A* my_o = dobo_out ? acc_o.mine() : nullptr;
    for (int64_t r = begin; r < end; ++r) {
      const ColRange cr = visible_cols(mask, g.query(r), g.tk);
      const T* sr = s + r * g.tk;
      const G* gr = dy + r * g.tk;
      T* dr = dx + r * g.tk;
      const A m = stats[3 * r], den = stats[3 * r + 1];
      const bool uses_max = stats[3 * r + 2] != A(0);
      const A inv_den = a.divide ? A(1) / den : A(1);
      A sgq = A(0), sq = A(0), ties = A(0);
      for (const Segment sg : segments(cr)) {
#pragma omp simd reduction(+ : sgq, sq, ties)
        for (int64_t j = sg.lo; j < sg.hi; ++j) {
          A x = load(sr[j]);
          bool v = is_visible(x);
          A tj = tr.t(v ? x : A(0));
          A e = fm::exp((tj - m) * c) * inv_den;  // unconditional: a select, not a branch
          A qj = v ? e : A(0);
          q[j] = qj;
          sgq += A(load(gr[j])) * post * qj;
          sq += qj;
          ties += (v & (tj == m)) ? A(1) : A(0);
        }
      }
      const A S = a.divide ? sgq : A(0);
      const A share = (uses_max && ties > A(0)) ? (sgq - S * sq) / ties : A(0);  // sum da / ties
      A dc = A(0);
      for (const Segment sg : segments(cr)) {
#pragma omp simd reduction(+ : dc)
        for (int64_t j = sg.lo; j < sg.hi; ++j) {
          A x = load(sr[j]);
          bool v = is_visible(x);
          A xs = v ? x : A(0), tj = tr.t(xs);
          A d = (A(load(gr[j])) * post - S) * q[j];  // da_j (q = r when not dividing, and S = 0)
          A dt = c * (d - (tj == m ? share : A(0)));
          dr[j] = store<T>(v ? dt * tr.dt(xs) : A(0));
          dc += v ? d * (tj - m) : A(0);
        }
      }
      zero_hidden(dr, cr, g.tk);
      if (my_c) my_c[0] += dc;
      if (my_o && a.divide) my_o[g.head(r)] += -S * inv_den;
    }
  });
  if (dc_out) dc_out[0] = acc_c.sum()[0];
  if (dobo_out) {
    auto sum = acc_o.sum();
    std::copy(sum.begin(), sum.end(), dobo_out);
  }
}

RowArgs row_args(int64_t transform, int64_t shift_mode, bool divide, double tparam, double guess, double overflow,
                 double post) {
  return {int32_t(transform), int32_t(shift_mode), int32_t(divide), tparam, guess, overflow, post};
}

std::tuple<at::Tensor, at::Tensor> rownorm_fwd_op(const at::Tensor& scores_, const at::Tensor& c_,
                                                  const at::Tensor& obo_, c10::IntArrayRef mask_, int64_t transform,
                                                  int64_t shift_mode, bool divide, double tparam, double guess,
                                                  double overflow, double post,
                                                  c10::optional<at::ScalarType> out_dtype) {
  at::Tensor s = scores_.contiguous();
  const auto acc = acc_dtype(s);
  at::Tensor obo = obo_.to(acc).contiguous();
  const RowGeom g = geometry(s, obo.numel());
  at::Tensor y = at::empty(s.sizes(), s.options().dtype(out_dtype.value_or(s.scalar_type())));
  at::Tensor stats = at::empty({g.rows, 3}, s.options().dtype(acc));
  const RowArgs a = row_args(transform, shift_mode, divide, tparam, guess, overflow, post);
  dispatch_io(s.scalar_type(), y.scalar_type(), "score_rownorm_fwd", [&](auto t_in, auto t_out) {
    using T = decltype(t_in);
    using O = decltype(t_out);
    using A = acc_t<T>;
    dispatch_transform<A>(a.transform, [&](auto* tag) {
      rownorm_fwd<std::remove_pointer_t<decltype(tag)>, T, O, A>(s.const_data_ptr<T>(), c_.item().to<A>(),
                                                                   obo.const_data_ptr<A>(), y.data_ptr<O>(),
                                                                   stats.data_ptr<A>(), a, mask_args(mask_), g);
    });
  });
  return {y, stats};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> rownorm_bwd_op(
    const at::Tensor& grad_, const at::Tensor& scores_, const at::Tensor& c_, const at::Tensor& obo_,
    const at::Tensor& stats, c10::IntArrayRef mask_, int64_t transform, bool divide, double tparam, double post,
    bool need_dc, bool need_dobo) {
  at::Tensor s = scores_.contiguous(), grad = grad_.contiguous();
  const auto acc = acc_dtype(s);
  const RowGeom g = geometry(s, obo_.numel());
  at::Tensor dx = at::empty_like(s);
  at::Tensor dc = at::zeros({1}, s.options().dtype(acc));
  at::Tensor dobo = at::zeros({obo_.numel()}, s.options().dtype(acc));
  const RowArgs a = row_args(transform, SHIFT_NONE, divide, tparam, 0.0, 0.0, post);
  dispatch_io(s.scalar_type(), grad.scalar_type(), "score_rownorm_bwd", [&](auto t_in, auto t_grad) {
    using T = decltype(t_in);
    using G = decltype(t_grad);
    using A = acc_t<T>;
    dispatch_transform<A>(a.transform, [&](auto* tag) {
      rownorm_bwd<std::remove_pointer_t<decltype(tag)>, T, G, A>(
          grad.const_data_ptr<G>(), s.const_data_ptr<T>(), c_.item().to<A>(), stats.contiguous().const_data_ptr<A>(),
          dx.data_ptr<T>(), need_dc ? dc.data_ptr<A>() : nullptr, need_dobo ? dobo.data_ptr<A>() : nullptr, a,
          mask_args(mask_), g);
    });
  });
  return {dx, dc.to(c_.scalar_type()).reshape(c_.sizes()), dobo.to(obo_.scalar_type()).reshape(obo_.sizes())};
}

}  // namespace

TORCH_LIBRARY_IMPL(forge_ops, CPU, m) {
  m.impl("score_elementwise_fwd", &elementwise_fwd);
  m.impl("score_elementwise_bwd", &elementwise_bwd);
  m.impl("score_rownorm_fwd", &rownorm_fwd_op);
  m.impl("score_rownorm_bwd", &rownorm_bwd_op);
}

}  // namespace cpu
}  // namespace forge
