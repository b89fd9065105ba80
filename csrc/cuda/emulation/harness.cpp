// C entry points over the CUDA launchers for the CPU emulation test (tests/test_cuda_compile.py loads the built
// library with ctypes). Tensors arrive as pointers plus int64 element strides; `is_double` picks the float or double
// instantiation. Each returns the launcher's cudaError_t.
#include <vector>

#include "cuda/softmax_mix.cuh"
#include "cuda/tanh_attention.cuh"

using namespace avk::cuda;

namespace {

// sizes = (B, Mq, N, D, E); strides are 3 per tensor; map: 0 tanh, 1 sigmoid (avk::AttentionMap).
TanhAttentionProblem attention_problem(const void* q, const int64_t* q_stride, const void* k, const int64_t* k_stride,
                                       const void* v, const int64_t* v_stride, const int64_t* sizes, int v_shared,
                                       double scale, double dropout_p, uint64_t seed, int activation, int map,
                                       double map_bias) {
  TanhAttentionProblem p{};
  p.q = q;
  p.k = k;
  p.v = v;
  p.v_shared = v_shared != 0;
  for (int i = 0; i < 3; ++i) {
    p.q_stride[i] = q_stride[i];
    p.k_stride[i] = k_stride[i];
    p.v_stride[i] = v_stride[i];
  }
  p.batch = sizes[0];
  p.queries = sizes[1];
  p.keys = sizes[2];
  p.head_dim = sizes[3];
  p.value_dim = sizes[4];
  p.scale = scale;
  p.dropout_p = dropout_p;
  p.seed = seed;
  p.activation = activation;
  p.map = static_cast<avk::AttentionMap>(map);
  p.map_bias = map_bias;
  return p;
}

// sizes = (B, L, d); candidate_strides holds 3 strides per candidate.
SoftmaxMixInputs gate_inputs(int count, int first_logit_candidate, const void* const* candidates,
                              const int64_t* candidate_strides, const int64_t* sizes, const void* weight,
                              const int64_t* weight_stride, const void* bias, int64_t bias_stride, double tau) {
  SoftmaxMixInputs in{};
  in.num_candidates = count;
  in.first_logit_candidate = first_logit_candidate;
  in.batch = sizes[0];
  in.seq_len = sizes[1];
  in.features = sizes[2];
  for (int t = 0; t < count; ++t) {
    in.candidates[t] = candidates[t];
    for (int i = 0; i < 3; ++i) in.candidate_stride[t][i] = candidate_strides[3 * t + i];
  }
  in.weight = weight;
  in.weight_stride[0] = weight_stride[0];
  in.weight_stride[1] = weight_stride[1];
  in.bias = bias;
  in.bias_stride = bias_stride;
  in.tau = tau;
  return in;
}

}  // namespace

extern "C" int emu_tanh_attention_forward(int is_double, const void* q, const int64_t* q_stride, const void* k,
                                          const int64_t* k_stride, const void* v, const int64_t* v_stride,
                                          const int64_t* sizes, int v_shared, double scale, double dropout_p,
                                          uint64_t seed, int activation, int map, double map_bias, void* o,
                                          uint8_t* mask) {
  TanhAttentionForwardParams params{};
  params.problem = attention_problem(q, q_stride, k, k_stride, v, v_stride, sizes, v_shared, scale, dropout_p, seed,
                                     activation, map, map_bias);
  params.o = o;
  params.mask = mask;
  return is_double ? launch_tanh_attention_forward<double>(params, nullptr)
                   : launch_tanh_attention_forward<float>(params, nullptr);
}

extern "C" int emu_tanh_attention_backward(int is_double, const void* q, const int64_t* q_stride, const void* k,
                                           const int64_t* k_stride, const void* v, const int64_t* v_stride,
                                           const int64_t* sizes, int v_shared, double scale, double dropout_p,
                                           uint64_t seed, int activation, int map, double map_bias, const void* dout,
                                           const int64_t* dout_stride,
                                           const void* o, const int64_t* o_stride, void* dq, void* dk, void* dv,
                                           int deterministic) {
  TanhAttentionBackwardParams params{};
  params.problem = attention_problem(q, q_stride, k, k_stride, v, v_stride, sizes, v_shared, scale, dropout_p, seed,
                                     activation, map, map_bias);
  params.dout = dout;
  params.o = o;
  for (int i = 0; i < 3; ++i) {
    params.dout_stride[i] = dout_stride[i];
    params.o_stride[i] = o_stride[i];
  }
  params.dq = dq;
  params.dk = dk;
  params.dv = dv;
  params.deterministic = deterministic != 0;
  std::vector<double> workspace(tanh_attention_backward_workspace_elems(params) + 1);  // double: fits float too
  params.workspace = workspace.data();
  return is_double ? launch_tanh_attention_backward<double>(params, nullptr)
                   : launch_tanh_attention_backward<float>(params, nullptr);
}

extern "C" int emu_softmax_mix_forward(int is_double, int count, int first_logit_candidate,
                                        const void* const* candidates, const int64_t* candidate_strides,
                                        const int64_t* sizes, const void* weight, const int64_t* weight_stride,
                                        const void* bias, int64_t bias_stride, double tau, void* out, void* gates) {
  SoftmaxMixForwardParams params{};
  params.inputs = gate_inputs(count, first_logit_candidate, candidates, candidate_strides, sizes, weight,
                              weight_stride, bias, bias_stride, tau);
  params.out = out;
  params.gates = gates;
  return is_double ? launch_softmax_mix_forward<double>(params, nullptr)
                   : launch_softmax_mix_forward<float>(params, nullptr);
}

extern "C" int emu_softmax_mix_backward(int is_double, int count, int first_logit_candidate,
                                         const void* const* candidates, const int64_t* candidate_strides,
                                         const int64_t* sizes, const void* weight, const int64_t* weight_stride,
                                         double tau, const void* dout, const int64_t* dout_stride, const void* dgates,
                                         const int64_t* dgates_stride, const void* gates, const int64_t* gates_stride,
                                         const void* out, const int64_t* out_stride, void* d_candidates,
                                         void* d_weight, void* d_bias) {
  SoftmaxMixBackwardParams params{};
  params.inputs = gate_inputs(count, first_logit_candidate, candidates, candidate_strides, sizes, weight,
                              weight_stride, nullptr, 0, tau);
  params.dout = dout;
  params.dgates = dgates;
  params.gates = gates;
  params.out = out;
  for (int i = 0; i < 3; ++i) {
    params.dout_stride[i] = dout_stride[i];
    params.dgates_stride[i] = dgates_stride[i];
    params.gates_stride[i] = gates_stride[i];
    params.out_stride[i] = out_stride[i];
  }
  params.d_candidates = d_candidates;
  params.d_weight = d_weight;
  params.d_bias = d_bias;
  std::vector<double> workspace(softmax_mix_backward_workspace_elems(params.inputs) + 1);
  params.workspace = workspace.data();
  return is_double ? launch_softmax_mix_backward<double>(params, nullptr)
                   : launch_softmax_mix_backward<float>(params, nullptr);
}
