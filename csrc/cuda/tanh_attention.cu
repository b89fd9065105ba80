// CUDA kernels of tanh_attention (SPEC 1): o = Drop_p(map(scale * q @ k^T + bias)) @ v [then ReLU(tanh(o))],
// with the map (tanh or sigmoid: TanhMap, SigmoidMap below) a template parameter of every kernel.
//
// Like FlashAttention, the (Mq x N) map never reaches global memory: every kernel recomputes its tiles of
// S = scale * q k^T from q and k, applies the map and the dropout mask (redrawn from Philox for map row b * Mq + i and
// column j, see csrc/common/philox.h), and contracts the tile immediately.
//
// Design (a tiled SIMT first version; tensor cores are not used yet):
//   * A block of 256 threads owns a square tile of kSize x kSize output elements (64 for fp32/fp16/bf16, 32 for
//     fp64 to stay within 48 KB of static shared memory); the threads form a 16 x 16 grid and each holds a
//     kPer x kPer register sub-tile at rows ty + 16 r, cols tx + 16 c (strided, so shared-memory reads are
//     conflict-free broadcasts along one axis).
//   * Tiles::dot reduces over an arbitrary inner dimension (D or E) in chunks of 16 staged through shared memory,
//     zero-filled outside the matrices: any D, E, Mq, N work, none needs to be a multiple of anything.
//   * Tiles::accumulate multiplies the map tile (kept in shared memory) by a kSize x kSize tile of a third matrix.
//   * Output feature dimensions wider than kSize are split over gridDim.y; each such block recomputes its map
//     tiles (tanh cost grows with ceil(E / kSize)): the JCA shapes have D = E = L = 16..32, a single chunk.
//   * Loads walk each tile along the source's unit-stride axis, so transposed views (the dense JCA passes
//     q = Q^T) are read coalesced without a copy.
//   * The element-wise work on a map tile (tanh, Philox, keep-mask, dS) runs in Tiles::map_elements on the tile in
//     shared memory, in a rolled loop: that keeps every kernel within 128 registers without spills.
//   * Backward: one kernel for dq (query tiles, loop over key tiles), one for dk and dv (key tiles, loop over query
//     tiles); the map is recomputed for dq, dk and dv separately. FlashAttention-2 computes dk and dv from one
//     recomputation; worth doing once the kernels can be profiled on a GPU (none has been run on one yet).
//   * A v shared over the batch gets dv as per-batch partials summed in batch order by a second kernel
//     (deterministic), or as fp32/fp64 atomics into one slice when determinism is not requested.
#include "cuda/tanh_attention.cuh"

#include "common/philox.h"
#include "cuda/common.cuh"

namespace avk {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kThreadGrid = 16;  // kThreads as a 16 x 16 grid over a tile
constexpr int kInnerChunk = 16;  // slice of the reduced dimension staged in shared memory per step
// At least two resident blocks (16 warps) per SM to hide load and special-function latency: caps registers at 128.
constexpr int kMinBlocksPerSm = 2;

// A (rows x cols) batch slice of a strided tensor of storage type T, read in acc_t<T>.
template <typename T>
struct Matrix {
  const T* data;
  int64_t rows, cols, row_stride, col_stride;

  __device__ acc_t<T> operator()(int64_t r, int64_t c) const {
    return to_acc<T>(data[r * row_stride + c * col_stride]);
  }
  __device__ bool rows_fastest() const { return row_stride == 1 && col_stride != 1; }
};

template <typename T>
__device__ Matrix<T> batch_matrix(const void* base, const int64_t (&stride)[3], int64_t b, int64_t rows, int64_t cols) {
  return Matrix<T>{static_cast<const T*>(base) + b * stride[0], rows, cols, stride[1], stride[2]};
}

// The gradient entering o = map @ v: dout, times d ReLU(tanh(z))/dz = (1 - o^2) [o > 0] when the epilogue ran
// (o = tanh(z) wherever o > 0). Computed as it is loaded, so no pre-activation tensor is ever stored. As torch's
// ReLU backward: a select where o <= 0 (a NaN dout there gives 0), and o = NaN passes dout on.
template <typename T>
struct PreActivationGrad {
  Matrix<T> dout, o;
  bool activation;
  int64_t rows, cols;

