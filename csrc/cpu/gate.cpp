// The two-way gate of DCA / GRJCA (SPEC 3): the softmax mix (softmax_mix.h) of the candidates (unattended, attended),
// with logits from the attended features only:
//   g = softmax((a W^T + b) / tau) per row (b, l),  out = ReLU(g0 * u + g1 * a)
// with a = attended, u = unattended, W (2, d). The front end (common/front_end.h) has checked the arguments.

#include "ops.h"

#include "softmax_mix.h"

namespace avk {
namespace cpu {
namespace {

// The candidates' order: g[..., 0] weighs the unattended features, and only the attended one feeds the logits.
constexpr int64_t kAttended = 1;

}  // namespace

std::tuple<Tensor, Tensor> gate_forward(const Tensor& attended, const Tensor& unattended,
                                        const Tensor& weight, const Tensor& bias, double tau) {
  return softmax_mix_forward({unattended, attended}, kAttended, weight, bias, tau);
}

std::tuple<Tensor, Tensor, Tensor, Tensor> gate_backward(
    const Tensor& dout, const Tensor& dg, const Tensor& attended, const Tensor& unattended,
    const Tensor& weight, const Tensor& g, const Tensor& out, double tau) {
  // Two separate tensors: the op's outputs must not alias each other (torch.library.opcheck checks).
  const Tensor d_attended = make_empty(attended, attended.sizes());
  const Tensor d_unattended = make_empty(attended, attended.sizes());
  auto [d_weight, d_bias] = softmax_mix_backward(dout, dg, {unattended, attended}, kAttended, weight, g, out, tau,
                                                 {d_unattended, d_attended});
  return {d_attended, d_unattended, d_weight, d_bias};
}

}  // namespace cpu
}  // namespace avk
