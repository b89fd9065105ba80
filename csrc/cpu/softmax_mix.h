// The softmax mix: the one computation behind both gates of SPEC 3, which gate.cpp and stage_gate.cpp adapt.
//
// Per row (b, l) of the candidates X_0 .. X_{C-1}, each (B, L, d):
//     z   = concat_{c >= first_logit} X_c  W^T + b      (C logits; W is (C, (C - first_logit) * d))
//     s   = softmax(z / tau)                            (the gate values, returned as (B, L, C))
//     out = ReLU(sum_c s_c X_c)
//   gate:       candidates (unattended, attended), first_logit = 1, W (2, d)
//   stage_gate: candidates stages[0 .. T),          first_logit = 0, W (T, T * d)
//
// The arguments are checked by the front end (common/front_end.h, common/gate_args.h).
#pragma once

#include <tuple>
#include <vector>

#include "common/tensor_api.h"

namespace avk {
namespace cpu {

// Returns (out (B, L, d), gate values (B, L, C)).
std::tuple<Tensor, Tensor> softmax_mix_forward(const std::vector<Tensor>& candidates,
                                               int64_t first_logit, const Tensor& weight,
                                               const Tensor& bias, double tau);

// Writes the candidates' gradients into d_candidates (C contiguous (B, L, d) tensors of the candidates' dtype, which
// gate.cpp and stage_gate.cpp allocate: one tensor per candidate for the gate, views of one (T, B, L, d) tensor for the stage gate)
// and returns (d_weight, d_bias). Deterministic: the weight and bias gradients are reduced per chunk of rows, then over
// chunks in a fixed order, whatever the thread count.
std::tuple<Tensor, Tensor> softmax_mix_backward(const Tensor& dout,
                                                const Tensor& dgates,
                                                const std::vector<Tensor>& candidates, int64_t first_logit,
                                                const Tensor& weight, const Tensor& gates,
                                                const Tensor& out, double tau,
                                                const std::vector<Tensor>& d_candidates);

}  // namespace cpu
}  // namespace avk
