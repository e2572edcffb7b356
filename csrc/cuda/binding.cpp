// The CUDA implementations of the forge_ops schemas (csrc/ops.cpp): tensor checks, outputs and
// workspaces from torch's allocator, then the torch-free launchers of forge/cuda_api.h on the
// current stream. Compiled only where torch was built with CUDA (forge_dist/ops/builder.py).
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>
#include <torch/types.h>

#include "forge/cuda_api.h"

namespace forge {
namespace cuda {
namespace {

DType dtype_of(at::ScalarType t, const char* op) {
  switch (t) {
    case at::kFloat: return DType::F32;
    case at::kHalf: return DType::F16;
    case at::kBFloat16: return DType::BF16;
    default: TORCH_CHECK(false, op, ": dtype ", t, " has no CUDA kernel (float32, float16, bfloat16)");
  }
}

void check(cudaError_t e, const char* op) { TORCH_CHECK(e == cudaSuccess, op, ": ", cudaGetErrorString(e)); }

cudaStream_t stream() { return c10::cuda::getCurrentCUDAStream(); }

at::Tensor f32(const at::Tensor& t) { return t.to(at::kFloat).contiguous(); }
at::Tensor f32(const c10::optional<at::Tensor>& t) { return t.has_value() ? f32(*t) : at::Tensor(); }
const float* fptr(const at::Tensor& t) { return t.defined() ? t.const_data_ptr<float>() : nullptr; }

MaskArgs mask_args(c10::IntArrayRef m) {
  TORCH_CHECK(m.size() == 5, "mask must be [enabled, causal, window, q_offset, n_sink]");
  return {int32_t(m[0]), int32_t(m[1]), int32_t(m[2]), int32_t(m[3]), int32_t(m[4])};
}

ScoreGeom geometry(const at::Tensor& s, int64_t n_params) {
  const int64_t tk = s.size(-1), tq = s.dim() >= 2 ? s.size(-2) : 1, heads = s.dim() >= 3 ? s.size(-3) : 1;
  TORCH_CHECK(n_params == 1 || n_params == heads, "per-head parameters: ", n_params, " values for ", heads, " heads");
  return {tk ? s.numel() / tk : 0, tq, tk, n_params == 1 ? 1 : heads};
}

ElemConsts elem_consts(c10::ArrayRef<double> v) {
  TORCH_CHECK(v.size() <= 8, "at most 8 constants");
  ElemConsts c{};
  for (size_t i = 0; i < v.size(); ++i) c.c[i] = v[i];
  return c;
}

// ---- norms ---------------------------------------------------------------------------------------
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> norm_fwd_op(
    const at::Tensor& x_, const c10::optional<at::Tensor>& residual, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, int64_t k, double eps, bool center, c10::optional<at::ScalarType> out_dtype) {
  c10::cuda::CUDAGuard guard(x_.device());
  at::Tensor x = x_.contiguous();
  const int64_t d = x.size(-1), rows = d ? x.numel() / d : 0;
  TORCH_CHECK(k >= 1 && k <= d, "norm_fwd: k=", k, " must be in [1, ", d, "]");
  at::Tensor res = residual.has_value() ? residual->contiguous() : at::Tensor();
  at::Tensor w = f32(weight), b = f32(bias);
  at::Tensor y = at::empty(x.sizes(), x.options().dtype(out_dtype.value_or(x.scalar_type())));
  at::Tensor h = res.defined() ? at::empty_like(x) : at::empty({0}, x.options());
  at::Tensor mean = at::empty({center ? rows : 0}, x.options().dtype(at::kFloat));
  at::Tensor rstd = at::empty({rows}, x.options().dtype(at::kFloat));
  NormFwd a{x.const_data_ptr(), res.defined() ? res.const_data_ptr() : nullptr, fptr(w), fptr(b), y.data_ptr(),
            res.defined() ? h.data_ptr() : nullptr, center ? mean.data_ptr<float>() : nullptr, rstd.data_ptr<float>(),
            rows, d, k, float(eps), center, dtype_of(x.scalar_type(), "norm_fwd"), dtype_of(y.scalar_type(), "norm_fwd")};
  check(norm_fwd(a, stream()), "norm_fwd");
  return {y, h, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> norm_bwd_op(
    const at::Tensor& grad_, const at::Tensor& h_, const c10::optional<at::Tensor>& weight, const at::Tensor& mean,
    const at::Tensor& rstd, const c10::optional<at::Tensor>& grad_h, int64_t k, bool center, bool need_dw,
    bool need_db) {
  c10::cuda::CUDAGuard guard(h_.device());
  at::Tensor h = h_.contiguous(), grad = grad_.contiguous();
  at::Tensor dh = grad_h.has_value() ? grad_h->to(h.scalar_type()).contiguous() : at::Tensor();
  const int64_t d = h.size(-1), rows = d ? h.numel() / d : 0;
  at::Tensor w = f32(weight), dx = at::empty_like(h);
  at::Tensor dw = at::zeros({need_dw ? d : 0}, h.options().dtype(at::kFloat));
  at::Tensor db = at::zeros({need_db ? d : 0}, h.options().dtype(at::kFloat));
  at::Tensor ws = (need_dw || need_db) ? at::empty({norm_bwd_workspace_floats(rows, d)}, h.options().dtype(at::kFloat))
                                       : at::Tensor();
  NormBwd a{grad.const_data_ptr(), h.const_data_ptr(), fptr(w), center ? mean.const_data_ptr<float>() : nullptr,
            rstd.const_data_ptr<float>(), dh.defined() ? dh.const_data_ptr() : nullptr, dx.data_ptr(),
            need_dw ? dw.data_ptr<float>() : nullptr, need_db ? db.data_ptr<float>() : nullptr,
            ws.defined() ? ws.data_ptr<float>() : nullptr, rows, d, k, center,
            dtype_of(h.scalar_type(), "norm_bwd"), dtype_of(grad.scalar_type(), "norm_bwd")};
  check(norm_bwd(a, stream()), "norm_bwd");
  auto wdtype = weight.has_value() ? weight->scalar_type() : h.scalar_type();
  return {dx, dw.to(wdtype), db.to(wdtype)};
}

// ---- score normalisers ---------------------------------------------------------------------------
at::Tensor elementwise_fwd_op(const at::Tensor& scores_, const at::Tensor& params_, int64_t kind,
                           c10::ArrayRef<double> consts, c10::IntArrayRef mask, c10::optional<at::ScalarType> out_dtype) {
  c10::cuda::CUDAGuard guard(scores_.device());
  at::Tensor s = scores_.contiguous(), params = f32(params_);
  at::Tensor y = at::empty(s.sizes(), s.options().dtype(out_dtype.value_or(s.scalar_type())));
  ElemFwd a{s.const_data_ptr(), params.const_data_ptr<float>(), y.data_ptr(), int32_t(kind), elem_consts(consts),
            mask_args(mask), geometry(s, params.size(0)), dtype_of(s.scalar_type(), "score_elementwise_fwd"),
            dtype_of(y.scalar_type(), "score_elementwise_fwd")};
  check(score_elementwise_fwd(a, stream()), "score_elementwise_fwd");
  return y;
}

std::tuple<at::Tensor, at::Tensor> elementwise_bwd_op(const at::Tensor& grad_, const at::Tensor& scores_,
                                                   const at::Tensor& params_, int64_t kind, c10::ArrayRef<double> consts,
                                                   c10::IntArrayRef mask, bool need_dparams) {
  c10::cuda::CUDAGuard guard(scores_.device());
  at::Tensor s = scores_.contiguous(), grad = grad_.contiguous(), params = f32(params_);
  at::Tensor dx = at::empty_like(s), dparams = at::zeros(params.sizes(), params.options());
  ElemBwd a{grad.const_data_ptr(), s.const_data_ptr(), params.const_data_ptr<float>(), dx.data_ptr(),
            need_dparams ? dparams.data_ptr<float>() : nullptr, int32_t(kind), elem_consts(consts), mask_args(mask),
            geometry(s, params.size(0)), dtype_of(s.scalar_type(), "score_elementwise_bwd"),
            dtype_of(grad.scalar_type(), "score_elementwise_bwd")};
  check(score_elementwise_bwd(a, stream()), "score_elementwise_bwd");
  return {dx, dparams.to(params_.scalar_type())};
}

RowArgs row_args(int64_t transform, int64_t shift_mode, bool divide, double tparam, double guess, double overflow,
                 double post) {
  return {int32_t(transform), int32_t(shift_mode), int32_t(divide), tparam, guess, overflow, post};
}

std::tuple<at::Tensor, at::Tensor> rownorm_fwd_op(const at::Tensor& scores_, const at::Tensor& c_, const at::Tensor& obo_,
                                               c10::IntArrayRef mask, int64_t transform, int64_t shift_mode, bool divide,
                                               double tparam, double guess, double overflow, double post,
                                               c10::optional<at::ScalarType> out_dtype) {
  c10::cuda::CUDAGuard guard(scores_.device());
  at::Tensor s = scores_.contiguous(), c = f32(c_), obo = f32(obo_);
  const ScoreGeom g = geometry(s, obo.numel());
  at::Tensor y = at::empty(s.sizes(), s.options().dtype(out_dtype.value_or(s.scalar_type())));
  at::Tensor stats = at::empty({g.rows, 3}, s.options().dtype(at::kFloat));
  RowFwd a{s.const_data_ptr(), c.const_data_ptr<float>(), obo.const_data_ptr<float>(), y.data_ptr(),
           stats.data_ptr<float>(), row_args(transform, shift_mode, divide, tparam, guess, overflow, post),
           mask_args(mask), g, dtype_of(s.scalar_type(), "score_rownorm_fwd"),
           dtype_of(y.scalar_type(), "score_rownorm_fwd")};
  check(score_rownorm_fwd(a, stream()), "score_rownorm_fwd");
  return {y, stats};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> rownorm_bwd_op(
    const at::Tensor& grad_, const at::Tensor& scores_, const at::Tensor& c_, const at::Tensor& obo_,
    const at::Tensor& stats_, c10::IntArrayRef mask, int64_t transform, bool divide, double tparam, double post,
    bool need_dc, bool need_dobo) {
  c10::cuda::CUDAGuard guard(scores_.device());
  at::Tensor s = scores_.contiguous(), grad = grad_.contiguous(), c = f32(c_), stats = f32(stats_);
  at::Tensor dx = at::empty_like(s);
  at::Tensor dc = at::zeros({1}, s.options().dtype(at::kFloat));
  at::Tensor dobo = at::zeros({obo_.numel()}, s.options().dtype(at::kFloat));
  RowBwd a{grad.const_data_ptr(), s.const_data_ptr(), c.const_data_ptr<float>(), stats.const_data_ptr<float>(),
           dx.data_ptr(), need_dc ? dc.data_ptr<float>() : nullptr, need_dobo ? dobo.data_ptr<float>() : nullptr,
           row_args(transform, 0, divide, tparam, 0.0, 0.0, post), mask_args(mask), geometry(s, obo_.numel()),
           dtype_of(s.scalar_type(), "score_rownorm_bwd"), dtype_of(grad.scalar_type(), "score_rownorm_bwd")};
  check(score_rownorm_bwd(a, stream()), "score_rownorm_bwd");
  return {dx, dc.to(c_.scalar_type()).reshape(c_.sizes()), dobo.to(obo_.scalar_type()).reshape(obo_.sizes())};
}

// ---- quantization --------------------------------------------------------------------------------
at::Tensor fake_quantize_op(const at::Tensor& x_, int64_t bits, bool symmetric, bool per_row) {
  TORCH_CHECK(bits >= 2 && bits <= 16, "fake_quantize: bits=", bits, " outside the kernel's range [2, 16]");
  c10::cuda::CUDAGuard guard(x_.device());
  at::Tensor x = x_.contiguous(), y = at::empty_like(x);
  const int64_t d = x.dim() ? x.size(-1) : 1, rows = d ? x.numel() / d : 0;
  at::Tensor ws = at::empty({fake_quantize_workspace_floats(x.numel())}, x.options().dtype(at::kFloat));
  FakeQuant a{x.const_data_ptr(), y.data_ptr(), ws.data_ptr<float>(), rows, d, int32_t(bits), symmetric, per_row,
              dtype_of(x.scalar_type(), "fake_quantize")};
  check(fake_quantize(a, stream()), "fake_quantize");
  return y;
}

constexpr int64_t TILE_N = 1024;

at::Tensor int8_linear_op(const at::Tensor& x_, const at::Tensor& qweight, const at::Tensor& scale_,
                       const at::Tensor& zp_, const c10::optional<at::Tensor>& bias_) {
  TORCH_CHECK(qweight.scalar_type() == at::kChar && qweight.dim() == 2, "int8_linear: qweight must be int8 (N, K)");
  c10::cuda::CUDAGuard guard(x_.device());
  const int64_t N = qweight.size(0), K = qweight.size(1);
  TORCH_CHECK(x_.size(-1) == K, "int8_linear: x has ", x_.size(-1), " features, the weight ", K);
  at::Tensor scale = f32(scale_).reshape(-1), zp = f32(zp_).reshape(-1), q = qweight.contiguous();
  TORCH_CHECK((scale.numel() == 1 || scale.numel() == N) && scale.numel() == zp.numel(),
              "int8_linear: scale and zero_point must have 1 or N values");
  auto out_shape = x_.sizes().vec();
  out_shape.back() = N;
  at::Tensor x = x_.reshape({-1, K}).contiguous();
  at::Tensor bias = bias_.has_value() ? bias_->to(x.scalar_type()).contiguous() : at::Tensor();
  const int64_t M = x.size(0);
  const DType dt = dtype_of(x.scalar_type(), "int8_linear");
  const bool per_channel = scale.numel() > 1;
  if (M <= INT8_GEMV_MAX_ROWS) {
    at::Tensor y = at::empty({M, N}, x.options());
    Int8Gemv a{x.const_data_ptr(), q.const_data_ptr<int8_t>(), scale.const_data_ptr<float>(), zp.const_data_ptr<float>(),
               bias.defined() ? bias.const_data_ptr() : nullptr, y.data_ptr(), M, N, K, per_channel, dt};
    check(int8_gemv(a, stream()), "int8_linear");
    return y.reshape(out_shape);
  }
  // Many rows: dequantise TILE_N weight rows at a time into a reused buffer and let cuBLAS multiply.
  at::Tensor y = at::empty({M, N}, x.options());
  at::Tensor w = at::empty({std::min(N, TILE_N), K}, x.options());
  for (int64_t n0 = 0; n0 < N; n0 += TILE_N) {
    const int64_t n1 = std::min(N, n0 + TILE_N);
    at::Tensor wt = w.narrow(0, 0, n1 - n0);
    check(int8_dequant_rows(q.const_data_ptr<int8_t>(), scale.const_data_ptr<float>(), zp.const_data_ptr<float>(),
                            per_channel, n0, n1, K, wt.data_ptr(), dt, stream()), "int8_linear");
    at::Tensor out = at::matmul(x, wt.t());
    if (bias.defined()) out.add_(bias.narrow(0, n0, n1 - n0));
    y.narrow(1, n0, n1 - n0).copy_(out);
  }
  return y.reshape(out_shape);
}

}  // namespace

TORCH_LIBRARY_IMPL(forge_ops, CUDA, m) {
  m.impl("norm_fwd", &norm_fwd_op);
  m.impl("norm_bwd", &norm_bwd_op);
  m.impl("score_elementwise_fwd", &elementwise_fwd_op);
  m.impl("score_elementwise_bwd", &elementwise_bwd_op);
  m.impl("score_rownorm_fwd", &rownorm_fwd_op);
  m.impl("score_rownorm_bwd", &rownorm_bwd_op);
  m.impl("fake_quantize", &fake_quantize_op);
  m.impl("int8_linear", &int8_linear_op);
}

}  // namespace cuda
}  // namespace forge