  __device__ acc_t<T> operator()(int64_t r, int64_t c) const {
    const acc_t<T> g = dout(r, c);
    if (!activation) return g;
    const acc_t<T> y = o(r, c);
    return y <= acc_t<T>(0) ? acc_t<T>(0) : g * (acc_t<T>(1) - y * y);
  }
  __device__ bool rows_fastest() const { return dout.rows_fastest(); }
};

// Inverted dropout on the map: element (b, i, j) is kept when the philox uniform of map row b * Mq + i, column j is
// >= p, and then scaled by 1 / (1 - p). The same stream and fp32 threshold as the cpp and Triton kernels.
template <typename Acc>
struct Dropout {
  bool enabled;
  uint64_t seed;
  uint64_t keys;
  float threshold;
  Acc keep_scale;

  __device__ explicit Dropout(const TanhAttentionProblem& p)
      : enabled(p.dropout_p > 0.0),
        seed(p.seed),
        keys(static_cast<uint64_t>(p.keys)),
        threshold(static_cast<float>(p.dropout_p)),
        keep_scale(static_cast<Acc>(1.0 / (1.0 - p.dropout_p))) {}

  __device__ bool keeps(uint64_t row, uint64_t j) const { return philox::keep(seed, row, j, keys, threshold); }
  __device__ Acc multiplier(uint64_t row, uint64_t j) const {
    return !enabled ? Acc(1) : (keeps(row, j) ? keep_scale : Acc(0));
  }
};

// The maps: the value at x = scale * qk (+ bias) of the score qk, and the derivative d map / dx from the value y.
// The only code that differs between maps (a template parameter of the kernels); a new map is one more struct and
// one more case in with_map.
template <typename T>
struct TanhMap {
  using Acc = acc_t<T>;
  Acc scale;

  __device__ explicit TanhMap(const TanhAttentionProblem& p) : scale(static_cast<Acc>(p.scale)) {}
  __device__ Acc operator()(Acc qk) const { return map_tanh<T>(qk * scale); }
  __device__ static Acc slope(Acc y) { return Acc(1) - y * y; }
};

template <typename T>
struct SigmoidMap {
  using Acc = acc_t<T>;
  Acc scale, bias;

  __device__ explicit SigmoidMap(const TanhAttentionProblem& p)
      : scale(static_cast<Acc>(p.scale)), bias(static_cast<Acc>(p.map_bias)) {}
  __device__ Acc operator()(Acc qk) const { return map_sigmoid<T>(qk * scale + bias); }
  __device__ static Acc slope(Acc y) { return y * (Acc(1) - y); }
};

// Row of map element (b, i, .) in the (B * Mq, N) map: the dropout generator's row and the returned mask's row.
__device__ __forceinline__ uint64_t map_row(const TanhAttentionProblem& p, int64_t b, int64_t i) {
  return static_cast<uint64_t>(b * p.queries + i);
}

template <typename Acc>
struct Tiles {
  static constexpr int kSize = std::is_same_v<Acc, double> ? 32 : 64;
  static constexpr int kPer = kSize / kThreadGrid;
  using Regs = Acc[kPer][kPer];

  struct Shared {
    Acc a[kSize][kInnerChunk + 1];  // +1: consecutive rows start on different banks
    Acc b[kSize][kInnerChunk + 1];
    Acc map[kSize][kSize + 1];
    Acc x[kSize][kSize + 1];
  };

  __device__ static int ty() { return threadIdx.x / kThreadGrid; }
  __device__ static int tx() { return threadIdx.x % kThreadGrid; }

