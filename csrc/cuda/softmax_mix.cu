// CUDA kernels of the softmax mix behind both gates (gate and stage_gate, SPEC 3); the math is in softmax_mix.cuh.
//
// Rows (b, l) are independent and short (d features, C <= 8 logits), so one warp owns one row: lanes stride over
// the features, the C logits are reduced with warp shuffles, and every lane then holds the gate values for the
// output pass. A row's inputs are read twice (logits, then the mix): the second read is served by L1, and holding
// rows of arbitrary d in registers would cap d. The per-row arrays (logits, gate values) have a compile-time
// capacity of 2, 4 or 8 >= C so that they stay in registers.
//
// Backward: the row kernel writes the candidates' gradients and the logit gradients dl (rows x C) to the
// workspace; the weight and bias gradients dW[k, c] = sum_rows dl[row, k] x[row, c] are then reduced over rows in
// chunks (one thread per weight column) and the chunk partials summed in chunk order: deterministic.
#include "cuda/softmax_mix.cuh"

#include <type_traits>

#include "cuda/common.cuh"

namespace avk {
namespace cuda {
namespace {

constexpr int kWarpSize = 32;
constexpr int kRowThreads = 256;
constexpr int kRowsPerBlock = kRowThreads / kWarpSize;
// Stated explicitly: without a minimum, ptxas's occupancy heuristic held some row kernels at 40-64 registers and
// spilled a few bytes; with it they take 48-128 registers and never spill (tests/test_cuda_compile.py checks).
constexpr int kMinRowBlocksPerSm = 1;
constexpr int kColumnThreads = 256;
constexpr int64_t kMaxRowChunks = 256;  // bounds the partials workspace: chunks * C * (columns + 1) accumulators
constexpr int64_t kMinRowsPerChunk = 32;

// Columns of the weight: the features of the candidates that feed the logits.
__host__ __device__ int64_t weight_columns(const SoftmaxMixInputs& in) {
  return (in.num_candidates - in.first_logit_candidate) * in.features;
}

template <typename T>
__device__ acc_t<T> candidate_at(const SoftmaxMixInputs& in, int t, int64_t b, int64_t l, int64_t f) {
  const int64_t* stride = in.candidate_stride[t];
  return to_acc<T>(static_cast<const T*>(in.candidates[t])[b * stride[0] + l * stride[1] + f * stride[2]]);
}

template <typename T>
__device__ acc_t<T> strided_at(const void* base, const int64_t (&stride)[3], int64_t b, int64_t l, int64_t f) {
  return to_acc<T>(static_cast<const T*>(base)[b * stride[0] + l * stride[1] + f * stride[2]]);
}

template <typename T>
__device__ acc_t<T> weight_at(const SoftmaxMixInputs& in, int k, int64_t column) {
  return to_acc<T>(static_cast<const T*>(in.weight)[k * in.weight_stride[0] + column * in.weight_stride[1]]);
}

// dout where the output's ReLU passed the mix (out > 0, or out NaN, as torch's ReLU backward), else 0: the gradient
// reaching the mix at (b, l, f).
template <typename T>
__device__ acc_t<T> relu_grad_at(const SoftmaxMixBackwardParams& params, int64_t b, int64_t l, int64_t f) {
  return strided_at<T>(params.out, params.out_stride, b, l, f) <= acc_t<T>(0)
             ? acc_t<T>(0)
             : strided_at<T>(params.dout, params.dout_stride, b, l, f);
}

// softmax((logits + bias) / tau) of row (b, l) into s[0 : C]; warp-collective, every lane gets all C values.
template <typename T, int kMaxC>
__device__ void gate_values(const SoftmaxMixInputs& in, int64_t b, int64_t l, int lane, acc_t<T> (&s)[kMaxC]) {
  using Acc = acc_t<T>;
  const int count = in.num_candidates;
  Acc z[kMaxC];
#pragma unroll
  for (int k = 0; k < kMaxC; ++k) z[k] = Acc(0);
  for (int64_t f = lane; f < in.features; f += kWarpSize) {
#pragma unroll
    for (int t = 0; t < kMaxC; ++t) {
      if (t < in.first_logit_candidate || t >= count) continue;
      const Acc x = candidate_at<T>(in, t, b, l, f);
      const int64_t column = (t - in.first_logit_candidate) * in.features + f;
#pragma unroll
      for (int k = 0; k < kMaxC; ++k) {
        if (k < count) z[k] += x * weight_at<T>(in, k, column);
      }
    }
  }
  const Acc tau = static_cast<Acc>(in.tau);
  Acc z_max = Acc(0);
#pragma unroll
  for (int k = 0; k < kMaxC; ++k) {
    if (k >= count) continue;
    z[k] = (warp_sum(z[k]) + to_acc<T>(static_cast<const T*>(in.bias)[k * in.bias_stride])) / tau;
    z_max = k == 0 ? z[k] : fmax(z_max, z[k]);
  }
  Acc total = Acc(0);
#pragma unroll
  for (int k = 0; k < kMaxC; ++k) {
    s[k] = k < count ? exp_acc(z[k] - z_max) : Acc(0);
    total += s[k];
  }
#pragma unroll
  for (int k = 0; k < kMaxC; ++k) s[k] /= total;
}

// out = ReLU(sum_t s_t X_t) and the gate values s, one warp per row.
//
// Args: params (softmax_mix.cuh), with num_candidates <= kMaxC; out and gates contiguous.
// Grid: ceil(batch * seq_len / kRowsPerBlock) blocks of kRowThreads (one warp per row).
template <typename T, int kMaxC>
__global__ void __launch_bounds__(kRowThreads, kMinRowBlocksPerSm)
    softmax_mix_forward_kernel(const SoftmaxMixForwardParams params) {
  using Acc = acc_t<T>;
  const SoftmaxMixInputs& in = params.inputs;
  const int64_t row = int64_t(blockIdx.x) * kRowsPerBlock + threadIdx.x / kWarpSize;
  if (row >= in.batch * in.seq_len) return;  // whole warps leave together: the shuffles below stay convergent
  const int lane = threadIdx.x % kWarpSize;
  const int count = in.num_candidates;
  const int64_t b = row / in.seq_len, l = row % in.seq_len;
  Acc s[kMaxC];
  gate_values<T, kMaxC>(in, b, l, lane, s);

  T* out = static_cast<T*>(params.out) + row * in.features;
  for (int64_t f = lane; f < in.features; f += kWarpSize) {
    Acc mixed = Acc(0);
#pragma unroll
    for (int t = 0; t < kMaxC; ++t) {
      if (t < count) mixed += s[t] * candidate_at<T>(in, t, b, l, f);
    }
    out[f] = from_acc<T>(mixed < Acc(0) ? Acc(0) : mixed);  // keeps NaN, as torch.relu (fmax would drop it)
  }
  if (lane == 0) {
#pragma unroll
    for (int k = 0; k < kMaxC; ++k) {
      if (k < count) static_cast<T*>(params.gates)[row * count + k] = from_acc<T>(s[k]);
    }
  }
}

// Per row: dy = dout [out > 0]; ds_t = dgates_t + <dy, X_t>; dl = s (ds - <s, ds>) / tau (softmax backward);
// dX_t = s_t dy + sum_k dl_k W[k, columns of X_t] (the second term only for logit candidates). Writes dX and dl.
//
// Args: params (softmax_mix.cuh), with num_candidates <= kMaxC; d_candidates contiguous; dl goes to
//       workspace[0 : rows * C].
// Grid: ceil(batch * seq_len / kRowsPerBlock) blocks of kRowThreads (one warp per row).
template <typename T, int kMaxC>
__global__ void __launch_bounds__(kRowThreads, kMinRowBlocksPerSm)
    softmax_mix_backward_rows_kernel(const SoftmaxMixBackwardParams params) {
  using Acc = acc_t<T>;
  const SoftmaxMixInputs& in = params.inputs;
  const int64_t rows = in.batch * in.seq_len;
  const int64_t row = int64_t(blockIdx.x) * kRowsPerBlock + threadIdx.x / kWarpSize;
  if (row >= rows) return;
  const int lane = threadIdx.x % kWarpSize;
  const int count = in.num_candidates;
  const int64_t b = row / in.seq_len, l = row % in.seq_len;

  Acc s[kMaxC], ds[kMaxC];
#pragma unroll
  for (int t = 0; t < kMaxC; ++t) {
    s[t] = t < count ? strided_at<T>(params.gates, params.gates_stride, b, l, t) : Acc(0);
    ds[t] = Acc(0);
  }
  for (int64_t f = lane; f < in.features; f += kWarpSize) {
    const Acc dy = relu_grad_at<T>(params, b, l, f);
#pragma unroll
    for (int t = 0; t < kMaxC; ++t) {
      if (t < count) ds[t] += dy * candidate_at<T>(in, t, b, l, f);
    }
  }
  Acc s_dot_ds = Acc(0);
#pragma unroll
  for (int t = 0; t < kMaxC; ++t) {
    if (t >= count) continue;
    ds[t] = warp_sum(ds[t]) + strided_at<T>(params.dgates, params.dgates_stride, b, l, t);
    s_dot_ds += s[t] * ds[t];
  }
  const Acc tau = static_cast<Acc>(in.tau);
  Acc dl[kMaxC];
#pragma unroll
  for (int k = 0; k < kMaxC; ++k) dl[k] = s[k] * (ds[k] - s_dot_ds) / tau;  // 0 for k >= count (s[k] = 0)
  if (lane == 0) {
#pragma unroll
    for (int k = 0; k < kMaxC; ++k) {
      if (k < count) static_cast<Acc*>(params.workspace)[row * count + k] = dl[k];
    }
  }

  T* d_candidates = static_cast<T*>(params.d_candidates);
  for (int64_t f = lane; f < in.features; f += kWarpSize) {
    const Acc dy = relu_grad_at<T>(params, b, l, f);
#pragma unroll
    for (int t = 0; t < kMaxC; ++t) {
      if (t >= count) continue;
      Acc grad = s[t] * dy;
      if (t >= in.first_logit_candidate) {
        const int64_t column = (t - in.first_logit_candidate) * in.features + f;
#pragma unroll
        for (int k = 0; k < kMaxC; ++k) {
          if (k < count) grad += dl[k] * weight_at<T>(in, k, column);
        }
      }
      d_candidates[(t * rows + row) * in.features + f] = from_acc<T>(grad);
    }
  }
}

int64_t rows_per_chunk(int64_t rows) {
  const int64_t even_split = ceil_div(rows, kMaxRowChunks);
  return even_split > kMinRowsPerChunk ? even_split : kMinRowsPerChunk;
}

// partials[chunk, k, column] = sum over the chunk's rows of dl[row, k] * x[row, column], where x is the
// concatenated logit input and column == weight_columns is the bias (x = 1).
//
// Args: params (softmax_mix.cuh); dl at workspace[0 : rows * C], partials after it.
// Grid: x = ceil((weight_columns + 1) / kColumnThreads), y = number of row chunks; kColumnThreads threads.
template <typename T, int kMaxC>
__global__ void __launch_bounds__(kColumnThreads)
    softmax_mix_weight_partials_kernel(const SoftmaxMixBackwardParams params, int64_t chunk_rows) {
  using Acc = acc_t<T>;
  const SoftmaxMixInputs& in = params.inputs;
  const int count = in.num_candidates;
  const int64_t columns = weight_columns(in);
  const int64_t column = int64_t(blockIdx.x) * kColumnThreads + threadIdx.x;
  if (column > columns) return;
  const int64_t rows = in.batch * in.seq_len;
  const Acc* dl = static_cast<const Acc*>(params.workspace);
  Acc* partials = static_cast<Acc*>(params.workspace) + rows * count;
  const bool is_bias = column == columns;
  const int t = is_bias ? 0 : in.first_logit_candidate + static_cast<int>(column / in.features);
  const int64_t f = is_bias ? 0 : column % in.features;

  Acc part[kMaxC];
#pragma unroll
  for (int k = 0; k < kMaxC; ++k) part[k] = Acc(0);
  const int64_t row_end = (blockIdx.y + 1) * chunk_rows < rows ? (blockIdx.y + 1) * chunk_rows : rows;
  for (int64_t row = blockIdx.y * chunk_rows; row < row_end; ++row) {
    const Acc x = is_bias ? Acc(1) : candidate_at<T>(in, t, row / in.seq_len, row % in.seq_len, f);
#pragma unroll
    for (int k = 0; k < kMaxC; ++k) {
      if (k < count) part[k] += dl[row * count + k] * x;
    }
  }
#pragma unroll
  for (int k = 0; k < kMaxC; ++k) {
    if (k < count) partials[(blockIdx.y * count + k) * (columns + 1) + column] = part[k];
  }
}

// d_weight[k, column] (and d_bias[k] for the last column) = sum over chunks, in chunk order, of the partials.
//
// Args: partials (chunks, C, columns + 1); d_weight (C, columns) and d_bias (C,) contiguous.
// Grid: 1-D grid-stride over C * (columns + 1); kColumnThreads threads.
template <typename T>
__global__ void __launch_bounds__(kColumnThreads)
    softmax_mix_weight_reduce_kernel(const acc_t<T>* partials, int64_t chunks, int num_candidates, int64_t columns,
                                      T* d_weight, T* d_bias) {
  const int64_t total = num_candidates * (columns + 1);
  for (int64_t idx = int64_t(blockIdx.x) * kColumnThreads + threadIdx.x; idx < total;
       idx += int64_t(gridDim.x) * kColumnThreads) {
    acc_t<T> sum = 0;
    for (int64_t chunk = 0; chunk < chunks; ++chunk) sum += partials[chunk * total + idx];
    const int64_t k = idx / (columns + 1), column = idx % (columns + 1);
    if (column < columns) {
      d_weight[k * columns + column] = from_acc<T>(sum);
    } else {
      d_bias[k] = from_acc<T>(sum);
    }
  }
}

// Calls fn(std::integral_constant<int, kMaxC>) with the smallest compiled capacity kMaxC >= count: the per-row
// arrays are sized at compile time (registers), three sizes keep the build small, and the gate's C = 2 fits exactly.
template <typename Fn>
cudaError_t with_capacity_for(int count, Fn&& fn) {
  static_assert(kMaxGateCandidates == 8, "extend the dispatch below");
  if (count <= 2) return fn(std::integral_constant<int, 2>{});
  if (count <= 4) return fn(std::integral_constant<int, 4>{});
  return fn(std::integral_constant<int, 8>{});
}

bool valid_inputs(const SoftmaxMixInputs& in) {
  return in.num_candidates >= 1 && in.num_candidates <= kMaxGateCandidates && in.first_logit_candidate >= 0 &&
         in.first_logit_candidate < in.num_candidates;
}

}  // namespace

int64_t softmax_mix_backward_workspace_elems(const SoftmaxMixInputs& inputs) {
  const int64_t rows = inputs.batch * inputs.seq_len;
  const int64_t chunks = ceil_div(rows, rows_per_chunk(rows));
  return rows * inputs.num_candidates + chunks * inputs.num_candidates * (weight_columns(inputs) + 1);
}

template <typename T>
cudaError_t launch_softmax_mix_forward(const SoftmaxMixForwardParams& params, cudaStream_t stream) {
  const SoftmaxMixInputs& in = params.inputs;
  if (!valid_inputs(in)) return cudaErrorInvalidValue;
  const int64_t blocks = ceil_div(in.batch * in.seq_len, kRowsPerBlock);
  if (blocks == 0) return cudaSuccess;
  if (blocks > kMaxGridX) return cudaErrorInvalidConfiguration;
  return with_capacity_for(in.num_candidates, [&](auto capacity) {
    softmax_mix_forward_kernel<T, decltype(capacity)::value><<<blocks, kRowThreads, 0, stream>>>(params);
    return cudaGetLastError();
  });
}

template <typename T>
cudaError_t launch_softmax_mix_backward(const SoftmaxMixBackwardParams& params, cudaStream_t stream) {
  const SoftmaxMixInputs& in = params.inputs;
  if (!valid_inputs(in)) return cudaErrorInvalidValue;
  const int64_t rows = in.batch * in.seq_len;
  const int64_t row_blocks = ceil_div(rows, kRowsPerBlock);
  const int64_t chunk_rows = rows_per_chunk(rows);
  const int64_t chunks = ceil_div(rows, chunk_rows);
  const int64_t columns = weight_columns(in);
  const int64_t column_blocks = ceil_div(columns + 1, kColumnThreads);
  if (row_blocks > kMaxGridX || column_blocks > kMaxGridX) return cudaErrorInvalidConfiguration;
  const int count = in.num_candidates;
  return with_capacity_for(count, [&](auto capacity) {
    constexpr int kMaxC = decltype(capacity)::value;
    if (rows > 0) {
      softmax_mix_backward_rows_kernel<T, kMaxC><<<row_blocks, kRowThreads, 0, stream>>>(params);
      softmax_mix_weight_partials_kernel<T, kMaxC><<<dim3(column_blocks, chunks), kColumnThreads, 0, stream>>>(
          params, chunk_rows);
    }
    // Also with no rows: the weight and bias gradients are then zeros.
    const int64_t reduce_blocks = ceil_div(count * (columns + 1), kColumnThreads);
    softmax_mix_weight_reduce_kernel<T><<<reduce_blocks < 4096 ? reduce_blocks : 4096, kColumnThreads, 0, stream>>>(
        static_cast<const acc_t<T>*>(params.workspace) + rows * count, chunks, count, columns,
        static_cast<T*>(params.d_weight), static_cast<T*>(params.d_bias));
    return cudaGetLastError();
  });
}

template cudaError_t launch_softmax_mix_forward<float>(const SoftmaxMixForwardParams&, cudaStream_t);
template cudaError_t launch_softmax_mix_forward<double>(const SoftmaxMixForwardParams&, cudaStream_t);
template cudaError_t launch_softmax_mix_forward<__half>(const SoftmaxMixForwardParams&, cudaStream_t);
template cudaError_t launch_softmax_mix_forward<__nv_bfloat16>(const SoftmaxMixForwardParams&, cudaStream_t);
template cudaError_t launch_softmax_mix_backward<float>(const SoftmaxMixBackwardParams&, cudaStream_t);
template cudaError_t launch_softmax_mix_backward<double>(const SoftmaxMixBackwardParams&, cudaStream_t);
template cudaError_t launch_softmax_mix_backward<__half>(const SoftmaxMixBackwardParams&, cudaStream_t);
template cudaError_t launch_softmax_mix_backward<__nv_bfloat16>(const SoftmaxMixBackwardParams&, cudaStream_t);

}  // namespace cuda
}  // namespace avk
