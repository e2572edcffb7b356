// Fused attention for the score normalisers: out_i = sum_j f(s_ij) v_j / D_i without the (T, S)
// score matrix. One task per (batch, KV head) over the ATen thread pool; every query head of the
// KV head's group runs over tiles of 64 query rows x the keys those rows see (Tile: causal stops at
// the last row's key, a sliding window starts at the first row's), so memory is O(threads x 64 x S),
// never O(T x S), fully masked keys cost nothing, and GQA never repeats K/V.
//
// s_ij = cap tanh((q_i . k_j) scale / cap) + bias_ij  (soft-capping: Gemma 2; additive bias: FIRE)
// Two families, their formulas the functors of forge/scores.h (shared with the normaliser kernels):
// - elementwise: f(s) = F.value(s), D a constant or learned per-head denominator inside F;
// - row-normalised: t = T(s), m the row shift (max over visible keys and the sink), e = exp(c (t - m)),
//   D = obo + sum_j e (+ the sink's e), out = post sum_j e_j v_j / D. A whole row is in the tile, so
//   m is the exact max (no running rescale); stats (B, H, T, 3) = [m, D, ties of the max] are
//   what the backward needs to recompute e, as flash attention keeps its log-sum-exp.
// Backward per row (Dao et al. 2022, with f general): dP_j = dO_i . v_j, delta = dO_i . out_i;
// elementwise ds_j = F'(s_j) dP_j; row-normalised da_j = (post dP_j - delta) e_j / D (no delta without
// division), dt_j = c (da_j - [t_j = m] sum(da) / ties) as amax's gradient, ds_j = dt_j T'(s_j).
#include <array>
#include <cmath>

#include "attention_tiles.h"

namespace forge {
namespace cpu {
namespace {
using namespace attn;

// ---- the two normaliser families -----------------------------------------------------------------
// Elementwise: params (H or 1, width) = per-head [beta, gamma] (width 2), or a functor's table row
// (Pfla: [beta, gamma, knots...]); dpar accumulates their gradients. With divide (a row sum of the
// curve, pfla_softmax): D = obo + sum_j f(s_j) (+ f(sink), the flash-LOBO key of zero value), out =
// sum_j f_j v_j / D, stats [0, D, 0]; backward dL/df_j = (dP_j - delta) / D, dobo = -delta / D.
template <class F, class = void>
struct HasTable : std::false_type {};
template <class F>
struct HasTable<F, std::void_t<decltype(F::kTable)>> : std::true_type {};

template <class F, class A>
struct Elementwise {
  const double* consts;
  const A* params;
  int64_t n_params, width;
  bool divide;
  const A* obo;
  int64_t n_obo;
  const A* sink;
  int64_t n_sink;
  int64_t row_of(int64_t h) const { return (n_params == 1 ? 0 : h) * width; }
  F functor(int64_t h) const {
    const A* p = params + row_of(h);
    if constexpr (HasTable<F>::value) return F(consts, p, width);
    else return F(consts, p[0], p[1], A(0));
  }
  // the gradient through f at x for dL/df = dy, the parameters' terms into drow (or p0, p1)
  static A grad_at(const F& f, A x, A dy, A* drow, A& p0, A& p1) {
    if constexpr (HasTable<F>::value) {
      return f.grad(x, dy, drow);
    } else {
      const ElemGrad<A> e = f.grad(x, dy);
      p0 += e.dp0;
      p1 += e.dp1;
      return e.dx;
    }
  }
  // p_j = f(s_j); returns the factor of sum_j p_j v_j (1, or 1/D with divide)
  A forward(int64_t h, A* s, const ColRange& c, A* stats) const {
    const F f = functor(h);
    A sum = A(0);
    for (const Segment sg : segments(c))
      for (int64_t j = sg.lo; j < sg.hi; ++j) {
        s[j] = f.value(s[j]);
        sum += s[j];
      }
    if (!divide) return A(1);
    if (n_sink) sum += f.value(sink[n_sink == 1 ? 0 : h]);
    A den = sum + obo[n_obo == 1 ? 0 : h];
    den = den == A(0) ? A(1) : den;
    stats[0] = A(0);
    stats[1] = den;
    stats[2] = A(0);
    return A(1) / den;
  }
  // in: s (scores), dp; out: p (weights), ds; dpar (width per head) += the parameters' gradients
  void backward(int64_t h, A* s, A* dp, const ColRange& c, const A* stats, A delta, A* dpar, A* /*dc*/,
                A* dobo, A* dsink) const {
    const F f = functor(h);
    A* drow = dpar + row_of(h);
    const A inv = divide ? A(1) / stats[1] : A(1), dl = divide ? delta : A(0);
    A p0 = A(0), p1 = A(0);
    for (const Segment sg : segments(c))
      for (int64_t j = sg.lo; j < sg.hi; ++j) {
        const A x = s[j];
        dp[j] = grad_at(f, x, (dp[j] - dl) * inv, drow, p0, p1);
        s[j] = f.value(x) * inv;
      }
    if (divide) {
      if (n_sink) {
        const int64_t i = n_sink == 1 ? 0 : h;
        dsink[i] += grad_at(f, sink[i], -delta * inv, drow, p0, p1);
      }
      dobo[n_obo == 1 ? 0 : h] -= delta * inv;
    }
    drow[0] += p0;
    drow[1] += p1;
  }
};

// Row-normalised: c the exponent scale, obo (H or 1) the off-by-one addend, sink (H or 1, or none)
// a virtual key of logit log C and zero value (flash-LOBO).
template <class Tr, class A>
struct RowNorm {
  Tr tr;
  RowArgs a;
  A c;
  const A* obo;
  int64_t n_obo;
  const A* sink;
  int64_t n_sink;
  A obo_of(int64_t h) const { return obo[n_obo == 1 ? 0 : h]; }
  bool has_sink() const { return n_sink > 0; }
  A sink_t(int64_t h) const { return tr.t(sink[n_sink == 1 ? 0 : h]); }

