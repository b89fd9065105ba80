// 16-bit storage, fp32 arithmetic: the conversions between a tensor's storage type S and the type T the kernels
// compute in (compute_t<S>: float for bfloat16, float16 and float32, double for float64).
//
// Why convert at the edges instead of computing in 16 bits: these CPUs have no bf16/fp16 arithmetic (AVX2 + F16C
// only; torch's own bf16 matmul runs at 3-21 GFLOP/s here against 130-180 in fp32), and sums over hundreds of keys
// in 16 bits would lose most of their digits. The kernels already copy every input into packed tiles or row
// buffers, so widening there is nearly free, and each output is rounded once, on its final store.
//
// Rounding: round to nearest, ties to even, both ways exact where representable. bf16 NaN stays NaN (quiet, as
// BFloat16 makes it: 0x7FC0). fp16 goes through F16C (vcvtph2ps / vcvtps2ph) when the running ISA variant is
// AVX2 or wider, else through Half; both round the same way, so every ISA variant stores the same bits.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "common/tensor_api.h"
#include "simd.h"

#if AVK_X86_DISPATCH
#include <immintrin.h>
#endif

namespace avk {
namespace cpu {

// The type every tile and sum of an S problem is computed in: fp32 for the 16-bit storage types, S otherwise.
template <typename S>
using compute_t = std::conditional_t<std::is_same_v<S, BFloat16> || std::is_same_v<S, Half>, float, S>;

// The dtype of the kernels' intermediate buffers (weight-gradient partials) for inputs of dtype s.
inline ScalarType compute_dtype(ScalarType s) {
  return s == ScalarType::BFloat16 || s == ScalarType::Half ? ScalarType::Float : s;
}

// bf16 is the top half of an fp32: widening is a shift, written on the bits so that the loops vectorise in every
// ISA variant (BFloat16's operator float goes through memcpy per element, which GCC leaves scalar).
inline float bits_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}
inline uint32_t float_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
}
inline float bf16_bits_to_float(uint16_t bits) { return bits_float(static_cast<uint32_t>(bits) << 16); }

// Round to nearest even on the bits; NaN -> 0x7FC0 like BFloat16 (a NaN whose payload sits in the low half
// would otherwise round to infinity).
inline uint16_t float_to_bf16_bits(float f) {
  const uint32_t u = float_bits(f);
  const uint16_t rounded = static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
  return (u & 0x7FFFFFFFu) > 0x7F800000u ? static_cast<uint16_t>(0x7FC0) : rounded;
}

#if AVK_X86_DISPATCH
// The bf16 loops once more, compiled for AVX2: the gates are built for baseline x86-64 only, where these loops get
// 16-byte vectors and made the gate forward ~1.7x slower than fp32 (measured at 64x64x512); 32-byte vectors here.
AVK_TARGET_AVX2 inline void widen_bf16_avx2(float* dst, const uint16_t* src, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = bf16_bits_to_float(src[i]);
}

AVK_TARGET_AVX2 inline void narrow_bf16_avx2(uint16_t* dst, const float* src, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = float_to_bf16_bits(src[i]);
}

__attribute__((target("avx2,f16c"))) inline void widen_half_f16c(float* dst, const uint16_t* src, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
  for (; i < n; ++i) dst[i] = _cvtsh_ss(src[i]);
}

__attribute__((target("avx2,f16c"))) inline void narrow_half_f16c(uint16_t* dst, const float* src, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i),
                     _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  for (; i < n; ++i) dst[i] = _cvtss_sh(src[i], _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}
#endif

// Whether the running ISA variant converts with AVX2 (and F16C, which x86-64-v3 includes).
inline bool use_avx2_conversions() {
#if AVK_X86_DISPATCH
  return cpu_isa() != Isa::kBaseline;
#else
  return false;
#endif
}

