// Argument checks of the compiled ops, shared by the CPU and CUDA libraries: every message names the op, the
// argument and what was expected, so that a caller reaching the ops directly (torch.ops.avkernels.*, an AOTInductor
// package) without the Python wrappers' checks still gets a clear error.
#pragma once

#include "common/tensor_api.h"

namespace avk {

// A float32, float64, bfloat16 or float16 tensor on a device of type `device`. The kernels compute in fp32 (fp64
// for float64 inputs) whatever the storage dtype, so the 16-bit dtypes are accepted wherever float32 is.
inline void check_float(const Tensor& t, DeviceType device, const char* fn, const char* name) {
  const char* where = device == DeviceType::CPU ? " CPU tensor, got " : " CUDA tensor, got ";
  AVK_CHECK(t.defined(), fn, ": ", name, " must be a float32, float64, bfloat16 or float16", where,
            "an undefined tensor");
  const ScalarType s = t.scalar_type();
  AVK_CHECK(device_type(t) == device && (s == ScalarType::Float || s == ScalarType::Double ||
                                         s == ScalarType::BFloat16 || s == ScalarType::Half),
            fn, ": ", name, " must be a float32, float64, bfloat16 or float16", where, "a ", dtype_name(s),
            " tensor on ", device_name(t));
}

// `t` like `ref` (already checked): a float tensor of the same dtype on the same device. Mixed dtypes are refused
// rather than promoted: a silent copy of a whole input would hide a caller's mistake and cost a pass over memory.
inline void check_float_like(const Tensor& t, const Tensor& ref, const char* fn, const char* name,
                             const char* ref_name) {
  check_float(t, device_type(ref), fn, name);
  AVK_CHECK(t.scalar_type() == ref.scalar_type(), fn, ": ", name, " must have the dtype of ", ref_name, " (",
            dtype_name(ref.scalar_type()), "), got ", dtype_name(t.scalar_type()));
  AVK_CHECK(t.device() == ref.device(), fn, ": ", name, " must be on the device of ", ref_name, " (",
            device_name(ref), "), got ", device_name(t));
}

// shape is the expected shape in words, e.g. "(B, Mq, D)", or null; sizes < 0 in `expected` are free.
inline void check_shape(const Tensor& t, IntList expected, const char* fn, const char* name,
                        const char* shape) {
  bool ok = t.dim() == static_cast<int64_t>(expected.size());
  for (size_t i = 0; ok && i < expected.size(); ++i) ok = expected[i] < 0 || t.size(i) == expected[i];
  AVK_CHECK(ok, fn, ": ", name, " must have shape ", shape == nullptr ? "" : shape, shape == nullptr ? "" : " = ",
            shape_string(expected), " (-1: any), got ", shape_string(t.sizes()));
}

}  // namespace avk
