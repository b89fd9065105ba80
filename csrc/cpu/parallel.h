// The one way the CPU kernels split work over threads: torch's parallel_for (common/tensor_api.h), with subnormals
// flushed (simd.h, FlushSubnormals) on every thread that runs a piece, since the floating-point mode is per thread.
#pragma once

#include <cstdint>

#include "common/tensor_api.h"
#include "simd.h"

namespace avk {
namespace cpu {

// f(begin, end) over pieces of [begin, end) of at least `grain` items, on torch's intra-op threads.
template <typename F>
void parallel_for(int64_t begin, int64_t end, int64_t grain, const F& f) {
  avk::parallel_for(begin, end, grain, [&](int64_t piece_begin, int64_t piece_end) {
    FlushSubnormals flush;
    f(piece_begin, piece_end);
  });
}

}  // namespace cpu
}  // namespace avk
