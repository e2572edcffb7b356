// Fused attention for the score normalisers: out_i = sum_j f(s_ij) v_j / D_i without the (T, S)
// score matrix. One task per (batch, KV head) over the ATen thread pool; every query head of the
// KV head's group runs over tiles of 64 query rows x the keys those rows see (causal: up to the last
// row's key), so memory is O(threads x 64 x S), never O(T x S), and GQA never repeats K/V.
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

#include "common.h"
#include "forge/scores.h"

namespace forge {
namespace cpu {
namespace {

struct Geo {
  int64_t B, Hq, Hkv, T, S, D, Dv, Hb;  // Hb: bias heads (0: no bias, 1: broadcast, or Hq)
  double scale, softcap;                 // softcap 0: none
  MaskArgs mask;
};

struct Segment {
  int64_t lo, hi;
};
inline std::array<Segment, 2> segments(const ColRange& c) { return {Segment{0, c.sink_end}, Segment{c.lo, c.hi}}; }

constexpr int64_t QBLOCK = 64;  // query rows per tile: the tile is QBLOCK x (keys the block sees)

// A tile row from raw q.k to the score: cap tanh(x scale / cap) (th keeps the tanh) + bias, visible
// columns only.
template <class A>
void finish_scores(A* s, A* th, const A* bias_row, const ColRange& c, const Geo& g) {
  const A sc = A(g.scale), cap = A(g.softcap);
  for (const Segment sg : segments(c)) {
    if (g.softcap != 0.0) {
      for (int64_t j = sg.lo; j < sg.hi; ++j) {
        A tt = std::tanh(s[j] * sc / cap);
        th[j] = tt;
        s[j] = cap * tt;
      }
    } else {
      for (int64_t j = sg.lo; j < sg.hi; ++j) s[j] *= sc;
    }
    if (bias_row)
      for (int64_t j = sg.lo; j < sg.hi; ++j) s[j] += bias_row[j];
  }
}

// ds w.r.t. the final score -> dbias, then back through tanh and the scale to raw q.k
template <class A>
void unfinish_grad(A* ds, const A* th, A* dbias_row, const ColRange& c, const Geo& g) {
  const A sc = A(g.scale);
  for (const Segment sg : segments(c)) {
    if (dbias_row)
      for (int64_t j = sg.lo; j < sg.hi; ++j) dbias_row[j] += ds[j];
    if (g.softcap != 0.0)
      for (int64_t j = sg.lo; j < sg.hi; ++j) ds[j] *= (A(1) - th[j] * th[j]) * sc;
    else
      for (int64_t j = sg.lo; j < sg.hi; ++j) ds[j] *= sc;
  }
}

// Zeros the hidden columns [sink_end, lo) and [hi, w) of a tile row.
template <class A>
void zero_hidden(A* row, const ColRange& c, int64_t w) {
  std::fill(row + c.sink_end, row + c.lo, A(0));
  std::fill(row + c.hi, row + w, A(0));
}

// ---- the two normaliser families -----------------------------------------------------------------
// Elementwise: params (H or 1, 2) = per-head (beta, gamma); dparams accumulates their gradients.
template <class F, class A>
struct Elementwise {
  const double* consts;
  const A* params;
  int64_t n_params;
  F functor(int64_t h) const {
    const int64_t i = n_params == 1 ? 0 : h;
    return F(consts, params[2 * i], params[2 * i + 1], A(0));
  }
  // p_j = f(s_j); returns the factor of sum_j p_j v_j (1)
  A forward(int64_t h, A* s, const ColRange& c, A* /*stats*/) const {
    const F f = functor(h);
    for (const Segment sg : segments(c))
      for (int64_t j = sg.lo; j < sg.hi; ++j) s[j] = f.value(s[j]);
    return A(1);
  }
  // in: s (scores), dp; out: p (weights), ds; dpar (2 per head) += the parameters' gradients
  void backward(int64_t h, A* s, A* dp, const ColRange& c, const A* /*stats*/, A /*delta*/, A* dpar, A* /*dc*/,
                A* /*dobo*/, A* /*dsink*/) const {
    const F f = functor(h);
    A p0 = A(0), p1 = A(0);
    for (const Segment sg : segments(c))
      for (int64_t j = sg.lo; j < sg.hi; ++j) {
        const A x = s[j];
        ElemGrad<A> e = f.grad(x, dp[j]);
        s[j] = f.value(x);
        dp[j] = e.dx;
        p0 += e.dp0;
        p1 += e.dp1;
      }
    const int64_t i = n_params == 1 ? 0 : h;
    dpar[2 * i] += p0;
    dpar[2 * i + 1] += p1;
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

// The products are BLAS calls on one tile (at::mm; single-threaded inside the parallel loop), the
// normaliser runs on the tile's rows in between; K, V in the accumulation type once per task.
template <class T, class Fam>
void attn_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const acc_t<T>* bias, at::Tensor& out,
              acc_t<T>* stats, const Fam& fam, const Geo& g) {
  using A = acc_t<T>;
  const auto acc = c10::CppTypeToScalarType<A>::value;
  const int64_t rep = g.Hq / g.Hkv;
  at::parallel_for(0, g.B * g.Hkv, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bg = begin; bg < end; ++bg) {
      const int64_t b = bg / g.Hkv, kvh = bg % g.Hkv;
      const at::Tensor kf = k[b][kvh].to(acc), vf = v[b][kvh].to(acc);
      for (int64_t h = kvh * rep; h < (kvh + 1) * rep; ++h) {
        const int64_t bh = b * g.Hq + h, hb = g.Hb == 1 ? 0 : h;
        const at::Tensor qf = q[b][h].to(acc);
        for (int64_t i0 = 0; i0 < g.T; i0 += QBLOCK) {
          const int64_t n = std::min(QBLOCK, g.T - i0), w = visible_cols(g.mask, i0 + n - 1, g.S).hi;
          at::Tensor s = at::mm(qf.narrow(0, i0, n), kf.narrow(0, 0, w).t()).contiguous();
          at::Tensor th = g.softcap != 0.0 ? at::empty_like(s) : s;
          at::Tensor f = at::empty({n, 1}, s.options());
          A *sp = s.data_ptr<A>(), *tp = th.data_ptr<A>(), *fp = f.data_ptr<A>();
          for (int64_t r = 0; r < n; ++r) {
            const int64_t i = i0 + r;
            const ColRange c = visible_cols(g.mask, i, g.S);
            finish_scores(sp + r * w, tp + r * w, g.Hb ? bias + (hb * g.T + i) * g.S : nullptr, c, g);
            fp[r] = fam.forward(h, sp + r * w, c, stats ? stats + (bh * g.T + i) * 3 : nullptr);
            zero_hidden(sp + r * w, c, w);
          }
          out[b][h].narrow(0, i0, n).copy_(at::mm(s, vf.narrow(0, 0, w)).mul_(f));
        }
      }
    }
  });
}

// grads: dq, dk, dv in T; dbias (Hb, T, S), and the small ones [dparams | dc | dobo | dsink] in A,
// summed over threads in thread order (deterministic for a thread count).
template <class T, class Fam>
void attn_bwd(const at::Tensor& grad, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
              const acc_t<T>* bias, const at::Tensor& out, const acc_t<T>* stats, at::Tensor& dq, at::Tensor& dk,
              at::Tensor& dv, acc_t<T>* dbias, acc_t<T>* small, int64_t n_small, std::array<int64_t, 4> offsets,
              const Fam& fam, const Geo& g) {
  using A = acc_t<T>;
  const auto acc = c10::CppTypeToScalarType<A>::value;
  const int64_t rep = g.Hq / g.Hkv, nb = dbias ? g.Hb * g.T * g.S : 0;
  PerThread<A> acc_bias(nb), acc_small(n_small);
  at::parallel_for(0, g.B * g.Hkv, 1, [&](int64_t begin, int64_t end) {
    A* my_bias = nb ? acc_bias.mine() : nullptr;
    A* my = acc_small.mine();
    for (int64_t bg = begin; bg < end; ++bg) {
      const int64_t b = bg / g.Hkv, kvh = bg % g.Hkv;
      const at::Tensor kf = k[b][kvh].to(acc), vf = v[b][kvh].to(acc);
      at::Tensor dkf = at::zeros_like(kf), dvf = at::zeros_like(vf);
      for (int64_t h = kvh * rep; h < (kvh + 1) * rep; ++h) {
        const int64_t bh = b * g.Hq + h, hb = g.Hb == 1 ? 0 : h;
        const at::Tensor qf = q[b][h].to(acc), gf = grad[b][h].to(acc);
        const at::Tensor delta = (gf * out[b][h].to(acc)).sum(-1).contiguous();  // dO . out per row
        const A* dl = delta.const_data_ptr<A>();
        for (int64_t i0 = 0; i0 < g.T; i0 += QBLOCK) {
          const int64_t n = std::min(QBLOCK, g.T - i0), w = visible_cols(g.mask, i0 + n - 1, g.S).hi;
          const at::Tensor qb = qf.narrow(0, i0, n), gb = gf.narrow(0, i0, n);
          at::Tensor s = at::mm(qb, kf.narrow(0, 0, w).t()).contiguous();
          at::Tensor dp = at::mm(gb, vf.narrow(0, 0, w).t()).contiguous();
          at::Tensor th = g.softcap != 0.0 ? at::empty_like(s) : s;
          A *sp = s.data_ptr<A>(), *tp = th.data_ptr<A>(), *dpp = dp.data_ptr<A>();
          for (int64_t r = 0; r < n; ++r) {
            const int64_t i = i0 + r;
            const ColRange c = visible_cols(g.mask, i, g.S);
            A *sr = sp + r * w, *dr = dpp + r * w;
            finish_scores(sr, tp + r * w, g.Hb ? bias + (hb * g.T + i) * g.S : nullptr, c, g);
            fam.backward(h, sr, dr, c, stats ? stats + (bh * g.T + i) * 3 : nullptr, dl[i], my + offsets[0],
                         my + offsets[1], my + offsets[2], my + offsets[3]);
            unfinish_grad(dr, tp + r * w, my_bias ? my_bias + (hb * g.T + i) * g.S : nullptr, c, g);
            zero_hidden(sr, c, w);
            zero_hidden(dr, c, w);
          }
          dvf.narrow(0, 0, w).addmm_(s.t(), gb);
          dkf.narrow(0, 0, w).addmm_(dp.t(), qb);
          dq[b][h].narrow(0, i0, n).copy_(at::mm(dp, kf.narrow(0, 0, w)));
        }
      }
      dk[b][kvh].copy_(dkf);
      dv[b][kvh].copy_(dvf);
    }
  });
  if (nb) {
    auto sum = acc_bias.sum();
    std::copy(sum.begin(), sum.end(), dbias);
  }
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
  int64_t Hb = 0;
  if (bias.defined()) {
    TORCH_CHECK(bias.dim() == 3 && (bias.size(0) == 1 || bias.size(0) == Hq) && bias.size(1) == q.size(2) &&
                    bias.size(2) == k.size(2),
                "attention: bias must be (1 or H, T, S), got ", bias.sizes());
    Hb = bias.size(0);
  }
  return {q.size(0), Hq, Hkv, q.size(2), k.size(2), q.size(3), v.size(3), Hb, scale, softcap,
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
      dispatch_elem<A>(int32_t(kind), consts.data(), [&](auto* tag) {
        using F = std::remove_pointer_t<decltype(tag)>;
        fn(T(), Elementwise<F, A>{consts.data(), params.const_data_ptr<A>(), params.size(0)});
      });
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
  Prepared p{q.contiguous(), k.contiguous(), v.contiguous(),
             bias.has_value() ? bias->to(acc).contiguous() : at::Tensor(), params.to(acc).contiguous(),
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
  at::Tensor stats = at::empty({family == ROWNORM ? g.B * g.Hq * g.T : 0, 3}, p.q.options().dtype(acc_of(p.q)));
  dispatch(p.q, family, kind, p.consts, p.params, p.c, p.obo, p.sink, p.ra, [&](auto t, const auto& fam) {
    using T = decltype(t);
    using A = acc_t<T>;
    attn_fwd<T>(p.q, p.k, p.v, g.Hb ? p.bias.const_data_ptr<A>() : nullptr, out,
                family == ROWNORM ? stats.data_ptr<A>() : nullptr, fam, g);
  });
  return {out, stats.reshape({family == ROWNORM ? g.B : 0, g.Hq, g.T, 3})};
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
  at::Tensor dbias = need_dbias && g.Hb ? at::empty({g.Hb, g.T, g.S}, acc) : at::zeros({0}, acc);
  // one buffer for the small gradients: [dparams | dc | dobo | dsink]
  const int64_t np = p.params.numel(), no = p.obo.numel(), ns = p.sink.numel();
  at::Tensor small = at::zeros({np + 1 + no + ns}, acc);
  dispatch(p.q, family, kind, p.consts, p.params, p.c, p.obo, p.sink, p.ra, [&](auto t, const auto& fam) {
    using T = decltype(t);
    using A = acc_t<T>;
    attn_bwd<T>(grad, p.q, p.k, p.v, g.Hb ? p.bias.const_data_ptr<A>() : nullptr, out,
                family == ROWNORM ? stats.const_data_ptr<A>() : nullptr, dq, dk, dv,
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
