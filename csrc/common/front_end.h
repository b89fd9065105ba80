// The one front end of the compiled ops, shared by the CPU library (csrc/cpu/library.cpp) and the CUDA library
// (csrc/cuda/binding.cpp): each op's schema arguments are checked here once, with messages that name the argument,
// and turned into the kernels' arguments (the seed tensor to an int, the activation and map names to codes). A
// library provides its kernels as a struct
//
//   struct Kernels {
//     static constexpr DeviceType kDevice = ...;  // where the op's tensors must be
//     static std::tuple<Tensor, Tensor> tanh_attention_forward(q, k, v, const TanhAttentionArgs&,
//                                                              bool return_mask);
//     static std::tuple<Tensor, Tensor, Tensor> tanh_attention_backward(dout, q, k, v, o,
//                                                                       const TanhAttentionArgs&);
//     ... gate_forward, gate_backward, stage_gate_forward, stage_gate_backward (the ops' own arguments, checked
//         here first: common/gate_args.h)
//   };
//
// (Tensor, DeviceType: common/tensor_api.h, ATen's or the stable ABI's) and registers
// FrontEnd<Kernels>::register_kernels(m) in its AVK_LIBRARY_IMPL. Determinism is a property of the kernels, not an
// argument: the CPU kernels always reduce in a fixed order; the CUDA tanh_attention backward, the one kernel with a
// faster order-dependent reduction, reads torch.use_deterministic_algorithms itself.
#pragma once

#include <cmath>
#include <string>
#include <tuple>
#include <vector>

#include "common/checks.h"
#include "common/gate_args.h"
#include "common/tensor_api.h"
#include "common/tanh_attention_args.h"

namespace avk {

// The seed tensor of the ops: empty (no dropout) or one int64 value in [0, 2^31) (Philox keys).
inline int64_t seed_value(const Tensor& seed, const char* op) {
  AVK_CHECK(seed.scalar_type() == ScalarType::Long && seed.numel() <= 1, op,
            ": seed must be an empty or one-element int64 tensor, got a ", dtype_name(seed.scalar_type()),
            " tensor of shape ", shape_string(seed.sizes()));
  const int64_t value = seed.numel() == 0 ? 0 : scalar_value<int64_t>(seed);
  AVK_CHECK(value >= 0 && value < (int64_t(1) << 31), op, ": seed must be in [0, 2**31), got ", value);
  return value;
}

// Checks q, k, v and the scalars of tanh_attention; `op` names the op in messages.
inline TanhAttentionArgs tanh_attention_args(const Tensor& q, const Tensor& k, const Tensor& v,
                                             const Tensor& seed, double scale, double dropout_p,
                                             StrArg activation, StrArg map, double map_bias,
                                             DeviceType device, const char* op) {
  check_float(q, device, op, "q");
  check_float_like(k, q, op, "k", "q");
  check_float_like(v, q, op, "v", "q");
  check_shape(q, {-1, -1, -1}, op, "q", "(B, Mq, D)");
  check_shape(k, {q.size(0), -1, q.size(2)}, op, "k", "(B, N, D)");
  check_shape(v, {-1, k.size(1), -1}, op, "v", "(B or 1, N, E)");
  AVK_CHECK(v.size(0) == q.size(0) || v.size(0) == 1, op, ": v must have batch size ", q.size(0),
            " (like q) or 1 (shared), got ", v.size(0));
  AVK_CHECK(std::isfinite(scale), op, ": scale must be finite, got ", scale);
  AVK_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, op, ": dropout_p must be in [0, 1), got ", dropout_p);
  AVK_CHECK(activation == "none" || activation == "tanh_relu", op,
            ": activation must be \"none\" or \"tanh_relu\", got \"", std::string(activation), "\"");
  int map_code = 0;
  while (map_code < kNumMaps && map != kMapNames[map_code]) ++map_code;
  if (map_code == kNumMaps) {
    std::string names;
    for (const char* name : kMapNames) names += std::string(names.empty() ? "\"" : ", \"") + name + "\"";
    AVK_CHECK(false, op, ": map must be one of ", names, "; got \"", std::string(map), "\"");
  }
  AVK_CHECK(std::isfinite(map_bias), op, ": map_bias must be finite, got ", map_bias);
  AVK_CHECK(map_bias == 0.0 || map == "sigmoid", op, ": map_bias is the sigmoid map's; map \"",
            std::string(map), "\" takes map_bias=0, got ", map_bias);
  TanhAttentionArgs args{};
  args.seed = seed_value(seed, op);
  args.scale = scale;
  args.dropout_p = dropout_p;
  args.tanh_relu = activation == "tanh_relu";
  args.map = static_cast<AttentionMap>(map_code);
  args.map_bias = map_bias;
  return args;
}