  // dst[r][c] = src(row0 + r, col0 + c), 0 outside src. Threads step along src's unit-stride axis (coalescing).
  template <int kRows, int kCols, int kLd, typename Source>
  __device__ static void load(Acc* dst, const Source& src, int64_t row0, int64_t col0) {
    static_assert(kRows * kCols % kThreads == 0, "tile must split evenly over the block");
    const bool rows_fastest = src.rows_fastest();
    // Two loads in flight per thread: fully unrolled, the 64-bit addresses of all steps stay live and the fp32
    // kernels spill at the 128-register cap.
#pragma unroll 2
    for (int step = 0; step < kRows * kCols / kThreads; ++step) {
      const int idx = step * kThreads + threadIdx.x;
      const int r = rows_fastest ? idx % kRows : idx / kCols;
      const int c = rows_fastest ? idx / kRows : idx % kCols;
      const int64_t gr = row0 + r, gc = col0 + c;
      dst[r * kLd + c] = (gr < src.rows && gc < src.cols) ? src(gr, gc) : Acc(0);
    }
  }

  // acc[r][c] = sum_k A(a0 + ty + 16 r, k) * B(b0 + tx + 16 c, k) over k < inner (A and B have `inner` columns).
  template <typename SourceA, typename SourceB>
  __device__ static void dot(Regs& acc, Shared& sm, const SourceA& a, int64_t a0, const SourceB& b, int64_t b0,
                             int64_t inner) {
#pragma unroll
    for (int r = 0; r < kPer; ++r)
#pragma unroll
      for (int c = 0; c < kPer; ++c) acc[r][c] = Acc(0);
    for (int64_t k0 = 0; k0 < inner; k0 += kInnerChunk) {
      load<kSize, kInnerChunk, kInnerChunk + 1>(&sm.a[0][0], a, a0, k0);
      load<kSize, kInnerChunk, kInnerChunk + 1>(&sm.b[0][0], b, b0, k0);
      __syncthreads();
#pragma unroll
      for (int kk = 0; kk < kInnerChunk; ++kk) {
        Acc av[kPer], bv[kPer];
#pragma unroll
        for (int r = 0; r < kPer; ++r) av[r] = sm.a[ty() + kThreadGrid * r][kk];
#pragma unroll
        for (int c = 0; c < kPer; ++c) bv[c] = sm.b[tx() + kThreadGrid * c][kk];
#pragma unroll
        for (int r = 0; r < kPer; ++r)
#pragma unroll
          for (int c = 0; c < kPer; ++c) acc[r][c] += av[r] * bv[c];
      }
      __syncthreads();  // the next chunk overwrites sm.a / sm.b
    }
  }

  // dst[ty + 16 r][tx + 16 c] = tile[r][c]: hands a register tile to the element-wise pass.
  __device__ static void store(Acc (*dst)[kSize + 1], const Regs& tile) {
#pragma unroll
    for (int r = 0; r < kPer; ++r)
#pragma unroll
      for (int c = 0; c < kPer; ++c) dst[ty() + kThreadGrid * r][tx() + kThreadGrid * c] = tile[r][c];
  }

  // sm.map[r][c] = f(r, c, sm.map[r][c], sm.x[r][c]) over the tile, between barriers. The tanh, Philox and
  // mask logic runs in this rolled loop rather than on the unrolled register tile: unrolled, it is inlined
  // kPer^2 times and needs ~250 registers; rolled, the kernels fit 128 registers without spills. Consecutive
  // threads take consecutive columns (coalesced keep-mask bytes, conflict-free banks).
  template <typename ElementFn>
  __device__ static void map_elements(Shared& sm, ElementFn f) {
    __syncthreads();  // publishes store()
#pragma unroll 1
    for (int idx = threadIdx.x; idx < kSize * kSize; idx += kThreads) {
      const int r = idx / kSize, c = idx % kSize;
      sm.map[r][c] = f(r, c, sm.map[r][c], sm.x[r][c]);
    }
    __syncthreads();  // accumulate() overwrites sm.x
  }

