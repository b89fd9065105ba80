// The one way the CPU kernels split work over threads: at::parallel_for, with subnormals flushed (simd.h,
// FlushSubnormals) on every thread that runs a piece, since the floating-point mode is per thread.
#pragma once

#include <ATen/Parallel.h>

#include <cstdint>

#include "simd.h"

namespace avk {
namespace cpu {

// f(begin, end) over pieces of [begin, end) of at least `grain` items, on torch's intra-op threads.
template <typename F>
void parallel_for(int64_t begin, int64_t end, int64_t grain, const F& f) {
  at::parallel_for(begin, end, grain, [&](int64_t piece_begin, int64_t piece_end) {
    FlushSubnormals flush;
    f(piece_begin, piece_end);
  });
}

}  // namespace cpu
}  // namespace avk
