// The one place where the two builds of the CPU library differ: the tensor type, allocation, the check macro,
// parallel_for, the dtype switch, the 16-bit scalar types and op registration, spelled against
//   - PyTorch's stable ABI (AVK_STABLE_ABI=1: torch::stable::Tensor, the C shims, STD_TORCH_CHECK), built when the
//     building torch is >= 2.10 and compiled with TORCH_TARGET_VERSION=2.10, so that one binary loads in every torch
//     from 2.10 on (avkernels/_build_config.py decides);
//   - ATen (the fallback for torch 2.4 ... 2.9, and the CUDA library, csrc/cuda/binding.cpp, which stays on ATen).
// Kernels and the front end use only what this header names.
#pragma once

#include <cstdint>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#if AVK_STABLE_ABI
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>
#include <torch/headeronly/util/BFloat16.h>
#include <torch/headeronly/util/Half.h>
#else
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>
#include <c10/util/string_view.h>
#include <torch/library.h>
#endif

namespace avk {

#if AVK_STABLE_ABI
namespace detail {
template <typename... Args>
std::string message(const Args&... args) {
  std::ostringstream out;
  (out << ... << args);
  return out.str();
}
}  // namespace detail

using Tensor = torch::stable::Tensor;
using IntList = torch::headeronly::IntHeaderOnlyArrayRef;
using ScalarType = torch::headeronly::ScalarType;
using DeviceType = torch::headeronly::DeviceType;
using BFloat16 = torch::headeronly::BFloat16;
using Half = torch::headeronly::Half;
using StrArg = std::string;                 // an op's `str` argument
using TensorListArg = std::vector<Tensor>;  // an op's `Tensor[]` argument
using Library = torch::stable::detail::StableLibrary;
// Like STD_TORCH_CHECK without its prefix (C++ function, file, line): the message is ours alone, as in the ATen
// build. The stable kernel boundary turns the std::runtime_error into Python's RuntimeError.
#define AVK_CHECK(cond, ...) \
  if (!(cond)) throw std::runtime_error(::avk::detail::message(__VA_ARGS__))
#define AVK_LIBRARY STABLE_TORCH_LIBRARY
#define AVK_LIBRARY_IMPL STABLE_TORCH_LIBRARY_IMPL
#define AVK_KERNEL(fn) TORCH_BOX(fn)

inline const char* dtype_name(ScalarType s) { return torch::headeronly::toString(s); }
inline Tensor make_empty(const Tensor& like, IntList sizes, ScalarType dtype) {
  return torch::stable::new_empty(like, sizes, dtype);
}
inline Tensor make_zeros(const Tensor& like, IntList sizes, ScalarType dtype) {
  return torch::stable::new_zeros(like, sizes, dtype);
}
inline Tensor empty_cpu(IntList sizes, ScalarType dtype) { return torch::stable::empty(sizes, dtype); }
inline Tensor contiguous_as(const Tensor& t, ScalarType dtype) {
  return torch::stable::to(torch::stable::contiguous(t), dtype);
}
inline Tensor clone_of(const Tensor& t) { return torch::stable::clone(t); }
inline void copy_into(Tensor dst, const Tensor& src) { torch::stable::copy_(dst, src); }
inline Tensor narrowed(const Tensor& t, int64_t dim, int64_t start, int64_t length) {
  return torch::stable::narrow(const_cast<Tensor&>(t), dim, start, length);
}
inline Tensor viewed(const Tensor& t, IntList sizes) { return torch::stable::view(t, sizes); }
inline Tensor selected(const Tensor& t, int64_t dim, int64_t index) { return torch::stable::select(t, dim, index); }
// The value of a one-element tensor. The stable build is the CPU library's only, so its tensors are on the CPU.
template <typename T>
T scalar_value(const Tensor& t) { return *t.const_data_ptr<T>(); }
inline const std::vector<Tensor>& tensor_vector(const TensorListArg& list) { return list; }
template <typename F>
void parallel_for(int64_t begin, int64_t end, int64_t grain, const F& f) {
  torch::stable::parallel_for(begin, end, grain, f);
}
#else
using Tensor = at::Tensor;
using IntList = at::IntArrayRef;
using ScalarType = at::ScalarType;
using DeviceType = c10::DeviceType;
using BFloat16 = c10::BFloat16;
using Half = c10::Half;
using StrArg = c10::string_view;
using TensorListArg = at::TensorList;
using Library = torch::Library;
#define AVK_CHECK TORCH_CHECK
#define AVK_LIBRARY TORCH_LIBRARY
#define AVK_LIBRARY_IMPL TORCH_LIBRARY_IMPL
#define AVK_KERNEL(fn) fn

inline const char* dtype_name(ScalarType s) { return c10::toString(s); }
inline Tensor make_empty(const Tensor& like, IntList sizes, ScalarType dtype) {
  return at::empty(sizes, like.options().dtype(dtype));
}
inline Tensor make_zeros(const Tensor& like, IntList sizes, ScalarType dtype) {
  return at::zeros(sizes, like.options().dtype(dtype));
}
inline Tensor empty_cpu(IntList sizes, ScalarType dtype) { return at::empty(sizes, at::TensorOptions().dtype(dtype)); }
inline Tensor contiguous_as(const Tensor& t, ScalarType dtype) { return t.contiguous().to(dtype); }
inline Tensor clone_of(const Tensor& t) { return t.clone(); }
inline void copy_into(Tensor dst, const Tensor& src) { dst.copy_(src); }
inline Tensor narrowed(const Tensor& t, int64_t dim, int64_t start, int64_t length) {
  return t.narrow(dim, start, length);
}
inline Tensor viewed(const Tensor& t, IntList sizes) { return t.view(sizes); }
inline Tensor selected(const Tensor& t, int64_t dim, int64_t index) { return t.select(dim, index); }
template <typename T>
T scalar_value(const Tensor& t) { return t.item<T>(); }
inline std::vector<Tensor> tensor_vector(const TensorListArg& list) { return list.vec(); }
template <typename F>
void parallel_for(int64_t begin, int64_t end, int64_t grain, const F& f) {
  at::parallel_for(begin, end, grain, f);
}
#endif

// Same-dtype allocations on the device of `like`.
inline Tensor make_empty(const Tensor& like, IntList sizes) { return make_empty(like, sizes, like.scalar_type()); }
inline Tensor make_zeros(const Tensor& like, IntList sizes) { return make_zeros(like, sizes, like.scalar_type()); }

// The slices t[0], t[1], ... (at::unbind(t, 0)).
inline std::vector<Tensor> unbind0(const Tensor& t) {
  std::vector<Tensor> slices;
  for (int64_t i = 0; i < t.size(0); ++i) slices.push_back(selected(t, 0, i));
  return slices;
}

// For messages, in both builds alike: "[2, 3, 4]", "cpu", "cuda:0".
inline std::string shape_string(IntList sizes) {
  std::ostringstream out;
  out << '[';
  for (size_t i = 0; i < sizes.size(); ++i) out << (i ? ", " : "") << sizes[i];
  out << ']';
  return out.str();
}
inline std::string device_name(const Tensor& t) {
  if (t.is_cpu()) return "cpu";
  return t.is_cuda() ? "cuda:" + std::to_string(t.device().index()) : "a non-CPU, non-CUDA device";
}
inline DeviceType device_type(const Tensor& t) { return t.device().type(); }

}  // namespace avk

// The lambda (the last argument) once with scalar_t = the storage type of `type` (float, double, BFloat16 or Half); any other dtype is an
// error naming `fn` (the front end has refused those already).
#define AVK_DISPATCH_FLOATING(type, fn, ...)                                                       \
  [&] {                                                                                            \
    switch (type) {                                                                                \
      case ::avk::ScalarType::Float: { using scalar_t = float; return __VA_ARGS__(); }             \
      case ::avk::ScalarType::Double: { using scalar_t = double; return __VA_ARGS__(); }           \
      case ::avk::ScalarType::BFloat16: { using scalar_t = ::avk::BFloat16; return __VA_ARGS__(); }\
      case ::avk::ScalarType::Half: { using scalar_t = ::avk::Half; return __VA_ARGS__(); }        \
      default: AVK_CHECK(false, fn, ": unsupported dtype ", ::avk::dtype_name(type));              \
    }                                                                                              \
  }()
