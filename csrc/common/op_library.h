// What the two op libraries (csrc/cpu/library.cpp: the schemas and the CPU kernels; csrc/cuda/binding.cpp: the CUDA
// kernels) share: turning the ops' schema arguments into the kernels' arguments, and the Python module stub.
//
// The ops' arguments are what torch.compile and torch.export can trace and AOTInductor can serialize: the dropout
// seed is a tensor (a Python int would be a constant burned into a compiled graph), the activation a string, and
// `deterministic` is not an argument at all but torch's global flag (torch.use_deterministic_algorithms), read here
// at each call, the way torch's own kernels read it.
#pragma once

#include <Python.h>  // first, as Python asks (it sets feature macros); only the module stub below uses it

#include <ATen/Context.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/string_view.h>

#include <cstdint>

namespace avk {

// The seed tensor of the ops: empty (no dropout) or one int64 value.
inline int64_t seed_value(const at::Tensor& seed, const char* op) {
  TORCH_CHECK(seed.scalar_type() == at::kLong && seed.numel() <= 1, op,
              ": seed must be an empty or one-element int64 tensor, got a ", seed.scalar_type(), " tensor of shape ",
              seed.sizes());
  return seed.numel() == 0 ? 0 : seed.item<int64_t>();
}

// The kernels' activation code: 0 = "none", 1 = "tanh_relu" (csrc/cpu/ops.h).
inline int64_t activation_code(c10::string_view activation, const char* op) {
  if (activation == "none") return 0;
  if (activation == "tanh_relu") return 1;
  TORCH_CHECK(false, op, ": activation must be \"none\" or \"tanh_relu\", got \"", std::string(activation), "\"");
  return 0;
}

inline bool deterministic() { return at::globalContext().deterministicAlgorithms(); }

}  // namespace avk

// A Python module with nothing in it, so that `import avkernels._C_cpu` (or `_C_cuda`) loads the library and runs
// its TORCH_LIBRARY registrations. Everything else goes through torch.ops.avkernels, so the library needs neither
// pybind11 nor libtorch_python. Its one Python symbol is weak: a C++ program without libpython can dlopen the
// library (a weak undefined symbol resolves to null), and inside Python it resolves to the interpreter's.
// Expand once per library, at file scope. TORCH_EXTENSION_NAME is defined by torch.utils.cpp_extension.
#define AVK_PYTHON_MODULE_STUB(doc)                                                    \
  extern "C" {                                                                         \
  PyObject* PyModule_Create2(PyModuleDef*, int) __attribute__((weak));                 \
  PyMODINIT_FUNC AVK_CONCAT(PyInit_, TORCH_EXTENSION_NAME)(void) {                     \
    static PyModuleDef module = {PyModuleDef_HEAD_INIT, AVK_STRINGIFY(TORCH_EXTENSION_NAME), doc, -1, nullptr}; \
    return PyModule_Create(&module);                                                   \
  }                                                                                    \
  }
#define AVK_CONCAT_(a, b) a##b
#define AVK_CONCAT(a, b) AVK_CONCAT_(a, b)
#define AVK_STRINGIFY_(a) #a
#define AVK_STRINGIFY(a) AVK_STRINGIFY_(a)
