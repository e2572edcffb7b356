// RMSNorm / pRMSNorm / LayerNorm (+ fused residual add) on CUDA: one block per row.
// Same formulas as csrc/cpu/norms.cpp (see there); float32 accumulation, 16-byte vector access,
// warp-shuffle block reductions. The row is read twice (statistics, then output): the second read
// comes from L1/L2, so DRAM sees one read and one write per element.
#include "common.cuh"

namespace forge {
namespace cuda {
namespace {

template <bool Center, class T, class O>
__global__ void norm_fwd_kernel(NormFwd a) {
  const int64_t r = blockIdx.x, d = a.d;
  const T* x = static_cast<const T*>(a.x) + r * d;
  const T* src = x;
  if (a.residual) {  // h = x + residual, rounded to T, written once; the statistics read h back
    const T* res = static_cast<const T*>(a.residual) + r * d;
    T* h = static_cast<T*>(a.h) + r * d;
    for (int64_t j = threadIdx.x; j < d; j += blockDim.x) h[j] = from_f<T>(to_f(x[j]) + to_f(res[j]));
    __syncthreads();  // makes the block's global writes of h visible to its other threads
    src = h;
  }
  float mu = 0.f;
  if (Center) {
    float s = 0.f;
    for_row(src, d, [&](int64_t, float v) { s += v; });
    mu = block_reduce(s, SumOp(), 0.f) / float(d);
  }
  float ss = 0.f;
  for_row(src, d, [&](int64_t j, float v) { if (j < a.k) ss += (v - mu) * (v - mu); });
  const float rs = rsqrtf(block_reduce(ss, SumOp(), 0.f) / float(a.k) + a.eps);
  O* y = static_cast<O*>(a.y) + r * d;
  map_row(y, src, static_cast<const T*>(nullptr), d, [&](int64_t j, float x, float) {
    float v = (x - mu) * rs;
    if (a.weight) v *= a.weight[j];
    if (a.bias) v += a.bias[j];
    return v;
  });
  if (threadIdx.x == 0) {
    a.rstd[r] = rs;
    if (Center) a.mean[r] = mu;
  }
}

// dx per row as on the CPU; a block handles rows blockIdx.x, +gridDim.x, ... and accumulates its
// share of dw / db in its own workspace row, which norm_param_grad_kernel sums over blocks.
template <bool Center, class T, class G>
__global__ void norm_bwd_kernel(NormBwd a) {
  const int64_t d = a.d;
  float* dw_part = a.workspace ? a.workspace + int64_t(blockIdx.x) * 2 * d : nullptr;
  for (int64_t r = blockIdx.x; r < a.rows; r += gridDim.x) {
    const G* dy = static_cast<const G*>(a.grad) + r * d;
    const T* h = static_cast<const T*>(a.h) + r * d;
    const float mu = Center ? a.mean[r] : 0.f, rs = a.rstd[r];
    float c1 = 0.f, c2 = 0.f;
    for_row(dy, h, d, [&](int64_t j, float gy, float hv) {  // a thread owns the same columns every row
      float xh = (hv - mu) * rs, g = a.weight ? gy * a.weight[j] : gy;
      c1 += g;
      c2 += g * xh;
      if (dw_part) {
        dw_part[j] += gy * xh;
        dw_part[d + j] += gy;
      }
    });
    c1 = Center ? block_reduce(c1, SumOp(), 0.f) / float(d) : 0.f;
    c2 = block_reduce(c2, SumOp(), 0.f) / float(a.k);
    T* dx = static_cast<T*>(a.dx) + r * d;
    const T* dh = a.grad_h ? static_cast<const T*>(a.grad_h) + r * d : nullptr;
    map_row(dx, dy, h, d, [&](int64_t j, float gy, float hv) {
      float xh = (hv - mu) * rs, g = a.weight ? gy * a.weight[j] : gy;
      float v = rs * (g - c1 - (j < a.k ? xh * c2 : 0.f));
      return dh ? v + to_f(dh[j]) : v;
    });
  }
}

// dw[j] = sum over blocks of workspace[b, 0, j]; db likewise from workspace[b, 1, j].
__global__ void norm_param_grad_kernel(const float* ws, int64_t blocks, int64_t d, float* dw, float* db) {
  const int64_t j = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= d) return;
  float w = 0.f, b = 0.f;
  for (int64_t i = 0; i < blocks; ++i) {
    w += ws[i * 2 * d + j];
    b += ws[i * 2 * d + d + j];
  }
  if (dw) dw[j] = w;
  if (db) db[j] = b;
}

constexpr int64_t BWD_BLOCKS = 1024;  // enough to fill any current GPU; bounds the workspace

}  // namespace

int64_t norm_bwd_workspace_floats(int64_t rows, int64_t d) {
  return (rows < BWD_BLOCKS ? rows : BWD_BLOCKS) * 2 * d;
}

cudaError_t norm_fwd(const NormFwd& a, cudaStream_t stream) {
  if (a.rows == 0) return cudaSuccess;
  return with_type(a.in, [&](auto t_in) {
    using T = decltype(t_in);
    return with_type(a.out, [&](auto t_out) {
      using O = decltype(t_out);
      const int threads = row_threads(a.d);
      if (a.center)
        norm_fwd_kernel<true, T, O><<<grid_rows(a.rows), threads, 0, stream>>>(a);
      else
        norm_fwd_kernel<false, T, O><<<grid_rows(a.rows), threads, 0, stream>>>(a);
      return cudaGetLastError();
    });
  });
}

cudaError_t norm_bwd(const NormBwd& a, cudaStream_t stream) {
  if (a.rows == 0) return cudaSuccess;
  const int64_t blocks = a.rows < BWD_BLOCKS ? a.rows : BWD_BLOCKS;
  const bool params = a.dw || a.db;
  if (params) {
    cudaError_t e = cudaMemsetAsync(a.workspace, 0, sizeof(float) * norm_bwd_workspace_floats(a.rows, a.d), stream);
    if (e != cudaSuccess) return e;
  }
  NormBwd b = a;
  if (!params) b.workspace = nullptr;
  cudaError_t e = with_type(a.in, [&](auto t_in) {
    using T = decltype(t_in);
    return with_type(a.grad_dtype, [&](auto t_grad) {
      using G = decltype(t_grad);
      const int threads = row_threads(a.d);
      if (a.center)
        norm_bwd_kernel<true, T, G><<<unsigned(blocks), threads, 0, stream>>>(b);
      else
        norm_bwd_kernel<false, T, G><<<unsigned(blocks), threads, 0, stream>>>(b);
      return cudaGetLastError();
    });
  });
  if (e != cudaSuccess || !params) return e;
  norm_param_grad_kernel<<<unsigned((a.d + 255) / 256), 256, 0, stream>>>(a.workspace, blocks, a.d, a.dw, a.db);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace forge
