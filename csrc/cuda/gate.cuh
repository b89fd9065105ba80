// The gate and stage_gate front ends (csrc/cuda/binding.cpp: argument checks, candidate order, first logit
// candidate) launch the softmax mix of softmax_mix.cuh; this header keeps the name they include.
#pragma once

#include "cuda/softmax_mix.cuh"
