// The dropout keep flags of the CPU kernels: the Philox stream of csrc/common/philox.h, drawn four map elements per
// call, in hand-vectorised AVX-512 and AVX2 versions picked once at load time (dropout.h), and the test helpers
// dropout_uniform / dropout_keep (ops.h) that expose the stream to the tests.
#include "dropout.h"

#include <algorithm>

#include "common/philox.h"
#include "ops.h"
#include "simd.h"

#if AVK_X86_DISPATCH
#include <immintrin.h>
// GCC 12 reports the `_mm512_undefined` placeholders inside its own AVX-512 intrinsics as maybe-uninitialized.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#endif

namespace avk {
namespace cpu {
namespace {

// ---------------------------------------------------------------------------------------------------------------
// Dropout keep flags from Philox (csrc/common/philox.h): call c gives the flags of the four elements 4c .. 4c + 3.
//
// Philox is the most expensive part of a training step on CPU (10 rounds of two 32x32->64 multiplies per call,
// drawn in forward and redrawn in backward), and compilers widen those multiplies to full 64x64 products when left
// to themselves. So it has hand-written AVX-512 and AVX2 versions (one vpmuludq per product, even and odd lanes),
// selected once at load time, and the portable scalar version of philox.h as the reference and fallback.
// ---------------------------------------------------------------------------------------------------------------

// keep[4 c + w] = 1 if word w of call (counter + c) gives a uniform >= p else 0, for c < calls.
void keep_flags_scalar(uint64_t seed, uint64_t counter, int64_t calls, float p, float* keep) {
  for (int64_t c = 0; c < calls; ++c) {
    const philox::Counter x = philox::words(seed, counter + c);
    const uint32_t word[kKeysPerCall] = {x.c0, x.c1, x.c2, x.c3};
    for (int w = 0; w < kKeysPerCall; ++w) keep[kKeysPerCall * c + w] = philox::word_to_unit(word[w]) >= p;
  }
}

#if AVK_X86_DISPATCH
// The AVX-512 / AVX2 Philox below runs 16 / 8 calls (counter + lane) at once. The low word of each 32x32->64
// product sits in the even dword of a 64-bit lane, so one multiply covers the even lanes and a second one the odd
// lanes (moved down by a dword shuffle); shuffles then route the hi and lo halves back into place. Shuffles run on a
// different port than the multiplies and shifts, which is why they replace shift + blend here.
//
// The counter's words 1-3 are the same in every lane (counter_hi, 0, 0), so the first round needs only the product
// A * c0, and the second only B * c2 plus a scalar product: two multiply pairs saved out of twenty.
//
// The four output words are compared with p lane by lane, giving four 16-bit (8-bit) masks, which pdep interleaves
// into the element order 4 * lane + word.

// hi and lo 32-bit halves of a * multiplier in every 32-bit lane (multiplier in the even dword of 64-bit lanes).
__attribute__((target("avx512f,bmi2"))) inline void mul_wide_avx512(__m512i a, __m512i multiplier, __m512i& hi,
                                                                    __m512i& lo) {
  const __m512i even = _mm512_mul_epu32(a, multiplier);
  const __m512i odd = _mm512_mul_epu32(_mm512_shuffle_epi32(a, _MM_PERM_DDBB), multiplier);
  hi = _mm512_mask_shuffle_epi32(odd, 0x5555, even, _MM_PERM_DDBB);  // even lanes <- even products' high dwords
  lo = _mm512_mask_shuffle_epi32(even, 0xAAAA, odd, _MM_PERM_CCAA);  // odd lanes <- odd products' low dwords
}

// Lanes whose word gives a uniform >= p (the fold x < 0 -> ~x and the fp32 scaling of philox::word_to_unit).
__attribute__((target("avx512f,bmi2"))) inline __mmask16 keeps_avx512(__m512i word, __m512 threshold) {
  const __m512i folded = _mm512_xor_si512(word, _mm512_srai_epi32(word, 31));
  const __m512 u = _mm512_mul_ps(_mm512_cvtepi32_ps(folded), _mm512_set1_ps(philox::kUint31ToUnit));
  return _mm512_cmp_ps_mask(u, threshold, _CMP_GE_OQ);
}

__attribute__((target("avx512f,bmi2"))) void keep_flags_avx512(uint64_t seed, uint64_t counter, int64_t calls,
                                                               float p, float* keep) {
  constexpr int kCalls = 16;
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i round_a = _mm512_set1_epi64(philox::kRoundA), round_b = _mm512_set1_epi64(philox::kRoundB);
  const __m512 threshold = _mm512_set1_ps(p), ones = _mm512_set1_ps(1.0f);
  for (int64_t c = 0; c < calls; c += kCalls) {
    const uint64_t first = counter + c;
    float tail[kCalls * kKeysPerCall];
    float* out = calls - c >= kCalls ? keep + kKeysPerCall * c : tail;  // a partial chunk goes through `tail`
    if (static_cast<uint32_t>(first) > 0xFFFFFFFFu - (kCalls - 1)) {  // the counter's low word wraps in this chunk
      keep_flags_scalar(seed, first, kCalls, p, out);
    } else {
      uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
      const __m512i lo_word = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(first)), lane);
      // Round 1 on (counter_lo, counter_hi, 0, 0): c0 = counter_hi ^ k0 and c1 = 0 are lane-uniform.
      __m512i c0, c1, c2, c3;
      mul_wide_avx512(lo_word, round_a, c2, c3);
      c2 = _mm512_xor_si512(c2, _mm512_set1_epi32(static_cast<int>(k1)));
      const uint32_t c0_uniform = static_cast<uint32_t>(first >> 32) ^ k0;
      k0 += philox::kKeyA;
      k1 += philox::kKeyB;
      // Round 2: the product of the uniform c0 is a scalar.
      mul_wide_avx512(c2, round_b, c0, c1);
      c0 = _mm512_xor_si512(c0, _mm512_set1_epi32(static_cast<int>(k0)));
      c2 = _mm512_xor_si512(c3,
                            _mm512_set1_epi32(static_cast<int>(philox::mulhi(philox::kRoundA, c0_uniform) ^ k1)));
      c3 = _mm512_set1_epi32(static_cast<int>(philox::kRoundA * c0_uniform));
      for (int round = 2; round < philox::kRounds; ++round) {
        k0 += philox::kKeyA;
        k1 += philox::kKeyB;
        __m512i hi_b, lo_b, hi_a, lo_a;
        mul_wide_avx512(c2, round_b, hi_b, lo_b);
        mul_wide_avx512(c0, round_a, hi_a, lo_a);
        c0 = _mm512_ternarylogic_epi32(hi_b, c1, _mm512_set1_epi32(static_cast<int>(k0)), 0x96);  // three-way xor
        c2 = _mm512_ternarylogic_epi32(hi_a, c3, _mm512_set1_epi32(static_cast<int>(k1)), 0x96);
        c1 = lo_b;
        c3 = lo_a;
      }
      // Bit 4 * lane + w of `bits` is word w of call `lane`: element order.
      const uint64_t bits = _pdep_u64(keeps_avx512(c0, threshold), 0x1111111111111111ull) |
                            _pdep_u64(keeps_avx512(c1, threshold), 0x2222222222222222ull) |
                            _pdep_u64(keeps_avx512(c2, threshold), 0x4444444444444444ull) |
                            _pdep_u64(keeps_avx512(c3, threshold), 0x8888888888888888ull);
      for (int q = 0; q < kKeysPerCall; ++q)
        _mm512_storeu_ps(out + 16 * q, _mm512_maskz_mov_ps(static_cast<__mmask16>(bits >> (16 * q)), ones));
    }
    if (out == tail) std::copy(tail, tail + kKeysPerCall * (calls - c), keep + kKeysPerCall * c);
  }
}

__attribute__((target("avx2,bmi2"))) inline void mul_wide_avx2(__m256i a, __m256i multiplier, __m256i& hi,
                                                               __m256i& lo) {
  const __m256i even = _mm256_mul_epu32(a, multiplier);
  const __m256i odd = _mm256_mul_epu32(_mm256_shuffle_epi32(a, 0xF5), multiplier);
  hi = _mm256_blend_epi32(_mm256_shuffle_epi32(even, 0xF5), odd, 0xAA);
  lo = _mm256_blend_epi32(even, _mm256_shuffle_epi32(odd, 0xA0), 0xAA);
}

__attribute__((target("avx2,bmi2"))) inline uint32_t keeps_avx2(__m256i word, __m256 threshold) {
  const __m256i folded = _mm256_xor_si256(word, _mm256_srai_epi32(word, 31));
  const __m256 u = _mm256_mul_ps(_mm256_cvtepi32_ps(folded), _mm256_set1_ps(philox::kUint31ToUnit));
  return static_cast<uint32_t>(_mm256_movemask_ps(_mm256_cmp_ps(u, threshold, _CMP_GE_OQ)));
}

__attribute__((target("avx2,bmi2"))) void keep_flags_avx2(uint64_t seed, uint64_t counter, int64_t calls,
                                                          float p, float* keep) {
  constexpr int kCalls = 8;
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i round_a = _mm256_set1_epi64x(philox::kRoundA), round_b = _mm256_set1_epi64x(philox::kRoundB);
  const __m256 threshold = _mm256_set1_ps(p), ones = _mm256_set1_ps(1.0f);
  const __m256i bit_of_lane = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
  for (int64_t c = 0; c < calls; c += kCalls) {
    const uint64_t first = counter + c;
    float tail[kCalls * kKeysPerCall];
    float* out = calls - c >= kCalls ? keep + kKeysPerCall * c : tail;
    if (static_cast<uint32_t>(first) > 0xFFFFFFFFu - (kCalls - 1)) {
      keep_flags_scalar(seed, first, kCalls, p, out);
    } else {
      __m256i c0 = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(first)), lane);
      __m256i c1 = _mm256_set1_epi32(static_cast<int>(first >> 32));
      __m256i c2 = _mm256_setzero_si256(), c3 = _mm256_setzero_si256();
      uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
      for (int round = 0; round < philox::kRounds; ++round) {
        __m256i hi_b, lo_b, hi_a, lo_a;
        mul_wide_avx2(c2, round_b, hi_b, lo_b);
        mul_wide_avx2(c0, round_a, hi_a, lo_a);
        c0 = _mm256_xor_si256(_mm256_xor_si256(hi_b, c1), _mm256_set1_epi32(static_cast<int>(k0)));
        c2 = _mm256_xor_si256(_mm256_xor_si256(hi_a, c3), _mm256_set1_epi32(static_cast<int>(k1)));
        c1 = lo_b;
        c3 = lo_a;
        k0 += philox::kKeyA;
        k1 += philox::kKeyB;
      }
      const uint32_t bits = _pdep_u32(keeps_avx2(c0, threshold), 0x11111111u) |
                            _pdep_u32(keeps_avx2(c1, threshold), 0x22222222u) |
                            _pdep_u32(keeps_avx2(c2, threshold), 0x44444444u) |
                            _pdep_u32(keeps_avx2(c3, threshold), 0x88888888u);
      for (int q = 0; q < kKeysPerCall; ++q) {
        const __m256i lanes = _mm256_and_si256(_mm256_set1_epi32(static_cast<int>(bits >> (8 * q))), bit_of_lane);
        const __m256 kept = _mm256_castsi256_ps(_mm256_cmpeq_epi32(lanes, bit_of_lane));
        _mm256_storeu_ps(out + 8 * q, _mm256_and_ps(kept, ones));
      }
    }
    if (out == tail) std::copy(tail, tail + kKeysPerCall * (calls - c), keep + kKeysPerCall * c);
  }
}
#endif

