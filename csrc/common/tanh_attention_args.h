// The scalar arguments of tanh_attention (SPEC 1) as every compiled kernel takes them, after the front end
// (csrc/common/front_end.h) has checked them. Torch-independent: the CUDA sources include it too.
#pragma once

#include <cstdint>

namespace avk {

// The map applied to scale * q k^T (+ map_bias): the op's "map" argument, named kMapNames[map].
enum class AttentionMap : int { kTanh = 0, kSigmoid = 1 };
constexpr const char* kMapNames[] = {"tanh", "sigmoid"};
constexpr int kNumMaps = sizeof(kMapNames) / sizeof(kMapNames[0]);

struct TanhAttentionArgs {
  int64_t seed;       // Philox key in [0, 2^31); meaningless without dropout
  double scale;       // finite
  double dropout_p;   // in [0, 1); 0 disables dropout
  bool tanh_relu;     // the ReLU(tanh(o)) epilogue
  AttentionMap map;
  double map_bias;    // finite; 0 unless map is kSigmoid
};

}  // namespace avk
