// Counter-based dropout randomness shared by the CPU (csrc/cpu) and CUDA (csrc/cuda) kernels, and reproduced by the
// Triton kernels (avkernels/ops/triton/tanh_attention.py) with tl.randint4x.
//
// One Philox-4x32-10 call gives four random words, and each is used: the element (b, i, j) of a (B, Mq, N) map lies
// in map row r = b * Mq + i, and takes word j % 4 of the call with counter
//     counter(r, j) = r * ceil(N / 4) + j / 4
// (each row starts a fresh counter, so a block of keys that starts at a multiple of 4 needs whole calls only).
// Philox runs with key (seed_lo, seed_hi) and counter words (counter_lo, counter_hi, 0, 0), which is Triton's
// tl.randint4x(seed, counter) for an int64 counter; a word is read as int32, folded onto [0, 2^31) (x < 0 -> ~x) and
// scaled by 4.6566127342e-10 in fp32 (Triton's uint_to_uniform_float). The element is kept when that uniform >= p.
// So the three fused backends draw the identical dropout mask for the same seed, and backward redraws it from the
// seed instead of storing it.
//
// Why four words per call: Philox is the most expensive part of a CPU training step; drawing one word per call (as
// tl.rand does) throws away three quarters of the work.
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

// The uniform fp32 in [0, 1) that Triton's uint_to_uniform_float derives from one random word.
AVK_HOST_DEVICE float word_to_unit(uint32_t word) {
  const int32_t x = static_cast<int32_t>(word);
  return static_cast<float>(x < 0 ? ~x : x) * kUint31ToUnit;
}

// The Philox calls one map row of `keys` elements uses: ceil(keys / 4).
AVK_HOST_DEVICE uint64_t calls_per_row(uint64_t keys) { return (keys + 3) / 4; }

// The four words of the call with this counter; seed is in [0, 2^31) by the ops' contract.
AVK_HOST_DEVICE Counter words(uint64_t seed, uint64_t counter) {
  return philox4x32(Counter{static_cast<uint32_t>(counter), static_cast<uint32_t>(counter >> 32), 0u, 0u},
                    static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
}

// uniform of map element (row, j) in a map with `keys` columns: see the top of this file.
AVK_HOST_DEVICE float uniform(uint64_t seed, uint64_t row, uint64_t j, uint64_t keys) {
  const Counter c = words(seed, row * calls_per_row(keys) + j / 4);
  const int word = static_cast<int>(j % 4);
  return word_to_unit(word == 0 ? c.c0 : word == 1 ? c.c1 : word == 2 ? c.c2 : c.c3);
}

// Whether map element (row, j) survives dropout with probability p of being dropped.
AVK_HOST_DEVICE bool keep(uint64_t seed, uint64_t row, uint64_t j, uint64_t keys, float p) {
  return uniform(seed, row, j, keys) >= p;
}

}  // namespace philox
}  // namespace avk
