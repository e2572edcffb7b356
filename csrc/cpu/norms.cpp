// RMSNorm / pRMSNorm / LayerNorm (+ fused residual add), forward and backward, on the CPU.
//
// One templated row kernel covers all of them (Center = LayerNorm):
//   h = x (+ residual),  mu = Center ? mean(h) : 0,  var = sum_{j<k} (h_j - mu)^2 / k,
//   r = 1 / sqrt(var + eps),  xhat = (h - mu) r,  y = xhat w (+ b)
// and its gradient, with g = dy w, c1 = Center ? mean(g) : 0, c2 = sum_j g_j xhat_j / k:
//   dx_j = r (g_j - c1 - [j < k] xhat_j c2),  dw = sum_rows dy xhat,  db = sum_rows dy.
// (LayerNorm: k = d, the usual formula; RMSNorm: c1 = 0; pRMSNorm: only the first k entries
// feed r, so only they get the -xhat c2 term.) Rows are computed in the accumulation type.
#include "common.h"

namespace forge {
namespace cpu {
namespace {

// Each row is streamed straight from its input (a row of a few KB stays in L1 between passes):
// mean (LayerNorm), then the variance about it (two passes: no cancellation), then the output.
template <bool Center, class T, class O, class A>
void norm_fwd_rows(const T* x, const T* res, const A* w, const A* b, O* y, T* h, A* mean, A* rstd,
                   int64_t rows, int64_t d, int64_t k, A eps) {
  parallel_rows(rows, d, [&](int64_t begin, int64_t end) {
    const A *wl = w, *bl = b;  // locals (see norm_bwd_rows)
    for (int64_t r = begin; r < end; ++r) {
      const T* src = x + r * d;
      A mu = A(0), ss = A(0);
      if (res) {  // h = x + residual, rounded to T as an unfused add would be; the norm reads h
        const T* rr = res + r * d;
        T* hr = h + r * d;
#pragma omp simd reduction(+ : mu, ss)
        for (int64_t j = 0; j < d; ++j) {
          hr[j] = store<T>(load(src[j]) + load(rr[j]));
          A v = load(hr[j]);
          mu += v;
          ss += j < k ? v * v : A(0);  // RMSNorm's statistic in the same pass
        }
        src = hr;
        mu = Center ? mu / A(d) : A(0);
      } else if (Center) {
#pragma omp simd reduction(+ : mu)
        for (int64_t j = 0; j < d; ++j) mu += load(src[j]);
        mu /= A(d);
      }
      if (Center || !res) {  // the sum of squares about the mean (two passes: no cancellation)
        ss = A(0);
#pragma omp simd reduction(+ : ss)
        for (int64_t j = 0; j < k; ++j) {
          A v = A(load(src[j])) - mu;
          ss += v * v;
        }
      }
      const A rs = A(1) / fm::sqrt(ss / A(k) + eps);
      O* yr = y + r * d;
      if (wl && bl) {
        for (int64_t j = 0; j < d; ++j) yr[j] = store<O>((A(load(src[j])) - mu) * rs * wl[j] + bl[j]);
      } else if (wl) {
        for (int64_t j = 0; j < d; ++j) yr[j] = store<O>((A(load(src[j])) - mu) * rs * wl[j]);
      } else {
        for (int64_t j = 0; j < d; ++j) yr[j] = store<O>((A(load(src[j])) - mu) * rs);
      }
      if (Center) mean[r] = mu;
      rstd[r] = rs;
    }
  });
}

// Two passes per row: the row sums c1, c2 with this thread's dw, db, then dx. w is never null
// here (ones when the norm has no gain) and dw, db are always accumulated, so no loop has a
// conditional load and every loop vectorises.
template <bool Center, class T, class G, class A>
void norm_bwd_rows(const G* dy, const T* h, const A* w, const A* mean, const A* rstd, const T* dh, T* dx,
                   A* dw_out, A* db_out, int64_t rows, int64_t d, int64_t k) {
  PerThread<A> dw(d), db(d);
  parallel_rows(rows, d, [&](int64_t begin, int64_t end) {
    // locals, not the captured references: with a captured base pointer GCC's `omp simd` code
    // gathers element by element (measured 3x slower)
    const A* wl = w;
    A* dwp = dw.mine();
    A* dbp = db.mine();
    for (int64_t r = begin; r < end; ++r) {
      const G* dyr = dy + r * d;
      const T* hr = h + r * d;
      const A mu = Center ? mean[r] : A(0), rs = rstd[r];
      A c1 = A(0), c2 = A(0);
#pragma omp simd reduction(+ : c1, c2)
      for (int64_t j = 0; j < d; ++j) {
        A gy = load(dyr[j]), xh = (A(load(hr[j])) - mu) * rs, g = gy * wl[j];
        c1 += g;
        c2 += g * xh;
        dwp[j] += gy * xh;
        dbp[j] += gy;
      }
      c1 = Center ? c1 / A(d) : A(0);
      c2 /= A(k);
      T* dxr = dx + r * d;
      auto dx_at = [&](int64_t j) {
        A xh = (A(load(hr[j])) - mu) * rs;
        return rs * (A(load(dyr[j])) * wl[j] - c1 - (j < k ? xh * c2 : A(0)));
      };
      if (dh) {
        const T* dhr = dh + r * d;
        for (int64_t j = 0; j < d; ++j) dxr[j] = store<T>(dx_at(j) + A(load(dhr[j])));
      } else {
        for (int64_t j = 0; j < d; ++j) dxr[j] = store<T>(dx_at(j));
      }
    }
  });
  if (dw_out) {
    auto s = dw.sum();
    std::copy(s.begin(), s.end(), dw_out);
  }
  if (db_out) {
    auto s = db.sum();
    std::copy(s.begin(), s.end(), db_out);
  }
}

at::ScalarType acc_dtype(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// Optional (d,) parameter as a contiguous tensor in the accumulation dtype (or undefined).
at::Tensor param_acc(const c10::optional<at::Tensor>& p, at::ScalarType acc) {
  return p.has_value() ? p->to(acc).contiguous() : at::Tensor();
}

template <class A>
const A* ptr_or_null(const at::Tensor& t) { return t.defined() ? t.const_data_ptr<A>() : nullptr; }

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> norm_fwd(
    const at::Tensor& x_, const c10::optional<at::Tensor>& residual, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, int64_t k, double eps, bool center,
    c10::optional<at::ScalarType> out_dtype) {
  at::Tensor x = x_.contiguous();
  const int64_t d = x.size(-1), rows = d ? x.numel() / d : 0;
  TORCH_CHECK(k >= 1 && k <= d, "norm_fwd: k=", k, " must be in [1, ", d, "]");
  const auto acc = acc_dtype(x);
  at::Tensor res = residual.has_value() ? residual->contiguous() : at::Tensor();
  TORCH_CHECK(!res.defined() || (res.sizes() == x.sizes() && res.scalar_type() == x.scalar_type()),
              "norm_fwd: residual must match x in shape and dtype");
  at::Tensor w = param_acc(weight, acc), b = param_acc(bias, acc);
  at::Tensor y = at::empty(x.sizes(), x.options().dtype(out_dtype.value_or(x.scalar_type())));
  at::Tensor h = res.defined() ? at::empty_like(x) : at::empty({0}, x.options());
  at::Tensor mean = at::empty({center ? rows : 0}, x.options().dtype(acc));
  at::Tensor rstd = at::empty({rows}, x.options().dtype(acc));
  dispatch_io(x.scalar_type(), y.scalar_type(), "norm_fwd", [&](auto t_in, auto t_out) {
    using T = decltype(t_in);
    using O = decltype(t_out);
    using A = acc_t<T>;
    auto run = [&](auto center_tag) {
      norm_fwd_rows<decltype(center_tag)::value, T, O, A>(
          x.const_data_ptr<T>(), res.defined() ? res.const_data_ptr<T>() : nullptr, ptr_or_null<A>(w),
          ptr_or_null<A>(b), y.data_ptr<O>(), res.defined() ? h.data_ptr<T>() : nullptr,
          center ? mean.data_ptr<A>() : nullptr, rstd.data_ptr<A>(), rows, d, k, static_cast<A>(eps));
    };
    center ? run(std::true_type()) : run(std::false_type());
  });
  return {y, h, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> norm_bwd(
    const at::Tensor& grad_, const at::Tensor& h_, const c10::optional<at::Tensor>& weight, const at::Tensor& mean,
    const at::Tensor& rstd, const c10::optional<at::Tensor>& grad_h, int64_t k, bool center, bool need_dw,
    bool need_db) {
  at::Tensor h = h_.contiguous(), grad = grad_.contiguous();
  at::Tensor dh = grad_h.has_value() ? grad_h->to(h.scalar_type()).contiguous() : at::Tensor();
  const int64_t d = h.size(-1), rows = d ? h.numel() / d : 0;
  const auto acc = acc_dtype(h);
  at::Tensor w = weight.has_value() ? param_acc(weight, acc) : at::ones({d}, h.options().dtype(acc));
  at::Tensor dx = at::empty_like(h);
  at::Tensor dw = at::zeros({need_dw ? d : 0}, h.options().dtype(acc));
  at::Tensor db = at::zeros({need_db ? d : 0}, h.options().dtype(acc));
  dispatch_io(h.scalar_type(), grad.scalar_type(), "norm_bwd", [&](auto t_in, auto t_grad) {
    using T = decltype(t_in);
    using G = decltype(t_grad);
    using A = acc_t<T>;
    auto run = [&](auto center_tag) {
      norm_bwd_rows<decltype(center_tag)::value, T, G, A>(
          grad.const_data_ptr<G>(), h.const_data_ptr<T>(), ptr_or_null<A>(w),
          center ? mean.const_data_ptr<A>() : nullptr, rstd.const_data_ptr<A>(),
          dh.defined() ? dh.const_data_ptr<T>() : nullptr, dx.data_ptr<T>(), need_dw ? dw.data_ptr<A>() : nullptr,
          need_db ? db.data_ptr<A>() : nullptr, rows, d, k);
    };
    center ? run(std::true_type()) : run(std::false_type());
  });
  auto wdtype = weight.has_value() ? weight->scalar_type() : h.scalar_type();
  return {dx, dw.to(wdtype), db.to(wdtype)};
}

}  // namespace

TORCH_LIBRARY_IMPL(forge_ops, CPU, m) {
  m.impl("norm_fwd", &norm_fwd);
  m.impl("norm_bwd", &norm_bwd);
}

}  // namespace cpu
}  // namespace forge