  // acc[r][c] += sum_n map[ty + 16 r][n] * X(x0 + n, c0 + tx + 16 c), the map tile being in sm.map.
  // Rows past X's end and column groups past its last column are skipped (block-uniform bounds): with the JCA
  // shapes (E or D = 16 in a 64-wide tile) that is three quarters of the FMAs.
  template <typename Source>
  __device__ static void accumulate(Regs& acc, Shared& sm, const Source& x, int64_t x0, int64_t c0) {
    load<kSize, kSize, kSize + 1>(&sm.x[0][0], x, x0, c0);
    __syncthreads();  // also publishes sm.map
    const int live_rows = static_cast<int>(x.rows - x0 < kSize ? x.rows - x0 : kSize);
    const int64_t live_cols = x.cols - c0;
#pragma unroll 8
    for (int n = 0; n < live_rows; ++n) {
      Acc mv[kPer], xv[kPer];
#pragma unroll
      for (int r = 0; r < kPer; ++r) mv[r] = sm.map[ty() + kThreadGrid * r][n];
#pragma unroll
      for (int c = 0; c < kPer; ++c) xv[c] = sm.x[n][tx() + kThreadGrid * c];
#pragma unroll
      for (int c = 0; c < kPer; ++c) {
        if (kThreadGrid * c >= live_cols) continue;
#pragma unroll
        for (int r = 0; r < kPer; ++r) acc[r][c] += mv[r] * xv[c];
      }
    }
    __syncthreads();  // sm.map and sm.x are rewritten by the next tile
  }
};

// Forward: o[b, i0:i0+kSize, e0:e0+kSize] = sum over key tiles of Drop(map(scale q k^T + bias)) v, then the
// epilogue.
//
// Args: params (see tanh_attention.cuh); o and mask are contiguous.
// Grid: x = batch * ceil(Mq / kSize) (batch-major), y = max(1, ceil(E / kSize)); kThreads threads.
// Only blocks with blockIdx.y == 0 write the keep-mask (the others draw the same bits).
template <typename T, class Map>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSm)
    tanh_attention_forward_kernel(const TanhAttentionForwardParams params) {
  using Acc = acc_t<T>;
  using Tl = Tiles<Acc>;
  __shared__ typename Tl::Shared sm;
  const TanhAttentionProblem& p = params.problem;
  const int64_t row_tiles = ceil_div(p.queries, Tl::kSize);
  const int64_t b = blockIdx.x / row_tiles;
  const int64_t i0 = (blockIdx.x % row_tiles) * Tl::kSize;
  const int64_t e0 = static_cast<int64_t>(blockIdx.y) * Tl::kSize;
  const auto q = batch_matrix<T>(p.q, p.q_stride, b, p.queries, p.head_dim);
  const auto k = batch_matrix<T>(p.k, p.k_stride, b, p.keys, p.head_dim);
  const auto v = batch_matrix<T>(p.v, p.v_stride, p.v_shared ? 0 : b, p.keys, p.value_dim);
  const Dropout<Acc> dropout(p);
  const Map map(p);
  const bool writes_mask = params.mask != nullptr && blockIdx.y == 0;

  typename Tl::Regs out;
#pragma unroll
  for (int r = 0; r < Tl::kPer; ++r)
#pragma unroll
    for (int c = 0; c < Tl::kPer; ++c) out[r][c] = Acc(0);

  for (int64_t j0 = 0; j0 < p.keys; j0 += Tl::kSize) {
    typename Tl::Regs s;
    Tl::dot(s, sm, q, i0, k, j0, p.head_dim);
    Tl::store(sm.map, s);
    Tl::map_elements(sm, [&](int r, int c, Acc qk, Acc) {
      const int64_t i = i0 + r, j = j0 + c;
      if (i >= p.queries || j >= p.keys) return Acc(0);  // rows/cols past the edge must add nothing
      const Acc t = map(qk);
      if (!dropout.enabled) return t;
      const uint64_t row = map_row(p, b, i);
      const bool keep = dropout.keeps(row, j);
      if (writes_mask) params.mask[row * p.keys + j] = keep;
      return t * (keep ? dropout.keep_scale : Acc(0));  // a product, as torch's dropout: a NaN dropped stays NaN
    });
    Tl::accumulate(out, sm, v, j0, e0);
  }

  T* o = static_cast<T*>(params.o);
#pragma unroll
  for (int r = 0; r < Tl::kPer; ++r) {
#pragma unroll
    for (int c = 0; c < Tl::kPer; ++c) {
      const int64_t i = i0 + Tl::ty() + kThreadGrid * r, e = e0 + Tl::tx() + kThreadGrid * c;
      if (i < p.queries && e < p.value_dim) {
        Acc value = out[r][c];
        if (p.activation == 1) {
          value = map_tanh<T>(value);
          value = value < Acc(0) ? Acc(0) : value;  // a ReLU that keeps NaN, as torch.relu (fmax would drop it)
        }
        o[(b * p.queries + i) * p.value_dim + e] = from_acc<T>(value);
      }
    }
  }
}

