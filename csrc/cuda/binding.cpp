// avkernels._C_cuda: the CUDA kernels of the avkernels ops (TORCH_LIBRARY_IMPL(avkernels, CUDA, ...)). The ops and
// their schemas are defined once, by avkernels._C_cpu (csrc/cpu/library.cpp), which avkernels/ops/native.py loads
// first; the Python side registers their fakes and autograd (avkernels/ops/declaration.py).
//
// Deliberately thin: the ops' front end (argument checks, schema arguments to kernel arguments) is the one shared
// with the CPU library (csrc/common/front_end.h); this file adds output and workspace allocation, the current
// stream, and dtype dispatch. All kernels live in the torch-independent
// csrc/cuda/*.cu files behind the launch functions of their .cuh headers. This file is the only torch-dependent
// CUDA source and the only csrc/cuda/*.cpp (setup.py compiles it with the host compiler).
#include "common/op_library.h"  // first: it includes Python.h

#include "common/front_end.h"

#include <ATen/Context.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "cuda/softmax_mix.cuh"
#include "cuda/tanh_attention.cuh"

namespace {

using avk::cuda::kMaxGateCandidates;
using avk::cuda::SoftmaxMixBackwardParams;
using avk::cuda::SoftmaxMixForwardParams;
using avk::cuda::SoftmaxMixInputs;
using avk::cuda::TanhAttentionBackwardParams;
using avk::cuda::TanhAttentionForwardParams;
using avk::cuda::TanhAttentionProblem;

template <typename T>
struct TypeTag {
  using type = T;
};

// Calls fn(TypeTag<T>{}) with the CUDA storage type of `dtype` (checked beforehand by the front end).
template <typename Fn>
cudaError_t dispatch_dtype(at::ScalarType dtype, Fn&& fn) {
  switch (dtype) {
    case at::kFloat: return fn(TypeTag<float>{});
    case at::kDouble: return fn(TypeTag<double>{});
    case at::kHalf: return fn(TypeTag<__half>{});
    case at::kBFloat16: return fn(TypeTag<__nv_bfloat16>{});
    default: break;
  }
  TORCH_CHECK(false, "avkernels._C_cuda: unsupported dtype ", dtype);
  return cudaErrorInvalidValue;
}

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA kernel launch failed: ", cudaGetErrorString(err),
              err == cudaErrorInvalidConfiguration ? " (a size exceeds the CUDA grid limits)" : "");
}

void copy_strides(int64_t (&dst)[3], const at::Tensor& t) {
  for (int d = 0; d < 3; ++d) dst[d] = t.stride(d);
}

// The kernels' problem description from q, k, v and the arguments the front end checked.
TanhAttentionProblem tanh_attention_problem(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                            const avk::TanhAttentionArgs& args) {
  TanhAttentionProblem p{};
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.v_shared = v.size(0) == 1;
  copy_strides(p.q_stride, q);
  copy_strides(p.k_stride, k);
  copy_strides(p.v_stride, v);
  p.batch = q.size(0);
  p.queries = q.size(1);
  p.keys = k.size(1);
  p.head_dim = q.size(2);
  p.value_dim = v.size(2);
  p.scale = args.scale;
  p.dropout_p = args.dropout_p;
  p.seed = static_cast<uint64_t>(args.seed);
  p.activation = args.tanh_relu ? 1 : 0;
  p.map = args.map;
  p.map_bias = args.map_bias;
  return p;
}

std::tuple<at::Tensor, at::Tensor> tanh_attention_forward(const at::Tensor& q, const at::Tensor& k,
                                                          const at::Tensor& v, const avk::TanhAttentionArgs& args,
                                                          bool return_mask) {
  constexpr const char* op = "tanh_attention_forward";
  TanhAttentionForwardParams params{};
  params.problem = tanh_attention_problem(q, k, v, args);
  const c10::cuda::CUDAGuard guard(q.device());
  const auto& p = params.problem;
  at::Tensor o = at::empty({p.batch, p.queries, p.value_dim}, q.options());
  at::Tensor mask = return_mask && args.dropout_p > 0.0
                        ? at::empty({p.batch, p.queries, p.keys}, q.options().dtype(at::kBool))
                        : at::empty({0}, q.options().dtype(at::kBool));
  params.o = o.data_ptr();
  params.mask = mask.numel() > 0 ? reinterpret_cast<uint8_t*>(mask.data_ptr<bool>()) : nullptr;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  check_launch(dispatch_dtype(q.scalar_type(),
                              [&](auto tag) {
                                using T = typename decltype(tag)::type;
                                return avk::cuda::launch_tanh_attention_forward<T>(params, stream);
                              }),
               op);
  return {o, mask};
}

