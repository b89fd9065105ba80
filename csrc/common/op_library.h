// The Python module stub of the two op libraries (csrc/cpu/library.cpp: the schemas and the CPU kernels;
// csrc/cuda/binding.cpp: the CUDA kernels). What else they share, the ops' argument checks and wrappers, is
// front_end.h.
#pragma once

#include <Python.h>  // first, as Python asks (it sets feature macros); only the module stub below uses it


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
