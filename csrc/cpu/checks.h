// The CPU spelling of the shared argument checks (csrc/common/checks.h), for the gates' front ends.
#pragma once

#include "common/checks.h"

namespace avk {
namespace cpu {

using avk::check_shape;

inline void check_float_cpu(const Tensor& t, const char* fn, const char* name) {
  check_float(t, DeviceType::CPU, fn, name);
}

inline void check_float_cpu_like(const Tensor& t, const Tensor& ref, const char* fn, const char* name,
                                 const char* ref_name) {
  check_float_cpu(t, fn, name);
  avk::check_float_like(t, ref, fn, name, ref_name);
}

}  // namespace cpu
}  // namespace avk
