// Fake quantization (affine / symmetric, per tensor or per row) and the int8 weight-only linear
// on the CPU. The math is forge/quant.h, shared with the CUDA kernels.
#include "common.h"
#include "forge/quant.h"

namespace forge {
namespace cpu {
namespace {

// (lo, hi) of one slice: (min, max) for affine, (0, max|x|) for symmetric.
template <class T, class A>
std::pair<A, A> slice_range(const T* x, int64_t n, bool symmetric) {
  A lo = fm::inf<A>(), hi = -fm::inf<A>(), amax = A(0);
#pragma omp simd reduction(min : lo) reduction(max : hi, amax)
  for (int64_t j = 0; j < n; ++j) {
    A v = load(x[j]);
    lo = fm::fmin(lo, v);
    hi = fm::fmax(hi, v);
    amax = fm::fmax(amax, v < A(0) ? -v : v);
  }
  return symmetric ? std::make_pair(A(0), amax) : std::make_pair(lo, hi);
}

template <class T, class A>
void quantize_slice(const T* x, T* y, int64_t n, const QuantParams<A>& q) {
  for (int64_t j = 0; j < n; ++j) y[j] = store<T>(fake_quant(A(load(x[j])), q));
}

template <class T, class A>
void fake_quantize_impl(const T* x, T* y, int64_t rows, int64_t d, int32_t bits, bool symmetric, bool per_row) {
  if (per_row) {
    parallel_rows(rows, d, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        auto lh = slice_range<T, A>(x + r * d, d, symmetric);
        quantize_slice<T, A>(x + r * d, y + r * d, d, quant_params<A>(lh.first, lh.second, bits, symmetric));
      }
    });
    return;
  }
  const int64_t n = rows * d, grain = 1 << 16;
  const int64_t chunks = std::max<int64_t>(1, (n + grain - 1) / grain);
  std::vector<A> lo(chunks, fm::inf<A>()), hi(chunks, A(0));
  if (!symmetric) std::fill(hi.begin(), hi.end(), -fm::inf<A>());
  at::parallel_for(0, chunks, 1, [&](int64_t b, int64_t e) {
    for (int64_t c = b; c < e; ++c) {
      auto lh = slice_range<T, A>(x + c * grain, std::min(grain, n - c * grain), symmetric);
      lo[c] = lh.first;
      hi[c] = lh.second;
    }
  });
  const QuantParams<A> q = quant_params<A>(*std::min_element(lo.begin(), lo.end()),
                                           *std::max_element(hi.begin(), hi.end()), bits, symmetric);
  at::parallel_for(0, n, grain, [&](int64_t b, int64_t e) { quantize_slice<T, A>(x + b, y + b, e - b, q); });
}

at::Tensor fake_quantize(const at::Tensor& x_, int64_t bits, bool symmetric, bool per_row) {
  TORCH_CHECK(bits >= 2 && bits <= 16, "fake_quantize: bits=", bits, " outside the kernel's range [2, 16]");
  at::Tensor x = x_.contiguous();
  at::Tensor y = at::empty_like(x);
  const int64_t d = x.dim() ? x.size(-1) : 1, rows = d ? x.numel() / d : 0;
  if (x.numel() == 0) return y;
  dispatch_io(x.scalar_type(), x.scalar_type(), "fake_quantize", [&](auto t_in, auto) {
    using T = decltype(t_in);
    fake_quantize_impl<T, acc_t<T>>(x.const_data_ptr<T>(), y.data_ptr<T>(), rows, d, int32_t(bits), symmetric,
                                    per_row);
  });
  return y;
}

// ---- int8 weight-only linear ------------------------------------------------------------------
// Few rows (decoding): one pass over the int8 weights; each weight row is dequantised once into an
// L1-resident buffer and dotted with every input row: y[m, n] = scale_n sum_k x[m, k] (q[n, k] - zp_n).
template <class T, class A>
void int8_gemv(const T* x, const int8_t* q, const float* scale, const float* zp, const T* bias, T* y, int64_t M,
               int64_t N, int64_t K, bool per_channel) {
  std::vector<A> xa(M * K);  // inputs in the accumulation type, read N times
  for (int64_t i = 0; i < M * K; ++i) xa[i] = load(x[i]);
  at::parallel_for(0, N, std::max<int64_t>(1, 16384 / std::max<int64_t>(1, K)), [&](int64_t b, int64_t e) {
    std::vector<A> wbuf(K);
    A* w = wbuf.data();
    const A* xs = xa.data();
    for (int64_t n = b; n < e; ++n) {
      const int8_t* qn = q + n * K;
      const A z = zp[per_channel ? n : 0];
      for (int64_t k = 0; k < K; ++k) w[k] = A(qn[k]) - z;
      const A s = scale[per_channel ? n : 0], bn = bias ? A(load(bias[n])) : A(0);
      for (int64_t m = 0; m < M; ++m) {
        const A* xm = xs + m * K;
        A acc = A(0);
#pragma omp simd reduction(+ : acc)
        for (int64_t k = 0; k < K; ++k) acc += xm[k] * w[k];
        y[m * N + n] = store<T>(acc * s + bn);
      }
    }
  });
}

constexpr int64_t GEMV_MAX_ROWS = 8;

// Many rows: the matmul is compute-bound, so the weights are dequantised once per call (one
// vectorised pass, int8 in, x's dtype out) and handed to the BLAS.
template <class T>
void dequantize_rows(const int8_t* q, const float* scale, const float* zp, T* w, int64_t N, int64_t K,
                     bool per_channel) {
  at::parallel_for(0, N, std::max<int64_t>(1, 65536 / std::max<int64_t>(1, K)), [&](int64_t b, int64_t e) {
    for (int64_t n = b; n < e; ++n) {
      const float s = scale[per_channel ? n : 0], z = zp[per_channel ? n : 0];
      for (int64_t k = 0; k < K; ++k) w[n * K + k] = store<T>((float(q[n * K + k]) - z) * s);
    }
  });
}

at::Tensor int8_dequantized_linear(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scale,
                                   const at::Tensor& zp, const c10::optional<at::Tensor>& bias) {
  at::Tensor w = at::empty(q.sizes(), x.options());
  dispatch_io(x.scalar_type(), x.scalar_type(), "int8_linear", [&](auto t_in, auto) {
    using T = decltype(t_in);
    dequantize_rows<T>(q.const_data_ptr<int8_t>(), scale.const_data_ptr<float>(), zp.const_data_ptr<float>(),
                       w.data_ptr<T>(), q.size(0), q.size(1), scale.numel() > 1);
  });
  return at::linear(x, w, bias);
}

at::Tensor int8_linear(const at::Tensor& x_, const at::Tensor& qweight, const at::Tensor& scale_,
                       const at::Tensor& zp_, const c10::optional<at::Tensor>& bias_) {
  TORCH_CHECK(qweight.scalar_type() == at::kChar && qweight.dim() == 2, "int8_linear: qweight must be int8 (N, K)");
  const int64_t N = qweight.size(0), K = qweight.size(1);
  TORCH_CHECK(x_.size(-1) == K, "int8_linear: x has ", x_.size(-1), " features, the weight ", K);
  at::Tensor scale = scale_.to(at::kFloat).contiguous().reshape(-1), zp = zp_.to(at::kFloat).contiguous().reshape(-1);
  TORCH_CHECK((scale.numel() == 1 || scale.numel() == N) && scale.numel() == zp.numel(),
              "int8_linear: scale and zero_point must have 1 or N values");
  auto out_shape = x_.sizes().vec();
  out_shape.back() = N;
  at::Tensor x = x_.reshape({-1, K}).contiguous(), q = qweight.contiguous();
  c10::optional<at::Tensor> bias;
  if (bias_.has_value()) bias = bias_->to(x.scalar_type()).contiguous();
  const int64_t M = x.size(0);
  if (M > GEMV_MAX_ROWS) return int8_dequantized_linear(x, q, scale, zp, bias).reshape(out_shape);
  at::Tensor y = at::empty({M, N}, x.options());
  dispatch_io(x.scalar_type(), x.scalar_type(), "int8_linear", [&](auto t_in, auto) {
    using T = decltype(t_in);
    int8_gemv<T, acc_t<T>>(x.const_data_ptr<T>(), q.const_data_ptr<int8_t>(), scale.const_data_ptr<float>(),
                           zp.const_data_ptr<float>(), bias.has_value() ? bias->const_data_ptr<T>() : nullptr,
                           y.data_ptr<T>(), M, N, K, scale.numel() > 1);
  });
  return y.reshape(out_shape);
}

}  // namespace

TORCH_LIBRARY_IMPL(forge_ops, CPU, m) {
  m.impl("fake_quantize", &fake_quantize);
  m.impl("int8_linear", &int8_linear);
}

}  // namespace cpu
}  // namespace forge
