// Counter-based dropout randomness shared by the CPU (csrc/cpu) and CUDA (csrc/cuda) kernels.
//
// uniform(seed, offset) is bit-for-bit the value Triton's tl.rand(seed, offset) returns for an int64 offset:
// Philox-4x32-10 with key (seed_lo, seed_hi) and counter (offset_lo, offset_hi, 0, 0); the first output word,
// read as int32, is folded onto [0, 2^31) (x < 0 -> ~x) and scaled by 4.6566127342e-10 in fp32. So the three
// fused backends (triton, cpp, cuda) draw the identical dropout mask for the same seed, and backward redraws
// it from (seed, offset) instead of storing it. A map element (b, i, j) of a (B, Mq, N) map has
// offset = (b * Mq + i) * N + j, and is kept when uniform(seed, offset) >= p.
//
// Torch-independent, header-only. Under nvcc every function is __host__ __device__.
#pragma once

#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define AVK_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define AVK_HOST_DEVICE inline
#endif

namespace avk {
namespace philox {

constexpr uint32_t kKeyA = 0x9E3779B9u;    // key schedule increments (golden ratio, sqrt(3) - 1)
constexpr uint32_t kKeyB = 0xBB67AE85u;
constexpr uint32_t kRoundA = 0xD2511F53u;  // round multipliers of Philox-4x32
constexpr uint32_t kRoundB = 0xCD9E8D57u;
constexpr int kRounds = 10;
// Largest float with (2^31 - 1) * scale < 1 after fp32 rounding: maps [0, 2^31) into [0, 1).
constexpr float kUint31ToUnit = 4.6566127342e-10f;

struct Counter {
  uint32_t c0, c1, c2, c3;
};

AVK_HOST_DEVICE uint32_t mulhi(uint32_t a, uint32_t b) {
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
}

// Philox-4x32 with `kRounds` rounds: the four output words for counter c under key (k0, k1).
AVK_HOST_DEVICE Counter philox4x32(Counter c, uint32_t k0, uint32_t k1) {
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int round = 0; round < kRounds; ++round) {
    const uint32_t c0 = c.c0, c2 = c.c2;
    c.c0 = mulhi(kRoundB, c2) ^ c.c1 ^ k0;
    c.c2 = mulhi(kRoundA, c0) ^ c.c3 ^ k1;
    c.c1 = kRoundB * c2;
    c.c3 = kRoundA * c0;
    k0 += kKeyA;
    k1 += kKeyB;
  }
  return c;
}

// The uniform fp32 in [0, 1) that tl.rand derives from one random word.
AVK_HOST_DEVICE float word_to_unit(uint32_t word) {
  const int32_t x = static_cast<int32_t>(word);
  return static_cast<float>(x < 0 ? ~x : x) * kUint31ToUnit;
}

// uniform(seed, offset): see the top of this file. seed is in [0, 2^31) by the ops' contract.
AVK_HOST_DEVICE float uniform(uint64_t seed, uint64_t offset) {
  const Counter c = philox4x32(
      Counter{static_cast<uint32_t>(offset), static_cast<uint32_t>(offset >> 32), 0u, 0u},
      static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
  return word_to_unit(c.c0);
}

// Whether map element `offset` survives dropout with probability p of being dropped.
AVK_HOST_DEVICE bool keep(uint64_t seed, uint64_t offset, float p) { return uniform(seed, offset) >= p; }

}  // namespace philox
}  // namespace avk