// dq[b, i0:i0+kSize, d0:d0+kSize] = sum over key tiles of dS k, with dS = (dout_pre v^T) * mask/(1-p) * map'
// * scale and the map recomputed.
//
// Args: params (see tanh_attention.cuh); dq contiguous.
// Grid: x = batch * ceil(Mq / kSize), y = ceil(D / kSize); kThreads threads.
template <typename T, class Map>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSm)
    tanh_attention_backward_dq_kernel(const TanhAttentionBackwardParams params) {
  using Acc = acc_t<T>;
  using Tl = Tiles<Acc>;
  __shared__ typename Tl::Shared sm;
  const TanhAttentionProblem& p = params.problem;
  const int64_t row_tiles = ceil_div(p.queries, Tl::kSize);
  const int64_t b = blockIdx.x / row_tiles;
  const int64_t i0 = (blockIdx.x % row_tiles) * Tl::kSize;
  const int64_t d0 = static_cast<int64_t>(blockIdx.y) * Tl::kSize;
  const auto q = batch_matrix<T>(p.q, p.q_stride, b, p.queries, p.head_dim);
  const auto k = batch_matrix<T>(p.k, p.k_stride, b, p.keys, p.head_dim);
  const auto v = batch_matrix<T>(p.v, p.v_stride, p.v_shared ? 0 : b, p.keys, p.value_dim);
  const PreActivationGrad<T> dout{batch_matrix<T>(params.dout, params.dout_stride, b, p.queries, p.value_dim),
                                  batch_matrix<T>(params.o, params.o_stride, b, p.queries, p.value_dim),
                                  p.activation == 1, p.queries, p.value_dim};
  const Dropout<Acc> dropout(p);
  const Map map(p);
  const Acc scale = static_cast<Acc>(p.scale);

  typename Tl::Regs dq;
#pragma unroll
  for (int r = 0; r < Tl::kPer; ++r)
#pragma unroll
    for (int c = 0; c < Tl::kPer; ++c) dq[r][c] = Acc(0);

  for (int64_t j0 = 0; j0 < p.keys; j0 += Tl::kSize) {
    typename Tl::Regs tile;
    Tl::dot(tile, sm, q, i0, k, j0, p.head_dim);
    Tl::store(sm.map, tile);
    Tl::dot(tile, sm, dout, i0, v, j0, p.value_dim);
    Tl::store(sm.x, tile);
    Tl::map_elements(sm, [&](int r, int c, Acc qk, Acc dmap) {
      const int64_t i = i0 + r, j = j0 + c;
      if (i >= p.queries || j >= p.keys) return Acc(0);
      const Acc t = map(qk);
      return dmap * dropout.multiplier(map_row(p, b, i), j) * Map::slope(t) * scale;
    });
    Tl::accumulate(dq, sm, k, j0, d0);
  }

  T* out = static_cast<T*>(params.dq);
#pragma unroll
  for (int r = 0; r < Tl::kPer; ++r) {
#pragma unroll
    for (int c = 0; c < Tl::kPer; ++c) {
      const int64_t i = i0 + Tl::ty() + kThreadGrid * r, d = d0 + Tl::tx() + kThreadGrid * c;
      if (i < p.queries && d < p.head_dim) out[(b * p.queries + i) * p.head_dim + d] = from_acc<T>(dq[r][c]);
    }
  }
}

