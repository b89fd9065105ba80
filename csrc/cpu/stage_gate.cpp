// GRJCA's stage gate (SPEC 3): the softmax mix (softmax_mix.h) of the T candidate stages, with logits from all of them:
//   s = softmax((concat_t X_t W^T + b) / tau) per row (b, l),  out = ReLU(sum_t s_t X_t)
// with W (T, T * d). Backward returns d_stages as one (T, B, L, d) tensor. This file checks the arguments under the
// stage gate's names and adapts them.

#include "ops.h"

#include <string>

#include "checks.h"
#include "softmax_mix.h"

namespace avk {
namespace cpu {
namespace {

void check_stage_inputs(const char* fn, const std::vector<Tensor>& stages, const Tensor& weight) {
  AVK_CHECK(!stages.empty(), fn, ": stages must be a non-empty list of (B, L, d) tensors");
  check_float_cpu(stages[0], fn, "stages[0]");
  check_shape(stages[0], {-1, -1, -1}, fn, "stages[0]", "(B, L, d)");
  for (size_t t = 1; t < stages.size(); ++t) {
    const std::string name = "stages[" + std::to_string(t) + "]";
    check_float_cpu_like(stages[t], stages[0], fn, name.c_str(), "stages[0]");
    check_shape(stages[t], stages[0].sizes(), fn, name.c_str(), "(B, L, d) like stages[0]");
  }
  const int64_t n = static_cast<int64_t>(stages.size());
  check_float_cpu_like(weight, stages[0], fn, "weight", "stages[0]");
  check_shape(weight, {n, n * stages[0].size(2)}, fn, "weight", "(T, T * d)");
}

}  // namespace

std::tuple<Tensor, Tensor> stage_gate_forward(const std::vector<Tensor>& stages, const Tensor& weight,
                                              const Tensor& bias, double tau) {
  constexpr const char* fn = "stage_gate_forward";
  check_stage_inputs(fn, stages, weight);
  return softmax_mix_forward({fn, "stages[0]", "T", "s"}, stages, 0, weight, bias, tau);
}

std::tuple<Tensor, Tensor, Tensor> stage_gate_backward(const Tensor& dout, const Tensor& ds,
                                                       const std::vector<Tensor>& stages,
                                                       const Tensor& weight, const Tensor& s,
                                                       const Tensor& out, double tau) {
  constexpr const char* fn = "stage_gate_backward";
  check_stage_inputs(fn, stages, weight);
  const auto shape = stages[0].sizes();
  Tensor d_stages = make_empty(stages[0], {static_cast<int64_t>(stages.size()), shape[0], shape[1], shape[2]});
  auto [d_weight, d_bias] = softmax_mix_backward({fn, "stages[0]", "T", "s"}, dout, ds, stages, 0, weight, s, out,
                                                 tau, unbind0(d_stages));
  return {d_stages, d_weight, d_bias};
}

}  // namespace cpu
}  // namespace avk
