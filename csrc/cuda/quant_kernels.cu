// Fake quantization and the int8 weight-only linear on CUDA. Math: forge/quant.h (shared with the CPU).
#include "common.cuh"
#include "forge/quant.h"

namespace forge {
namespace cuda {
namespace {

// (lo, hi) of the elements a thread sees: (min, max) or (0, max|x|) for symmetric.
struct Range {
  float lo = fm::inf<float>(), hi = -fm::inf<float>();
  __device__ void add(float v, bool symmetric) {
    if (symmetric) {
      lo = 0.f;
      hi = fmaxf(hi, fabsf(v));
    } else {
      lo = fminf(lo, v);
      hi = fmaxf(hi, v);
    }
  }
  __device__ void reduce() {
    lo = block_reduce(lo, MinOp(), fm::inf<float>());
    hi = block_reduce(hi, MaxOp(), -fm::inf<float>());
  }
};

template <class T>
__global__ void fake_quant_rows_kernel(FakeQuant a) {
  const T* x = static_cast<const T*>(a.x) + int64_t(blockIdx.x) * a.d;
  T* y = static_cast<T*>(a.y) + int64_t(blockIdx.x) * a.d;
  Range rg;
  for_row(x, a.d, [&](int64_t, float v) { rg.add(v, a.symmetric); });
  rg.reduce();
  const QuantParams<float> q = quant_params<float>(rg.lo, rg.hi, a.bits, a.symmetric);
  map_row(y, x, static_cast<const T*>(nullptr), a.d, [&](int64_t, float v, float) { return fake_quant(v, q); });
}

constexpr int STAT_BLOCKS = 512, STAT_THREADS = 256;

// Per-tensor statistics, stage 1: each block's (lo, hi) into workspace[2 b], workspace[2 b + 1].
template <class T>
__global__ void range_partial_kernel(FakeQuant a, int64_t n) {
  const T* x = static_cast<const T*>(a.x);
  Range rg;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    rg.add(to_f(x[i]), a.symmetric);
  rg.reduce();
  if (threadIdx.x == 0) {
    a.workspace[2 * blockIdx.x] = rg.lo;
    a.workspace[2 * blockIdx.x + 1] = rg.hi;
  }
}

// Stage 2: every block folds the partials (cheap, deterministic) and quantizes its share.
template <class T>
__global__ void fake_quant_tensor_kernel(FakeQuant a, int64_t n, int partials) {
  Range rg;
  for (int i = threadIdx.x; i < partials; i += blockDim.x) {
    rg.lo = fminf(rg.lo, a.workspace[2 * i]);
    rg.hi = fmaxf(rg.hi, a.workspace[2 * i + 1]);
  }
  rg.reduce();
  const QuantParams<float> q = quant_params<float>(rg.lo, rg.hi, a.bits, a.symmetric);
  const T* x = static_cast<const T*>(a.x);
  T* y = static_cast<T*>(a.y);
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    y[i] = from_f<T>(fake_quant(to_f(x[i]), q));
}

// int8 GEMV for M <= 8 rows: a warp per output feature n; lanes stride over K in 16-byte chunks of
// q (16 codes), dequantise in registers and dot them with every input row; one warp reduction.
template <class T, int M>
__global__ void int8_gemv_kernel(Int8Gemv a) {
  const int64_t n = int64_t(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x & 31;
  if (n >= a.N) return;
  const int8_t* q = a.q + n * a.K;
  const float s = a.scale[a.per_channel ? n : 0], z = a.zero_point[a.per_channel ? n : 0];
  const T* x = static_cast<const T*>(a.x);
  float acc[M];
#pragma unroll
  for (int m = 0; m < M; ++m) acc[m] = 0.f;
  const bool vec = a.K % 16 == 0 && (reinterpret_cast<uintptr_t>(q) & 15u) == 0;
  const int64_t step = vec ? 16 : 1;
  for (int64_t k0 = int64_t(lane) * step; k0 < a.K; k0 += 32 * step) {
    int8_t codes[16];
    if (vec) {
      *reinterpret_cast<int4*>(codes) = *reinterpret_cast<const int4*>(q + k0);
    } else {
      codes[0] = q[k0];
    }
    for (int i = 0; i < step; ++i) {
      const float w = float(codes[i]) - z;
#pragma unroll
      for (int m = 0; m < M; ++m)
        if (m < a.M) acc[m] += to_f(x[m * a.K + k0 + i]) * w;
    }
  }
#pragma unroll
  for (int m = 0; m < M; ++m) {
    float v = warp_reduce(acc[m], SumOp());
    if (lane == 0 && m < a.M) {
      float b = a.bias ? to_f(static_cast<const T*>(a.bias)[n]) : 0.f;
      static_cast<T*>(a.y)[m * a.N + n] = from_f<T>(v * s + b);
    }
  }
}

template <class T>
__global__ void dequant_rows_kernel(const int8_t* q, const float* scale, const float* zp, bool per_channel,
                                    int64_t n0, int64_t rows, int64_t K, T* w) {
  const int64_t total = rows * K;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t n = n0 + i / K, c = per_channel ? n : 0;
    w[i] = from_f<T>((float(q[n0 * K + i]) - zp[c]) * scale[c]);
  }
}

}  // namespace

int64_t fake_quantize_workspace_floats(int64_t) { return 2 * STAT_BLOCKS; }

cudaError_t fake_quantize(const FakeQuant& a, cudaStream_t stream) {
  const int64_t n = a.rows * a.d;
  if (n == 0) return cudaSuccess;
  return with_type(a.dtype, [&](auto t) {
    using T = decltype(t);
    if (a.per_row) {
      fake_quant_rows_kernel<T><<<grid_rows(a.rows), row_threads(a.d), 0, stream>>>(a);
      return cudaGetLastError();
    }
    const int64_t want = (n + STAT_THREADS - 1) / STAT_THREADS;
    const int blocks = int(want < STAT_BLOCKS ? want : STAT_BLOCKS);
    range_partial_kernel<T><<<blocks, STAT_THREADS, 0, stream>>>(a, n);
    fake_quant_tensor_kernel<T><<<blocks, STAT_THREADS, 0, stream>>>(a, n, blocks);
    return cudaGetLastError();
  });
}

cudaError_t int8_gemv(const Int8Gemv& a, cudaStream_t stream) {
  if (a.M == 0 || a.N == 0) return cudaSuccess;
  if (a.M > INT8_GEMV_MAX_ROWS) return cudaErrorInvalidValue;
  constexpr int WARPS = 8;
  const unsigned blocks = unsigned((a.N + WARPS - 1) / WARPS);
  return with_type(a.dtype, [&](auto t) {
    using T = decltype(t);
    if (a.M == 1)
      int8_gemv_kernel<T, 1><<<blocks, WARPS * 32, 0, stream>>>(a);
    else
      int8_gemv_kernel<T, INT8_GEMV_MAX_ROWS><<<blocks, WARPS * 32, 0, stream>>>(a);
    return cudaGetLastError();
  });
}

cudaError_t int8_dequant_rows(const int8_t* q, const float* scale, const float* zero_point, bool per_channel,
                              int64_t n0, int64_t n1, int64_t K, void* w, DType dtype, cudaStream_t stream) {
  const int64_t total = (n1 - n0) * K;
  if (total <= 0) return cudaSuccess;
  const unsigned blocks = unsigned(total / 256 + 1 < 4096 ? total / 256 + 1 : 4096);
  return with_type(dtype, [&](auto t) {
    using T = decltype(t);
    dequant_rows_kernel<T><<<blocks, 256, 0, stream>>>(q, scale, zero_point, per_channel, n0, n1 - n0, K,
                                                       static_cast<T*>(w));
    return cudaGetLastError();
  });
}

}  // namespace cuda
}  // namespace forge
