// The maps of tanh_attention (SPEC 1) on CPU vectors: P = map(scale * S + bias) on a tile of S = q k^T, and the
// map's derivative written in terms of its value. Each map is one struct here; the kernel bodies of
// tanh_attention.cpp take it as a template parameter, so the matrix-product loops exist once for every map.
#pragma once

#include <cstdint>

#include "common/tanh_attention_args.h"  // AttentionMap: which struct a call uses
#include "simd.h"

namespace avk {
namespace cpu {

// tanh(scale * s); the bias is 0 (the ops refuse any other for this map), so it is not even added.
template <typename T, int VB>
struct TanhMap {
  using V = Vec<T, VB>;
  T scale;

  TanhMap(T scale, T /*bias*/) : scale(scale) {}

  AVK_INLINE V operator()(V s) const { return tanh_vec<VB>(s * scale); }

  // d map(x) / dx at the x whose map value is y.
  AVK_INLINE static V slope(V y) { return T(1) - y * y; }
};

// sigmoid(scale * s + bias), as (1 + tanh(x / 2)) / 2: the fast tanh of simd.h serves both maps, at an absolute
// error of about one ulp of 1 (the relative error of tiny map values is larger, as it is for 1 - tanh near 1; the
// kernels only ever add map values times v, where absolute error is what counts). The halving is folded into the
// scale and bias (exact: a multiplication by 1/2).
template <typename T, int VB>
struct SigmoidMap {
  using V = Vec<T, VB>;
  T half_scale, half_bias;

  SigmoidMap(T scale, T bias) : half_scale(scale * T(0.5)), half_bias(bias * T(0.5)) {}

  AVK_INLINE V operator()(V s) const { return T(0.5) + T(0.5) * tanh_vec<VB>(s * half_scale + half_bias); }

  AVK_INLINE static V slope(V y) { return y * (T(1) - y); }
};

}  // namespace cpu
}  // namespace avk
