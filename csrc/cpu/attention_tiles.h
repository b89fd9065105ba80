// The tiles and micro-kernels of the CPU tanh_attention (tanh_attention.cpp, and the fp32 steps of the bf16 bodies in
// tanh_attention16.h): tile sizes, packing, the two matrix-product kernels and the element-wise map / gradient steps
// between them. They know nothing of the op's tensors or of the task partition.
#pragma once

#include <algorithm>
#include <cstdint>

#include "attention_map.h"
#include "convert.h"
#include "dropout.h"  // kKeysPerCall: key blocks take whole Philox calls
#include "simd.h"

namespace avk {
namespace cpu {
namespace {


// Tile sizes shared by every ISA variant, so that the task partition, the padding and hence the order of every sum
// are the same whichever variant runs.
template <typename T>
struct Tile {
  static constexpr int kBN = 256 / sizeof(T);            // keys per block: 64 fp32 / 32 fp64
  static constexpr int kBM = 32;                         // query rows per block: amortises the packed panels
  static constexpr int kPad = kMaxVecBytes / sizeof(T);  // D and E are padded to whole 64-byte vectors
  static constexpr int kAccRows = 4;                     // rows per step of accumulate_rows
  static_assert(kBN % kKeysPerCall == 0 && kBM % kAccRows == 0 && kBN % kAccRows == 0, "tile sizes");
};

// Register blocking of one ISA variant (VB-byte vectors): S and dZ tiles are computed kGroup vectors at a time for
// kFwdRows (forward) or kBwdRows (backward, S and dZ together) rows, sized to the register file: 16 accumulators
// of the 32 AVX-512 registers, 8 of the 16 AVX2 / SSE registers.
template <typename T, int VB>
struct Blocking {
  static constexpr int kW = kLanes<T, VB>;
  static constexpr int kGroup = 4;
  static constexpr int kGroups = Tile<T>::kBN / (kW * kGroup);
  static constexpr int kFwdRows = VB == 64 ? 4 : 2;
  static constexpr int kBwdRows = VB == 64 ? 2 : 1;
  static_assert(kGroups >= 1 && Tile<T>::kBN % (kW * kGroup) == 0 && Tile<T>::kPad % kW == 0, "blocking");
};

// dst[r * ld + c] = src[r * src_r + c * src_c] for r < rows, c < cols, and 0 elsewhere in rows_alloc x ld.
// Reading through strides here is what lets the ops accept any layout without copying whole inputs, and widening
// here (storage S = bf16 / fp16 to T = float) is what lets one kernel body serve every storage type: an element is
// converted once as it is packed and then reused from the tile by every row or key of the block.
template <typename S, typename T>
void pack(T* dst, int64_t ld, int64_t rows_alloc, const S* src, int64_t src_r, int64_t src_c, int64_t rows,
          int64_t cols) {
  for (int64_t r = 0; r < rows_alloc; ++r) {
    T* row = dst + r * ld;
    int64_t c = 0;
    if (r < rows) {
      widen_row(row, src + r * src_r, src_c, cols);
      c = cols;
    }
    std::fill(row + c, row + ld, T(0));
  }
}

// acc[r][c] = sum_t a[r * lda + t] * panel[t * kBN + c * kW] for R rows of a against kGroup vectors of a
// (n_inner x kBN) panel: part of an S or dZ tile. The accumulators stay in registers; a panel row is loaded once
// per R rows.
template <typename T, int VB, int R>
AVK_INLINE void rows_times_panel(const T* a, int64_t lda, const T* panel, int64_t n_inner,
                                 Vec<T, VB> (&acc)[R][Blocking<T, VB>::kGroup]) {
  constexpr int C = Blocking<T, VB>::kGroup, W = Blocking<T, VB>::kW, BN = Tile<T>::kBN;
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = Vec<T, VB>{};
  for (int64_t t = 0; t < n_inner; ++t) {
    Vec<T, VB> y[C];
    for (int c = 0; c < C; ++c) y[c] = load<T, VB>(panel + t * BN + c * W);
    for (int r = 0; r < R; ++r) {
      const T ar = a[r * lda + t];
      for (int c = 0; c < C; ++c) acc[r][c] += ar * y[c];
    }
  }
}

// out[r * ldo + x] += sum_t a[r * a_row + t * a_inner] * y[t * ldy + x] for r < kAccRows and x < n_cols (a multiple
// of kPad): o += C @ v, dq += dS @ k, dk += dS^T @ q, dv += C^T @ do, depending on the strides of a.
template <typename T, int VB>
AVK_INLINE void accumulate_rows(T* out, int64_t ldo, const T* a, int64_t a_row, int64_t a_inner, const T* y,
                                int64_t ldy, int64_t n_inner, int64_t n_cols) {
  constexpr int R = Tile<T>::kAccRows, W = Blocking<T, VB>::kW;
  for (int64_t x = 0; x < n_cols; x += W) {
    Vec<T, VB> acc[R];
    for (int r = 0; r < R; ++r) acc[r] = load<T, VB>(out + r * ldo + x);
    for (int64_t t = 0; t < n_inner; ++t) {
      const Vec<T, VB> yt = load<T, VB>(y + t * ldy + x);
      for (int r = 0; r < R; ++r) acc[r] += a[r * a_row + t * a_inner] * yt;
    }
    for (int r = 0; r < R; ++r) store<T, VB>(out + r * ldo + x, acc[r]);
  }
}

// Zeroes the rows >= n_rows and the columns >= n_keys of a (kBM, kBN) tile: the padding of a partial block.
template <typename T>
void clear_padding(T* tile, int64_t n_rows, int64_t n_keys) {
  constexpr int BN = Tile<T>::kBN, BM = Tile<T>::kBM;
  if (n_keys < BN)
    for (int64_t r = 0; r < n_rows; ++r) std::fill(tile + r * BN + n_keys, tile + (r + 1) * BN, T(0));
  if (n_rows < BM) std::fill(tile + n_rows * BN, tile + BM * BN, T(0));
}

// kW keep flags (fp32 0/1) as a Vec<T, VB>.
template <typename T, int VB>
AVK_INLINE Vec<T, VB> load_keep(const float* keep) {
  if constexpr (sizeof(T) == sizeof(float)) {
    return load<float, VB>(keep);
  } else {
    return __builtin_convertvector(load<float, VB / 2>(keep), Vec<T, VB>);
  }
}

// The element-wise step of forward between its two products: C = Drop(map(S)) for R rows of kGroup vectors of an S
// tile held in registers, stored at c (rows kBN apart). keep: the rows' keep flags (kBN apart), or null without
// dropout.
template <typename T, int VB, int R, class Map>
AVK_INLINE void map_tile(const Map& map, const Vec<T, VB> (&s)[R][Blocking<T, VB>::kGroup], const float* keep,
                         T inv_keep, T* c) {
  constexpr int BN = Tile<T>::kBN, W = Blocking<T, VB>::kW;
  for (int r = 0; r < R; ++r) {
    for (int g = 0; g < Blocking<T, VB>::kGroup; ++g) {
      Vec<T, VB> t = map(s[r][g]);
      if (keep != nullptr) t *= load_keep<T, VB>(keep + r * BN + g * W) * inv_keep;
      store<T, VB>(c + r * BN + g * W, t);
    }
  }
}

// The element-wise step of backward: C = Drop(map(S)) as above, and dS = dZ * keep / (1 - p) * map' * scale, the
// gradient of S = q k^T, from the dZ = do' v^T tile in registers; stored at c and ds.
template <typename T, int VB, int R, class Map>
AVK_INLINE void grad_tile(const Map& map, const Vec<T, VB> (&s)[R][Blocking<T, VB>::kGroup],
                          const Vec<T, VB> (&dz)[R][Blocking<T, VB>::kGroup], const float* keep, T inv_keep, T scale,
                          T* c, T* ds) {
  constexpr int BN = Tile<T>::kBN, W = Blocking<T, VB>::kW;
  for (int r = 0; r < R; ++r) {
    for (int g = 0; g < Blocking<T, VB>::kGroup; ++g) {
      const Vec<T, VB> t = map(s[r][g]);
      Vec<T, VB> f = splat<T, VB>(1);
      if (keep != nullptr) f = load_keep<T, VB>(keep + r * BN + g * W) * inv_keep;
      store<T, VB>(c + r * BN + g * W, t * f);
      store<T, VB>(ds + r * BN + g * W, dz[r][g] * f * Map::slope(t) * scale);
    }
  }
}

}  // namespace
}  // namespace cpu
}  // namespace avk