// dk and dv for one key tile, looping over query tiles with the map transposed (rows = keys, cols = queries):
//   dk[j] = sum_i dS[i, j] q[i],   dv[j] = sum_i Drop(t)[i, j] dout_pre[i].
// Blocks with blockIdx.y < ceil(D / kSize) compute a dk column chunk (they need dS, hence dout_pre v^T); the
// others compute a dv column chunk (the map alone). A shared v (batch size 1) gets per-batch partials in the
// workspace, summed in batch order by reduce_shared_dv_kernel (deterministic), or atomics into a single slice.
//
// Args: params (see tanh_attention.cuh); dk, dv contiguous; workspace as tanh_attention_backward_workspace_elems.
// Grid: x = batch * ceil(N / kSize), y = ceil(D / kSize) + ceil(E / kSize); kThreads threads.
template <typename T, class Map>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSm)
    tanh_attention_backward_dkdv_kernel(const TanhAttentionBackwardParams params) {
  using Acc = acc_t<T>;
  using Tl = Tiles<Acc>;
  __shared__ typename Tl::Shared sm;
  const TanhAttentionProblem& p = params.problem;
  const int64_t key_tiles = ceil_div(p.keys, Tl::kSize);
  const int64_t b = blockIdx.x / key_tiles;
  const int64_t j0 = (blockIdx.x % key_tiles) * Tl::kSize;
  const int64_t dk_chunks = ceil_div(p.head_dim, Tl::kSize);
  const bool computes_dk = blockIdx.y < dk_chunks;
  const int64_t c0 = (computes_dk ? blockIdx.y : blockIdx.y - dk_chunks) * Tl::kSize;
  const auto q = batch_matrix<T>(p.q, p.q_stride, b, p.queries, p.head_dim);
  const auto k = batch_matrix<T>(p.k, p.k_stride, b, p.keys, p.head_dim);
  const auto v = batch_matrix<T>(p.v, p.v_stride, p.v_shared ? 0 : b, p.keys, p.value_dim);
  const PreActivationGrad<T> dout{batch_matrix<T>(params.dout, params.dout_stride, b, p.queries, p.value_dim),
                                  batch_matrix<T>(params.o, params.o_stride, b, p.queries, p.value_dim),
                                  p.activation == 1, p.queries, p.value_dim};
  const Dropout<Acc> dropout(p);
  const Map map(p);
  const Acc scale = static_cast<Acc>(p.scale);

  typename Tl::Regs acc;
#pragma unroll
  for (int r = 0; r < Tl::kPer; ++r)
#pragma unroll
    for (int c = 0; c < Tl::kPer; ++c) acc[r][c] = Acc(0);

  for (int64_t i0 = 0; i0 < p.queries; i0 += Tl::kSize) {
    typename Tl::Regs tile;
    Tl::dot(tile, sm, k, j0, q, i0, p.head_dim);  // tile[r][c] = (q k^T)[i0 + tx + 16 c, j0 + ty + 16 r]
    Tl::store(sm.map, tile);
    if (computes_dk) {  // block-uniform
      Tl::dot(tile, sm, v, j0, dout, i0, p.value_dim);
      Tl::store(sm.x, tile);
    }
    Tl::map_elements(sm, [&](int r, int c, Acc qk, Acc dmap) {
      const int64_t j = j0 + r, i = i0 + c;
      if (i >= p.queries || j >= p.keys) return Acc(0);
      const Acc t = map(qk);
      const Acc m = dropout.multiplier(map_row(p, b, i), j);
      return computes_dk ? dmap * m * Map::slope(t) * scale : t * m;
    });
    if (computes_dk) {
      Tl::accumulate(acc, sm, q, i0, c0);
    } else {
      Tl::accumulate(acc, sm, dout, i0, c0);
    }
  }

  const bool reduces_dv = p.v_shared && p.batch > 1;
#pragma unroll
  for (int r = 0; r < Tl::kPer; ++r) {
#pragma unroll
    for (int c = 0; c < Tl::kPer; ++c) {
      const int64_t j = j0 + Tl::ty() + kThreadGrid * r, col = c0 + Tl::tx() + kThreadGrid * c;
      if (j >= p.keys) continue;
      if (computes_dk) {
        if (col < p.head_dim) static_cast<T*>(params.dk)[(b * p.keys + j) * p.head_dim + col] = from_acc<T>(acc[r][c]);
      } else if (col < p.value_dim) {
        if (!reduces_dv) {
          static_cast<T*>(params.dv)[(b * p.keys + j) * p.value_dim + col] = from_acc<T>(acc[r][c]);
        } else if (params.deterministic) {
          static_cast<Acc*>(params.workspace)[(b * p.keys + j) * p.value_dim + col] = acc[r][c];
        } else {
          atomicAdd(static_cast<Acc*>(params.workspace) + j * p.value_dim + col, acc[r][c]);
        }
      }
    }
  }
}

