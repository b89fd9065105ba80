// GRJCA's stage gate (SPEC 3): the softmax mix (softmax_mix.h) of the T candidate stages, with logits from all of them:
//   s = softmax((concat_t X_t W^T + b) / tau) per row (b, l),  out = ReLU(sum_t s_t X_t)
// with W (T, T * d). Backward returns d_stages as one (T, B, L, d) tensor. The front end (common/front_end.h) has
// checked the arguments.

#include "ops.h"

#include "softmax_mix.h"

namespace avk {
namespace cpu {

std::tuple<Tensor, Tensor> stage_gate_forward(const std::vector<Tensor>& stages, const Tensor& weight,
                                              const Tensor& bias, double tau) {
  return softmax_mix_forward(stages, 0, weight, bias, tau);
}

std::tuple<Tensor, Tensor, Tensor> stage_gate_backward(const Tensor& dout, const Tensor& ds,
                                                       const std::vector<Tensor>& stages,
                                                       const Tensor& weight, const Tensor& s,
                                                       const Tensor& out, double tau) {
  const auto shape = stages[0].sizes();
  Tensor d_stages = make_empty(stages[0], {static_cast<int64_t>(stages.size()), shape[0], shape[1], shape[2]});
  auto [d_weight, d_bias] = softmax_mix_backward(dout, ds, stages, 0, weight, s, out, tau, unbind0(d_stages));
  return {d_stages, d_weight, d_bias};
}

}  // namespace cpu
}  // namespace avk
