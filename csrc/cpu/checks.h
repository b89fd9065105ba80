// Input checks shared by the CPU ops: every message names the function, the argument and what was expected, so a
// caller reaching the extension directly (without the Python wrappers' checks) still gets a clear error.
#pragma once

#include <c10/util/Exception.h>
#include <ATen/core/Tensor.h>

namespace avk {
namespace cpu {

inline void check_float_cpu(const at::Tensor& t, const char* fn, const char* name) {
  TORCH_CHECK(t.defined(), fn, ": ", name, " must be a float32 or float64 CPU tensor, got an undefined tensor");
  TORCH_CHECK(t.device().is_cpu() && (t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble), fn, ": ",
              name, " must be a float32 or float64 CPU tensor, got a ", t.scalar_type(), " tensor on ", t.device());
}

// `t` like `ref`: same dtype (both already checked to be float CPU tensors).
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