  A forward(int64_t h, A* s, const ColRange& cr, A* stats) const {
    A mx = fm::lowest<A>();
    for (const Segment sg : segments(cr))
      for (int64_t j = sg.lo; j < sg.hi; ++j) {
        s[j] = tr.t(s[j]);
        mx = fm::fmax(mx, s[j]);
      }
    const A ts = has_sink() ? sink_t(h) : A(0);
    if (has_sink()) mx = fm::fmax(mx, ts);
    bool uses_max;
    const A m = row_shift(a, mx, &uses_max);
    A sum = A(0), ties = A(0);
    for (const Segment sg : segments(cr))
      for (int64_t j = sg.lo; j < sg.hi; ++j) {
        ties += s[j] == m ? A(1) : A(0);
        s[j] = fm::exp((s[j] - m) * c);
        sum += s[j];
      }
    if (has_sink()) {
      ties += ts == m ? A(1) : A(0);
      sum += fm::exp((ts - m) * c);
    }
    A den = a.divide ? sum + obo_of(h) : A(1);
    den = den == A(0) ? A(1) : den;
    stats[0] = m;
    stats[1] = den;
    stats[2] = uses_max ? ties : A(0);
    return A(a.post) / den;
  }

  void backward(int64_t h, A* s, A* dp, const ColRange& cr, const A* stats, A delta, A* /*dpar*/, A* dc, A* dobo,
                A* dsink) const {
    const A m = stats[0], den = stats[1], ties = stats[2];
    const A inv = a.divide ? A(1) / den : A(1), post = A(a.post);
    const A dl = a.divide ? delta : A(0);
    // sum of da over every key and the sink: delta obo / D with division, delta without
    const A sum_da = a.divide ? delta * obo_of(h) * inv : delta;
    const A share = ties > A(0) ? sum_da / ties : A(0);
    A dcr = A(0);
    for (const Segment sg : segments(cr))
      for (int64_t j = sg.lo; j < sg.hi; ++j) {
        const A x = s[j], t = tr.t(x);
        const A qj = fm::exp((t - m) * c) * inv;
        const A da = (post * dp[j] - dl) * qj;
        dcr += da * (t - m);
        dp[j] = c * (da - (t == m ? share : A(0))) * tr.dt(x);
        s[j] = qj * post;  // the weight of v_j in out
      }
    if (has_sink()) {
      const A xs = sink[n_sink == 1 ? 0 : h], ts = tr.t(xs);
      const A da = -dl * fm::exp((ts - m) * c) * inv;
      dcr += da * (ts - m);
      dsink[n_sink == 1 ? 0 : h] += c * (da - (ts == m ? share : A(0))) * tr.dt(xs);
    }
    dc[0] += dcr;
    if (a.divide) dobo[n_obo == 1 ? 0 : h] += -delta * inv;
  }
};

// One task per (batch, KV head): K and V in the accumulation type once, then every query head of
// the group tile by tile; the products are BLAS calls on the tile, the normaliser runs on its rows.
template <class T, class Fam>
void attn_fwd(const T* q, const T* k, const T* v, const acc_t<T>* bias, T* out, acc_t<T>* stats, const Fam& fam,
              const Geo& g) {
  using A = acc_t<T>;
  const int64_t rep = g.Hq / g.Hkv;
  const A alpha = g.softcap != 0.0 ? A(1) : A(g.scale);
  at::parallel_for(0, g.B * g.Hkv, 1, [&](int64_t begin, int64_t end) {
    std::vector<A> kbuf, vbuf, qbuf, s(size_t(QBLOCK * g.S)), th(g.softcap != 0.0 ? s.size() : 0),
        o(size_t(QBLOCK * g.Dv));
    A f[QBLOCK];
    for (int64_t bg = begin; bg < end; ++bg) {
      const int64_t b = bg / g.Hkv, kvh = bg % g.Hkv;
      const A* kf = as_acc<A>(k + bg * g.S * g.D, g.S * g.D, kbuf);
      const A* vf = as_acc<A>(v + bg * g.S * g.Dv, g.S * g.Dv, vbuf);
      for (int64_t h = kvh * rep; h < (kvh + 1) * rep; ++h) {
        const int64_t bh = b * g.Hq + h;
        const A* qf = as_acc<A>(q + bh * g.T * g.D, g.T * g.D, qbuf);
        for (int64_t i0 = 0; i0 < g.T; i0 += QBLOCK) {
          const Tile t(g, i0);
          keys_nt<A>(t, g.D, alpha, qf + i0 * g.D, g.D, kf, s.data());
          for (int64_t r = 0; r < t.n; ++r) {
            const int64_t i = i0 + r;
            const ColRange c = t.row(g, r);
            A* sr = s.data() + r * t.w;
            finish_scores(sr, th.data() + r * t.w, g.Hb ? bias + g.bias_row(b, h, i) : nullptr, t.shift, c, g);
            f[r] = fam.forward(h, sr, c, stats ? stats + (bh * g.T + i) * 3 : nullptr);
            zero_hidden(sr, c, t.w);
          }
          keys_nn<A>(t, g.Dv, A(1), s.data(), vf, A(0), o.data(), g.Dv);
          T* dst = out + (bh * g.T + i0) * g.Dv;
          for (int64_t r = 0; r < t.n; ++r)
            for (int64_t d = 0; d < g.Dv; ++d) dst[r * g.Dv + d] = store<T>(o[r * g.Dv + d] * f[r]);
        }
      }
    }
  });
}

// dq, dk, dv in T; dbias (Bb, Hb, T, S) and the small ones [dparams | dc | dobo | dsink] in A. Each
// task owns the dbias slices it writes (a bias broadcast over the batch or the heads keeps those
// inside one task), so dbias needs no per-thread copy; the small gradients are summed over threads
// in thread order (deterministic for a thread count).
template <class T, class Fam>
void attn_bwd(const T* grad, const T* q, const T* k, const T* v, const acc_t<T>* bias, const T* out,
              const acc_t<T>* stats, T* dq, T* dk, T* dv, acc_t<T>* dbias, acc_t<T>* small, int64_t n_small,
              std::array<int64_t, 4> offsets, const Fam& fam, const Geo& g) {
  using A = acc_t<T>;
  const int64_t rep = g.Hq / g.Hkv;
  const A alpha = g.softcap != 0.0 ? A(1) : A(g.scale);
  // tasks over the batch unless dbias is shared across it, over KV heads unless shared across them
  const int64_t nb = !dbias || g.Bb == g.B ? g.B : 1, nh = !dbias || g.Hb == g.Hq || g.Hkv == 1 ? g.Hkv : 1;
  PerThread<A> acc_small(n_small);
  at::parallel_for(0, nb * nh, 1, [&](int64_t begin, int64_t end) {
    A* my = acc_small.mine();
    std::vector<A> kbuf, vbuf, qbuf, gbuf, s(size_t(QBLOCK * g.S)), dp(s.size()), th(g.softcap != 0.0 ? s.size() : 0),
        dkf(size_t(g.S * g.D)), dvf(size_t(g.S * g.Dv)), dqt(size_t(QBLOCK * g.D));
    A delta[QBLOCK];
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b_lo = nb == 1 ? 0 : task / nh, b_hi = nb == 1 ? g.B : b_lo + 1;
      const int64_t h_lo = nh == 1 ? 0 : task % nh, h_hi = nh == 1 ? g.Hkv : h_lo + 1;
      for (int64_t b = b_lo; b < b_hi; ++b)
        for (int64_t kvh = h_lo; kvh < h_hi; ++kvh) {
          const int64_t bg = b * g.Hkv + kvh;
          const A* kf = as_acc<A>(k + bg * g.S * g.D, g.S * g.D, kbuf);
          const A* vf = as_acc<A>(v + bg * g.S * g.Dv, g.S * g.Dv, vbuf);
          std::fill(dkf.begin(), dkf.end(), A(0));
          std::fill(dvf.begin(), dvf.end(), A(0));
          for (int64_t h = kvh * rep; h < (kvh + 1) * rep; ++h) {
            const int64_t bh = b * g.Hq + h;
            const A* qf = as_acc<A>(q + bh * g.T * g.D, g.T * g.D, qbuf);
            const A* gf = as_acc<A>(grad + bh * g.T * g.Dv, g.T * g.Dv, gbuf);
            for (int64_t i0 = 0; i0 < g.T; i0 += QBLOCK) {
              const Tile t(g, i0);
              const A *qb = qf + i0 * g.D, *gb = gf + i0 * g.Dv;
              for (int64_t r = 0; r < t.n; ++r) {  // dO . out per row
                const T* o = out + (bh * g.T + i0 + r) * g.Dv;
                A acc = A(0);
                for (int64_t d = 0; d < g.Dv; ++d) acc += gb[r * g.Dv + d] * load(o[d]);
                delta[r] = acc;
              }
              keys_nt<A>(t, g.D, alpha, qb, g.D, kf, s.data());
              keys_nt<A>(t, g.Dv, A(1), gb, g.Dv, vf, dp.data());
              for (int64_t r = 0; r < t.n; ++r) {
                const int64_t i = i0 + r;
                const ColRange c = t.row(g, r);
                A *sr = s.data() + r * t.w, *dr = dp.data() + r * t.w, *tr = th.data() + r * t.w;
                finish_scores(sr, tr, g.Hb ? bias + g.bias_row(b, h, i) : nullptr, t.shift, c, g);
                fam.backward(h, sr, dr, c, stats ? stats + (bh * g.T + i) * 3 : nullptr, delta[r], my + offsets[0],
                             my + offsets[1], my + offsets[2], my + offsets[3]);
                unfinish_grad(dr, tr, dbias ? dbias + g.bias_row(b, h, i) : nullptr, t.shift, c, g);
                zero_hidden(sr, c, t.w);
                zero_hidden(dr, c, t.w);
              }
              keys_tn<A>(t, g.Dv, A(1), s.data(), gb, dvf.data());
              keys_tn<A>(t, g.D, alpha, dp.data(), qb, dkf.data());
              keys_nn<A>(t, g.D, alpha, dp.data(), kf, A(0), dqt.data(), g.D);
              T* dst = dq + (bh * g.T + i0) * g.D;
              for (int64_t j = 0; j < t.n * g.D; ++j) dst[j] = store<T>(dqt[j]);
            }
          }
          for (int64_t j = 0; j < g.S * g.D; ++j) dk[bg * g.S * g.D + j] = store<T>(dkf[j]);
          for (int64_t j = 0; j < g.S * g.Dv; ++j) dv[bg * g.S * g.Dv + j] = store<T>(dvf[j]);
        }
    }
  });
  auto sum = acc_small.sum();
  std::copy(sum.begin(), sum.end(), small);
}

// ---- op entry points -----------------------------------------------------------------------------
enum Family : int64_t { ELEMENTWISE = 0, ROWNORM = 1 };

at::ScalarType acc_of(const at::Tensor& x) { return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

Geo geometry(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& bias, double scale,
             double softcap, c10::IntArrayRef m) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "attention: q, k, v must be (B, H, T, D)");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(),
              "attention: q, k, v must share a dtype");
  const int64_t Hq = q.size(1), Hkv = k.size(1);
  TORCH_CHECK(Hkv > 0 && Hq % Hkv == 0 && k.size(0) == q.size(0) && v.size(0) == q.size(0) && v.size(1) == Hkv &&
                  v.size(2) == k.size(2) && k.size(3) == q.size(3),
              "attention: shapes q ", q.sizes(), " k ", k.sizes(), " v ", v.sizes(), " do not fit");
  TORCH_CHECK(m.size() == 5, "mask must be [enabled, causal, window, q_offset, n_sink]");
  int64_t Bb = 1, Hb = 0;
  if (bias.defined()) {  // (1 or H, T, S), or (1 or B, 1 or H, T, S)
    const int64_t d = bias.dim();
    TORCH_CHECK((d == 3 || d == 4) && (d == 3 || bias.size(0) == 1 || bias.size(0) == q.size(0)) &&
                    (bias.size(d - 3) == 1 || bias.size(d - 3) == Hq) && bias.size(d - 2) == q.size(2) &&
                    bias.size(d - 1) == k.size(2),
                "attention: bias must be (1 or H, T, S) or (1 or B, 1 or H, T, S), got ", bias.sizes());
    Bb = d == 4 ? bias.size(0) : 1;
    Hb = bias.size(d - 3);
  }
  return {q.size(0), Hq, Hkv, q.size(2), k.size(2), q.size(3), v.size(3), Bb, Hb, scale, softcap,
          MaskArgs{int32_t(m[0]), int32_t(m[1]), int32_t(m[2]), int32_t(m[3]), int32_t(m[4])}};
}

