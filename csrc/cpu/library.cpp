// avkernels._C_cpu: the schema of every avkernels op (TORCH_LIBRARY: the one definition of the ops, which the CUDA
// library and the Python side register kernels, fakes and autograd for) and their CPU kernels (TORCH_LIBRARY_IMPL).
// A plain shared library of torch ops: Python loads it with `import avkernels._C_cpu` (avkernels/ops/native.py), a
// C++ program with dlopen (examples/aoti), and both then call the ops through the dispatcher.
//
// The kernels are the functions of ops.h; the front end shared with the CUDA library (csrc/common/front_end.h)
// checks the schema's arguments and turns them into theirs. avkernels/ops/declaration.py holds the same schemas for
// the Python-kernel backends' own ops and checks at load time that these match it.
#include "common/op_library.h"  // first: it includes Python.h

#include "common/front_end.h"

#include <ATen/core/Dict.h>
#include <torch/library.h>

#include <string>
#include <tuple>
#include <vector>

#include "dot16.h"
#include "ops.h"
#include "simd.h"

namespace {

namespace cpu = avk::cpu;

// The CPU kernels, as the shared front end (csrc/common/front_end.h) calls them. All are deterministic.
struct CpuKernels {
  static constexpr c10::DeviceType kDevice = c10::DeviceType::CPU;
  static constexpr auto tanh_attention_forward = &cpu::tanh_attention_forward;
  static constexpr auto tanh_attention_backward = &cpu::tanh_attention_backward;
  static constexpr auto gate_forward = &cpu::gate_forward;
  static constexpr auto gate_backward = &cpu::gate_backward;
  static constexpr auto stage_gate_forward = &cpu::stage_gate_forward;
  static constexpr auto stage_gate_backward = &cpu::stage_gate_backward;
};

std::string cpu_isa() {
  const cpu::Isa isa = cpu::cpu_isa();
  return isa == cpu::Isa::kAvx512 ? "avx512" : isa == cpu::Isa::kAvx2 ? "avx2" : "baseline";
}

// What the 16-bit path can and does use, so that a user (or a benchmark) can tell a machine with bfloat16 units from
// one without. compute_16bit names what computes tanh_attention's bf16 products: "avx512_bf16" (vdpbf16ps),
// "emulated" (its stand-in, AVKERNELS_CPU_16BIT=emulated) or "fp32" (bf16 widened on load, fp32 FMA); float16 and the
// gates always take the fp32 path. Flags are "true" or "false" (an op returns one value type per dict).
c10::Dict<std::string, std::string> cpu_features() {
  c10::Dict<std::string, std::string> features;
  const auto flag = [](bool on) { return std::string(on ? "true" : "false"); };
  features.insert("isa", cpu_isa());
#if AVK_X86_DISPATCH
  __builtin_cpu_init();
  features.insert("f16c", flag(__builtin_cpu_supports("f16c")));
  features.insert("avx512_bf16", flag(__builtin_cpu_supports("avx512bf16")));
  features.insert("amx_bf16", flag(__builtin_cpu_supports("amx-bf16")));
#else
  for (const char* name : {"f16c", "avx512_bf16", "amx_bf16"}) features.insert(name, flag(false));
#endif
  features.insert("compute_16bit", cpu::compute_16bit_name(cpu::compute_16bit()));
  return features;
}

}  // namespace

// The schemas. Each fused op has a backward op, so that compiled backward graphs keep the kernels opaque too; the
// Python side (avkernels/ops/declaration.py) registers the fakes and the autograd formulas that connect them.
TORCH_LIBRARY(avkernels, m) {
  m.def("tanh_attention(Tensor q, Tensor k, Tensor v, Tensor seed, float scale, float dropout_p, str activation, "
        "bool return_mask, str map=\"tanh\", float map_bias=0.) -> (Tensor, Tensor)");
  m.def("tanh_attention_backward(Tensor do, Tensor q, Tensor k, Tensor v, Tensor o, Tensor seed, float scale, "
        "float dropout_p, str activation, str map=\"tanh\", float map_bias=0.) -> (Tensor, Tensor, Tensor)");
  m.def("gate(Tensor attended, Tensor unattended, Tensor weight, Tensor bias, float tau) -> (Tensor, Tensor)");
  m.def("gate_backward(Tensor dout, Tensor dg, Tensor attended, Tensor unattended, Tensor weight, Tensor g, "
        "Tensor out, float tau) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("stage_gate(Tensor[] stages, Tensor weight, Tensor bias, float tau) -> (Tensor, Tensor)");
  m.def("stage_gate_backward(Tensor dout, Tensor ds, Tensor[] stages, Tensor weight, Tensor s, Tensor out, "
        "float tau) -> (Tensor, Tensor, Tensor)");

  // Helpers for tests and benchmarks. They take no tensor, so they are registered for every dispatch key at once.
  m.def("cpu_isa() -> str", &cpu_isa);  // avx512, avx2 or baseline ($AVKERNELS_CPU_ISA can lower it)
  m.def("cpu_features() -> Dict(str, str)", &cpu_features);
  // The dropout generator (csrc/common/philox.h) on map rows [first_row, first_row + rows): the fp32 uniforms, and
  // the keep flags drawn the way the kernels draw them.
  m.def("dropout_uniform(int seed, int first_row, int rows, int keys) -> Tensor", &cpu::dropout_uniform);
  m.def("dropout_keep(int seed, int first_row, int rows, int keys, float dropout_p) -> Tensor", &cpu::dropout_keep);
  // One instruction of the 16-bit unit, by unit "scalar", "emulated" or "avx512_bf16" (ops.h).
  m.def("dot16_dot(Tensor acc, Tensor a, Tensor b, str unit) -> Tensor", &cpu::dot16_dot);
  m.def("dot16_round(Tensor x, str unit) -> Tensor", &cpu::dot16_round);
}

TORCH_LIBRARY_IMPL(avkernels, CPU, m) { avk::FrontEnd<CpuKernels>::register_kernels(m); }

AVK_PYTHON_MODULE_STUB("avkernels' CPU kernels: the torch ops torch.ops.avkernels.* (backend \"cpp\")")