// dst[i] = src[i * stride] for i < n, widened to T.
template <typename S, typename T>
inline void widen_row(T* dst, const S* src, int64_t stride, int64_t n) {
  if constexpr (std::is_same_v<S, T>) {
    if (stride == 1) {
      std::copy(src, src + n, dst);
    } else {
      for (int64_t i = 0; i < n; ++i) dst[i] = src[i * stride];
    }
  } else if constexpr (std::is_same_v<S, BFloat16>) {
    static_assert(std::is_same_v<T, float>, "bfloat16 widens to float");
    const uint16_t* bits = reinterpret_cast<const uint16_t*>(src);
#if AVK_X86_DISPATCH
    if (stride == 1 && use_avx2_conversions()) {
      widen_bf16_avx2(dst, bits, n);
      return;
    }
#endif
    if (stride == 1) {
      for (int64_t i = 0; i < n; ++i) dst[i] = bf16_bits_to_float(bits[i]);
    } else {
      for (int64_t i = 0; i < n; ++i) dst[i] = bf16_bits_to_float(bits[i * stride]);
    }
  } else {
    static_assert(std::is_same_v<S, Half> && std::is_same_v<T, float>, "float16 widens to float");
#if AVK_X86_DISPATCH
    if (stride == 1 && use_avx2_conversions()) {
      widen_half_f16c(dst, reinterpret_cast<const uint16_t*>(src), n);
      return;
    }
#endif
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i * stride]);
  }
}

// dst[i] = src[i] for i < n, rounded to S (contiguous: every output the kernels write is).
template <typename S, typename T>
inline void narrow_row(S* dst, const T* src, int64_t n) {
  if constexpr (std::is_same_v<S, T>) {
    std::copy(src, src + n, dst);
  } else if constexpr (std::is_same_v<S, BFloat16>) {
    static_assert(std::is_same_v<T, float>, "bfloat16 narrows from float");
    uint16_t* bits = reinterpret_cast<uint16_t*>(dst);
#if AVK_X86_DISPATCH
    if (use_avx2_conversions()) {
      narrow_bf16_avx2(bits, src, n);
      return;
    }
#endif
    for (int64_t i = 0; i < n; ++i) bits[i] = float_to_bf16_bits(src[i]);
  } else {
    static_assert(std::is_same_v<S, Half> && std::is_same_v<T, float>, "float16 narrows from float");
#if AVK_X86_DISPATCH
    if (use_avx2_conversions()) {
      narrow_half_f16c(reinterpret_cast<uint16_t*>(dst), src, n);
      return;
    }
#endif
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<Half>(src[i]);
  }
}

// One value of S as T (for the few scalars read outside the row loops: gate probabilities, saved outputs).
template <typename T, typename S>
inline T widen(S x) {
  if constexpr (std::is_same_v<S, BFloat16>)
    return bf16_bits_to_float(x.x);
  else
    return static_cast<T>(x);
}

// A row of a (B, L, d) input as T: the row itself when S is T (no copy), else widened into `scratch` (which must
// hold d values). The returned stride is the row's feature stride, or 1 for a widened row.
template <typename S, typename T>
struct RowAs {
  const T* data;
  int64_t stride;
};
template <typename T, typename S>
inline RowAs<S, T> row_as(const S* row, int64_t stride, int64_t d, T* scratch) {
  if constexpr (std::is_same_v<S, T>) {
    (void)d;
    (void)scratch;
    return {row, stride};
  } else {
    widen_row(scratch, row, stride, d);
    return {scratch, 1};
  }
}

// Where a kernel writes an output row of S in T: the row itself when S is T, else `scratch`, which commit() rounds
// into the row.
template <typename S, typename T>
struct RowOut {
  S* dst;
  T* data;
  int64_t d;
  RowOut(S* row, int64_t n, T* scratch) : dst(row), d(n) {
    if constexpr (std::is_same_v<S, T>) {
      (void)scratch;
      data = row;
    } else {
      data = scratch;
    }
  }
  void commit() const {
    if constexpr (!std::is_same_v<S, T>) narrow_row(dst, data, d);
  }
};

}  // namespace cpu
}  // namespace avk
