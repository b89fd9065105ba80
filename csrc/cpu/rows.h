// Row helpers of the softmax mix (softmax_mix.cpp, both gates): a softmax over a handful of logits and its backward,
// row views through strides, and the fixed-order reduction that keeps weight gradients deterministic.
#pragma once

#include "parallel.h"
#include <ATen/core/Tensor.h>

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
  explicit RowView(const at::Tensor& t)
      : data(t.data_ptr<T>()), s0(t.stride(0)), s1(t.stride(1)), s2(t.stride(2)), length(t.size(1)) {}
  const T* row(int64_t r) const { return data + (r / length) * s0 + (r % length) * s1; }
};

// sum_i x[i * stride] * w[i]. A contiguous row (the usual case) is summed in SIMD lanes: `omp simd` allows the
// reassociation the compiler may not do on its own (the order is still fixed, so results stay reproducible).
template <typename T>
inline T dot(const T* x, int64_t stride, const T* w, int64_t n) {
  T acc = 0;
  if (stride == 1) {
#pragma omp simd reduction(+ : acc)
    for (int64_t i = 0; i < n; ++i) acc += x[i] * w[i];
  } else {
    for (int64_t i = 0; i < n; ++i) acc += x[i * stride] * w[i];
  }
  return acc;
}

// z[0..n) <- softmax(z / tau), computed as torch does: subtract the max, exponentiate, normalise.
template <typename T>
inline void softmax_in_place(T* z, int64_t n, T tau) {
  T top = z[0] / tau;
  for (int64_t t = 1; t < n; ++t) top = std::max(top, z[t] / tau);
  T total = 0;
  for (int64_t t = 0; t < n; ++t) {
    z[t] = std::exp(z[t] / tau - top);
    total += z[t];
  }
  for (int64_t t = 0; t < n; ++t) z[t] /= total;
}

// Gradient of the logits given the softmax s and the gradient ds of its output (both length n), for logits / tau.
template <typename T>
inline void softmax_backward(const T* s, const T* ds, T* dz, int64_t n, T tau) {
  T dot = 0;
  for (int64_t t = 0; t < n; ++t) dot += s[t] * ds[t];
  for (int64_t t = 0; t < n; ++t) dz[t] = s[t] * (ds[t] - dot) / tau;
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
