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
#include "common/tensor_api.h"

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
  static constexpr avk::DeviceType kDevice = avk::DeviceType::CPU;
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
// gates always take the fp32 path. Flags are "true" or "false". Items are "key=value" strings, which
// avkernels.cpu_features() turns into a dict: the stable ABI has no Dict return.
std::vector<std::string> cpu_features() {
  std::vector<std::string> features;
  const auto item = [&](const std::string& key, const std::string& value) { features.push_back(key + "=" + value); };
  const auto flag = [](bool on) { return std::string(on ? "true" : "false"); };
  item("isa", cpu_isa());
#if AVK_X86_DISPATCH
  __builtin_cpu_init();
  item("f16c", flag(__builtin_cpu_supports("f16c")));
  item("avx512_bf16", flag(__builtin_cpu_supports("avx512bf16")));
  item("amx_bf16", flag(__builtin_cpu_supports("amx-bf16")));
#else
  for (const char* name : {"f16c", "avx512_bf16", "amx_bf16"}) item(name, flag(false));
#endif
  item("compute_16bit", cpu::compute_16bit_name(cpu::compute_16bit()));
  return features;
}

}  // namespace

// The schemas. Each fused op has a backward op, so that compiled backward graphs keep the kernels opaque too; the
// Python side (avkernels/ops/declaration.py) registers the fakes and the autograd formulas that connect them.
AVK_LIBRARY(avkernels, m) {
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

  // Helpers for tests and benchmarks (kernels below).
  m.def("cpu_isa() -> str");  // avx512, avx2 or baseline ($AVKERNELS_CPU_ISA can lower it)
  m.def("cpu_features() -> str[]");
  // The dropout generator (csrc/common/philox.h) on map rows [first_row, first_row + rows): the fp32 uniforms, and
  // the keep flags drawn the way the kernels draw them.
  m.def("dropout_uniform(int seed, int first_row, int rows, int keys) -> Tensor");
  m.def("dropout_keep(int seed, int first_row, int rows, int keys, float dropout_p) -> Tensor");
  // One instruction of the 16-bit unit, by unit "scalar", "emulated" or "avx512_bf16" (ops.h).
  m.def("dot16_dot(Tensor acc, Tensor a, Tensor b, str unit) -> Tensor");
  m.def("dot16_round(Tensor x, str unit) -> Tensor");
}

AVK_LIBRARY_IMPL(avkernels, CPU, m) { avk::FrontEnd<CpuKernels>::register_kernels(m); }

// The helpers: those without a tensor argument dispatch on no key, which CompositeExplicitAutograd covers; the
// dot16 ones check that their tensors are on the CPU.
AVK_LIBRARY_IMPL(avkernels, CompositeExplicitAutograd, m) {
  m.impl("cpu_isa", AVK_KERNEL(&cpu_isa));
  m.impl("cpu_features", AVK_KERNEL(&cpu_features));
  m.impl("dropout_uniform", AVK_KERNEL(&cpu::dropout_uniform));
  m.impl("dropout_keep", AVK_KERNEL(&cpu::dropout_keep));
  m.impl("dot16_dot", AVK_KERNEL(&cpu::dot16_dot));
  m.impl("dot16_round", AVK_KERNEL(&cpu::dot16_round));
}

AVK_PYTHON_MODULE_STUB("avkernels' CPU kernels: the torch ops torch.ops.avkernels.* (backend \"cpp\")")
