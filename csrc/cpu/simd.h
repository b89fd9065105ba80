// Portable SIMD for the CPU kernels: GCC/Clang vector extensions plus per-ISA function clones.
//
// Why not at::vec: in an extension, at::vec::Vectorized only uses AVX2/AVX-512 when the whole translation unit is
// compiled for that ISA (ATen builds each kernel file several times and dispatches at run time; an extension gets
// one build). Here the hot loops are written once on 64-byte generic vectors (`Vec<T>`: 16 floats or 8 doubles)
// and the functions running them carry AVK_CLONES: the compiler emits an AVX-512, an AVX2+FMA and a baseline
// x86-64 copy and picks one when the library loads (ifunc). The binary runs on any x86-64 CPU and uses the widest
// unit the machine has; on other architectures AVK_CLONES is empty and the vectors map to the native SIMD width.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if (defined(__GNUC__) || defined(__clang__)) && defined(__x86_64__) && defined(__linux__)
#define AVK_X86_DISPATCH 1
#define AVK_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define AVK_X86_DISPATCH 0
#define AVK_CLONES
#endif
// Helpers are force-inlined so that each ISA clone of a kernel inlines its own copy compiled for that ISA.
#define AVK_INLINE inline __attribute__((always_inline))

// Passing 64-byte vectors between inlined helpers triggers GCC's notes about an ABI that never applies here.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

namespace avk {
namespace cpu {

constexpr int kVecBytes = 64;

template <typename T>
struct VecTraits;
template <>
struct VecTraits<float> {
  typedef float vec __attribute__((vector_size(kVecBytes)));
  typedef int32_t ivec __attribute__((vector_size(kVecBytes)));
};
template <>
struct VecTraits<double> {
  typedef double vec __attribute__((vector_size(kVecBytes)));
  typedef int64_t ivec __attribute__((vector_size(kVecBytes)));
};

template <typename T>
using Vec = typename VecTraits<T>::vec;
template <typename T>
constexpr int kLanes = kVecBytes / sizeof(T);

template <typename T>
AVK_INLINE Vec<T> load(const T* p) {
  Vec<T> v;
  std::memcpy(&v, p, sizeof(v));  // unaligned load; compiles to one vector move
  return v;
}

template <typename T>
AVK_INLINE void store(T* p, Vec<T> v) {
  std::memcpy(p, &v, sizeof(v));
}

template <typename T>
AVK_INLINE Vec<T> splat(T x) {
  return Vec<T>{} + x;
}

inline int64_t round_up(int64_t x, int64_t multiple) { return (x + multiple - 1) / multiple * multiple; }

// tanh of every lane, for fp32 to ~2 ulp (tested against torch.tanh in fp64), NaN propagating, +-inf -> +-1.
//
// Why not std::tanh or Sleef: this is the inner loop of every fused kernel (one tanh per element of the attention
// map) and must vectorise in every ISA clone. Two branch-free pieces, blended by |x|:
//   |x| < 0.625: tanh(x) = x + x^3 P(x^2), P a degree-4 minimax fit of (tanh(x) - x) / x^3 (relative error 4e-9);
//   otherwise:   tanh(|x|) = 1 - 2 / (exp(2|x|) + 1) (no cancellation there: the result is >= 0.55), with exp by
//                Cody-Waite reduction to [-ln2/2, ln2/2], a degree-6 fit and an exponent-field shift.
// |x| is clamped at 9, where tanh rounds to 1 in fp32, so exp cannot overflow.
AVK_INLINE Vec<float> tanh_vec(Vec<float> x) {
  using V = Vec<float>;
  using VI = VecTraits<float>::ivec;
  const VI sign = (VI)x & (int32_t)0x80000000;
  V a = (V)((VI)x & (int32_t)0x7fffffff);
  a = a > 9.0f ? splat(9.0f) : a;  // NaN compares false and stays NaN

  const V z = a * a;
  V p = splat(-5.704991801e-03f);
  p = p * z + 2.063909176e-02f;
  p = p * z - 5.373971647e-02f;
  p = p * z + 1.333144221e-01f;
  p = p * z - 3.333328194e-01f;
  const V small = a + a * z * p;

  const V y = a + a;
  const V shifter = splat(12582912.0f);  // 1.5 * 2^23: adding it rounds to the nearest integer
  const V n = (y * 1.44269504089f + shifter) - shifter;
  const V r = (y - n * 0.693145751953125f) - n * 1.42860682030941723e-6f;  // ln 2 split in two for exactness
  V e = splat(1.381461113e-03f);
  e = e * r + 8.368710183e-03f;
  e = e * r + 4.166838742e-02f;
  e = e * r + 1.666652069e-01f;
  e = e * r + 4.999999345e-01f;
  e = e * r + 1.0f;
  e = e * r + 1.0f;
  e = (V)((VI)e + (__builtin_convertvector(n, VI) << 23));  // e * 2^n, n in [0, 26]
  const V large = 1.0f - 2.0f / (e + 1.0f);

  const V result = a < 0.625f ? small : large;
  return (V)((VI)result | sign);
}

// fp64 is the verification dtype (gradcheck), not a speed path: the accurate libm tanh per lane.
AVK_INLINE Vec<double> tanh_vec(Vec<double> x) {
  for (int l = 0; l < kLanes<double>; ++l) x[l] = std::tanh(x[l]);
  return x;
}

}  // namespace cpu
}  // namespace avk
