// Row helpers of the softmax mix (softmax_mix.cpp, both gates): a softmax over a handful of logits and its backward,
// row views through strides, and the fixed-order reduction that keeps weight gradients deterministic.
#pragma once

#include "parallel.h"

#include <algorithm>
#include <cmath>
#include <cstdint>

namespace avk {
namespace cpu {

// Rows (b, l) of a (B, L, d) tensor read through its strides: no copy of a non-contiguous input.
template <typename T>
struct RowView {
  const T* data;
  int64_t s0, s1, s2, length;
  explicit RowView(const Tensor& t)
      : data(t.mutable_data_ptr<T>()), s0(t.stride(0)), s1(t.stride(1)), s2(t.stride(2)), length(t.size(1)) {}
  const T* row(int64_t r) const { return data + (r / length) * s0 + (r % length) * s1; }
};

// The gates' logits and softmax are computed in fp64 whatever the inputs' dtype. A small temperature amplifies
// their rounding: softmax(z / tau) moves by (rounding error of z) / tau, which at tau = 1e-4 turns fp32's 1e-7 into
// 1e-3, so fp32 logits would be as wrong as the fp32 reference's and, depending on the draw, several times more
// (measured: 3-30x in the weight and bias gradients at tau = 1e-4). Logits are O(T^2 d) multiply-adds per row
// against the mix's O(T d).
using Logit = double;

// sum_i x[i * stride] * w[i], accumulated in A. A contiguous row (the usual case) is summed in SIMD lanes: `omp simd`
// allows the reassociation the compiler may not do on its own (the order is still fixed, so results stay
// reproducible).
template <typename A, typename T>
inline A dot(const T* x, int64_t stride, const T* w, int64_t n) {
  A acc = 0;
  if (stride == 1) {
#pragma omp simd reduction(+ : acc)
    for (int64_t i = 0; i < n; ++i) acc += static_cast<A>(x[i]) * static_cast<A>(w[i]);
  } else {
    for (int64_t i = 0; i < n; ++i) acc += static_cast<A>(x[i * stride]) * static_cast<A>(w[i]);
  }
  return acc;
}

// z[0..n) <- softmax(z / tau): subtract the max, exponentiate, normalise, as torch does, except that the max is
// subtracted before dividing by tau rather than from z / tau, whose own rounding 1 / tau magnifies. NaN and inf
// logits give the reference's NaN.
template <typename T>
inline void softmax_in_place(T* z, int64_t n, T tau) {
  T top = z[0];
  for (int64_t t = 1; t < n; ++t) top = std::max(top, z[t]);
  T total = 0;
  for (int64_t t = 0; t < n; ++t) {
    z[t] = std::exp((z[t] - top) / tau);
    total += z[t];
  }
  for (int64_t t = 0; t < n; ++t) z[t] /= total;
}

// Gradient of the logits given the softmax s and the gradient ds of its output (both length n), for logits / tau:
// dz_t = s_t (ds_t - sum_u s_u ds_u) / tau, computed in fp64 (Logit) as s_t sum_{u != t} s_u (ds_t - ds_u) / tau.
// The direct form cancels: with a near one-hot s, ds_t - sum_u s_u ds_u subtracts two nearly equal numbers, and the
// saved s, rounded to the inputs' dtype, no longer sums to 1; 1 / tau then magnifies both. Non-finite terms take the
// direct form, whose NaN and inf are the reference's.
template <typename T>
inline void softmax_backward(const T* s, const T* ds, T* dz, int64_t n, double tau) {
  Logit dot = 0;
  for (int64_t t = 0; t < n; ++t) dot += static_cast<Logit>(s[t]) * static_cast<Logit>(ds[t]);
  for (int64_t t = 0; t < n; ++t) {
    Logit sum = 0;
    if (std::isfinite(dot)) {
      for (int64_t u = 0; u < n; ++u)
        if (u != t) sum += static_cast<Logit>(s[u]) * (static_cast<Logit>(ds[t]) - static_cast<Logit>(ds[u]));
    } else {
      sum = static_cast<Logit>(ds[t]) - dot;
    }
    dz[t] = static_cast<T>(static_cast<Logit>(s[t]) * sum / tau);
  }
}

// Rows are processed in chunks of this many; each chunk writes its own weight-gradient partial, and the partials are
// summed in chunk order, so the weight gradients do not depend on the thread count or scheduling.
constexpr int64_t kRowsPerChunk = 32;

// out[x] = sum over c < chunks of part[c * n + x], in order of c.
template <typename T>
void sum_chunks(const T* part, int64_t chunks, int64_t n, T* out) {
  parallel_for(0, n, 1024, [&](int64_t begin, int64_t end) {
    for (int64_t x = begin; x < end; ++x) {
      T total = part[x];
      for (int64_t c = 1; c < chunks; ++c) total += part[c * n + x];
      out[x] = total;
    }
  });
}

}  // namespace cpu
}  // namespace avk
