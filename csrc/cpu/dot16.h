// bf16 products on the CPU's 16-bit unit (AVX-512 BF16) or its software stand-in: the two instructions the fused
// kernels use, the layouts they read, and the micro-kernels built on them.
//
// Instructions (the only ones used, semantics measured bit for bit against an AMD Zen 4 and matching Intel's SDM):
//   vdpbf16ps  acc[l] += a.hi[l] * b.hi[l], then acc[l] += a.lo[l] * b.lo[l], lane l of 16 fp32 lanes, where each
//              32-bit lane of a and b holds a pair of bf16 (lo = bits 0-15, hi = bits 16-31). Each step is one fused
//              multiply-add rounded to nearest even, with denormal inputs read as zero (the bf16 operands and acc)
//              and a tiny result flushed to a zero of its sign (tiny after rounding to 24 bits with an unbounded
//              exponent, which flushes some results fmaf would round up to 2^-126); MXCSR is neither read nor
//              written. NaN: the first NaN among a, b, acc of the step (in that order) comes out quieted; an
//              invalid step (inf * 0, inf - inf) with no NaN operand gives the default NaN 0xFFC00000.
//   vcvtne2ps2bf16  32 fp32 -> 32 bf16 (round to nearest even; denormal -> zero of its sign; NaN -> its top half,
//              quieted), the first 16 from the second operand: one vector of consecutive pairs.
// `Bf16Native` issues them (GCC builtins: the kernel templates that call them carry no target attribute, and only
// the entry point compiled for avx512bf16 instantiates it); `Bf16Emulated` computes the same bits with AVX-512F
// vector code, so that the bf16 kernel runs, and is tested bit for bit, on any AVX-512 CPU; the scalar functions
// below define the semantics once and test both on every CPU (the dot16_* helper ops of library.cpp).
//
// Layouts (uint32_t words, one bf16 pair each): "pairs along columns" (rows x cols/2: word [r][c/2] holds columns
// c, c+1 of row r) for the left operand of a product, broadcast one word at a time; "pairs along rows" (VNNI: rows/2
// x cols: word [t/2][c] holds rows t, t+1 of column c) for the right operand, read 16 columns per vector.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "convert.h"  // bits_float, float_bits
#include "simd.h"

#if AVK_X86_DISPATCH
#include <immintrin.h>  // declares the GCC builtins used below
#endif

