// Attention-score normalisers on CUDA: one block per row of scores, the mask from MaskArgs (no mask
// tensor), the formulas of forge/scores.h (shared with csrc/cpu/scores.cpp, where the row-normalised
// backward is derived). Learned-parameter gradients are block-reduced, then one atomicAdd per block.
#include "common.cuh"

namespace forge {
namespace cuda {
namespace {

__device__ __forceinline__ int64_t head_of(const ScoreGeom& g, int64_t r) { return g.heads == 1 ? 0 : (r / g.tq) % g.heads; }

__device__ __forceinline__ bool col_visible(const ColRange& c, int64_t j) { return j < c.sink_end || (j >= c.lo && j < c.hi); }

__device__ __forceinline__ bool is_visible(float x) { return x != -fm::inf<float>(); }

// ---- elementwise -------------------------------------------------------------------------------
template <class F, class T, class O>
__global__ void elem_fwd_kernel(ElemFwd a) {
  const int64_t r = blockIdx.x, h = head_of(a.g, r), tk = a.g.tk;
  const F f(a.consts.c, a.params[2 * h], a.params[2 * h + 1], 0.f);
  const ColRange cr = visible_cols(a.mask, r % a.g.tq, tk);
  const T* s = static_cast<const T*>(a.scores) + r * tk;
  O* y = static_cast<O*>(a.y) + r * tk;
  map_row(y, s, static_cast<const T*>(nullptr), tk, [&](int64_t j, float x, float) {
    return col_visible(cr, j) && is_visible(x) ? f.value(x) : 0.f;
  });
}

template <class F, class T, class G>
__global__ void elem_bwd_kernel(ElemBwd a) {
  const int64_t r = blockIdx.x, h = head_of(a.g, r), tk = a.g.tk;
  const F f(a.consts.c, a.params[2 * h], a.params[2 * h + 1], 0.f);
  const ColRange cr = visible_cols(a.mask, r % a.g.tq, tk);
  const T* s = static_cast<const T*>(a.scores) + r * tk;
  const G* dy = static_cast<const G*>(a.grad) + r * tk;
  T* dx = static_cast<T*>(a.dscores) + r * tk;
  float p0 = 0.f, p1 = 0.f;
  map_row(dx, s, dy, tk, [&](int64_t j, float x, float g) {
    if (!col_visible(cr, j) || !is_visible(x)) return 0.f;
    ElemGrad<float> e = f.grad(x, g);
    p0 += e.dp0;
    p1 += e.dp1;
    return e.dx;
  });
  if (a.dparams) {
    p0 = block_reduce(p0, SumOp(), 0.f);
    p1 = block_reduce(p1, SumOp(), 0.f);
    if (threadIdx.x == 0) {
      atomicAdd(a.dparams + 2 * h, p0);
      atomicAdd(a.dparams + 2 * h + 1, p1);
    }
  }
}

// ---- row-normalised ----------------------------------------------------------------------------
template <class Tr, class T, class O>
__global__ void row_fwd_kernel(RowFwd a) {
  const int64_t r = blockIdx.x, tk = a.g.tk;
  const ColRange cr = visible_cols(a.mask, r % a.g.tq, tk);
  const Tr tr{float(a.args.tparam)};
  const float c = a.c[0];
  const T* s = static_cast<const T*>(a.scores) + r * tk;
  float mx = fm::lowest<float>();
  for_row(s, tk, [&](int64_t j, float x) {
    if (col_visible(cr, j) && is_visible(x)) mx = fmaxf(mx, tr.t(x));
  });
  mx = block_reduce(mx, MaxOp(), fm::lowest<float>());
  bool uses_max;
  const float m = row_shift(a.args, mx, &uses_max);
  float sum = 0.f;
  for_row(s, tk, [&](int64_t j, float x) {
    if (col_visible(cr, j) && is_visible(x)) sum += fm::exp((tr.t(x) - m) * c);
  });
  sum = block_reduce(sum, SumOp(), 0.f);
  float den = a.args.divide ? sum + a.obo[head_of(a.g, r)] : 1.f;
  den = den == 0.f ? 1.f : den;
  const float scale = float(a.args.post) / den;
  O* y = static_cast<O*>(a.y) + r * tk;
  map_row(y, s, static_cast<const T*>(nullptr), tk, [&](int64_t j, float x, float) {
    return col_visible(cr, j) && is_visible(x) ? fm::exp((tr.t(x) - m) * c) * scale : 0.f;
  });
  if (threadIdx.x == 0) {
    a.stats[3 * r] = m;
    a.stats[3 * r + 1] = den;
    a.stats[3 * r + 2] = uses_max ? 1.f : 0.f;
  }
}

// One reduction pass (sum gy q, sum q, ties of the max), then dx written once: the same algebra as
// csrc/cpu/scores.cpp rownorm_bwd.
template <class Tr, class T, class G>
__global__ void row_bwd_kernel(RowBwd a) {
  const int64_t r = blockIdx.x, tk = a.g.tk;
  const ColRange cr = visible_cols(a.mask, r % a.g.tq, tk);
  const Tr tr{float(a.args.tparam)};
  const float c = a.c[0], m = a.stats[3 * r], den = a.stats[3 * r + 1], post = float(a.args.post);
  const bool uses_max = a.stats[3 * r + 2] != 0.f;
  const float inv_den = a.args.divide ? 1.f / den : 1.f;
  const T* s = static_cast<const T*>(a.scores) + r * tk;
  const G* dy = static_cast<const G*>(a.grad) + r * tk;
  float sgq = 0.f, sq = 0.f, ties = 0.f;
  for_row(s, dy, tk, [&](int64_t j, float x, float g) {
    if (!col_visible(cr, j) || !is_visible(x)) return;
    float tj = tr.t(x), q = fm::exp((tj - m) * c) * inv_den;
    sgq += g * post * q;
    sq += q;
    ties += tj == m ? 1.f : 0.f;
  });
  sgq = block_reduce(sgq, SumOp(), 0.f);
  sq = block_reduce(sq, SumOp(), 0.f);
  ties = block_reduce(ties, SumOp(), 0.f);
  const float S = a.args.divide ? sgq : 0.f;
  const float share = (uses_max && ties > 0.f) ? (sgq - S * sq) / ties : 0.f;
  float dc = 0.f;
  T* dx = static_cast<T*>(a.dscores) + r * tk;
  map_row(dx, s, dy, tk, [&](int64_t j, float x, float g) {
    if (!col_visible(cr, j) || !is_visible(x)) return 0.f;
    float tj = tr.t(x), d = (g * post - S) * fm::exp((tj - m) * c) * inv_den;
    dc += d * (tj - m);
    return c * (d - (tj == m ? share : 0.f)) * tr.dt(x);
  });
  if (a.dc) {
    dc = block_reduce(dc, SumOp(), 0.f);
    if (threadIdx.x == 0) atomicAdd(a.dc, dc);
  }
  if (a.dobo && a.args.divide && threadIdx.x == 0) atomicAdd(a.dobo + head_of(a.g, r), -S * inv_den);
}

template <class Fn>
cudaError_t with_transform(int32_t kind, Fn&& fn) {
  cudaError_t e = cudaErrorInvalidValue;
  dispatch_transform<float>(kind, [&](auto* tag) { e = fn(tag); });
  return e;
}

template <class Fn>
cudaError_t with_elem(int32_t kind, const double* consts, Fn&& fn) {
  cudaError_t e = cudaErrorInvalidValue;
  dispatch_elem<float>(kind, consts, [&](auto* tag) { e = fn(tag); });
  return e;
}

}  // namespace

cudaError_t score_elementwise_fwd(const ElemFwd& a, cudaStream_t stream) {
  if (a.g.rows == 0) return cudaSuccess;
  return with_type(a.in, [&](auto t_in) {
    return with_type(a.out, [&](auto t_out) {
      return with_elem(a.kind, a.consts.c, [&](auto* tag) {
        using F = std::remove_pointer_t<decltype(tag)>;
        elem_fwd_kernel<F, decltype(t_in), decltype(t_out)><<<grid_rows(a.g.rows), row_threads(a.g.tk), 0, stream>>>(a);
        return cudaGetLastError();
      });
    });
  });
}

cudaError_t score_elementwise_bwd(const ElemBwd& a, cudaStream_t stream) {
  if (a.g.rows == 0) return cudaSuccess;
  return with_type(a.in, [&](auto t_in) {
    return with_type(a.grad_dtype, [&](auto t_grad) {
      return with_elem(a.kind, a.consts.c, [&](auto* tag) {
        using F = std::remove_pointer_t<decltype(tag)>;
        elem_bwd_kernel<F, decltype(t_in), decltype(t_grad)><<<grid_rows(a.g.rows), row_threads(a.g.tk), 0, stream>>>(a);
        return cudaGetLastError();
      });
    });
  });
}

cudaError_t score_rownorm_fwd(const RowFwd& a, cudaStream_t stream) {
  if (a.g.rows == 0) return cudaSuccess;
  return with_type(a.in, [&](auto t_in) {
    return with_type(a.out, [&](auto t_out) {
      return with_transform(a.args.transform, [&](auto* tag) {
        using Tr = std::remove_pointer_t<decltype(tag)>;
        row_fwd_kernel<Tr, decltype(t_in), decltype(t_out)><<<grid_rows(a.g.rows), row_threads(a.g.tk), 0, stream>>>(a);
        return cudaGetLastError();
      });
    });
  });
}

cudaError_t score_rownorm_bwd(const RowBwd& a, cudaStream_t stream) {
  if (a.g.rows == 0) return cudaSuccess;
  return with_type(a.in, [&](auto t_in) {
    return with_type(a.grad_dtype, [&](auto t_grad) {
      return with_transform(a.args.transform, [&](auto* tag) {
        using Tr = std::remove_pointer_t<decltype(tag)>;
        row_bwd_kernel<Tr, decltype(t_in), decltype(t_grad)><<<grid_rows(a.g.rows), row_threads(a.g.tk), 0, stream>>>(a);
        return cudaGetLastError();
      });
    });
  });
}

}  // namespace cuda
}  // namespace forge