// Runs fn(T-tag, family object) for the dtype and the normaliser.
template <class Fn>
void dispatch(const at::Tensor& q, int64_t family, int64_t kind, const std::vector<double>& consts,
              const at::Tensor& params, const at::Tensor& c, const at::Tensor& obo, const at::Tensor& sink,
              const RowArgs& ra, Fn&& fn) {
  dispatch_io(q.scalar_type(), q.scalar_type(), "attention", [&](auto t_in, auto) {
    using T = decltype(t_in);
    using A = acc_t<T>;
    if (family == ELEMENTWISE) {
      auto run = [&](auto* tag) {
        using F = std::remove_pointer_t<decltype(tag)>;
        fn(T(), Elementwise<F, A>{consts.data(), params.const_data_ptr<A>(), params.size(0), params.size(1),
                                  ra.divide != 0, obo.const_data_ptr<A>(), obo.numel(), sink.const_data_ptr<A>(),
                                  ra.divide != 0 ? sink.numel() : 0});
      };
      if (kind == PFLA) run(static_cast<Pfla<A>*>(nullptr));
      else dispatch_elem<A>(int32_t(kind), consts.data(), run);
    } else {
      dispatch_transform<A>(ra.transform, [&](auto* tag) {
        using Tr = std::remove_pointer_t<decltype(tag)>;
        fn(T(), RowNorm<Tr, A>{Tr{A(ra.tparam)}, ra, c.item().to<A>(), obo.const_data_ptr<A>(), obo.numel(),
                               sink.const_data_ptr<A>(), sink.numel()});
      });
    }
  });
}