namespace avk {
namespace cpu {

// Which unit computes the products of the fused kernels for bf16 inputs: kFp32 widens them to fp32 (any CPU),
// kEmulated runs the bf16 kernel on the stand-in (needs AVX-512F), kAvx512Bf16 on vdpbf16ps.
enum class Compute16 { kFp32 = 0, kEmulated = 1, kAvx512Bf16 = 2 };

inline bool cpu_has_avx512_bf16() {
#if AVK_X86_DISPATCH && !defined(__clang__)
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512bf16");
#else
  return false;
#endif
}

// The unit for this process: AVX-512 BF16 where the running ISA variant is AVX-512 and the CPU has it, else fp32.
// AVKERNELS_CPU_16BIT=fp32|emulated|avx512_bf16 picks one (for tests and benchmarks); a choice this CPU cannot run
// falls back to fp32 (emulated needs the AVX-512 variant of the kernels), and cpu_features() says what runs.
inline Compute16 compute_16bit() {
  static const Compute16 unit = [] {
    const bool avx512 = cpu_isa() == Isa::kAvx512;
    const bool native = avx512 && cpu_has_avx512_bf16();
    const char* wanted = std::getenv("AVKERNELS_CPU_16BIT");
    if (wanted == nullptr) return native ? Compute16::kAvx512Bf16 : Compute16::kFp32;
    if (std::strcmp(wanted, "emulated") == 0 && avx512) return Compute16::kEmulated;
    if (std::strcmp(wanted, "avx512_bf16") == 0 && native) return Compute16::kAvx512Bf16;
    return Compute16::kFp32;
  }();
  return unit;
}

inline const char* compute_16bit_name(Compute16 unit) {
  return unit == Compute16::kAvx512Bf16 ? "avx512_bf16" : unit == Compute16::kEmulated ? "emulated" : "fp32";
}

namespace dot16 {

// ---------------------------------------------------------------------------------------------------------------
// The semantics, one lane at a time (the definition the vector code is tested against).
// ---------------------------------------------------------------------------------------------------------------

inline bool is_nan_bits(uint32_t u) { return (u & 0x7FFFFFFFu) > 0x7F800000u; }
inline uint32_t flush_bits(uint32_t u) { return (u & 0x7F800000u) == 0 ? u & 0x80000000u : u; }

// vcvtne2ps2bf16 on one value.
inline uint16_t round_bf16(float f) {
  const uint32_t u = float_bits(f);
  if (is_nan_bits(u)) return static_cast<uint16_t>((u >> 16) | 0x40u);
  if ((u & 0x7F800000u) == 0) return static_cast<uint16_t>((u >> 16) & 0x8000u);
  return static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

// Whether x * y + c is tiny in IEEE's "after rounding" sense: rounded to 24 bits with an unbounded exponent, it lies
// below 2^-126, i.e. |x * y + c| < 2^-126 - 2^-151 exactly. The unit flushes such a result even where fmaf rounds
// it up to 2^-126 (measured: the boundary sits at 2^-126 - 2^-151, ties kept). x * y is exact in a double (8-bit
// significands) and TwoSum gives the double sum's rounding error, so the comparison is exact.
inline bool exact_sum_is_tiny(float x, float y, float c) {
  const double p = static_cast<double>(x) * static_cast<double>(y), cd = c;
  const double s = p + cd, t = s - p, err = (p - (s - t)) + (cd - t);
  const double limit = std::ldexp(1.0, -126) - std::ldexp(1.0, -151);
  return std::fabs(s) < limit || (std::fabs(s) == limit && err != 0 && (err > 0) != (s > 0));
}

// One step of vdpbf16ps: acc + x * y, x and y bf16 bits.
inline float dot_step(float acc, uint16_t x, uint16_t y) {
  const uint32_t xb = static_cast<uint32_t>(x) << 16, yb = static_cast<uint32_t>(y) << 16, cb = float_bits(acc);
  if (is_nan_bits(xb)) return bits_float(xb | 0x00400000u);
  if (is_nan_bits(yb)) return bits_float(yb | 0x00400000u);
  if (is_nan_bits(cb)) return bits_float(cb | 0x00400000u);
  const float xf = bits_float(flush_bits(xb)), yf = bits_float(flush_bits(yb)), cf = bits_float(flush_bits(cb));
  const float r = __builtin_fmaf(xf, yf, cf);
  if (r != r) return bits_float(0xFFC00000u);
  const uint32_t rb = float_bits(r);
  if ((rb & 0x7FFFFFFFu) == 0x00800000u && exact_sum_is_tiny(xf, yf, cf)) return bits_float(rb & 0x80000000u);
  return bits_float(flush_bits(rb));
}

// vdpbf16ps on one lane.
inline float dot_pair(float acc, uint32_t a, uint32_t b) {
  acc = dot_step(acc, static_cast<uint16_t>(a >> 16), static_cast<uint16_t>(b >> 16));
  return dot_step(acc, static_cast<uint16_t>(a), static_cast<uint16_t>(b));
}

inline uint32_t pair(uint16_t lo, uint16_t hi) { return static_cast<uint32_t>(lo) | static_cast<uint32_t>(hi) << 16; }

// ---------------------------------------------------------------------------------------------------------------
// Packing (any CPU; not in the inner loops): fp32 tiles, already widened and zero-padded by the kernels' own
// packing, rounded to bf16 pairs (exact for values that came from bf16; do' through the epilogue is rounded once).
// ---------------------------------------------------------------------------------------------------------------

// Pairs along columns: dst[r * ld2 + c] = (src[r * lds + 2c], src[r * lds + 2c + 1]) for r < rows, c < pairs.
inline void pairs_along_columns(uint32_t* dst, int64_t ld2, const float* src, int64_t lds, int64_t rows,
                                int64_t pairs) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < pairs; ++c)
      dst[r * ld2 + c] = pair(round_bf16(src[r * lds + 2 * c]), round_bf16(src[r * lds + 2 * c + 1]));
}

// Pairs along rows (VNNI): dst[t * cols + c] = (src[2t * lds + c], src[(2t + 1) * lds + c]) for t < ceil(rows / 2),
// c < cols; an odd last row pairs with zero.
inline void pairs_along_rows(uint32_t* dst, const float* src, int64_t lds, int64_t rows, int64_t cols) {
  for (int64_t t = 0; 2 * t < rows; ++t)
    for (int64_t c = 0; c < cols; ++c)
      dst[t * cols + c] = pair(round_bf16(src[2 * t * lds + c]),
                               2 * t + 1 < rows ? round_bf16(src[(2 * t + 1) * lds + c]) : uint16_t(0));
}

// ---------------------------------------------------------------------------------------------------------------
// The two units, on 16-lane vectors (64 bytes: instantiated in AVX-512 entry points only).
// ---------------------------------------------------------------------------------------------------------------

using VF = Vec<float, 64>;
using VU = Vec<uint32_t, 64>;
using VI = Vec<int32_t, 64>;
using VH = Vec<int16_t, 64>;  // 32 bf16

#if AVK_X86_DISPATCH && !defined(__clang__)
struct Bf16Native {
  static AVK_INLINE VF dot(VF acc, VU a, VU b) { return __builtin_ia32_dpbf16ps_v16sf(acc, (VH)a, (VH)b); }
  // words l < 8: (lo[2l], lo[2l+1]); words l >= 8: (hi[2l-16], hi[2l-15])
  static AVK_INLINE VU round_pairs(VF lo, VF hi) { return (VU)__builtin_ia32_cvtne2ps2bf16_v32hi(hi, lo); }
};

struct Bf16Emulated {
  static AVK_INLINE VI flush(VI x) { return (x & 0x7F800000) == 0 ? x & (int32_t)0x80000000 : x; }
  static AVK_INLINE VI nan(VI x) { return (x & 0x7FFFFFFF) > 0x7F800000; }
  static AVK_INLINE VI step(VI c, VI x, VI y) {  // dot_step on bf16 values already in the top halves of x and y
    // rounding 8: to nearest even with exceptions suppressed, whatever MXCSR says
    const VF r = __builtin_ia32_vfmaddps512_mask((VF)flush(x), (VF)flush(y), (VF)flush(c), -1, 8);
    const VI ri = (VI)r;
    VI out = nan(ri) ? VI{} + (int32_t)0xFFC00000 : flush(ri);
    const VI quiet = VI{} + 0x00400000;
    out = nan(x) ? x | quiet : nan(y) ? y | quiet : nan(c) ? c | quiet : out;
    const VI at_smallest_normal = (out & 0x7FFFFFFF) == 0x00800000;  // rare: decided by the definition
    for (int l = 0; l < 16; ++l)
      if (at_smallest_normal[l])
        out[l] = static_cast<int32_t>(float_bits(dot_step(bits_float(static_cast<uint32_t>(c[l])),
                                                          static_cast<uint16_t>(static_cast<uint32_t>(x[l]) >> 16),
                                                          static_cast<uint16_t>(static_cast<uint32_t>(y[l]) >> 16))));
    return out;
  }
  static AVK_INLINE VF dot(VF acc, VU a, VU b) {
    const VI hi_mask = VI{} + (int32_t)0xFFFF0000;
    VI c = step((VI)acc, (VI)a & hi_mask, (VI)b & hi_mask);
    return (VF)step(c, (VI)(a << 16), (VI)(b << 16));
  }
  static AVK_INLINE VU round1(VF f) {  // round_bf16 of each lane, in the low half
    const VU u = (VU)f;
    const VU rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    const VU flushed = (u >> 16) & 0x8000u;
    const VU quieted = (u >> 16) | 0x40u;
    return ((u & 0x7FFFFFFFu) > 0x7F800000u) ? quieted : ((u & 0x7F800000u) == 0) ? flushed : rounded;
  }
  static AVK_INLINE VU round_pairs(VF lo, VF hi) {
    const VU a = round1(lo), b = round1(hi);
    VU out;
    for (int l = 0; l < 8; ++l) {
      out[l] = a[2 * l] | (a[2 * l + 1] << 16);
      out[l + 8] = b[2 * l] | (b[2 * l + 1] << 16);
    }
    return out;
  }
};
#endif

// Pairs along rows of two 16-lane rows: word l = (row0[l], row1[l]).
template <typename Unit>
AVK_INLINE VU interleave_rows(VF row0, VF row1) {
  const VH both = (VH)Unit::round_pairs(row0, row1);  // bf16 0-15: row0, 16-31: row1
  VH index;
  for (int l = 0; l < 16; ++l) {
    index[2 * l] = static_cast<int16_t>(l);
    index[2 * l + 1] = static_cast<int16_t>(l + 16);
  }
  return (VU)__builtin_shuffle(both, index);
}

// acc[r][c] = sum_t a[r * lda2 + t] . panel[t * width + 16 c] for r < R, c < G, t < pairs: R rows of an S or dZ
// tile, 16 G columns, from pairs along the contraction (a) and a VNNI panel.
template <typename Unit, int R, int G>
AVK_INLINE void rows_times_panel(const uint32_t* a, int64_t lda2, const uint32_t* panel, int64_t width,
                                 int64_t pairs, VF (&acc)[R][G]) {
  VF sum[R][G] = {};  // local, so that GCC keeps it in registers (writing acc in the loop made it store every step)
  for (int64_t t = 0; t < pairs; ++t) {
    VU y[G];
    for (int c = 0; c < G; ++c) y[c] = load<uint32_t, 64>(panel + t * width + 16 * c);
    for (int r = 0; r < R; ++r) {
      const VU ar = VU{} + a[r * lda2 + t];
      for (int c = 0; c < G; ++c) sum[r][c] = Unit::dot(sum[r][c], ar, y[c]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < G; ++c) acc[r][c] = sum[r][c];
}

// out[r * ldo + x] += sum_t a[r * a_row + t * a_inner] . y[t * ldy + x] for r < R, x < n_cols (a multiple of 16),
// t < pairs: o += C v, dq += dS k, dk += dS^T q, dv += C^T do, by the strides of a.
template <typename Unit, int R>
AVK_INLINE void accumulate_rows(float* out, int64_t ldo, const uint32_t* a, int64_t a_row, int64_t a_inner,
                                const uint32_t* y, int64_t ldy, int64_t pairs, int64_t n_cols) {
  for (int64_t x = 0; x < n_cols; x += 16) {
    VF acc[R];
    for (int r = 0; r < R; ++r) acc[r] = load<float, 64>(out + r * ldo + x);
    for (int64_t t = 0; t < pairs; ++t) {
      const VU yt = load<uint32_t, 64>(y + t * ldy + x);
      for (int r = 0; r < R; ++r) acc[r] = Unit::dot(acc[r], VU{} + a[r * a_row + t * a_inner], yt);
    }
    for (int r = 0; r < R; ++r) store<float, 64>(out + r * ldo + x, acc[r]);
  }
}

}  // namespace dot16
}  // namespace cpu
}  // namespace avk
