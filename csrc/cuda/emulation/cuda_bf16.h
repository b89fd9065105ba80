// CPU stand-in (see cuda_runtime.h): a "bfloat16" that stores a float, enough to compile the instantiations.
#pragma once
struct __nv_bfloat16 {
  float value;
};
inline float __bfloat162float(__nv_bfloat16 h) { return h.value; }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return {f}; }