struct Prepared {
  at::Tensor q, k, v, bias, params, c, obo, sink;
  std::vector<double> consts;
  RowArgs ra;
};

Prepared prepare(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const c10::optional<at::Tensor>& bias,
                 const at::Tensor& params, const at::Tensor& c, const at::Tensor& obo, const at::Tensor& sink,
                 c10::ArrayRef<double> consts, c10::ArrayRef<double> row) {
  const auto acc = acc_of(q);
  TORCH_CHECK(row.size() == 7, "row args must be [transform, shift, divide, tparam, guess, overflow, post]");
  TORCH_CHECK(params.dim() == 2 || params.numel() == 0, "params must be (H or 1, width)");
  Prepared p{q.contiguous(), k.contiguous(), v.contiguous(),
             bias.has_value() ? bias->to(acc).contiguous() : at::Tensor(),
             (params.dim() == 2 ? params : params.reshape({0, 2})).to(acc).contiguous(),
             c.to(acc).contiguous(), obo.to(acc).contiguous(), sink.to(acc).contiguous(),
             std::vector<double>(consts.begin(), consts.end()),
             RowArgs{int32_t(row[0]), int32_t(row[1]), int32_t(row[2]), row[3], row[4], row[5], row[6]}};
  p.consts.resize(8, 0.0);
  return p;
}

