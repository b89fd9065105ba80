// The functions avkernels._C_cpu exports; avkernels._C_cuda (csrc/cuda/binding.cpp) exports the same op functions
// (names and signatures), without the dropout-generator helpers for tests.
// Semantics are the OpImpl contracts in avkernels/ops/{tanh_attention,gate,stage_gate}.py. Every reduction runs in a
// fixed order that depends on the shapes only: the results are bitwise reproducible, with any thread count.
//
// Dtypes: float32, float64, bfloat16 and float16, the same for every floating tensor of one call (a mix is refused,
// naming the argument). 16-bit inputs are computed in fp32 (convert.h) and every output and gradient is returned in
// the input dtype, rounded once to nearest even; dropout masks depend on the seed and shapes only, never the dtype.
#pragma once

#include <tuple>
#include <vector>

#include "common/tanh_attention_args.h"
#include "common/tensor_api.h"

namespace avk {
namespace cpu {

// Every op's arguments are checked before these run (csrc/common/front_end.h, csrc/common/gate_args.h).
//
// mask is an empty bool tensor unless return_mask and args.dropout_p > 0. dout is checked, and so, with the tanh_relu
// epilogue, is out (the forward output).
std::tuple<Tensor, Tensor> tanh_attention_forward(const Tensor& q, const Tensor& k,
                                                  const Tensor& v, const TanhAttentionArgs& args,
                                                  bool return_mask);

std::tuple<Tensor, Tensor, Tensor> tanh_attention_backward(const Tensor& dout, const Tensor& q,
                                                           const Tensor& k, const Tensor& v,
                                                           const Tensor& out,
                                                           const TanhAttentionArgs& args);

// For tests: the dropout generator (csrc/common/philox.h) on map rows [first_row, first_row + rows) of a map with
// `keys` columns, as a (rows, keys) tensor: the fp32 uniforms (portable scalar code) and the keep flags drawn the
// way the kernels draw them (the SIMD code of the running ISA variant).
Tensor dropout_uniform(int64_t seed, int64_t first_row, int64_t rows, int64_t keys);
Tensor dropout_keep(int64_t seed, int64_t first_row, int64_t rows, int64_t keys, double dropout_p);

// For tests: one instruction of the 16-bit unit over every lane (dot16.h), computed by `unit` = "scalar" (the
// definition), "emulated" (the stand-in's vector code) or "avx512_bf16" (the instruction): acc + a . b with a, b
// int32 words holding bf16 pairs (vdpbf16ps), and x rounded to bf16 pairs (vcvtne2ps2bf16, returned as int16).
Tensor dot16_dot(const Tensor& acc, const Tensor& a, const Tensor& b, StrArg unit);
Tensor dot16_round(const Tensor& x, StrArg unit);

std::tuple<Tensor, Tensor> gate_forward(const Tensor& attended, const Tensor& unattended,
                                        const Tensor& weight, const Tensor& bias, double tau);

std::tuple<Tensor, Tensor, Tensor, Tensor> gate_backward(
    const Tensor& dout, const Tensor& dg, const Tensor& attended, const Tensor& unattended,
    const Tensor& weight, const Tensor& g, const Tensor& out, double tau);

std::tuple<Tensor, Tensor> stage_gate_forward(const std::vector<Tensor>& stages, const Tensor& weight,
                                              const Tensor& bias, double tau);

std::tuple<Tensor, Tensor, Tensor> stage_gate_backward(const Tensor& dout, const Tensor& ds,
                                                       const std::vector<Tensor>& stages,
                                                       const Tensor& weight, const Tensor& s,
                                                       const Tensor& out, double tau);

}  // namespace cpu
}  // namespace avk