// dv[idx] = sum over s < slices (in order) of partials[s * slice_elems + idx], rounded to T once.
//
// Args: partials (slices, slice_elems) accumulators, dv (slice_elems,) output.
// Grid: 1-D grid-stride over slice_elems; 256 threads.
template <typename T>
__global__ void __launch_bounds__(256)
    reduce_shared_dv_kernel(const acc_t<T>* partials, T* dv, int64_t slices, int64_t slice_elems) {
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < slice_elems;
       idx += int64_t(gridDim.x) * blockDim.x) {
    acc_t<T> sum = 0;
    for (int64_t s = 0; s < slices; ++s) sum += partials[s * slice_elems + idx];
    dv[idx] = from_acc<T>(sum);
  }
}

template <typename T>
constexpr int tile_size() {
  return Tiles<acc_t<T>>::kSize;
}

bool fits_grid(int64_t x, int64_t y) { return x <= kMaxGridX && y <= kMaxGridYZ; }

bool reduces_shared_dv(const TanhAttentionProblem& p) { return p.v_shared && p.batch > 1; }

// fn(Map*{}) with Map the map struct p.map names (a null pointer as a type tag): the kernels' instantiation.
template <typename T, typename Fn>
cudaError_t with_map(const TanhAttentionProblem& p, Fn&& fn) {
  return p.map == AttentionMap::kSigmoid ? fn(static_cast<SigmoidMap<T>*>(nullptr))
                                         : fn(static_cast<TanhMap<T>*>(nullptr));
}

}  // namespace

int64_t tanh_attention_backward_workspace_elems(const TanhAttentionBackwardParams& params) {
  const TanhAttentionProblem& p = params.problem;
  if (!reduces_shared_dv(p)) return 0;
  return (params.deterministic ? p.batch : 1) * p.keys * p.value_dim;
}

template <typename T>
cudaError_t launch_tanh_attention_forward(const TanhAttentionForwardParams& params, cudaStream_t stream) {
  const TanhAttentionProblem& p = params.problem;
  if (p.batch == 0 || p.queries == 0) return cudaSuccess;
  const int64_t grid_x = p.batch * ceil_div(p.queries, tile_size<T>());
  // At least one column block, so that the keep-mask is drawn even when E == 0.
  const int64_t grid_y = ceil_div(p.value_dim, tile_size<T>()) > 0 ? ceil_div(p.value_dim, tile_size<T>()) : 1;
  if (!fits_grid(grid_x, grid_y)) return cudaErrorInvalidConfiguration;
  return with_map<T>(p, [&](auto tag) -> cudaError_t {
    using Map = std::remove_pointer_t<decltype(tag)>;
    tanh_attention_forward_kernel<T, Map><<<dim3(grid_x, grid_y), kThreads, 0, stream>>>(params);
    return cudaGetLastError();
  });
}

