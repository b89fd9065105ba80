// avkernels._C_cpu: the CPU kernels as a Python module (signatures in ops.h). The Python side,
// avkernels/ops/native.py, adapts them to the backend registry.
#include <torch/extension.h>

#include "ops.h"
#include "simd.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace cpu = avk::cpu;
  m.doc() = "avkernels fused CPU kernels (backend \"cpp\")";
  m.def("cpu_isa", [] {
    const cpu::Isa isa = cpu::cpu_isa();
    return isa == cpu::Isa::kAvx512 ? "avx512" : isa == cpu::Isa::kAvx2 ? "avx2" : "baseline";
  }, "the vector code the kernels run: avx512, avx2 or baseline (AVKERNELS_CPU_ISA can lower it)");
  m.def("cpu_features", [] {
    // What the 16-bit path can and does use, so that a user (or a benchmark) can tell a machine with bfloat16 matrix
    // units from one without: the kernels widen 16-bit inputs to fp32 on load on every CPU today.
    py::dict features;
    const cpu::Isa isa = cpu::cpu_isa();
    features["isa"] = isa == cpu::Isa::kAvx512 ? "avx512" : isa == cpu::Isa::kAvx2 ? "avx2" : "baseline";
#if AVK_X86_DISPATCH
    __builtin_cpu_init();
    features["f16c"] = static_cast<bool>(__builtin_cpu_supports("f16c"));
    features["avx512_bf16"] = static_cast<bool>(__builtin_cpu_supports("avx512bf16"));
    features["amx_bf16"] = static_cast<bool>(__builtin_cpu_supports("amx-bf16"));
#else
    features["f16c"] = features["avx512_bf16"] = features["amx_bf16"] = false;
#endif
    features["compute_16bit"] = "fp32: bf16/fp16 inputs are widened on load, products run as fp32 FMA";
    return features;
  }, "the CPU features the kernels detect and how they compute 16-bit inputs");
  m.def("tanh_attention_forward", &cpu::tanh_attention_forward, "o = Drop(tanh(scale q k^T)) v (SPEC 1)",
        py::arg("q"), py::arg("k"), py::arg("v"), py::arg("seed"), py::arg("scale"), py::arg("dropout_p"),
        py::arg("activation"), py::arg("return_mask"));
  m.def("tanh_attention_backward", &cpu::tanh_attention_backward, "(dq, dk, dv) of tanh_attention", py::arg("dout"),
        py::arg("q"), py::arg("k"), py::arg("v"), py::arg("out"), py::arg("seed"), py::arg("scale"),
        py::arg("dropout_p"), py::arg("activation"), py::arg("deterministic"));
  m.def("gate_forward", &cpu::gate_forward, "(out, g) of the two-way gate (SPEC 3)", py::arg("attended"),
        py::arg("unattended"), py::arg("weight"), py::arg("bias"), py::arg("tau"));
  m.def("gate_backward", &cpu::gate_backward, "(d_attended, d_unattended, d_weight, d_bias)", py::arg("dout"),
        py::arg("dg"), py::arg("attended"), py::arg("unattended"), py::arg("weight"), py::arg("g"), py::arg("out"),
        py::arg("tau"), py::arg("deterministic"));
  m.def("stage_gate_forward", &cpu::stage_gate_forward, "(out, s) of the stage gate (SPEC 3)", py::arg("stages"),
        py::arg("weight"), py::arg("bias"), py::arg("tau"));
  m.def("stage_gate_backward", &cpu::stage_gate_backward, "(d_stages (T, B, L, d), d_weight, d_bias)",
        py::arg("dout"), py::arg("ds"), py::arg("stages"), py::arg("weight"), py::arg("s"), py::arg("out"),
        py::arg("tau"), py::arg("deterministic"));
  m.def("dropout_uniform", &cpu::dropout_uniform,
        "(rows, keys) uniforms of the dropout generator for map rows first_row.. (csrc/common/philox.h)",
        py::arg("seed"), py::arg("first_row"), py::arg("rows"), py::arg("keys"));
  m.def("dropout_keep", &cpu::dropout_keep, "(rows, keys) keep flags drawn as the kernels draw them",
        py::arg("seed"), py::arg("first_row"), py::arg("rows"), py::arg("keys"), py::arg("dropout_p"));
}
