// CUDA building blocks: dtype conversion, 16-byte vector access and block reductions.
// Torch-free (compiles with plain nvcc).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "forge/cuda_api.h"
#include "forge/math.h"

namespace forge {
namespace cuda {

template <class T>
__device__ __forceinline__ float to_f(T v);
template <>
__device__ __forceinline__ float to_f<float>(float v) { return v; }
template <>
__device__ __forceinline__ float to_f<__half>(__half v) { return __half2float(v); }
template <>
__device__ __forceinline__ float to_f<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

template <class T>
__device__ __forceinline__ T from_f(float v);
template <>
__device__ __forceinline__ float from_f<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// V elements of T loaded or stored in one transaction (16 bytes for the widest type of a row op).
template <class T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};

template <class... Ts>
constexpr int vec_width() {
  size_t widest = 1;
  for (size_t s : {sizeof(Ts)...}) widest = s > widest ? s : widest;
  return int(16 / widest);
}

template <class T>
__device__ __forceinline__ bool aligned_to(const T* p, int bytes) {
  return p == nullptr || (reinterpret_cast<uintptr_t>(p) % bytes) == 0;
}

// Visits a row of n elements of up to two inputs (b may be null: then b_j = 0), fn(j, a_j, b_j)
// for the elements this thread owns: chunks of V consecutive elements, thread t taking chunks
// t, t + blockDim, ... so a warp reads 32 consecutive chunks (coalesced, one transaction each).
// Falls back to one element per step when a row start is misaligned or n is not a multiple of V.
template <class T0, class T1, class Fn>
__device__ __forceinline__ void for_row(const T0* a, const T1* b, int64_t n, Fn&& fn) {
  constexpr int V = vec_width<T0, T1>();
  if (aligned_to(a, sizeof(T0) * V) && aligned_to(b, sizeof(T1) * V) && n % V == 0) {
    for (int64_t c = threadIdx.x; c < n / V; c += blockDim.x) {
      Pack<T0, V> pa = reinterpret_cast<const Pack<T0, V>*>(a)[c];
      Pack<T1, V> pb;
      if (b) pb = reinterpret_cast<const Pack<T1, V>*>(b)[c];
#pragma unroll
      for (int i = 0; i < V; ++i) fn(c * V + i, to_f(pa.v[i]), b ? to_f(pb.v[i]) : 0.f);
    }
  } else {
    for (int64_t j = threadIdx.x; j < n; j += blockDim.x) fn(j, to_f(a[j]), b ? to_f(b[j]) : 0.f);
  }
}

template <class T, class Fn>
__device__ __forceinline__ void for_row(const T* a, int64_t n, Fn&& fn) {
  for_row(a, static_cast<const T*>(nullptr), n, [&](int64_t j, float x, float) { fn(j, x); });
}

// out_j = fn(j, a_j, b_j) over a row, with the traversal and vector width of for_row.
template <class O, class T0, class T1, class Fn>
__device__ __forceinline__ void map_row(O* out, const T0* a, const T1* b, int64_t n, Fn&& fn) {
  constexpr int V = vec_width<O, T0, T1>();
  if (aligned_to(out, sizeof(O) * V) && aligned_to(a, sizeof(T0) * V) && aligned_to(b, sizeof(T1) * V) &&
      n % V == 0) {
    for (int64_t c = threadIdx.x; c < n / V; c += blockDim.x) {
      Pack<T0, V> pa = reinterpret_cast<const Pack<T0, V>*>(a)[c];
      Pack<T1, V> pb;
      if (b) pb = reinterpret_cast<const Pack<T1, V>*>(b)[c];
      Pack<O, V> po;
#pragma unroll
      for (int i = 0; i < V; ++i) po.v[i] = from_f<O>(fn(c * V + i, to_f(pa.v[i]), b ? to_f(pb.v[i]) : 0.f));
      reinterpret_cast<Pack<O, V>*>(out)[c] = po;
    }
  } else {
    for (int64_t j = threadIdx.x; j < n; j += blockDim.x) out[j] = from_f<O>(fn(j, to_f(a[j]), b ? to_f(b[j]) : 0.f));
  }
}

struct SumOp {
  __device__ __forceinline__ float operator()(float a, float b) const { return a + b; }
};
struct MaxOp {
  __device__ __forceinline__ float operator()(float a, float b) const { return a > b ? a : b; }
};
struct MinOp {
  __device__ __forceinline__ float operator()(float a, float b) const { return a < b ? a : b; }
};

template <class Op>
__device__ __forceinline__ float warp_reduce(float v, Op op) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Reduction over the block, result returned to every thread. blockDim.x is a multiple of 32 (<= 1024).
template <class Op>
__device__ __forceinline__ float block_reduce(float v, Op op, float identity) {
  __shared__ float partial[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  v = warp_reduce(v, op);
  __syncthreads();  // partial[] may still be read by a previous call
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  v = lane < warps ? partial[lane] : identity;
  return warp_reduce(v, op);
}

// Threads per row block: enough to give each thread about 8 elements, 32..1024.
inline int row_threads(int64_t n) {
  int t = 32;
  while (t < 1024 && t * 8 < n) t *= 2;
  return t;
}

inline unsigned grid_rows(int64_t rows) { return static_cast<unsigned>(rows); }

// Calls fn(T()) for the C++ type of a DType.
template <class Fn>
inline cudaError_t with_type(DType t, Fn&& fn) {
  switch (t) {
    case DType::F32: return fn(float());
    case DType::F16: return fn(__half());
    case DType::BF16: return fn(__nv_bfloat16());
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace forge
