// The 16-bit unit's instructions one at a time, for tests (library.cpp: avkernels::dot16_dot, dot16_round): the
// scalar definition (any CPU), the stand-in's vector code (AVX-512F) and the instruction itself (AVX-512 BF16), on
// the same inputs, so that a test can compare their bits.
#include "ops.h"

#include <string>

#include "common/tensor_api.h"
#include "dot16.h"

namespace avk {
namespace cpu {
namespace {

enum class Unit { kScalar, kEmulated, kNative };

Unit unit_named(StrArg name, const char* fn) {
  const std::string unit(name);
  const bool avx512 = cpu_isa() == Isa::kAvx512;
#if !(AVK_X86_DISPATCH && !defined(__clang__))
  AVK_CHECK(unit == "scalar", fn, ": unit '", unit, "' is not built here (x86-64 with GCC only); use 'scalar'");
#endif
  if (unit == "scalar") return Unit::kScalar;
  if (unit == "emulated") {
    AVK_CHECK(avx512, fn, ": unit 'emulated' needs the AVX-512 variant of the kernels (AVX-512F), which this CPU ",
              "or AVKERNELS_CPU_ISA does not allow");
    return Unit::kEmulated;
  }
  if (unit == "avx512_bf16") {
    AVK_CHECK(avx512 && cpu_has_avx512_bf16(), fn, ": unit 'avx512_bf16' needs a CPU with AVX-512 BF16");
    return Unit::kNative;
  }
  AVK_CHECK(false, fn, ": unit must be 'scalar', 'emulated' or 'avx512_bf16', got '", unit, "'");
}

#if AVK_X86_DISPATCH && !defined(__clang__)
template <typename U>
AVK_INLINE void dot_lanes(float* acc, const uint32_t* a, const uint32_t* b, int64_t n) {
  for (int64_t i = 0; i < n; i += 16)
    store<float, 64>(acc + i, U::dot(load<float, 64>(acc + i), load<uint32_t, 64>(a + i), load<uint32_t, 64>(b + i)));
}
template <typename U>
AVK_INLINE void round_lanes(uint32_t* out, const float* x, int64_t n) {
  for (int64_t i = 0; i < n; i += 32)
    store<uint32_t, 64>(out + i / 2, U::round_pairs(load<float, 64>(x + i), load<float, 64>(x + i + 16)));
}
__attribute__((target("arch=x86-64-v4,avx512bf16"))) void dot_native(float* acc, const uint32_t* a,
                                                                     const uint32_t* b, int64_t n) {
  dot_lanes<dot16::Bf16Native>(acc, a, b, n);
}
AVK_TARGET_AVX512 void dot_emulated(float* acc, const uint32_t* a, const uint32_t* b, int64_t n) {
  dot_lanes<dot16::Bf16Emulated>(acc, a, b, n);
}
__attribute__((target("arch=x86-64-v4,avx512bf16"))) void round_native(uint32_t* out, const float* x, int64_t n) {
  round_lanes<dot16::Bf16Native>(out, x, n);
}
AVK_TARGET_AVX512 void round_emulated(uint32_t* out, const float* x, int64_t n) {
  round_lanes<dot16::Bf16Emulated>(out, x, n);
}
#endif

void check_lanes(const Tensor& t, ScalarType dtype, int64_t multiple, const char* fn, const char* name) {
  AVK_CHECK(t.is_cpu() && t.scalar_type() == dtype && t.dim() == 1 && t.is_contiguous(), fn, ": ", name,
            " must be a contiguous 1-D CPU tensor of ", dtype_name(dtype), ", got a ", dtype_name(t.scalar_type()),
            " tensor on ", device_name(t), " of shape ", shape_string(t.sizes()));
  AVK_CHECK(t.numel() % multiple == 0, fn, ": ", name, " must have a multiple of ", multiple, " elements, got ",
            t.numel());
}

}  // namespace

Tensor dot16_dot(const Tensor& acc, const Tensor& a, const Tensor& b, StrArg unit) {
  constexpr const char* fn = "dot16_dot";
  const Unit u = unit_named(unit, fn);
  check_lanes(acc, ScalarType::Float, 16, fn, "acc");
  check_lanes(a, ScalarType::Int, 16, fn, "a");
  check_lanes(b, ScalarType::Int, 16, fn, "b");
  AVK_CHECK(a.numel() == acc.numel() && b.numel() == acc.numel(), fn, ": acc, a and b must have one size, got ",
            acc.numel(), ", ", a.numel(), ", ", b.numel());
  Tensor out = clone_of(acc);
  float* o = out.mutable_data_ptr<float>();
  const uint32_t* pa = reinterpret_cast<const uint32_t*>(a.mutable_data_ptr<int32_t>());
  const uint32_t* pb = reinterpret_cast<const uint32_t*>(b.mutable_data_ptr<int32_t>());
  const int64_t n = out.numel();
  if (u == Unit::kScalar) {
    for (int64_t i = 0; i < n; ++i) o[i] = dot16::dot_pair(o[i], pa[i], pb[i]);
  }
#if AVK_X86_DISPATCH && !defined(__clang__)
  if (u == Unit::kEmulated) dot_emulated(o, pa, pb, n);
  if (u == Unit::kNative) dot_native(o, pa, pb, n);
#endif
  return out;
}

Tensor dot16_round(const Tensor& x, StrArg unit) {
  constexpr const char* fn = "dot16_round";
  const Unit u = unit_named(unit, fn);
  check_lanes(x, ScalarType::Float, 32, fn, "x");
  Tensor out = make_empty(x, {x.numel()}, ScalarType::Short);
  uint32_t* o = reinterpret_cast<uint32_t*>(out.mutable_data_ptr<int16_t>());
  const float* px = x.mutable_data_ptr<float>();
  if (u == Unit::kScalar) {
    for (int64_t i = 0; i < x.numel(); i += 2)
      o[i / 2] = dot16::pair(dot16::round_bf16(px[i]), dot16::round_bf16(px[i + 1]));
  }
#if AVK_X86_DISPATCH && !defined(__clang__)
  if (u == Unit::kEmulated) round_emulated(o, px, x.numel());
  if (u == Unit::kNative) round_native(o, px, x.numel());
#endif
  return out;
}

}  // namespace cpu
}  // namespace avk
