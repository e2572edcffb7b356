// The tile machinery of the fused attention kernel (attention.cpp): geometry, which keys a tile of
// query rows computes, BLAS products on raw tile pointers, and the score's finishing touches
// (scale, soft-capping, bias) forward and backward.
#pragma once

#include <array>
#include <cmath>
#include <type_traits>
#include <vector>

#include "common.h"
#include "forge/scores.h"

namespace forge {
namespace cpu {
namespace attn {

struct Geo {
  int64_t B, Hq, Hkv, T, S, D, Dv, Bb, Hb;  // bias (Bb, Hb, T, S): Bb 1 or B, Hb 1 or Hq; Hb 0: no bias
  double scale, softcap;                     // softcap 0: none
  MaskArgs mask;
  int64_t bias_row(int64_t b, int64_t h, int64_t i) const {
    return (((Bb == 1 ? 0 : b) * Hb + (Hb == 1 ? 0 : h)) * T + i) * S;
  }
};

struct Segment {
  int64_t lo, hi;
};
inline std::array<Segment, 2> segments(const ColRange& c) { return {Segment{0, c.sink_end}, Segment{c.lo, c.hi}}; }

constexpr int64_t QBLOCK = 64;  // query rows per tile

// The keys a tile of query rows [i0, i0 + n) computes: the sink columns [0, ka) and the keys
// [kb0, kb1) from the first row's lowest to the last row's highest visible key, packed side by side
// (tile column ka + j is key kb0 + j). So a causal tile stops at its last row's key and a sliding
// window's tile starts at its first row's, skipping every key no row of the tile sees.
struct Tile {
  int64_t i0, n, ka, kb0, kb1, w, shift;  // w = ka + kb1 - kb0 columns; tile column c >= ka is key c + shift
  Tile(const Geo& g, int64_t i0_) : i0(i0_), n(std::min(QBLOCK, g.T - i0_)) {
    const ColRange first = visible_cols(g.mask, i0, g.S), last = visible_cols(g.mask, i0 + n - 1, g.S);
    const int64_t ns = first.sink_end;
    kb1 = std::max(last.hi, first.lo);
    const bool split = first.lo > ns;  // else the sinks adjoin the keys: one range from 0
    ka = split ? ns : 0;
    kb0 = split ? first.lo : 0;
    w = ka + kb1 - kb0;
    shift = kb0 - ka;
  }
  ColRange row(const Geo& g, int64_t r) const {  // the row's visible columns, in tile columns
    const ColRange c = visible_cols(g.mask, i0 + r, g.S);
    return {c.sink_end, c.lo - shift, c.hi - shift};
  }
};

// ---- BLAS on raw tile pointers ---------------------------------------------------------------------
// The BLAS torch links (MKL in the official CPU wheels) called directly: a tile is a handful of small
// products, where at::mm's per-call tensor plumbing costs as much as the arithmetic at T = 256. Weak
// references: a torch without these symbols takes at::mm on views of the same memory instead.
extern "C" {
void sgemm_(const char*, const char*, const int*, const int*, const int*, const float*, const float*, const int*,
            const float*, const int*, const float*, float*, const int*) __attribute__((weak));
void dgemm_(const char*, const char*, const int*, const int*, const int*, const double*, const double*, const int*,
            const double*, const int*, const double*, double*, const int*) __attribute__((weak));
}

// Row-major C (m x n, ldc) = alpha op(A) op(B) + beta C, beta 0 or 1; op(X) = X^T where tX.
template <class A>
void gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, A alpha, const A* a, int64_t lda, const A* b,
          int64_t ldb, A beta, A* c, int64_t ldc) {
  if (m <= 0 || n <= 0) return;
  if (k <= 0) {
    if (beta == A(0))
      for (int64_t i = 0; i < m; ++i) std::fill(c + i * ldc, c + i * ldc + n, A(0));
    return;
  }
  auto blas = [] {
    if constexpr (std::is_same_v<A, float>) return sgemm_;
    else return dgemm_;
  }();
  if (blas) {  // column-major: C^T = op(B)^T op(A)^T, the same flags with the operands swapped
    const char ca = ta ? 'T' : 'N', cb = tb ? 'T' : 'N';
    const int M = int(n), N = int(m), K = int(k), LA = int(ldb), LB = int(lda), LC = int(ldc);
    blas(&cb, &ca, &M, &N, &K, &alpha, b, &LA, a, &LB, &beta, c, &LC);
    return;
  }
  const auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<A>::value);
  auto view = [&](const A* p, int64_t r, int64_t cols, int64_t ld, bool t) {
    at::Tensor x = at::from_blob(const_cast<A*>(p), {t ? cols : r, t ? r : cols}, {ld, 1}, opts);
    return t ? x.t() : x;
  };
  at::Tensor cv = at::from_blob(c, {m, n}, {ldc, 1}, opts);
  const at::Tensor prod = at::mm(view(a, m, k, lda, ta), view(b, k, n, ldb, tb)).mul_(alpha);
  beta == A(0) ? cv.copy_(prod) : cv.add_(prod);
}

// A tile's product with the keys on its inner side: C = alpha op(X) [K seg 1 | K seg 2] pieces.
// keys_nt: C (n x w) = alpha X (n x d) [K[0:ka] ; K[kb0:kb1]]^T, K rows of ld d (scores, dP);
template <class A>
void keys_nt(const Tile& t, int64_t d, A alpha, const A* x, int64_t ldx, const A* kk, A* c) {
  gemm<A>(false, true, t.n, t.ka, d, alpha, x, ldx, kk, d, A(0), c, t.w);
  gemm<A>(false, true, t.n, t.kb1 - t.kb0, d, alpha, x, ldx, kk + t.kb0 * d, d, A(0), c + t.ka, t.w);
}
// keys_nn: C (n x d) (+)= alpha P (n x w) [K pieces] (P V, dS K); beta: accumulate into C
template <class A>
void keys_nn(const Tile& t, int64_t d, A alpha, const A* p, const A* kk, A beta, A* c, int64_t ldc) {
  if (t.ka) gemm<A>(false, false, t.n, d, t.ka, alpha, p, t.w, kk, d, beta, c, ldc);
  gemm<A>(false, false, t.n, d, t.kb1 - t.kb0, alpha, p + t.ka, t.w, kk + t.kb0 * d, d, t.ka ? A(1) : beta, c, ldc);
}
// keys_tn: the key rows' gradients, G[keys] += alpha P^T (w x n) X (n x d) (dV, dK)
template <class A>
void keys_tn(const Tile& t, int64_t d, A alpha, const A* p, const A* x, A* gk) {
  gemm<A>(true, false, t.ka, d, t.n, alpha, p, t.w, x, d, A(1), gk, d);
  gemm<A>(true, false, t.kb1 - t.kb0, d, t.n, alpha, p + t.ka, t.w, x, d, A(1), gk + t.kb0 * d, d);
}

// A tile row from q.k (times the scale, folded into the product without soft-capping) to the
// score: cap tanh(x scale / cap) (th keeps the tanh) + bias, visible columns only; the bias row is
// indexed by key (tile column c of the second segment is key c + shift).
template <class A>
void finish_scores(A* s, A* th, const A* bias_row, int64_t shift, const ColRange& c, const Geo& g) {
  const A sc = A(g.scale), cap = A(g.softcap);
  int64_t off = 0;
  for (const Segment sg : segments(c)) {
    if (g.softcap != 0.0)
      for (int64_t j = sg.lo; j < sg.hi; ++j) {
        A tt = std::tanh(s[j] * sc / cap);
        th[j] = tt;
        s[j] = cap * tt;
      }
    if (bias_row)
      for (int64_t j = sg.lo; j < sg.hi; ++j) s[j] += bias_row[j + off];
    off = shift;
  }
}

// ds w.r.t. the final score -> dbias, then back through tanh (the scale: in the products after)
template <class A>
void unfinish_grad(A* ds, const A* th, A* dbias_row, int64_t shift, const ColRange& c, const Geo& g) {
  const A sc = A(g.scale);
  int64_t off = 0;
  for (const Segment sg : segments(c)) {
    if (dbias_row)
      for (int64_t j = sg.lo; j < sg.hi; ++j) dbias_row[j + off] += ds[j];
    if (g.softcap != 0.0)
      for (int64_t j = sg.lo; j < sg.hi; ++j) ds[j] *= (A(1) - th[j] * th[j]) * sc;
    off = shift;
  }
}

// Zeros the hidden columns [sink_end, lo) and [hi, w) of a tile row.
template <class A>
void zero_hidden(A* row, const ColRange& c, int64_t w) {
  std::fill(row + c.sink_end, row + c.lo, A(0));
  std::fill(row + c.hi, row + w, A(0));
}

// x (n elements of T) in the accumulation type: the tensor's own memory when T is A, else a copy
template <class A, class T>
const A* as_acc(const T* x, int64_t n, std::vector<A>& buf) {
  if constexpr (std::is_same_v<A, T>) {
    return x;
  } else {
    buf.resize(size_t(n));
    for (int64_t i = 0; i < n; ++i) buf[i] = load(x[i]);
    return buf.data();
  }
}

}  // namespace attn
}  // namespace cpu
}  // namespace forge
