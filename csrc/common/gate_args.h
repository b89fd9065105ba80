// The argument checks of both gates (gate, stage_gate and their backwards), shared by the CPU and CUDA libraries
// through the front end (common/front_end.h). Both gates are one softmax mix of C candidates (SPEC 3): the gate's
// (unattended, attended), the stage gate's stages[0 .. T); the messages use each op's own argument names.
#pragma once

#include <cmath>
#include <string>
#include <vector>

#include "common/checks.h"
#include "common/tensor_api.h"

namespace avk {

// How an op names the mix's arguments: `ref_name` is the argument the others are checked against ("attended",
// "stages[0]"), `count` how the op writes C ("2", "T"), `gates_name` the gate values ("g", "s"; their gradient is
// "d" + gates_name).
struct SoftmaxMixNames {
  const char* op;  // e.g. "gate_forward"
  const char* ref_name;
  const char* count;
  const char* gates_name;
};

inline void check_tau(double tau, const char* op) {
  AVK_CHECK(std::isfinite(tau) && tau > 0.0, op, ": tau must be a finite positive number, got ", tau);
}

// The forward's bias and tau; `ref` (the checked reference candidate) gives dtype and device.
inline void check_mix_forward(const SoftmaxMixNames& names, const Tensor& ref, int64_t count, const Tensor& bias,
                              double tau) {
  check_float_like(bias, ref, names.op, "bias", names.ref_name);
  const std::string bias_shape = std::string("(") + names.count + ",)";
  check_shape(bias, {count}, names.op, "bias", bias_shape.c_str());
  check_tau(tau, names.op);
}

// The backward's dout, out (B, L, d), the gate values and their gradient (B, L, C), and tau.
inline void check_mix_backward(const SoftmaxMixNames& names, const Tensor& ref, int64_t count, const Tensor& dout,
                               const Tensor& dgates, const Tensor& gates, const Tensor& out, double tau) {
  const char* op = names.op;
  const auto shape = ref.sizes();
  const std::string like = std::string("(B, L, d) like ") + names.ref_name;
  const std::string gates_shape = std::string("(B, L, ") + names.count + ")";
  const std::string dgates_name = std::string("d") + names.gates_name;
  check_float_like(dout, ref, op, "dout", names.ref_name);
  check_shape(dout, shape, op, "dout", like.c_str());
  check_float_like(out, ref, op, "out", names.ref_name);
  check_shape(out, shape, op, "out", like.c_str());
  check_float_like(dgates, ref, op, dgates_name.c_str(), names.ref_name);
  check_shape(dgates, {shape[0], shape[1], count}, op, dgates_name.c_str(), gates_shape.c_str());
  check_float_like(gates, ref, op, names.gates_name, names.ref_name);
  check_shape(gates, {shape[0], shape[1], count}, op, names.gates_name, gates_shape.c_str());
  check_tau(tau, op);
}

// The gate's candidates and weight (2, d): the logits read the attended features only.
inline void check_gate_inputs(const char* op, const Tensor& attended, const Tensor& unattended, const Tensor& weight,
                              DeviceType device) {
  check_float(attended, device, op, "attended");
  check_shape(attended, {-1, -1, -1}, op, "attended", "(B, L, d)");
  check_float_like(unattended, attended, op, "unattended", "attended");
  check_shape(unattended, attended.sizes(), op, "unattended", "(B, L, d) like attended");
  check_float_like(weight, attended, op, "weight", "attended");
  check_shape(weight, {2, attended.size(2)}, op, "weight", "(2, d)");
}

// The stage gate's T stages and weight (T, T * d): the logits read every stage.
inline void check_stage_inputs(const char* op, const std::vector<Tensor>& stages, const Tensor& weight,
                               DeviceType device) {
  AVK_CHECK(!stages.empty(), op, ": stages must be a non-empty list of (B, L, d) tensors");
  check_float(stages[0], device, op, "stages[0]");
  check_shape(stages[0], {-1, -1, -1}, op, "stages[0]", "(B, L, d)");
  for (size_t t = 1; t < stages.size(); ++t) {
    const std::string name = "stages[" + std::to_string(t) + "]";
    check_float_like(stages[t], stages[0], op, name.c_str(), "stages[0]");
    check_shape(stages[t], stages[0].sizes(), op, name.c_str(), "(B, L, d) like stages[0]");
  }
  const int64_t n = static_cast<int64_t>(stages.size());
  check_float_like(weight, stages[0], op, "weight", "stages[0]");
  check_shape(weight, {n, n * stages[0].size(2)}, op, "weight", "(T, T * d)");
}

}  // namespace avk
