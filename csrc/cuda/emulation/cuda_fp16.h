// CPU stand-in (see cuda_runtime.h): a "half" that stores a float, enough to compile the __half instantiations.
#pragma once
struct __half {
  float value;
};
inline float __half2float(__half h) { return h.value; }
inline __half __float2half_rn(float f) { return {f}; }