template <typename T>
cudaError_t launch_tanh_attention_backward(const TanhAttentionBackwardParams& params, cudaStream_t stream) {
  const TanhAttentionProblem& p = params.problem;
  constexpr int kSize = tile_size<T>();
  const int64_t dq_grid_x = p.batch * ceil_div(p.queries, kSize), dq_grid_y = ceil_div(p.head_dim, kSize);
  const int64_t dkdv_grid_x = p.batch * ceil_div(p.keys, kSize);
  const int64_t dkdv_grid_y = ceil_div(p.head_dim, kSize) + ceil_div(p.value_dim, kSize);
  if (!fits_grid(dq_grid_x, dq_grid_y) || !fits_grid(dkdv_grid_x, dkdv_grid_y)) return cudaErrorInvalidConfiguration;

  const bool reduces_dv = reduces_shared_dv(p);
  const int64_t slice_elems = p.keys * p.value_dim;
  if (reduces_dv && !params.deterministic && slice_elems > 0) {
    const cudaError_t err = cudaMemsetAsync(params.workspace, 0, slice_elems * sizeof(acc_t<T>), stream);
    if (err != cudaSuccess) return err;
  }
  const cudaError_t err = with_map<T>(p, [&](auto tag) -> cudaError_t {
    using Map = std::remove_pointer_t<decltype(tag)>;
    if (dq_grid_x > 0 && dq_grid_y > 0) {
      tanh_attention_backward_dq_kernel<T, Map><<<dim3(dq_grid_x, dq_grid_y), kThreads, 0, stream>>>(params);
      const cudaError_t err = cudaGetLastError();
      if (err != cudaSuccess) return err;
    }
    if (dkdv_grid_x > 0 && dkdv_grid_y > 0) {
      tanh_attention_backward_dkdv_kernel<T, Map><<<dim3(dkdv_grid_x, dkdv_grid_y), kThreads, 0, stream>>>(params);
      return cudaGetLastError();
    }
    return cudaSuccess;
  });
  if (err != cudaSuccess) return err;
  if (reduces_dv && slice_elems > 0) {
    const int64_t blocks = ceil_div(slice_elems, 256) < 4096 ? ceil_div(slice_elems, 256) : 4096;
    reduce_shared_dv_kernel<T><<<blocks, 256, 0, stream>>>(static_cast<const acc_t<T>*>(params.workspace),
                                                          static_cast<T*>(params.dv),
                                                          params.deterministic ? p.batch : 1, slice_elems);
    return cudaGetLastError();
  }
  return cudaSuccess;
}

template cudaError_t launch_tanh_attention_forward<float>(const TanhAttentionForwardParams&, cudaStream_t);
template cudaError_t launch_tanh_attention_forward<double>(const TanhAttentionForwardParams&, cudaStream_t);
template cudaError_t launch_tanh_attention_forward<__half>(const TanhAttentionForwardParams&, cudaStream_t);
template cudaError_t launch_tanh_attention_forward<__nv_bfloat16>(const TanhAttentionForwardParams&, cudaStream_t);
template cudaError_t launch_tanh_attention_backward<float>(const TanhAttentionBackwardParams&, cudaStream_t);
template cudaError_t launch_tanh_attention_backward<double>(const TanhAttentionBackwardParams&, cudaStream_t);
template cudaError_t launch_tanh_attention_backward<__half>(const TanhAttentionBackwardParams&, cudaStream_t);
template cudaError_t launch_tanh_attention_backward<__nv_bfloat16>(const TanhAttentionBackwardParams&, cudaStream_t);

}  // namespace cuda
}  // namespace avk