std::tuple<at::Tensor, at::Tensor> attention_fwd(const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_,
                                                 const c10::optional<at::Tensor>& bias_, const at::Tensor& params_,
                                                 const at::Tensor& c_, const at::Tensor& obo_, const at::Tensor& sink_,
                                                 int64_t family, int64_t kind, c10::ArrayRef<double> consts,
                                                 c10::ArrayRef<double> row, c10::IntArrayRef mask, double scale,
                                                 double softcap) {
  Prepared p = prepare(q_, k_, v_, bias_, params_, c_, obo_, sink_, consts, row);
  const Geo g = geometry(p.q, p.k, p.v, p.bias, scale, softcap, mask);
  at::Tensor out = at::empty({g.B, g.Hq, g.T, g.Dv}, p.q.options());
  const bool keeps_stats = family == ROWNORM || p.ra.divide;  // [m, D, ties] per row for the backward
  at::Tensor stats = at::empty({keeps_stats ? g.B * g.Hq * g.T : 0, 3}, p.q.options().dtype(acc_of(p.q)));
  dispatch(p.q, family, kind, p.consts, p.params, p.c, p.obo, p.sink, p.ra, [&](auto t, const auto& fam) {
    using T = decltype(t);
    using A = acc_t<T>;
    attn_fwd<T>(p.q.const_data_ptr<T>(), p.k.const_data_ptr<T>(), p.v.const_data_ptr<T>(),
                g.Hb ? p.bias.const_data_ptr<A>() : nullptr, out.data_ptr<T>(),
                keeps_stats ? stats.data_ptr<A>() : nullptr, fam, g);
  });
  return {out, stats.reshape({keeps_stats ? g.B : 0, g.Hq, g.T, 3})};
}

