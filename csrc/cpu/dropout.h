// Dropout keep flags for the CPU kernels, from the Philox stream of csrc/common/philox.h (dropout.cpp).
#pragma once

#include <cstdint>

namespace avk {
namespace cpu {

constexpr int64_t kKeysPerCall = 4;  // map elements per Philox call (one per output word)

// keep[4 c + w] = 1 if word w of Philox call (counter + c) gives a uniform >= p, else 0, for c < calls: the flags of
// the 4 * calls map elements starting at the first element of call `counter`. The fastest version this CPU runs
// (AVX-512, AVX2 or portable), chosen once when the library loads; every version draws the same flags.
using KeepFlagsFn = void (*)(uint64_t seed, uint64_t counter, int64_t calls, float p, float* keep);
extern const KeepFlagsFn keep_flags;

}  // namespace cpu
}  // namespace avk
