// CPU stand-in for the CUDA runtime and device built-ins that csrc/cuda/*.cu use, so that the kernels' own code
// runs on a machine without a GPU (tests/test_cuda_compile.py). Used only by that test, never by the build.
//
// A launch runs the blocks one after another; each block is blockDim.x std::threads sharing one barrier
// (__syncthreads) and one per-warp barrier (__shfl_xor_sync). __shared__ becomes a function-local static, which
// the threads of the running block share. This checks indexing, tiling, masking and reductions; it says nothing
// about speed, memory coalescing or races that only real warps would expose. tests/test_cuda_compile.py rewrites
// the `kernel<<<grid, block, smem, stream>>>(args);` statements into emu::launch calls before compiling.
#pragma once

#include <math.h>

#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

typedef int cudaError_t;
enum { cudaSuccess = 0, cudaErrorInvalidValue = 1, cudaErrorInvalidConfiguration = 9 };
typedef void* cudaStream_t;

struct dim3 {
  unsigned x, y, z;
  dim3(unsigned long long x_ = 1, unsigned long long y_ = 1, unsigned long long z_ = 1) : x(x_), y(y_), z(z_) {}
};

namespace emu {

inline dim3 block_idx, grid_dim, block_dim;
inline thread_local dim3 thread_idx;
inline std::barrier<>* block_barrier;
struct Warp {
  std::unique_ptr<std::barrier<>> barrier;
  double lanes[32];
};
inline std::vector<Warp>* warps;
inline std::mutex atomic_mutex;

template <class Kernel>
void launch(dim3 grid, dim3 block, Kernel kernel) {
  grid_dim = grid;
  block_dim = block;
  for (unsigned z = 0; z < grid.z; ++z) {
    for (unsigned y = 0; y < grid.y; ++y) {
      for (unsigned x = 0; x < grid.x; ++x) {
        block_idx = dim3(x, y, z);
        std::barrier<> barrier(block.x);
        block_barrier = &barrier;
        std::vector<Warp> block_warps(block.x / 32);
        for (auto& warp : block_warps) warp.barrier = std::make_unique<std::barrier<>>(32);
        warps = &block_warps;
        std::vector<std::thread> threads;
        for (unsigned t = 0; t < block.x; ++t) threads.emplace_back([&, t] {
          thread_idx = dim3(t);
          kernel();
        });
        for (auto& thread : threads) thread.join();
      }
    }
  }
}

}  // namespace emu

#define threadIdx emu::thread_idx
#define blockIdx emu::block_idx
#define gridDim emu::grid_dim
#define blockDim emu::block_dim

inline void __syncthreads() { emu::block_barrier->arrive_and_wait(); }

template <class T>
T __shfl_xor_sync(unsigned, T value, int lane_mask) {
  auto& warp = (*emu::warps)[threadIdx.x / 32];
  const int lane = threadIdx.x % 32;
  warp.lanes[lane] = static_cast<double>(value);  // exact for float and double
  warp.barrier->arrive_and_wait();
  const T other = static_cast<T>(warp.lanes[lane ^ lane_mask]);
  warp.barrier->arrive_and_wait();
  return other;
}

template <class T>
T atomicAdd(T* address, T value) {
  const std::lock_guard<std::mutex> lock(emu::atomic_mutex);
  const T old = *address;
  *address += value;
  return old;
}

inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline cudaError_t cudaMemsetAsync(void* ptr, int value, size_t bytes, cudaStream_t) {
  std::memset(ptr, value, bytes);
  return cudaSuccess;
}