KeepFlagsFn select_keep_flags() {
#if AVK_X86_DISPATCH
  if (cpu_isa() == Isa::kAvx512) return keep_flags_avx512;
  if (cpu_isa() == Isa::kAvx2) return keep_flags_avx2;
#endif
  return keep_flags_scalar;
}

}  // namespace

const KeepFlagsFn keep_flags = select_keep_flags();

Tensor dropout_uniform(int64_t seed, int64_t first_row, int64_t rows, int64_t keys) {
  AVK_CHECK(seed >= 0 && seed < (int64_t(1) << 31), "dropout_uniform: seed must be in [0, 2**31), got ", seed);
  AVK_CHECK(first_row >= 0 && rows >= 0 && keys >= 0, "dropout_uniform: first_row, rows and keys must be >= 0, got ",
            first_row, ", ", rows, ", ", keys);
  Tensor u = empty_cpu({rows, keys}, ScalarType::Float);
  float* out = u.mutable_data_ptr<float>();
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t j = 0; j < keys; ++j)
      out[r * keys + j] = philox::uniform(static_cast<uint64_t>(seed), static_cast<uint64_t>(first_row + r),
                                          static_cast<uint64_t>(j), static_cast<uint64_t>(keys));
  return u;
}

Tensor dropout_keep(int64_t seed, int64_t first_row, int64_t rows, int64_t keys, double dropout_p) {
  AVK_CHECK(seed >= 0 && seed < (int64_t(1) << 31), "dropout_keep: seed must be in [0, 2**31), got ", seed);
  AVK_CHECK(first_row >= 0 && rows >= 0 && keys >= 0, "dropout_keep: first_row, rows and keys must be >= 0, got ",
            first_row, ", ", rows, ", ", keys);
  Tensor kept = empty_cpu({rows, keys}, ScalarType::Bool);
  bool* out = kept.mutable_data_ptr<bool>();
  const uint64_t calls_per_row = philox::calls_per_row(keys);
  constexpr int64_t kBlock = 64;  // the fp32 kernels' key block
  float flags[kBlock];
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t j0 = 0; j0 < keys; j0 += kBlock) {
      const int64_t n = std::min(kBlock, keys - j0);
      keep_flags(static_cast<uint64_t>(seed), (first_row + r) * calls_per_row + j0 / kKeysPerCall,
                 (n + kKeysPerCall - 1) / kKeysPerCall, static_cast<float>(dropout_p), flags);
      for (int64_t j = 0; j < n; ++j) out[r * keys + j0 + j] = flags[j] != 0.0f;
    }
  }
  return kept;
}

}  // namespace cpu
}  // namespace avk
