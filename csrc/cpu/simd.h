// Portable SIMD for the CPU kernels: GCC/Clang vector extensions, compiled once per ISA and dispatched at run time.
//
// Why not at::vec: in an extension, at::vec::Vectorized only uses AVX2/AVX-512 when the whole translation unit is
// compiled for that ISA (ATen builds each kernel file several times and dispatches at run time; an extension gets
// one build). Here the hot loops are written once on 64-byte generic vectors (`Vec<T>`: 16 floats or 8 doubles) in
// force-inlined functions, and each kernel has three thin entry points compiled for x86-64-v4 (AVX-512),
// x86-64-v3 (AVX2 + FMA) and baseline x86-64; `cpu_isa()` picks one. So the binary runs on any x86-64 CPU and uses
// the widest unit the machine has, and the environment variable AVKERNELS_CPU_ISA=baseline|avx2|avx512 lowers the
// choice, which is how the tests run every variant on one machine. Elsewhere only the baseline entry exists.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "tanh_table.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <xmmintrin.h>  // _mm_getcsr / _mm_setcsr
#endif

#if (defined(__GNUC__) || defined(__clang__)) && defined(__x86_64__)
#define AVK_X86_DISPATCH 1
#define AVK_TARGET_AVX512 __attribute__((target("arch=x86-64-v4")))
#define AVK_TARGET_AVX2 __attribute__((target("arch=x86-64-v3")))
#else
#define AVK_X86_DISPATCH 0
#endif
#if AVK_X86_DISPATCH
#include <immintrin.h>  // declares the __builtin_ia32_* used below (the ATen headers used to include it for us)
#endif
// Kernel bodies are force-inlined into each ISA entry point, which compiles its own copy for that ISA.
#define AVK_INLINE inline __attribute__((always_inline))

// Passing 64-byte vectors between inlined helpers triggers GCC's notes about an ABI that never applies here.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

