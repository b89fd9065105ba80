// tanh_attention on CUDA: o = Drop_p(map(scale * q @ k^T + map_bias)) @ v, optional ReLU(tanh(o)) epilogue
// (SPEC 1), the map tanh (map_bias 0) or sigmoid.
//
// Host interface of csrc/cuda/tanh_attention.cu, torch-independent: plain pointers, int64 sizes and int64 element
// strides. The launchers are explicitly instantiated for T = float, double, __half and __nv_bfloat16 (fp32
// accumulation for the half types, fp64 for double).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "common/tanh_attention_args.h"

namespace avk {
namespace cuda {

// Problem sizes and inputs shared by forward and backward.
//   q (batch, queries, head_dim), k (batch, keys, head_dim), v (batch or 1, keys, value_dim), any strides.
struct TanhAttentionProblem {
  const void* q;
  const void* k;
  const void* v;
  bool v_shared;  // v has batch size 1 and serves every batch; dv (1, keys, value_dim) then sums over the batch
  int64_t q_stride[3];
  int64_t k_stride[3];
  int64_t v_stride[3];
  int64_t batch;
  int64_t queries;    // Mq
  int64_t keys;       // N
  int64_t head_dim;   // D
  int64_t value_dim;  // E
  double scale;
  double dropout_p;  // 0 disables dropout; kept where the philox uniform (csrc/common/philox.h) >= (float)dropout_p
  uint64_t seed;     // in [0, 2^31)
  int activation;    // 0: none, 1: ReLU(tanh(o))
  AttentionMap map;  // the map applied to scale * q k^T + map_bias
  double map_bias;   // 0 for the tanh map
};

struct TanhAttentionForwardParams {
  TanhAttentionProblem problem;
  void* o;        // contiguous (batch, queries, value_dim), dtype T
  uint8_t* mask;  // contiguous (batch, queries, keys) keep-mask (0/1, torch.bool layout), or nullptr
};

struct TanhAttentionBackwardParams {
  TanhAttentionProblem problem;
  const void* dout;  // (batch, queries, value_dim), any strides
  int64_t dout_stride[3];
  const void* o;  // forward output (batch, queries, value_dim), any strides; read only when activation == 1
  int64_t o_stride[3];
  void* dq;  // contiguous, shaped like q
  void* dk;  // contiguous, shaped like k
  void* dv;  // contiguous (1 if v is shared else batch, keys, value_dim)
  // Reduction of dv over the batch when v is shared: true sums per-batch partials in a fixed order (identical bits
  // run to run); false accumulates with atomics (less workspace, order-dependent rounding).
  bool deterministic;
  // acc_t<T> scratch of tanh_attention_backward_workspace_elems(params) elements (may be null when that is 0).
  void* workspace;
};

// Number of accumulator elements (float, or double for T = double) the backward needs as workspace.
int64_t tanh_attention_backward_workspace_elems(const TanhAttentionBackwardParams& params);

// Launch on `stream`; return the launch error (cudaErrorInvalidConfiguration when a size exceeds the grid limits).
template <typename T>
cudaError_t launch_tanh_attention_forward(const TanhAttentionForwardParams& params, cudaStream_t stream);

template <typename T>
cudaError_t launch_tanh_attention_backward(const TanhAttentionBackwardParams& params, cudaStream_t stream);

}  // namespace cuda
}  // namespace avk
