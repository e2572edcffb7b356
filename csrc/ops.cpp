// The one TORCH_LIBRARY of forge_dist: every op's schema. Device implementations register
// themselves with TORCH_LIBRARY_IMPL in csrc/cpu/*.cpp and csrc/cuda/binding.cpp; autograd and
// fake-tensor rules are registered from Python (forge_dist/ops/autograd.py).
//
// Conventions: "empty" optional outputs are 0-element tensors (a schema cannot return Tensor?);
// row statistics are float32 (float64 for float64 inputs); out_dtype None means the input's dtype.
#include <torch/library.h>

#include <string>

#ifndef FORGE_OPS_KEY
#define FORGE_OPS_KEY unversioned
#endif
#define FORGE_STR2(x) #x
#define FORGE_STR(x) FORGE_STR2(x)

// Readable in the shared object's bytes, so the loader can tell a stale prebuilt library from a
// current one without loading it (a second TORCH_LIBRARY of the same namespace cannot be loaded).
extern "C" __attribute__((used, visibility("default"))) const char forge_ops_key_marker[] =
    "FORGE_OPS_KEY:" FORGE_STR(FORGE_OPS_KEY) ";";

static std::string build_info() { return FORGE_STR(FORGE_OPS_KEY); }

TORCH_LIBRARY(forge_ops, m) {
  m.def("build_info() -> str", &build_info);

  // y = ((h - mean) * rstd) * weight + bias over the last dim, h = x (+ residual); the statistic
  // comes from the first k entries (k = d except for pRMSNorm). center=False is RMSNorm (mean 0).
  m.def("norm_fwd(Tensor x, Tensor? residual, Tensor? weight, Tensor? bias, int k, float eps, bool center, "
        "ScalarType? out_dtype) -> (Tensor y, Tensor h, Tensor mean, Tensor rstd)");
  m.def("norm_bwd(Tensor grad, Tensor h, Tensor? weight, Tensor mean, Tensor rstd, Tensor? grad_h, int k, "
        "bool center, bool need_dw, bool need_db) -> (Tensor dx, Tensor dw, Tensor db)");

  // Elementwise score normalisers; params (H or 1, 2) = per-head (beta, gamma); mask =
  // [enabled, causal, window (-1 none), q_offset, n_sink].
  m.def("score_elementwise_fwd(Tensor scores, Tensor params, int kind, float[] consts, int[] mask, "
        "ScalarType? out_dtype) -> Tensor");
  m.def("score_elementwise_bwd(Tensor grad, Tensor scores, Tensor params, int kind, float[] consts, "
        "int[] mask, bool need_dparams) -> (Tensor dscores, Tensor dparams)");

  // Row-normalised score normalisers; c (1,) the exponent scale, obo (H or 1,) the off-by-one
  // addend; stats (rows, 3) = [shift, denominator, shift came from the row max].
  m.def("score_rownorm_fwd(Tensor scores, Tensor c, Tensor obo, int[] mask, int transform, int shift_mode, "
        "bool divide, float tparam, float guess, float overflow, float post, ScalarType? out_dtype) "
        "-> (Tensor y, Tensor stats)");
  m.def("score_rownorm_bwd(Tensor grad, Tensor scores, Tensor c, Tensor obo, Tensor stats, int[] mask, "
        "int transform, bool divide, float tparam, float post, bool need_dc, bool need_dobo) "
        "-> (Tensor dscores, Tensor dc, Tensor dobo)");

  // Fused attention over a score normaliser without the (T, S) scores (csrc/cpu/attention.cpp):
  // q (B, Hq, T, D), k, v (B, Hkv, S, .), bias (1 or Hq, T, S); family 0 elementwise (kind, consts,
  // params (H or 1, 2) as score_elementwise_fwd), 1 row-normalised (c (1,), obo (H or 1,), sink
  // (H or 1,) or empty, row = [transform, shift_mode, divide, tparam, guess, overflow, post]);
  // softcap 0 means none; stats (B, Hq, T, 3) = [shift, denominator, ties of the max] (B = 0 for
  // elementwise). attention_bwd returns [dq, dk, dv, dbias, dparams, dc, dobo, dsink].
  m.def("attention_fwd(Tensor q, Tensor k, Tensor v, Tensor? bias, Tensor params, Tensor c, Tensor obo, "
        "Tensor sink, int family, int kind, float[] consts, float[] row, int[] mask, float scale, float softcap) "
        "-> (Tensor out, Tensor stats)");
  m.def("attention_bwd(Tensor grad, Tensor q, Tensor k, Tensor v, Tensor? bias, Tensor params, Tensor c, "
        "Tensor obo, Tensor sink, Tensor out, Tensor stats, int family, int kind, float[] consts, float[] row, "
        "int[] mask, float scale, float softcap, bool need_dbias) -> Tensor[]");

  // Quantize-dequantize with per-tensor or per-row (last dim) statistics.
  m.def("fake_quantize(Tensor x, int bits, bool symmetric, bool per_row) -> Tensor");
  // y = x @ ((q - zero_point) * scale)^T + bias, q int8 (N, K), scale / zero_point (N,) or (1,).
  m.def("int8_linear(Tensor x, Tensor qweight, Tensor scale, Tensor zero_point, Tensor? bias) -> Tensor");
}