namespace avk {
namespace cpu {

// Widest vector (AVX-512); packed tiles pad their rows to this many bytes so that every ISA variant reads whole
// vectors of its own width.
constexpr int kMaxVecBytes = 64;

enum class Isa { kBaseline = 0, kAvx2 = 1, kAvx512 = 2 };

// The widest ISA variant this CPU runs, lowered by AVKERNELS_CPU_ISA=baseline|avx2|avx512 if set (never raised).
inline Isa cpu_isa() {
  static const Isa isa = [] {
    Isa best = Isa::kBaseline;
#if AVK_X86_DISPATCH
    __builtin_cpu_init();
    if (__builtin_cpu_supports("x86-64-v4"))
      best = Isa::kAvx512;
    else if (__builtin_cpu_supports("x86-64-v3"))
      best = Isa::kAvx2;
#endif
    const char* wanted = std::getenv("AVKERNELS_CPU_ISA");
    Isa cap = best;
    if (wanted != nullptr && std::strcmp(wanted, "baseline") == 0) cap = Isa::kBaseline;
    if (wanted != nullptr && std::strcmp(wanted, "avx2") == 0) cap = Isa::kAvx2;
    return cap < best ? cap : best;
  }();
  return isa;
}

// Calls name_<isa><T>(args...) for the ISA of cpu_isa(): every kernel defines its _avx512, _avx2 and _baseline
// entry points around one force-inlined body.
#if AVK_X86_DISPATCH
#define AVK_DISPATCH_ISA(name, T, ...)                                                   \
  (::avk::cpu::cpu_isa() == ::avk::cpu::Isa::kAvx512 ? name##_avx512<T>(__VA_ARGS__)     \
   : ::avk::cpu::cpu_isa() == ::avk::cpu::Isa::kAvx2 ? name##_avx2<T>(__VA_ARGS__)       \
                                                     : name##_baseline<T>(__VA_ARGS__))
#else
#define AVK_DISPATCH_ISA(name, T, ...) name##_baseline<T>(__VA_ARGS__)
#endif

// Vec<T, VB>: VB bytes of T (VB = 64, 32, 16 for the AVX-512, AVX2 and baseline variants).
template <typename T, int VB>
struct VecTraits {
  typedef T vec __attribute__((vector_size(VB)));
};
template <typename T, int VB>
using Vec = typename VecTraits<T, VB>::vec;
template <int VB>
using IntVec = Vec<int32_t, VB>;  // same lanes as Vec<float, VB>

template <typename T, int VB>
constexpr int kLanes = VB / static_cast<int>(sizeof(T));

template <typename T, int VB>
AVK_INLINE Vec<T, VB> load(const T* p) {
  Vec<T, VB> v;
  std::memcpy(&v, p, sizeof(v));  // unaligned load; compiles to one vector move
  return v;
}

template <typename T, int VB>
AVK_INLINE void store(T* p, Vec<T, VB> v) {
  std::memcpy(p, &v, sizeof(v));
}

template <typename T, int VB>
AVK_INLINE Vec<T, VB> splat(T x) {
  return Vec<T, VB>{} + x;
}

// While alive, the calling thread flushes subnormal results to zero and reads subnormal inputs as zero (x86 MXCSR
// FTZ and DAZ bits); the previous mode is restored after. No-op on other architectures.
//
// Why: a saturated gate (softmax of logits / 0.1) gives probabilities near 1e-30, and the gradients through them
// fall below 1.2e-38, fp32's smallest normal number. x86 handles every such subnormal operand in microcode, about
// 100x slower, and they spread through the backward pass: a GRJCA training step once saturated ran 3-4x slower
// (measured: 320-490 ms instead of 107-113 ms at the official shape). Outputs change by less than 1.2e-38.
class FlushSubnormals {
 public:
#if defined(__x86_64__) || defined(_M_X64)
  FlushSubnormals() : saved_(_mm_getcsr()) { _mm_setcsr(saved_ | kFlushToZero | kDenormalsAreZero); }
  ~FlushSubnormals() { _mm_setcsr(saved_); }

 private:
  static constexpr unsigned kFlushToZero = 0x8000, kDenormalsAreZero = 0x0040;
  unsigned saved_;
#else
  FlushSubnormals() {}
#endif
  FlushSubnormals(const FlushSubnormals&) = delete;
  FlushSubnormals& operator=(const FlushSubnormals&) = delete;
};

inline int64_t round_up(int64_t x, int64_t multiple) { return (x + multiple - 1) / multiple * multiple; }

#if AVK_X86_DISPATCH && !defined(__clang__)
// tab[idx & 31] per lane: one vpermt2ps over a 32-entry table. VB = 64 only. A GCC builtin rather than the
// _mm512_* intrinsic because this template has no target attribute: intrinsics refuse to inline into it, the builtin
// expands once the caller is inlined into an AVX-512 entry point (the only place VB = 64 is instantiated on x86).
template <int VB>
AVK_INLINE Vec<float, VB> lookup32(const float* tab, IntVec<VB> idx) {
  return __builtin_ia32_vpermt2varps512_mask(idx, load<float, VB>(tab), load<float, VB>(tab + 16), -1);
}
#endif

// tanh of every lane in fp32: NaN propagating, +-inf -> +-1, -0 -> -0 (tested against fp64 tanh).
//
// Why not std::tanh or Sleef: this is the inner loop of every fused kernel (one tanh per element of the attention
// map) and must vectorise in every ISA clone, in as few operations as possible.
//
// AVX-512 (max error 0.99 ulp over all 2^32 inputs): no division and no exp. With a = min(|x|, 9.5) (tanh rounds to
// 1 beyond), the exponent and top two mantissa bits of a + 1/16 pick one of 32 intervals (4 per binade of a + 1/16
// in [1/16, 16); the first starts at a = 0), and tanh(a) = c0 + u (c1 + ... + u c5) with u = a - lo exact and
// per-interval coefficients (tanh_table.h, from scripts/gen_tanh_table.py). Each of the 7 table rows is one
// vpermt2ps: 18 vector instructions (the whole forward op got ~3% faster than with the formula below).
//
// AVX2 / baseline (max error 2.5 ulp; AVX2 has no cheap 32-entry lookup): one branch-free formula,
//   tanh(|x|) = -m / (m + 2) with m = expm1(-2|x|) in (-1, 0],
// which has no cancellation anywhere (for small |x|, m ~ -2|x| carries full relative precision). expm1(y) is
// 2^n expm1(r) + (2^n - 1) with n = round(y / ln 2), r = y - n ln 2 in [-ln2/2, ln2/2] (Cody-Waite, ln 2 in two
// parts) and expm1(r) = r + r^2 q(r), q a degree-4 minimax fit (relative error 1.3e-8). |x| is clamped at 9, where
// tanh rounds to 1 in fp32, so 2^n stays a normal number.
template <int VB>
AVK_INLINE Vec<float, VB> tanh_vec(Vec<float, VB> x) {
  using V = Vec<float, VB>;
  using VI = IntVec<VB>;
  const VI sign = (VI)x & (int32_t)0x80000000;
  V a = (V)((VI)x & (int32_t)0x7fffffff);
#if AVK_X86_DISPATCH && !defined(__clang__)
  if constexpr (VB == 64) {
    a = __builtin_ia32_minps512_mask(splat<float, VB>(kTanhClamp), a, a, -1, 4);  // vminps: a NaN stays NaN
    const VI slot = (VI)(a + 0.0625f) >> 21;
    const V u = a - lookup32<VB>(kTanhTable[0], slot);
    V y = lookup32<VB>(kTanhTable[kTanhDegree + 1], slot);
    for (int row = kTanhDegree; row >= 1; --row) y = y * u + lookup32<VB>(kTanhTable[row], slot);
    return (V)((VI)y | sign);  // y >= 0
  }
#endif
  a = a > 9.0f ? splat<float, VB>(9.0f) : a;  // NaN compares false and stays NaN

  const V y = a * -2.0f;
  const V shifter = splat<float, VB>(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer in the low bits
  const V shifted = y * 1.44269504089f + shifter;
  const V n = shifted - shifter;
  const V r = (y - n * 0.693145751953125f) - n * 1.42860682030941723e-6f;
  V q = splat<float, VB>(1.3882521469e-03f);
  q = q * r + 8.3665141205e-03f;
  q = q * r + 4.1667199668e-02f;
  q = q * r + 1.6666543669e-01f;
  q = q * r + 4.9999998155e-01f;
  const V expm1_r = r + (r * r) * q;
  const V two_n = (V)(((VI)shifted - (VI)shifter + 127) << 23);  // 2^n from n's bits, n in [-26, 0]
  const V m = two_n * expm1_r + (two_n - 1.0f);
  const V t = m / (-2.0f - m);  // >= 0 (or -0 when m = 0: the sign is cleared below)
  return (V)(((VI)t & (int32_t)0x7fffffff) | sign);
}

// fp64 is the verification dtype (gradcheck), not a speed path: the accurate libm tanh per lane.
template <int VB>
AVK_INLINE Vec<double, VB> tanh_vec(Vec<double, VB> x) {
  for (int l = 0; l < kLanes<double, VB>; ++l) x[l] = std::tanh(x[l]);
  return x;
}

}  // namespace cpu
}  // namespace avk