// The one kernel whose reduction has a faster order-dependent form (atomics for a v shared over the batch): it
// takes the fixed order when torch.use_deterministic_algorithms asks for it.
std::tuple<at::Tensor, at::Tensor, at::Tensor> tanh_attention_backward(const at::Tensor& dout, const at::Tensor& q,
                                                                       const at::Tensor& k, const at::Tensor& v,
                                                                       const at::Tensor& o,
                                                                       const avk::TanhAttentionArgs& args) {
  constexpr const char* op = "tanh_attention_backward";
  TanhAttentionBackwardParams params{};
  params.problem = tanh_attention_problem(q, k, v, args);
  params.dout = dout.data_ptr();
  copy_strides(params.dout_stride, dout);
  if (args.tanh_relu) {  // the tanh_relu epilogue's derivative reads the forward output
    params.o = o.data_ptr();
    copy_strides(params.o_stride, o);
  }
  const c10::cuda::CUDAGuard guard(q.device());
  at::Tensor dq = at::empty(q.sizes(), q.options());
  at::Tensor dk = at::empty(k.sizes(), k.options());
  at::Tensor dv = at::empty(v.sizes(), v.options());
  params.dq = dq.data_ptr();
  params.dk = dk.data_ptr();
  params.dv = dv.data_ptr();
  params.deterministic = at::globalContext().deterministicAlgorithms();
  const auto acc_dtype = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor workspace =
      at::empty({avk::cuda::tanh_attention_backward_workspace_elems(params)}, q.options().dtype(acc_dtype));
  params.workspace = workspace.data_ptr();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  check_launch(dispatch_dtype(q.scalar_type(),
                              [&](auto tag) {
                                using T = typename decltype(tag)::type;
                                return avk::cuda::launch_tanh_attention_backward<T>(params, stream);
                              }),
               op);
  return {dq, dk, dv};
}

// The kernels' inputs from the candidates (each (B, L, d)), weight and bias (undefined in the backward, which does
// not read it), as the front end checked them. The kernels take at most kMaxGateCandidates candidates: a limit of
// this library, not of the op, so checked here.
SoftmaxMixInputs gate_inputs(const std::vector<at::Tensor>& candidates, int first_logit_candidate,
                              const at::Tensor& weight, const at::Tensor& bias, double tau, const char* op) {
  const int count = static_cast<int>(candidates.size());
  TORCH_CHECK(count <= kMaxGateCandidates, op, ": expected 1 to ", kMaxGateCandidates, " stages, got ", count);
  const at::Tensor& first = candidates[0];
  SoftmaxMixInputs in{};
  in.num_candidates = count;
  in.first_logit_candidate = first_logit_candidate;
  in.batch = first.size(0);
  in.seq_len = first.size(1);
  in.features = first.size(2);
  for (int t = 0; t < count; ++t) {
    in.candidates[t] = candidates[t].data_ptr();
    copy_strides(in.candidate_stride[t], candidates[t]);
  }
  in.weight = weight.data_ptr();
  in.weight_stride[0] = weight.stride(0);
  in.weight_stride[1] = weight.stride(1);
  if (bias.defined()) {
    in.bias = bias.data_ptr();
    in.bias_stride = bias.stride(0);
  }
  in.tau = tau;
  return in;
}

// out = ReLU(sum_t s_t X_t) and s (B, L, C) for the given candidates.
std::tuple<at::Tensor, at::Tensor> softmax_mix_forward(const SoftmaxMixInputs& in, const at::Tensor& like,
                                                        const char* op) {
  const c10::cuda::CUDAGuard guard(like.device());
  at::Tensor out = at::empty({in.batch, in.seq_len, in.features}, like.options());
  at::Tensor gates = at::empty({in.batch, in.seq_len, in.num_candidates}, like.options());
  SoftmaxMixForwardParams params{in, out.data_ptr(), gates.data_ptr()};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  check_launch(dispatch_dtype(like.scalar_type(),
                              [&](auto tag) {
                                using T = typename decltype(tag)::type;
                                return avk::cuda::launch_softmax_mix_forward<T>(params, stream);
                              }),
               op);
  return {out, gates};
}

