// Runs an AOTInductor package written by export_aoti.py, in a C++ program without Python: loads the avkernels op
// library (dlopen: its static initializers register torch.ops.avkernels.* and their CPU kernels, which the package
// calls by name), loads the package, runs the sample's inputs and compares with PyTorch's outputs.
//
//   run_aoti <op library .so> <model.pt2> <sample.pt> [tolerance]
//
// Prints the largest absolute difference; exits with 1 when it is above the tolerance (default 1e-4), 2 on a usage
// or loading error.
#include <dlfcn.h>

#include <ATen/ATen.h>
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#include <torch/csrc/jit/serialization/pickle.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

namespace {

// sample.pt holds {"inputs": [tensors], "expected": [tensors]}, written by torch.save (torch::jit::pickle_load reads that format).
std::vector<at::Tensor> tensors(const c10::impl::GenericDict& sample, const char* key) {
  std::vector<at::Tensor> out;
  for (const c10::IValue& value : sample.at(key).toListRef()) out.push_back(value.toTensor());
  return out;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 4 && argc != 5) {
    std::fprintf(stderr, "usage: %s <op library .so> <model.pt2> <sample.pt> [tolerance]\n", argv[0]);
    return 2;
  }
  const double tolerance = argc == 5 ? std::atof(argv[4]) : 1e-4;
  // RTLD_NOW: every symbol resolved here, so a library that needed libpython would fail now, not mid-run.
  if (dlopen(argv[1], RTLD_NOW | RTLD_GLOBAL) == nullptr) {
    std::fprintf(stderr, "cannot load the op library: %s\n", dlerror());
    return 2;
  }
  std::ifstream file(argv[3], std::ios::binary);
  if (!file) {
    std::fprintf(stderr, "cannot read %s\n", argv[3]);
    return 2;
  }
  const std::vector<char> bytes((std::istreambuf_iterator<char>(file)), std::istreambuf_iterator<char>());
  const c10::impl::GenericDict sample = torch::jit::pickle_load(bytes).toGenericDict();
  const std::vector<at::Tensor> inputs = tensors(sample, "inputs");
  const std::vector<at::Tensor> expected = tensors(sample, "expected");

  std::vector<at::Tensor> outputs;
  try {
    torch::inductor::AOTIModelPackageLoader loader(argv[2]);
    outputs = loader.run(inputs);
  } catch (const c10::Error& error) {  // e.g. "Could not find schema for avkernels::tanh_attention": no op library
    std::fprintf(stderr, "running %s failed: %s\n", argv[2], error.what_without_backtrace());
    return 2;
  }
  if (outputs.size() != expected.size()) {
    std::fprintf(stderr, "the package returned %zu outputs, PyTorch %zu\n", outputs.size(), expected.size());
    return 1;
  }
  double error = 0.0;
  for (size_t i = 0; i < outputs.size(); ++i) {
    error = std::max(error, (outputs[i] - expected[i]).abs().max().item<double>());
  }
  std::printf("outputs: %zu, batch %lld; max abs difference to PyTorch: %.3g\n", outputs.size(),
              static_cast<long long>(inputs[0].size(0)), error);
  return error <= tolerance ? 0 : 1;
}