template <class Kernels>
struct FrontEnd {
  static std::tuple<Tensor, Tensor> tanh_attention(const Tensor& q, const Tensor& k,
                                                   const Tensor& v, const Tensor& seed, double scale,
                                                   double dropout_p, StrArg activation,
                                                   bool return_mask, StrArg map, double map_bias) {
    const TanhAttentionArgs args = tanh_attention_args(q, k, v, seed, scale, dropout_p, activation, map, map_bias,
                                                       Kernels::kDevice, "tanh_attention_forward");
    return Kernels::tanh_attention_forward(q, k, v, args, return_mask);
  }

  // `o` is read (and checked) only with the tanh_relu epilogue, whose derivative needs it.
  static std::tuple<Tensor, Tensor, Tensor> tanh_attention_backward(
      const Tensor& dout, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& o,
      const Tensor& seed, double scale, double dropout_p, StrArg activation, StrArg map,
      double map_bias) {
    constexpr const char* op = "tanh_attention_backward";
    const TanhAttentionArgs args = tanh_attention_args(q, k, v, seed, scale, dropout_p, activation, map, map_bias,
                                                       Kernels::kDevice, op);
    check_float_like(dout, q, op, "dout", "q");
    check_shape(dout, {q.size(0), q.size(1), v.size(2)}, op, "dout", "(B, Mq, E)");
    if (args.tanh_relu) {
      check_float_like(o, q, op, "out", "q");
      check_shape(o, {q.size(0), q.size(1), v.size(2)}, op, "out", "(B, Mq, E)");
    }
    return Kernels::tanh_attention_backward(dout, q, k, v, o, args);
  }

  // The gate's candidates are (unattended, attended): g[..., 0] weighs the unattended features.
  static std::tuple<Tensor, Tensor> gate(const Tensor& attended, const Tensor& unattended, const Tensor& weight,
                                         const Tensor& bias, double tau) {
    constexpr SoftmaxMixNames names{"gate_forward", "attended", "2", "g"};
    check_gate_inputs(names.op, attended, unattended, weight, Kernels::kDevice);
    check_mix_forward(names, attended, 2, bias, tau);
    return Kernels::gate_forward(attended, unattended, weight, bias, tau);
  }

  static std::tuple<Tensor, Tensor, Tensor, Tensor> gate_backward(const Tensor& dout, const Tensor& dg,
                                                                  const Tensor& attended, const Tensor& unattended,
                                                                  const Tensor& weight, const Tensor& g,
                                                                  const Tensor& out, double tau) {
    constexpr SoftmaxMixNames names{"gate_backward", "attended", "2", "g"};
    check_gate_inputs(names.op, attended, unattended, weight, Kernels::kDevice);
    check_mix_backward(names, attended, 2, dout, dg, g, out, tau);
    return Kernels::gate_backward(dout, dg, attended, unattended, weight, g, out, tau);
  }

  static std::tuple<Tensor, Tensor> stage_gate(TensorListArg stages, const Tensor& weight,
                                               const Tensor& bias, double tau) {
    constexpr SoftmaxMixNames names{"stage_gate_forward", "stages[0]", "T", "s"};
    const std::vector<Tensor>& list = tensor_vector(stages);
    check_stage_inputs(names.op, list, weight, Kernels::kDevice);
    check_mix_forward(names, list[0], static_cast<int64_t>(list.size()), bias, tau);
    return Kernels::stage_gate_forward(list, weight, bias, tau);
  }

  static std::tuple<Tensor, Tensor, Tensor> stage_gate_backward(const Tensor& dout,
                                                                const Tensor& ds,
                                                                TensorListArg stages,
                                                                const Tensor& weight,
                                                                const Tensor& s,
                                                                const Tensor& out, double tau) {
    constexpr SoftmaxMixNames names{"stage_gate_backward", "stages[0]", "T", "s"};
    const std::vector<Tensor>& list = tensor_vector(stages);
    check_stage_inputs(names.op, list, weight, Kernels::kDevice);
    check_mix_backward(names, list[0], static_cast<int64_t>(list.size()), dout, ds, s, out, tau);
    return Kernels::stage_gate_backward(dout, ds, list, weight, s, out, tau);
  }

  static void register_kernels(Library& m) {
    m.impl("tanh_attention", AVK_KERNEL(&tanh_attention));
    m.impl("tanh_attention_backward", AVK_KERNEL(&tanh_attention_backward));
    m.impl("gate", AVK_KERNEL(&gate));
    m.impl("gate_backward", AVK_KERNEL(&gate_backward));
    m.impl("stage_gate", AVK_KERNEL(&stage_gate));
    m.impl("stage_gate_backward", AVK_KERNEL(&stage_gate_backward));
  }
};

}  // namespace avk
