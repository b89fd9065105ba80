// Device helpers shared by the CUDA kernels of avkernels (csrc/cuda/*.cu): accumulator types, dtype conversion,
// the tanh and sigmoid used inside the attention map, warp reductions, and the tiled-loop building blocks.
//
// Torch-independent: kernels see plain pointers, int64 sizes and int64 element strides. Every storage dtype
// (float, double, __half, __nv_bfloat16) is read into an accumulator type (double for double, float otherwise)
// and only the final result is rounded back, so half-precision inputs get fp32 arithmetic throughout.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

namespace avk {
namespace cuda {

template <typename T>
struct AccumulatorOf {
  using type = float;
};
template <>
struct AccumulatorOf<double> {
  using type = double;
};
template <typename T>
using acc_t = typename AccumulatorOf<T>::type;

template <typename T>
constexpr bool is_half_precision_v = std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16>;

template <typename T>
__device__ __forceinline__ acc_t<T> to_acc(T x) {
  if constexpr (std::is_same_v<T, __half>) {
    return __half2float(x);
  } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return __bfloat162float(x);
  } else {
    return x;
  }
}

template <typename T>
__device__ __forceinline__ T from_acc(acc_t<T> x) {
  if constexpr (std::is_same_v<T, __half>) {
    return __float2half_rn(x);
  } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return __float2bfloat16_rn(x);
  } else {
    return x;
  }
}

// tanh for storage dtype T, computed in acc_t<T>. fp32 and fp64 use the accurate libdevice tanh (the map is the
// op's result, and tests hold these paths to fp32/fp64 accuracy). fp16/bf16 use the single special-function
// instruction tanh.approx.f32 (relative error below 2^-10.9, under one fp16 ulp and an eighth of a bf16 ulp):
// tanh is the throughput limit of the fused map (one per map element against 2 * (D + E) FMAs), and the
// approximation is smaller than the rounding the inputs already carry.
template <typename T>
__device__ __forceinline__ acc_t<T> map_tanh(acc_t<T> x) {
  if constexpr (is_half_precision_v<T>) {
#if defined(__CUDA_ARCH__)
    float y;
    asm("tanh.approx.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
#else  // host compilation passes (and the CPU emulation in tests/test_cuda_compile.py)
    return tanhf(x);
#endif
  } else if constexpr (std::is_same_v<acc_t<T>, float>) {
    return tanhf(x);
  } else {
    return ::tanh(x);
  }
}

// sigmoid for storage dtype T, computed in acc_t<T>, with the same split as map_tanh: 1 / (1 + exp(-x)) in fp32
// and fp64 (exp(-x) overflows to inf for very negative x, giving the right limit 0), and for fp16/bf16
// (1 + tanh(x / 2)) / 2 with the special-function tanh.
template <typename T>
__device__ __forceinline__ acc_t<T> map_sigmoid(acc_t<T> x) {
  using Acc = acc_t<T>;
  if constexpr (is_half_precision_v<T>) {
    return 0.5f + 0.5f * map_tanh<T>(0.5f * x);
  } else if constexpr (std::is_same_v<Acc, float>) {
    return 1.0f / (1.0f + expf(-x));
  } else {
    return 1.0 / (1.0 + ::exp(-x));
  }
}

template <typename Acc>
__device__ __forceinline__ Acc exp_acc(Acc x) {
  if constexpr (std::is_same_v<Acc, float>) {
    return expf(x);
  } else {
    return ::exp(x);
  }
}

template <typename Acc>
__device__ __forceinline__ Acc warp_sum(Acc x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}

__host__ __device__ constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// CUDA grid limits (x: 2^31 - 1, y and z: 65535); launchers check them instead of launching a truncated grid.
constexpr int64_t kMaxGridX = 2147483647;
constexpr int64_t kMaxGridYZ = 65535;

}  // namespace cuda
}  // namespace avk
