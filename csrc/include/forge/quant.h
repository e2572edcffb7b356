// Fake quantization and int8 dequantization math shared by the CPU and CUDA kernels.
//
// Bit-for-bit the sequence of forge_dist/ops/reference/quantize.py in the compute dtype A
// (float32, or float64 for a float64 input):
//   affine     scale = (max - min) / (2^b - 1),  zp = -round(min / scale) + qmin,
//              q = clamp(round(x / scale) + zp, qmin, qmax)
//   symmetric  scale = max|x| / qmax,  zp = 0,  q = clamp(round(x / scale), qmin, qmax)
//   x_hat = (q - zp) * scale; a zero range gets scale 1. round() is half-to-even (nearbyint in the
//   default rounding mode), as torch.round.
#pragma once

#include "forge/math.h"

namespace forge {

template <class A>
struct QuantParams {
  A scale, zero_point, qmin, qmax;
};

template <class A>
FORGE_HD A round_half_even(A v) { return ::nearbyint(v); }
FORGE_HD float round_half_even(float v) { return ::nearbyintf(v); }

// lo, hi: the minimum and maximum (affine) or 0 and max|x| (symmetric) of the slice.
template <class A>
FORGE_HD QuantParams<A> quant_params(A lo, A hi, int32_t bits, bool symmetric) {
  A qmin = -A(int64_t(1) << (bits - 1)), qmax = A((int64_t(1) << (bits - 1)) - 1);
  if (symmetric) {
    A s = hi / qmax;
    s = s > A(0) ? s : A(1);
    return {s, A(0), qmin, qmax};
  }
  A s = (hi - lo) / A((int64_t(1) << bits) - 1);
  s = s > A(0) ? s : A(1);
  return {s, -round_half_even(lo / s) + qmin, qmin, qmax};
}

template <class A>
FORGE_HD A fake_quant(A x, const QuantParams<A>& q) {
  A code = fm::fmin(fm::fmax(round_half_even(x / q.scale) + q.zero_point, q.qmin), q.qmax);
  return (code - q.zero_point) * q.scale;
}

}  // namespace forge
