// CPU kernel plumbing: element loads/stores in the accumulation type, row-parallel loops and
// per-thread partial sums for the reductions over rows (weight and parameter gradients).
#pragma once

#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include <algorithm>
#include <vector>

#include "forge/math.h"

namespace forge {
namespace cpu {

// bf16 <-> float by bit manipulation (round to nearest even, NaN kept quiet): plain integer code
// that GCC vectorises, unlike a call per element.
inline float load(c10::BFloat16 v) { return fm::bit_cast<float>(static_cast<uint32_t>(v.x) << 16); }
inline float load(float v) { return v; }
inline double load(double v) { return v; }

template <class T>
inline T store(float v);
template <class T>
inline T store(double v);
template <>
inline float store<float>(float v) { return v; }
template <>
inline double store<double>(double v) { return v; }
template <>
inline float store<float>(double v) { return static_cast<float>(v); }
template <>
inline double store<double>(float v) { return v; }
template <>
inline c10::BFloat16 store<c10::BFloat16>(float v) {
  uint32_t u = fm::bit_cast<uint32_t>(v);
  uint32_t rounded = (u + (((u >> 16) & 1u) + 0x7fffu)) >> 16;
  uint16_t bits = v != v ? uint16_t(0x7fc0) : static_cast<uint16_t>(rounded);
  return c10::BFloat16(bits, c10::BFloat16::from_bits());
}

// Accumulation type: double for double, float for everything else.
template <class T>
struct Acc { using type = float; };
template <>
struct Acc<double> { using type = double; };
template <class T>
using acc_t = typename Acc<T>::type;

// Rows split over the ATen thread pool; each chunk has at least ~32K elements so that small inputs
// stay on one thread.
template <class Fn>
inline void parallel_rows(int64_t rows, int64_t row_len, Fn&& fn) {
  int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, row_len));
  at::parallel_for(0, rows, grain, fn);
}

// One zeroed block of n accumulators per thread; sum() adds them in thread order (deterministic for
// a given thread count).
template <class A>
struct PerThread {
  int64_t n;
  std::vector<A> buf;
  explicit PerThread(int64_t n_) : n(n_), buf(static_cast<size_t>(n_ * at::get_num_threads()), A(0)) {}
  A* mine() { return buf.data() + at::get_thread_num() * n; }
  std::vector<A> sum() const {
    std::vector<A> out(static_cast<size_t>(n), A(0));
    for (size_t t = 0; t * n < buf.size(); ++t)
      for (int64_t j = 0; j < n; ++j) out[j] += buf[t * n + j];
    return out;
  }
};

// Runs fn with the C++ types (T in, O out) of a supported (input, output) dtype pair.
template <class Fn>
inline void dispatch_io(at::ScalarType in, at::ScalarType out, const char* op, Fn&& fn) {
  using S = at::ScalarType;
  if (in == S::Float && out == S::Float) return fn(float(), float());
  if (in == S::Double && out == S::Double) return fn(double(), double());
  if (in == S::BFloat16 && out == S::BFloat16) return fn(c10::BFloat16(), c10::BFloat16());
  if (in == S::BFloat16 && out == S::Float) return fn(c10::BFloat16(), float());
  TORCH_CHECK(false, op, ": unsupported dtypes ", in, " -> ", out, " on CPU");
}

inline at::Tensor opt_or_empty(const c10::optional<at::Tensor>& t) { return t.has_value() ? *t : at::Tensor(); }

}  // namespace cpu
}  // namespace forge