// Gradients of the candidates (C, B, L, d), the weight and the bias. The reductions over rows are always in a
// fixed order (softmax_mix.cuh): deterministic.
std::tuple<at::Tensor, at::Tensor, at::Tensor> softmax_mix_backward(const SoftmaxMixInputs& in,
                                                                     const at::Tensor& dout, const at::Tensor& dgates,
                                                                     const at::Tensor& gates, const at::Tensor& out,
                                                                     const at::Tensor& weight, const char* op) {
  const int64_t c = in.num_candidates;
  const c10::cuda::CUDAGuard guard(weight.device());
  at::Tensor d_candidates = at::empty({c, in.batch, in.seq_len, in.features}, weight.options());
  at::Tensor d_weight = at::empty(weight.sizes(), weight.options());
  at::Tensor d_bias = at::empty({c}, weight.options());
  const auto acc_dtype = weight.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor workspace =
      at::empty({avk::cuda::softmax_mix_backward_workspace_elems(in)}, weight.options().dtype(acc_dtype));

  SoftmaxMixBackwardParams params{};
  params.inputs = in;
  params.dout = dout.data_ptr();
  copy_strides(params.dout_stride, dout);
  params.dgates = dgates.data_ptr();
  copy_strides(params.dgates_stride, dgates);
  params.gates = gates.data_ptr();
  copy_strides(params.gates_stride, gates);
  params.out = out.data_ptr();
  copy_strides(params.out_stride, out);
  params.d_candidates = d_candidates.data_ptr();
  params.d_weight = d_weight.data_ptr();
  params.d_bias = d_bias.data_ptr();
  params.workspace = workspace.data_ptr();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  check_launch(dispatch_dtype(weight.scalar_type(),
                              [&](auto tag) {
                                using T = typename decltype(tag)::type;
                                return avk::cuda::launch_softmax_mix_backward<T>(params, stream);
                              }),
               op);
  return {d_candidates, d_weight, d_bias};
}

// The gate's candidates are (unattended, attended): g[..., 0] weighs the unattended features, and the logits read
// the attended ones only (first_logit_candidate = 1).
std::tuple<at::Tensor, at::Tensor> gate_forward(const at::Tensor& attended, const at::Tensor& unattended,
                                                const at::Tensor& weight, const at::Tensor& bias, double tau) {
  constexpr const char* op = "gate_forward";
  const auto in = gate_inputs({unattended, attended}, 1, weight, bias, tau, op);
  return softmax_mix_forward(in, attended, op);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> gate_backward(
    const at::Tensor& dout, const at::Tensor& dg, const at::Tensor& attended, const at::Tensor& unattended,
    const at::Tensor& weight, const at::Tensor& g, const at::Tensor& out, double tau) {
  constexpr const char* op = "gate_backward";
  const auto in = gate_inputs({unattended, attended}, 1, weight, at::Tensor(), tau, op);
  auto [d_candidates, d_weight, d_bias] = softmax_mix_backward(in, dout, dg, g, out, weight, op);
  // A custom op's outputs must not alias one another (opcheck rejects it, as it did on CPU): the kernel writes both
  // candidates' gradients into one buffer, so one of them leaves it as a copy.
  return {d_candidates[1].clone(), d_candidates[0], d_weight, d_bias};
}

std::tuple<at::Tensor, at::Tensor> stage_gate_forward(const std::vector<at::Tensor>& stages, const at::Tensor& weight,
                                                      const at::Tensor& bias, double tau) {
  constexpr const char* op = "stage_gate_forward";
  const auto in = gate_inputs(stages, 0, weight, bias, tau, op);
  return softmax_mix_forward(in, stages[0], op);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> stage_gate_backward(const at::Tensor& dout, const at::Tensor& ds,
                                                                   const std::vector<at::Tensor>& stages,
                                                                   const at::Tensor& weight, const at::Tensor& s,
                                                                   const at::Tensor& out, double tau) {
  constexpr const char* op = "stage_gate_backward";
  const auto in = gate_inputs(stages, 0, weight, at::Tensor(), tau, op);
  return softmax_mix_backward(in, dout, ds, s, out, weight, op);
}

// The CUDA kernels, as the shared front end (csrc/common/front_end.h) calls them, with checked arguments.
struct CudaKernels {
  static constexpr c10::DeviceType kDevice = c10::DeviceType::CUDA;
  static constexpr auto tanh_attention_forward = &::tanh_attention_forward;
  static constexpr auto tanh_attention_backward = &::tanh_attention_backward;
  static constexpr auto gate_forward = &::gate_forward;
  static constexpr auto gate_backward = &::gate_backward;
  static constexpr auto stage_gate_forward = &::stage_gate_forward;
  static constexpr auto stage_gate_backward = &::stage_gate_backward;
};

}  // namespace

TORCH_LIBRARY_IMPL(avkernels, CUDA, m) { avk::FrontEnd<CudaKernels>::register_kernels(m); }

AVK_PYTHON_MODULE_STUB("avkernels' CUDA kernels: kernels of the torch ops torch.ops.avkernels.* (backend \"cuda\")")
