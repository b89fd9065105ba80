// The softmax mix on CUDA: the DCA/GRJCA two-way gate and the GRJCA stage gate (SPEC 3) are this one computation.
//
// Per row (b, l) of `candidates` X_0 .. X_{C-1}, each (batch, seq_len, features):
//     z   = concat_{t >= first_logit_candidate} X_t  @ weight^T + bias           (C logits)
//     s   = softmax(z / tau)                                                      (the gate values)
//     out = ReLU(sum_t s_t X_t)
//   gate:       candidates (unattended, attended), first_logit_candidate = 1, weight (2, d)
//   stage_gate: candidates stages[0..T),           first_logit_candidate = 0, weight (T, T * d)
//
// Host interface of csrc/cuda/softmax_mix.cu, torch-independent: plain pointers, int64 sizes and element strides. The
// launchers are explicitly instantiated for T = float, double, __half and __nv_bfloat16 (fp32 accumulation for
// the half types).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace avk {
namespace cuda {

constexpr int kMaxGateCandidates = 8;

struct SoftmaxMixInputs {
  int num_candidates;         // C, 1 .. kMaxGateCandidates
  int first_logit_candidate;  // the logits read candidates first_logit_candidate .. C-1
  int64_t batch, seq_len, features;
  const void* candidates[kMaxGateCandidates];  // each (batch, seq_len, features)
  int64_t candidate_stride[kMaxGateCandidates][3];
  const void* weight;  // (C, (C - first_logit_candidate) * features)
  int64_t weight_stride[2];
  const void* bias;  // (C,)
  int64_t bias_stride;
  double tau;
};

struct SoftmaxMixForwardParams {
  SoftmaxMixInputs inputs;
  void* out;    // contiguous (batch, seq_len, features)
  void* gates;  // contiguous (batch, seq_len, C)
};

// The weight and bias gradients reduce over the batch * seq_len rows through per-chunk partials summed in a fixed
// order: always deterministic (no atomics), so no `deterministic` switch is needed.
struct SoftmaxMixBackwardParams {
  SoftmaxMixInputs inputs;  // bias is not read
  const void* dout;          // (batch, seq_len, features), any strides
  int64_t dout_stride[3];
  const void* dgates;  // (batch, seq_len, C), any strides
  int64_t dgates_stride[3];
  const void* gates;  // forward gate values (batch, seq_len, C), any strides
  int64_t gates_stride[3];
  const void* out;  // forward output (batch, seq_len, features), any strides
  int64_t out_stride[3];
  void* d_candidates;  // contiguous (C, batch, seq_len, features)
  void* d_weight;      // contiguous like weight
  void* d_bias;        // contiguous (C,)
  void* workspace;     // acc_t<T> scratch of softmax_mix_backward_workspace_elems(inputs) elements
};

// Number of accumulator elements (float, or double for T = double) the backward needs as workspace.
int64_t softmax_mix_backward_workspace_elems(const SoftmaxMixInputs& inputs);

// Launch on `stream`; cudaErrorInvalidValue when num_candidates is outside 1 .. kMaxGateCandidates,
// cudaErrorInvalidConfiguration when the rows exceed the grid limits.
template <typename T>
cudaError_t launch_softmax_mix_forward(const SoftmaxMixForwardParams& params, cudaStream_t stream);

template <typename T>
cudaError_t launch_softmax_mix_backward(const SoftmaxMixBackwardParams& params, cudaStream_t stream);

}  // namespace cuda
}  // namespace avk
