// Launchers of the CUDA kernels, callable without torch: raw pointers, sizes and a stream.
//
// csrc/cuda/*.cu implement them and compile standalone (`nvcc -c`, tests/ops/test_cuda_compile.py);
// csrc/cuda/binding.cpp is the only CUDA file that sees torch: it checks tensors, allocates outputs
// and workspaces, and registers the ops for the CUDA dispatch key.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "forge/scores.h"

namespace forge {
namespace cuda {

enum class DType : int32_t { F32 = 0, F16 = 1, BF16 = 2 };

// ---- norms (csrc/cuda/norm_kernels.cu) -----------------------------------------------------------
struct NormFwd {
  const void* x;
  const void* residual;  // nullable
  const float* weight;   // nullable, float32
  const float* bias;     // nullable, float32
  void* y;
  void* h;               // written when residual != nullptr
  float* mean;           // written when center
  float* rstd;
  int64_t rows, d, k;
  float eps;
  bool center;
  DType in, out;
};
cudaError_t norm_fwd(const NormFwd& a, cudaStream_t stream);

struct NormBwd {
  const void* grad;
  const void* h;
  const float* weight;   // nullable
  const float* mean;     // nullable unless center
  const float* rstd;
  const void* grad_h;    // nullable, dtype `in`
  void* dx;
  float* dw;             // nullable, (d,)
  float* db;             // nullable, (d,)
  float* workspace;      // norm_bwd_workspace_floats(rows, d) floats when dw or db is wanted
  int64_t rows, d, k;
  bool center;
  DType in, grad_dtype;
};
int64_t norm_bwd_workspace_floats(int64_t rows, int64_t d);
cudaError_t norm_bwd(const NormBwd& a, cudaStream_t stream);

// ---- score normalisers (csrc/cuda/score_kernels.cu) ---------------------------------------------
struct ScoreGeom {
  int64_t rows, tq, tk, heads;  // heads = 1 when the parameters are shared
};
struct ElemFwd {
  const void* scores;
  const float* params;  // (heads, 2): beta, gamma
  void* y;
  int32_t kind;
  ElemConsts consts;
  MaskArgs mask;
  ScoreGeom g;
  DType in, out;
};
cudaError_t score_elementwise_fwd(const ElemFwd& a, cudaStream_t stream);

struct ElemBwd {
  const void* grad;
  const void* scores;
  const float* params;
  void* dscores;
  float* dparams;  // nullable, (heads, 2), zeroed by the caller
  int32_t kind;
  ElemConsts consts;
  MaskArgs mask;
  ScoreGeom g;
  DType in, grad_dtype;
};
cudaError_t score_elementwise_bwd(const ElemBwd& a, cudaStream_t stream);

struct RowFwd {
  const void* scores;
  const float* c;    // (1,)
  const float* obo;  // (heads,)
  void* y;
  float* stats;      // (rows, 3)
  RowArgs args;
  MaskArgs mask;
  ScoreGeom g;
  DType in, out;
};
cudaError_t score_rownorm_fwd(const RowFwd& a, cudaStream_t stream);

struct RowBwd {
  const void* grad;
  const void* scores;
  const float* c;
  const float* stats;
  void* dscores;
  float* dc;    // nullable, (1,), zeroed by the caller
  float* dobo;  // nullable, (heads,), zeroed by the caller
  RowArgs args;
  MaskArgs mask;
  ScoreGeom g;
  DType in, grad_dtype;
};
cudaError_t score_rownorm_bwd(const RowBwd& a, cudaStream_t stream);

// ---- quantization (csrc/cuda/quant_kernels.cu) --------------------------------------------------
struct FakeQuant {
  const void* x;
  void* y;
  float* workspace;  // fake_quantize_workspace_floats(n) floats (per-tensor statistics)
  int64_t rows, d;
  int32_t bits;
  bool symmetric, per_row;
  DType dtype;
};
int64_t fake_quantize_workspace_floats(int64_t n);
cudaError_t fake_quantize(const FakeQuant& a, cudaStream_t stream);

struct Int8Gemv {  // y (M, N) = x (M, K) dequant(q (N, K))^T + bias, M <= INT8_GEMV_MAX_ROWS
  const void* x;
  const int8_t* q;
  const float* scale;       // (1,) or (N,)
  const float* zero_point;  // same shape as scale
  const void* bias;         // nullable, dtype of x
  void* y;
  int64_t M, N, K;
  bool per_channel;
  DType dtype;
};
constexpr int64_t INT8_GEMV_MAX_ROWS = 8;
cudaError_t int8_gemv(const Int8Gemv& a, cudaStream_t stream);
// w (n1 - n0, K) in `dtype` = (q[n0:n1] - zp) * scale: a tile for a BLAS matmul (many rows).
cudaError_t int8_dequant_rows(const int8_t* q, const float* scale, const float* zero_point, bool per_channel,
                              int64_t n0, int64_t n1, int64_t K, void* w, DType dtype, cudaStream_t stream);

}  // namespace cuda
}  // namespace forge
