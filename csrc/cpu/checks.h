// Input checks shared by the CPU ops: every message names the function, the argument and what was expected, so a
// caller reaching the extension directly (without the Python wrappers' checks) still gets a clear error.
#pragma once

#include <c10/util/Exception.h>
#include <ATen/core/Tensor.h>

namespace avk {
namespace cpu {

// The kernels compute in fp32 (fp64 for float64 inputs) whatever the storage dtype (convert.h), so the 16-bit
// dtypes are accepted wherever float32 is.
inline void check_float_cpu(const at::Tensor& t, const char* fn, const char* name) {
  constexpr const char* kExpected = " must be a float32, float64, bfloat16 or float16 CPU tensor, got ";
  TORCH_CHECK(t.defined(), fn, ": ", name, kExpected, "an undefined tensor");
  const at::ScalarType s = t.scalar_type();
  TORCH_CHECK(t.device().is_cpu() && (s == at::kFloat || s == at::kDouble || s == at::kBFloat16 || s == at::kHalf),
              fn, ": ", name, kExpected, "a ", s, " tensor on ", t.device());
}

// `t` like `ref`: same dtype (both already checked to be float CPU tensors). Mixed dtypes are refused rather than
// promoted: a silent copy of a whole input would hide a caller's mistake and cost a pass over memory.
inline void check_float_cpu_like(const at::Tensor& t, const at::Tensor& ref, const char* fn, const char* name,
                                 const char* ref_name) {
  check_float_cpu(t, fn, name);
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), fn, ": ", name, " must have the dtype of ", ref_name, " (",
              ref.scalar_type(), "), got ", t.scalar_type());
}

// shape is the expected shape in words, e.g. "(B, Mq, D)"; sizes < 0 in `expected` are free.
inline void check_shape(const at::Tensor& t, at::IntArrayRef expected, const char* fn, const char* name,
                        const char* shape) {
  bool ok = t.dim() == static_cast<int64_t>(expected.size());
  for (size_t i = 0; ok && i < expected.size(); ++i) ok = expected[i] < 0 || t.size(i) == expected[i];
  TORCH_CHECK(ok, fn, ": ", name, " must have shape ", shape, " = ", expected, " (-1: any), got ", t.sizes());
}

}  // namespace cpu
}  // namespace avk