std::vector<at::Tensor> attention_bwd(const at::Tensor& grad_, const at::Tensor& q_, const at::Tensor& k_,
                                      const at::Tensor& v_, const c10::optional<at::Tensor>& bias_,
                                      const at::Tensor& params_, const at::Tensor& c_, const at::Tensor& obo_,
                                      const at::Tensor& sink_, const at::Tensor& out_, const at::Tensor& stats_,
                                      int64_t family, int64_t kind, c10::ArrayRef<double> consts,
                                      c10::ArrayRef<double> row, c10::IntArrayRef mask, double scale, double softcap,
                                      bool need_dbias) {
  Prepared p = prepare(q_, k_, v_, bias_, params_, c_, obo_, sink_, consts, row);
  const Geo g = geometry(p.q, p.k, p.v, p.bias, scale, softcap, mask);
  at::Tensor grad = grad_.to(p.q.scalar_type()).contiguous(), out = out_.contiguous(), stats = stats_.contiguous();
  at::Tensor dq = at::empty_like(p.q), dk = at::empty_like(p.k), dv = at::empty_like(p.v);
  const auto acc = p.q.options().dtype(acc_of(p.q));
  at::Tensor dbias = need_dbias && g.Hb ? at::zeros(p.bias.sizes(), acc) : at::zeros({0}, acc);
  // one buffer for the small gradients: [dparams | dc | dobo | dsink]
  const int64_t np = p.params.numel(), no = p.obo.numel(), ns = p.sink.numel();
  at::Tensor small = at::zeros({np + 1 + no + ns}, acc);
  dispatch(p.q, family, kind, p.consts, p.params, p.c, p.obo, p.sink, p.ra, [&](auto t, const auto& fam) {
    using T = decltype(t);
    using A = acc_t<T>;
    attn_bwd<T>(grad.const_data_ptr<T>(), p.q.const_data_ptr<T>(), p.k.const_data_ptr<T>(), p.v.const_data_ptr<T>(),
                g.Hb ? p.bias.const_data_ptr<A>() : nullptr, out.const_data_ptr<T>(),
                family == ROWNORM || p.ra.divide ? stats.const_data_ptr<A>() : nullptr, dq.data_ptr<T>(), dk.data_ptr<T>(),
                dv.data_ptr<T>(),
                dbias.numel() ? dbias.data_ptr<A>() : nullptr, small.data_ptr<A>(), small.numel(),
                {0, np, np + 1, np + 1 + no}, fam, g);
  });
  return {dq, dk, dv, dbias, small.narrow(0, 0, np).reshape(params_.sizes()), small.narrow(0, np, 1),
          small.narrow(0, np + 1, no), small.narrow(0, np + 1 + no, ns)};
}

}  // namespace

TORCH_LIBRARY_IMPL(forge_ops, CPU, m) {
  m.impl("attention_fwd", &attention_fwd);
  m.impl("attention_bwd", &attention_bwd);
}

}  // namespace cpu
}  // namespace forge
