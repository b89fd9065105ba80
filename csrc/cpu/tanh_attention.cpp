// Fused tanh attention on CPU: o = Drop_p(tanh(scale * q @ k^T)) @ v (SPEC 1), forward and backward.
//
// The (Mq x N) map is never stored. A task owns a chunk of query rows of one batch element, packs that element's
// k and v once (zero-padded key blocks of kBN columns), and for each block of kBM rows sweeps the key blocks: the S
// tile (kBM x kBN) is computed from the packed q rows and key block, passed through tanh and the dropout mask in
// registers, parked in an L1-sized buffer and immediately contracted with the value block. Backward recomputes each tile (and redraws its dropout mask from the
// same Philox offsets) instead of reading a saved map.
//
// Zero padding makes every tile full, so the micro-kernels have no tail loops: padded keys have k = v = 0 and padded
// query rows q = do = 0. The padded rows and columns of the C and dS tiles are cleared before they are contracted,
// so that they contribute nothing even when a real input is infinite (inf * 0 would be NaN).
//
// bf16 / fp16 inputs are widened to fp32 as they are packed and computed exactly as fp32 inputs are (same tiles, same
// task partition, same Philox offsets, so the same dropout mask); o, dq and the summed dk / dv are rounded to the
// input dtype on their final store only (convert.h). Where the CPU has AVX-512 BF16 (or AVKERNELS_CPU_16BIT=emulated
// asks for its stand-in), bf16 inputs take the bodies of tanh_attention16.h instead: the same tiles and draws, with
// the matrix products on bf16 pairs (dot16.h) and fp32 sums.
//
// Determinism: forward tasks write disjoint output rows. Backward tasks own their dq rows and accumulate dk/dv in a
// thread-private buffer; a task that is the only one of its output rows rounds them into dk / dv, otherwise it keeps
// them (unpadded) in its slice of a partials buffer, and the partials are summed in task order. The task partition
// depends on the shapes only (not on the thread count), so results are bitwise reproducible with any number of
// threads.

#include "ops.h"

#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <vector>

#include "checks.h"
#include "common/philox.h"
#include "convert.h"
#include "parallel.h"
#include "simd.h"

#if AVK_X86_DISPATCH
#include <immintrin.h>
// GCC 12 reports the `_mm512_undefined` placeholders inside its own AVX-512 intrinsics as maybe-uninitialized.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#endif

namespace avk {
namespace cpu {
namespace {

// ---------------------------------------------------------------------------------------------------------------
// Dropout keep flags from Philox (csrc/common/philox.h): call c gives the flags of the four elements 4c .. 4c + 3.
//
// Philox is the most expensive part of a training step on CPU (10 rounds of two 32x32->64 multiplies per call,
// drawn in forward and redrawn in backward), and compilers widen those multiplies to full 64x64 products when left
// to themselves. So it has hand-written AVX-512 and AVX2 versions (one vpmuludq per product, even and odd lanes),
// selected once at load time, and the portable scalar version of philox.h as the reference and fallback.
// ---------------------------------------------------------------------------------------------------------------

constexpr int64_t kKeysPerCall = 4;

// keep[4 c + w] = 1 if word w of call (counter + c) gives a uniform >= p else 0, for c < calls.
void keep_flags_scalar(uint64_t seed, uint64_t counter, int64_t calls, float p, float* keep) {
  for (int64_t c = 0; c < calls; ++c) {
    const philox::Counter x = philox::words(seed, counter + c);
    const uint32_t word[kKeysPerCall] = {x.c0, x.c1, x.c2, x.c3};
    for (int w = 0; w < kKeysPerCall; ++w) keep[kKeysPerCall * c + w] = philox::word_to_unit(word[w]) >= p;
  }
}

#if AVK_X86_DISPATCH
// The AVX-512 / AVX2 Philox below runs 16 / 8 calls (counter + lane) at once. The low word of each 32x32->64
// product sits in the even dword of a 64-bit lane, so one multiply covers the even lanes and a second one the odd
// lanes (moved down by a dword shuffle); shuffles then route the hi and lo halves back into place. Shuffles run on a
// different port than the multiplies and shifts, which is why they replace shift + blend here.
//
// The counter's words 1-3 are the same in every lane (counter_hi, 0, 0), so the first round needs only the product
// A * c0, and the second only B * c2 plus a scalar product: two multiply pairs saved out of twenty.
//
// The four output words are compared with p lane by lane, giving four 16-bit (8-bit) masks, which pdep interleaves
// into the element order 4 * lane + word.

// hi and lo 32-bit halves of a * multiplier in every 32-bit lane (multiplier in the even dword of 64-bit lanes).
__attribute__((target("avx512f,bmi2"))) inline void mul_wide_avx512(__m512i a, __m512i multiplier, __m512i& hi,
                                                                         __m512i& lo) {
  const __m512i even = _mm512_mul_epu32(a, multiplier);
  const __m512i odd = _mm512_mul_epu32(_mm512_shuffle_epi32(a, _MM_PERM_DDBB), multiplier);
  hi = _mm512_mask_shuffle_epi32(odd, 0x5555, even, _MM_PERM_DDBB);  // even lanes <- even products' high dwords
  lo = _mm512_mask_shuffle_epi32(even, 0xAAAA, odd, _MM_PERM_CCAA);  // odd lanes <- odd products' low dwords
}

// Lanes whose word gives a uniform >= p (the fold x < 0 -> ~x and the fp32 scaling of philox::word_to_unit).
__attribute__((target("avx512f,bmi2"))) inline __mmask16 keeps_avx512(__m512i word, __m512 threshold) {
  const __m512i folded = _mm512_xor_si512(word, _mm512_srai_epi32(word, 31));
  const __m512 u = _mm512_mul_ps(_mm512_cvtepi32_ps(folded), _mm512_set1_ps(philox::kUint31ToUnit));
  return _mm512_cmp_ps_mask(u, threshold, _CMP_GE_OQ);
}

__attribute__((target("avx512f,bmi2"))) void keep_flags_avx512(uint64_t seed, uint64_t counter, int64_t calls,
                                                                  float p, float* keep) {
  constexpr int kCalls = 16;
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i round_a = _mm512_set1_epi64(philox::kRoundA), round_b = _mm512_set1_epi64(philox::kRoundB);
  const __m512 threshold = _mm512_set1_ps(p), ones = _mm512_set1_ps(1.0f);
  for (int64_t c = 0; c < calls; c += kCalls) {
    const uint64_t first = counter + c;
    float tail[kCalls * kKeysPerCall];
    float* out = calls - c >= kCalls ? keep + kKeysPerCall * c : tail;  // a partial chunk goes through `tail`
    if (static_cast<uint32_t>(first) > 0xFFFFFFFFu - (kCalls - 1)) {  // the counter's low word wraps in this chunk
      keep_flags_scalar(seed, first, kCalls, p, out);
    } else {
      uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
      const __m512i lo_word = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(first)), lane);
      // Round 1 on (counter_lo, counter_hi, 0, 0): c0 = counter_hi ^ k0 and c1 = 0 are lane-uniform.
      __m512i c0, c1, c2, c3;
      mul_wide_avx512(lo_word, round_a, c2, c3);
      c2 = _mm512_xor_si512(c2, _mm512_set1_epi32(static_cast<int>(k1)));
      const uint32_t c0_uniform = static_cast<uint32_t>(first >> 32) ^ k0;
      k0 += philox::kKeyA;
      k1 += philox::kKeyB;
      // Round 2: the product of the uniform c0 is a scalar.
      mul_wide_avx512(c2, round_b, c0, c1);
      c0 = _mm512_xor_si512(c0, _mm512_set1_epi32(static_cast<int>(k0)));
      c2 = _mm512_xor_si512(c3,
                            _mm512_set1_epi32(static_cast<int>(philox::mulhi(philox::kRoundA, c0_uniform) ^ k1)));
      c3 = _mm512_set1_epi32(static_cast<int>(philox::kRoundA * c0_uniform));
      for (int round = 2; round < philox::kRounds; ++round) {
        k0 += philox::kKeyA;
        k1 += philox::kKeyB;
        __m512i hi_b, lo_b, hi_a, lo_a;
        mul_wide_avx512(c2, round_b, hi_b, lo_b);
        mul_wide_avx512(c0, round_a, hi_a, lo_a);
        c0 = _mm512_ternarylogic_epi32(hi_b, c1, _mm512_set1_epi32(static_cast<int>(k0)), 0x96);  // three-way xor
        c2 = _mm512_ternarylogic_epi32(hi_a, c3, _mm512_set1_epi32(static_cast<int>(k1)), 0x96);
        c1 = lo_b;
        c3 = lo_a;
      }
      // Bit 4 * lane + w of `bits` is word w of call `lane`: element order.
      const uint64_t bits = _pdep_u64(keeps_avx512(c0, threshold), 0x1111111111111111ull) |
                            _pdep_u64(keeps_avx512(c1, threshold), 0x2222222222222222ull) |
                            _pdep_u64(keeps_avx512(c2, threshold), 0x4444444444444444ull) |
                            _pdep_u64(keeps_avx512(c3, threshold), 0x8888888888888888ull);
      for (int q = 0; q < kKeysPerCall; ++q)
        _mm512_storeu_ps(out + 16 * q, _mm512_maskz_mov_ps(static_cast<__mmask16>(bits >> (16 * q)), ones));
    }
    if (out == tail) std::copy(tail, tail + kKeysPerCall * (calls - c), keep + kKeysPerCall * c);
  }
}

__attribute__((target("avx2,bmi2"))) inline void mul_wide_avx2(__m256i a, __m256i multiplier, __m256i& hi,
                                                                       __m256i& lo) {
  const __m256i even = _mm256_mul_epu32(a, multiplier);
  const __m256i odd = _mm256_mul_epu32(_mm256_shuffle_epi32(a, 0xF5), multiplier);
  hi = _mm256_blend_epi32(_mm256_shuffle_epi32(even, 0xF5), odd, 0xAA);
  lo = _mm256_blend_epi32(even, _mm256_shuffle_epi32(odd, 0xA0), 0xAA);
}

__attribute__((target("avx2,bmi2"))) inline uint32_t keeps_avx2(__m256i word, __m256 threshold) {
  const __m256i folded = _mm256_xor_si256(word, _mm256_srai_epi32(word, 31));
  const __m256 u = _mm256_mul_ps(_mm256_cvtepi32_ps(folded), _mm256_set1_ps(philox::kUint31ToUnit));
  return static_cast<uint32_t>(_mm256_movemask_ps(_mm256_cmp_ps(u, threshold, _CMP_GE_OQ)));
}

__attribute__((target("avx2,bmi2"))) void keep_flags_avx2(uint64_t seed, uint64_t counter, int64_t calls,
                                                                float p, float* keep) {
  constexpr int kCalls = 8;
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i round_a = _mm256_set1_epi64x(philox::kRoundA), round_b = _mm256_set1_epi64x(philox::kRoundB);
  const __m256 threshold = _mm256_set1_ps(p), ones = _mm256_set1_ps(1.0f);
  const __m256i bit_of_lane = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
  for (int64_t c = 0; c < calls; c += kCalls) {
    const uint64_t first = counter + c;
    float tail[kCalls * kKeysPerCall];
    float* out = calls - c >= kCalls ? keep + kKeysPerCall * c : tail;
    if (static_cast<uint32_t>(first) > 0xFFFFFFFFu - (kCalls - 1)) {
      keep_flags_scalar(seed, first, kCalls, p, out);
    } else {
      __m256i c0 = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(first)), lane);
      __m256i c1 = _mm256_set1_epi32(static_cast<int>(first >> 32));
      __m256i c2 = _mm256_setzero_si256(), c3 = _mm256_setzero_si256();
      uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
      for (int round = 0; round < philox::kRounds; ++round) {
        __m256i hi_b, lo_b, hi_a, lo_a;
        mul_wide_avx2(c2, round_b, hi_b, lo_b);
        mul_wide_avx2(c0, round_a, hi_a, lo_a);
        c0 = _mm256_xor_si256(_mm256_xor_si256(hi_b, c1), _mm256_set1_epi32(static_cast<int>(k0)));
        c2 = _mm256_xor_si256(_mm256_xor_si256(hi_a, c3), _mm256_set1_epi32(static_cast<int>(k1)));
        c1 = lo_b;
        c3 = lo_a;
        k0 += philox::kKeyA;
        k1 += philox::kKeyB;
      }
      const uint32_t bits = _pdep_u32(keeps_avx2(c0, threshold), 0x11111111u) |
                            _pdep_u32(keeps_avx2(c1, threshold), 0x22222222u) |
                            _pdep_u32(keeps_avx2(c2, threshold), 0x44444444u) |
                            _pdep_u32(keeps_avx2(c3, threshold), 0x88888888u);
      for (int q = 0; q < kKeysPerCall; ++q) {
        const __m256i lanes = _mm256_and_si256(_mm256_set1_epi32(static_cast<int>(bits >> (8 * q))), bit_of_lane);
        const __m256 kept = _mm256_castsi256_ps(_mm256_cmpeq_epi32(lanes, bit_of_lane));
        _mm256_storeu_ps(out + 8 * q, _mm256_and_ps(kept, ones));
      }
    }
    if (out == tail) std::copy(tail, tail + kKeysPerCall * (calls - c), keep + kKeysPerCall * c);
  }
}
#endif

using KeepFlagsFn = void (*)(uint64_t, uint64_t, int64_t, float, float*);

KeepFlagsFn select_keep_flags() {
#if AVK_X86_DISPATCH
  if (cpu_isa() == Isa::kAvx512) return keep_flags_avx512;
  if (cpu_isa() == Isa::kAvx2) return keep_flags_avx2;
#endif
  return keep_flags_scalar;
}

const KeepFlagsFn keep_flags = select_keep_flags();

// ---------------------------------------------------------------------------------------------------------------
// Tiles and micro-kernels
// ---------------------------------------------------------------------------------------------------------------

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

// ---------------------------------------------------------------------------------------------------------------
// The problem: sizes, strides (in elements; v's batch stride is 0 when v is shared) and scalars.
// ---------------------------------------------------------------------------------------------------------------

constexpr int64_t kMinTasks = 32;
constexpr int64_t kMaxPartBytes = int64_t(256) << 20;
constexpr int64_t kFewPartBytes = int64_t(8) << 20;  // partials this small are allowed whatever the map's size

// S is the storage type of the tensors, T = compute_t<S> the type of every tile and sum (Tile<T>: so the tiles,
// the task partition and the dropout draws of a bf16 / fp16 problem are those of the fp32 one).
template <typename S>
struct Problem {
  using T = compute_t<S>;
  const S* q;
  const S* k;
  const S* v;
  int64_t batch, rows, keys, head, value;  // B, Mq, N, D, E
  int64_t sq[3], sk[3], sv[3];
  T scale;
  bool dropout;
  float p;
  T inv_keep;  // 1 / (1 - p)
  uint64_t seed;
  bool tanh_relu;
  int64_t head_pad, value_pad;  // D and E rounded up to whole vectors
  int64_t row_blocks, key_blocks, keys_pad;
  int64_t chunks;            // tasks per batch element
  int64_t blocks_per_chunk;  // row blocks per task

  int64_t tasks() const { return batch * chunks; }
  int64_t first_block(int64_t task) const { return (task % chunks) * blocks_per_chunk; }
  int64_t end_block(int64_t task) const { return std::min(row_blocks, (task % chunks + 1) * blocks_per_chunk); }

  // Keep flags of R rows starting at query row i against the key block starting at j0 (a multiple of 4, so the
  // block takes whole Philox calls: csrc/common/philox.h); padded rows get none.
  template <int R>
  void draw_keep(int64_t b, int64_t i, int64_t j0, float* keep) const {
    constexpr int BN = Tile<T>::kBN;
    const uint64_t calls_per_row = philox::calls_per_row(keys);
    for (int r = 0; r < R; ++r) {
      if (i + r < rows)
        keep_flags(seed, (b * rows + i + r) * calls_per_row + j0 / kKeysPerCall, BN / kKeysPerCall, p,
                   keep + r * BN);
      else
        std::fill(keep + r * BN, keep + (r + 1) * BN, 0.0f);
    }
  }
};

template <typename S>
Problem<S> make_problem(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t seed, double scale,
                        double dropout_p, int64_t activation) {
  using T = compute_t<S>;
  Problem<S> P;
  P.q = q.data_ptr<S>();
  P.k = k.data_ptr<S>();
  P.v = v.data_ptr<S>();
  P.batch = q.size(0);
  P.rows = q.size(1);
  P.keys = k.size(1);
  P.head = q.size(2);
  P.value = v.size(2);
  for (int d = 0; d < 3; ++d) {
    P.sq[d] = q.stride(d);
    P.sk[d] = k.stride(d);
    P.sv[d] = v.stride(d);
  }
  if (v.size(0) == 1) P.sv[0] = 0;  // shared over the batch
  P.scale = static_cast<T>(scale);
  P.dropout = dropout_p > 0.0;
  P.p = static_cast<float>(dropout_p);
  P.inv_keep = static_cast<T>(1.0 / (1.0 - dropout_p));
  P.seed = static_cast<uint64_t>(seed);
  P.tanh_relu = activation == 1;
  P.head_pad = round_up(P.head, Tile<T>::kPad);
  P.value_pad = round_up(P.value, Tile<T>::kPad);
  P.row_blocks = (P.rows + Tile<T>::kBM - 1) / Tile<T>::kBM;
  P.key_blocks = (P.keys + Tile<T>::kBN - 1) / Tile<T>::kBN;
  P.keys_pad = P.key_blocks * Tile<T>::kBN;
  // Tasks per batch element: enough for the threads of a large machine (kMinTasks in all) but no more than the row
  // blocks, and the backward's dk/dv partials (one (N, D + E) slice per task when a batch element has several)
  // within the size of the (B, Mq, N) map that the reference keeps for its backward (kFewPartBytes at least, and
  // kMaxPartBytes at most), so that the fused backward never needs more memory than the reference. A function of
  // the shapes only, so the backward's reduction order does not depend on the thread count.
  const int64_t part_bytes = P.keys * (P.head + P.value) * static_cast<int64_t>(sizeof(T)) * P.batch;
  const int64_t map_bytes = P.batch * P.rows * P.keys * static_cast<int64_t>(sizeof(S));
  const int64_t part_budget = std::min(kMaxPartBytes, std::max(kFewPartBytes, map_bytes));
  P.chunks = std::min(P.row_blocks, (kMinTasks + P.batch - 1) / P.batch);
  P.chunks = std::max<int64_t>(1, std::min(P.chunks, part_budget / std::max<int64_t>(1, part_bytes)));
  P.blocks_per_chunk = (P.row_blocks + P.chunks - 1) / P.chunks;
  return P;
}

// ---------------------------------------------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------------------------------------------

// The packed key/value blocks of one batch element, kept while a thread runs that element's tasks: packing them
// once per task instead of once per row block removes a strided copy per map element.
template <typename S>
struct KeyValuePanels {
  using T = compute_t<S>;
  std::vector<T> k_panels;  // (key_blocks, D, BN): each key block transposed, for S = q k^T
  std::vector<T> k_blocks;  // (key_blocks, BN, Dp): each key block, for dq = dS k (backward only)
  std::vector<T> v_panels;  // (key_blocks, E, BN): each value block transposed, for dZ = do v^T (backward only)
  std::vector<T> v_blocks;  // (key_blocks, BN, Ep): each value block, for o = C v (forward only)
  int64_t batch_index = -1;

  void pack_for(const Problem<S>& P, int64_t b, bool backward) {
    constexpr int BN = Tile<T>::kBN;
    if (b == batch_index) return;
    const int64_t D = P.head, E = P.value, Dp = P.head_pad, Ep = P.value_pad;
    k_panels.resize(P.key_blocks * D * BN);
    (backward ? k_blocks : v_blocks).resize(P.key_blocks * BN * (backward ? Dp : Ep));
    if (backward) v_panels.resize(P.key_blocks * E * BN);
    for (int64_t kb = 0; kb < P.key_blocks; ++kb) {
      const int64_t j0 = kb * BN, n_keys = std::min<int64_t>(BN, P.keys - j0);
      const S* k = P.k + b * P.sk[0] + j0 * P.sk[1];
      const S* v = P.v + b * P.sv[0] + j0 * P.sv[1];
      pack(k_panels.data() + kb * D * BN, BN, D, k, P.sk[2], P.sk[1], D, n_keys);
      if (backward) {
        pack(k_blocks.data() + kb * BN * Dp, Dp, BN, k, P.sk[1], P.sk[2], n_keys, D);
        pack(v_panels.data() + kb * E * BN, BN, E, v, P.sv[2], P.sv[1], E, n_keys);
      } else {
        pack(v_blocks.data() + kb * BN * Ep, Ep, BN, v, P.sv[1], P.sv[2], n_keys, E);
      }
    }
    batch_index = b;
  }
};

// The keep flags of R map rows from query row i (the first rows_left of them real) against the key block at j0, into
// the returned (B, Mq, N) mask if there is one.
template <int R, typename S>
void store_mask_rows(const Problem<S>& P, bool* mask, const float* keep, int64_t b, int64_t i, int64_t rows_left,
                     int64_t j0, int64_t n_keys) {
  constexpr int BN = Tile<compute_t<S>>::kBN;
  for (int r = 0; r < R && mask != nullptr && r < rows_left; ++r) {
    bool* m = mask + (b * P.rows + i + r) * P.keys + j0;
    for (int64_t j = 0; j < n_keys; ++j) m[j] = keep[r * BN + j] != 0.0f;
  }
}

// The finished output rows i0 .. i0 + n_rows of batch element b: the epilogue, then one rounding store to o.
template <typename T, int VB, typename S>
AVK_INLINE void finish_output_rows(const Problem<S>& P, T* o_tile, S* o, int64_t b, int64_t i0, int64_t n_rows) {
  const int64_t Ep = P.value_pad;
  for (int64_t r = 0; r < n_rows; ++r) {
    T* row = o_tile + r * Ep;
    if (P.tanh_relu) {
      for (int64_t x = 0; x < Ep; x += kLanes<T, VB>) {
        const Vec<T, VB> t = tanh_vec<VB>(load<T, VB>(row + x));
        store<T, VB>(row + x, t < T(0) ? Vec<T, VB>{} : t);  // ReLU that keeps NaN, as torch.relu does
      }
    }
    narrow_row(o + (b * P.rows + i0 + r) * P.value, row, P.value);
  }
}

// Forward tasks [begin, end): task = (batch element, chunk of kBM-row blocks).
//
// Args: P the problem; o the contiguous (B, Mq, E) output; mask the contiguous (B, Mq, N) keep-mask or null.
// Grid: P.tasks() independent tasks (disjoint output rows), split over threads by at::parallel_for.
template <typename S, int VB>
AVK_INLINE void forward_tasks(const Problem<S>& P, S* o, bool* mask, int64_t begin, int64_t end) {
  using T = compute_t<S>;
  using Vt = Vec<T, VB>;
  constexpr int BN = Tile<T>::kBN, BM = Tile<T>::kBM, R = Tile<T>::kAccRows;
  constexpr int W = Blocking<T, VB>::kW, G = Blocking<T, VB>::kGroup, RF = Blocking<T, VB>::kFwdRows;
  const int64_t D = P.head, Dp = P.head_pad, Ep = P.value_pad;
  std::vector<T> buffer(BM * Dp + BM * Ep + BM * BN);
  T* q_tile = buffer.data();      // (BM, Dp)  query rows
  T* o_tile = q_tile + BM * Dp;   // (BM, Ep)  output accumulator
  T* c_tile = o_tile + BM * Ep;   // (BM, BN)  Drop(tanh(S)) of the current key block
  std::vector<float> keep(RF * BN, 1.0f);
  KeyValuePanels<S> panels;

  for (int64_t task = begin; task < end; ++task) {
    const int64_t b = task / P.chunks;
    panels.pack_for(P, b, /*backward=*/false);
    for (int64_t block = P.first_block(task); block < P.end_block(task); ++block) {
      const int64_t i0 = block * BM, n_rows = std::min<int64_t>(BM, P.rows - i0);
      pack(q_tile, Dp, BM, P.q + b * P.sq[0] + i0 * P.sq[1], P.sq[1], P.sq[2], n_rows, D);
      std::fill(o_tile, o_tile + BM * Ep, T(0));

      for (int64_t kb = 0; kb < P.key_blocks; ++kb) {
        const int64_t j0 = kb * BN, n_keys = std::min<int64_t>(BN, P.keys - j0);
        const T* k_panel = panels.k_panels.data() + kb * D * BN;
        const T* v_block = panels.v_blocks.data() + kb * BN * Ep;
        for (int64_t i = 0; i < BM; i += RF) {
          if (P.dropout) P.template draw_keep<RF>(b, i0 + i, j0, keep.data());
          for (int64_t col0 = 0; col0 < BN; col0 += G * W) {
            Vt s[RF][G];
            rows_times_panel<T, VB, RF>(q_tile + i * Dp, Dp, k_panel + col0, D, s);
            for (int r = 0; r < RF; ++r) {
              for (int c = 0; c < G; ++c) {
                const int64_t col = col0 + c * W;
                Vt t = tanh_vec<VB>(s[r][c] * P.scale);
                if (P.dropout) t *= load_keep<T, VB>(keep.data() + r * BN + col) * P.inv_keep;
                store<T, VB>(c_tile + (i + r) * BN + col, t);
              }
            }
          }
          store_mask_rows<RF>(P, mask, keep.data(), b, i0 + i, n_rows - i, j0, n_keys);
        }
        clear_padding(c_tile, n_rows, n_keys);
        for (int64_t i = 0; i < BM; i += R)
          accumulate_rows<T, VB>(o_tile + i * Ep, Ep, c_tile + i * BN, BN, 1, v_block, Ep, BN, Ep);
      }

      finish_output_rows<T, VB>(P, o_tile, o, b, i0, n_rows);
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------------------------------------------

template <typename S>
struct Gradients {
  using T = compute_t<S>;
  const S* dout;
  int64_t sdo[3];
  const S* out;  // forward output (tanh_relu only), strides so
  int64_t so[3];
  S* dq;       // contiguous (B, Mq, D)
  S* dk;       // contiguous (B, N, D): written by the tasks when dk_part is null (one task per batch element)
  S* dv;       // contiguous (B or 1, N, E): likewise when dv_part is null
  T* dk_part;  // (tasks, N, D): each task's dk when a batch element has several tasks, in the compute type; or null
  T* dv_part;  // (tasks, N, E): likewise when several tasks add into one dv row (chunks, or a shared v); or null
};

// The q rows and the output-gradient rows i0 .. i0 + n_rows of batch element b as (BM, Dp) and (BM, Ep) tiles;
// the output gradient goes through the tanh_relu epilogue: d ReLU(tanh(x)) = [y > 0] (1 - y^2), y the saved output.
template <typename S, typename T = compute_t<S>>
void pack_gradient_rows(const Problem<S>& P, const Gradients<S>& G, T* q_tile, T* do_tile, int64_t b, int64_t i0,
                        int64_t n_rows) {
  constexpr int BM = Tile<T>::kBM;
  const int64_t D = P.head, E = P.value, Dp = P.head_pad, Ep = P.value_pad;
  pack(q_tile, Dp, BM, P.q + b * P.sq[0] + i0 * P.sq[1], P.sq[1], P.sq[2], n_rows, D);
  pack(do_tile, Ep, BM, G.dout + b * G.sdo[0] + i0 * G.sdo[1], G.sdo[1], G.sdo[2], n_rows, E);
  if (!P.tanh_relu) return;
  for (int64_t r = 0; r < n_rows; ++r) {
    const S* y = G.out + b * G.so[0] + (i0 + r) * G.so[1];
    for (int64_t e = 0; e < E; ++e) {
      const T ye = widen<T>(y[e * G.so[2]]);
      // As torch's ReLU backward: a select (a NaN do where y <= 0 gives 0), and y = NaN passes do on.
      T& g = do_tile[r * Ep + e];
      g = ye <= T(0) ? T(0) : g * (T(1) - ye * ye);
    }
  }
}

// Rows j < keys, columns < width of a task's (keys_pad, ld) accumulator: rounded into out when the task is the only one
// adding into those rows (part null), else copied into the task's slice of the partials.
template <typename S, typename T>
void keep_task_sum(const T* acc, int64_t ld, int64_t keys, int64_t width, S* out, T* part) {
  for (int64_t j = 0; j < keys; ++j) {
    if (part != nullptr)
      std::copy(acc + j * ld, acc + j * ld + width, part + j * width);
    else
      narrow_row(out + j * width, acc + j * ld, width);
  }
}

// Backward tasks [begin, end): task = (batch element b, chunk of row blocks). Writes the task's dq rows, and its dk
// and dv contributions into dk / dv or its own slices of dk_part / dv_part (keep_task_sum).
//
// Per tile: S = q k^T, t = tanh(scale S), f = keep / (1 - p), C = t f, dZ = do' v^T (do' = do through the tanh_relu
// epilogue), dS = dZ f (1 - t^2) scale; dq += dS k, dk += dS^T q, dv += C^T do'.
// Grid: P.tasks() tasks with private outputs, split over threads by at::parallel_for.
template <typename S, int VB>
AVK_INLINE void backward_tasks(const Problem<S>& P, const Gradients<S>& G, int64_t begin, int64_t end) {
  using T = compute_t<S>;
  using Vt = Vec<T, VB>;
  constexpr int BN = Tile<T>::kBN, BM = Tile<T>::kBM, R = Tile<T>::kAccRows;
  constexpr int W = Blocking<T, VB>::kW, NG = Blocking<T, VB>::kGroup, RB = Blocking<T, VB>::kBwdRows;
  const int64_t D = P.head, E = P.value, Dp = P.head_pad, Ep = P.value_pad;
  std::vector<T> buffer(BM * Dp + BM * Ep + BM * Dp + 2 * BM * BN);
  T* q_tile = buffer.data();       // (BM, Dp)
  T* do_tile = q_tile + BM * Dp;   // (BM, Ep)  output gradient through the epilogue
  T* dq_tile = do_tile + BM * Ep;  // (BM, Dp)
  T* c_tile = dq_tile + BM * Dp;   // (BM, BN)
  T* ds_tile = c_tile + BM * BN;   // (BM, BN)
  std::vector<float> keep(RB * BN, 1.0f);
  KeyValuePanels<S> panels;
  // The running task's dk and dv, padded like the tiles; one pair per thread, not per task.
  std::vector<T> dk_sum(P.keys_pad * Dp), dv_sum(P.keys_pad * Ep);
  T* dk_acc = dk_sum.data();
  T* dv_acc = dv_sum.data();

  for (int64_t task = begin; task < end; ++task) {
    const int64_t b = task / P.chunks;
    panels.pack_for(P, b, /*backward=*/true);
    std::fill(dk_sum.begin(), dk_sum.end(), T(0));
    std::fill(dv_sum.begin(), dv_sum.end(), T(0));
    for (int64_t block = P.first_block(task); block < P.end_block(task); ++block) {
      const int64_t i0 = block * BM, n_rows = std::min<int64_t>(BM, P.rows - i0);
      pack_gradient_rows(P, G, q_tile, do_tile, b, i0, n_rows);
      std::fill(dq_tile, dq_tile + BM * Dp, T(0));

      for (int64_t kb = 0; kb < P.key_blocks; ++kb) {
        const int64_t j0 = kb * BN, n_keys = std::min<int64_t>(BN, P.keys - j0);
        const T* k_panel = panels.k_panels.data() + kb * D * BN;
        const T* k_block = panels.k_blocks.data() + kb * BN * Dp;
        const T* v_panel = panels.v_panels.data() + kb * E * BN;
        for (int64_t i = 0; i < BM; i += RB) {
          if (P.dropout) P.template draw_keep<RB>(b, i0 + i, j0, keep.data());
          for (int64_t col0 = 0; col0 < BN; col0 += NG * W) {
            Vt s[RB][NG], dz[RB][NG];
            rows_times_panel<T, VB, RB>(q_tile + i * Dp, Dp, k_panel + col0, D, s);
            rows_times_panel<T, VB, RB>(do_tile + i * Ep, Ep, v_panel + col0, E, dz);
            for (int r = 0; r < RB; ++r) {
              for (int c = 0; c < NG; ++c) {
                const int64_t col = col0 + c * W;
                const Vt t = tanh_vec<VB>(s[r][c] * P.scale);
                Vt f = splat<T, VB>(1);
                if (P.dropout) f = load_keep<T, VB>(keep.data() + r * BN + col) * P.inv_keep;
                store<T, VB>(c_tile + (i + r) * BN + col, t * f);
                store<T, VB>(ds_tile + (i + r) * BN + col, dz[r][c] * f * (T(1) - t * t) * P.scale);
              }
            }
          }
        }
        clear_padding(c_tile, n_rows, n_keys);
        clear_padding(ds_tile, n_rows, n_keys);
        for (int64_t i = 0; i < BM; i += R)
          accumulate_rows<T, VB>(dq_tile + i * Dp, Dp, ds_tile + i * BN, BN, 1, k_block, Dp, BN, Dp);
        for (int64_t j = 0; j < BN; j += R) {
          accumulate_rows<T, VB>(dk_acc + (j0 + j) * Dp, Dp, ds_tile + j, 1, BN, q_tile, Dp, BM, Dp);
          accumulate_rows<T, VB>(dv_acc + (j0 + j) * Ep, Ep, c_tile + j, 1, BN, do_tile, Ep, BM, Ep);
        }
      }
      for (int64_t r = 0; r < n_rows; ++r)
        narrow_row(G.dq + (b * P.rows + i0 + r) * D, dq_tile + r * Dp, D);
    }
    keep_task_sum(dk_acc, Dp, P.keys, D, G.dk_part ? nullptr : G.dk + b * P.keys * D,
                  G.dk_part ? G.dk_part + task * P.keys * D : nullptr);
    keep_task_sum(dv_acc, Ep, P.keys, E, G.dv_part ? nullptr : G.dv + b * P.keys * E,
                  G.dv_part ? G.dv_part + task * P.keys * E : nullptr);
  }
}

// One entry point per ISA around each kernel body (see simd.h), with that ISA's vector width.
#define AVK_DEFINE_ISA_ENTRY(attributes, suffix, vector_bytes)                                         \
  template <typename S>                                                                                \
  attributes void forward_tasks_##suffix(const Problem<S>& P, S* o, bool* mask, int64_t b, int64_t e) { \
    forward_tasks<S, vector_bytes>(P, o, mask, b, e);                                                  \
  }                                                                                                    \
  template <typename S>                                                                                \
  attributes void backward_tasks_##suffix(const Problem<S>& P, const Gradients<S>& G, int64_t b,       \
                                          int64_t e) {                                                 \
    backward_tasks<S, vector_bytes>(P, G, b, e);                                                       \
  }
AVK_DEFINE_ISA_ENTRY(, baseline, 16)
#if AVK_X86_DISPATCH
AVK_DEFINE_ISA_ENTRY(AVK_TARGET_AVX2, avx2, 32)
AVK_DEFINE_ISA_ENTRY(AVK_TARGET_AVX512, avx512, 64)
#endif
#undef AVK_DEFINE_ISA_ENTRY

}  // namespace
}  // namespace cpu
}  // namespace avk

#include "tanh_attention16.h"  // the bf16 bodies: matrix products on bf16 pairs

namespace avk {
namespace cpu {
namespace {

// Runs the bf16 forward tasks on the 16-bit unit (or its stand-in) compute_16bit() picks; false for fp32, where
// the caller widens bf16 to fp32 instead, and for every other dtype.
template <typename S>
bool forward_on_16bit_unit(const Problem<S>&, S*, bool*) {
  return false;
}
template <typename S>
bool backward_on_16bit_unit(const Problem<S>&, const Gradients<S>&) {
  return false;
}

bool forward_on_16bit_unit(const Problem<c10::BFloat16>& P, c10::BFloat16* o, bool* mask) {
#if AVK_HAVE_DOT16
  const Compute16 unit = compute_16bit();
  if (unit == Compute16::kFp32) return false;
  parallel_for(0, P.tasks(), 1, [&](int64_t begin, int64_t end) {
    (unit == Compute16::kAvx512Bf16 ? forward_tasks16_native : forward_tasks16_emulated)(P, o, mask, begin, end);
  });
  return true;
#else
  return false;
#endif
}

bool backward_on_16bit_unit(const Problem<c10::BFloat16>& P, const Gradients<c10::BFloat16>& G) {
#if AVK_HAVE_DOT16
  const Compute16 unit = compute_16bit();
  if (unit == Compute16::kFp32) return false;
  parallel_for(0, P.tasks(), 1, [&](int64_t begin, int64_t end) {
    (unit == Compute16::kAvx512Bf16 ? backward_tasks16_native : backward_tasks16_emulated)(P, G, begin, end);
  });
  return true;
#else
  return false;
#endif
}

// out[g, j, :width] = sum over t < parts of part[g * parts + t, j, :width], added in the order t = 0, 1, ...
// part is (groups * parts, keys, width): the tasks' sums. The sum stays in T (no rounding to a 16-bit S between
// partials); only the total is rounded.
template <typename S, typename T>
void sum_partials(S* out, int64_t groups, int64_t keys, int64_t width, const T* part, int64_t parts) {
  parallel_for(0, groups * keys, 64, [&](int64_t begin, int64_t end) {
    std::vector<T> total(width);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t g = row / keys, j = row % keys;
      const T* src = part + (g * parts * keys + j) * width;
      std::copy(src, src + width, total.begin());
      for (int64_t t = 1; t < parts; ++t)
        for (int64_t x = 0; x < width; ++x) total[x] += src[t * keys * width + x];
      narrow_row(out + row * width, total.data(), width);
    }
  });
}

void check_inputs(const char* fn, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t seed,
                  double dropout_p, int64_t activation) {
  check_float_cpu(q, fn, "q");
  check_float_cpu_like(k, q, fn, "k", "q");
  check_float_cpu_like(v, q, fn, "v", "q");
  check_shape(q, {-1, -1, -1}, fn, "q", "(B, Mq, D)");
  check_shape(k, {q.size(0), -1, q.size(2)}, fn, "k", "(B, N, D)");
  check_shape(v, {-1, k.size(1), -1}, fn, "v", "(B or 1, N, E)");
  TORCH_CHECK(v.size(0) == q.size(0) || v.size(0) == 1, fn, ": v must have batch size ", q.size(0),
              " (like q) or 1 (shared), got ", v.size(0));
  TORCH_CHECK(seed >= 0 && seed < (int64_t(1) << 31), fn, ": seed must be in [0, 2**31), got ", seed);
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, fn, ": dropout_p must be in [0, 1), got ", dropout_p);
  TORCH_CHECK(activation == 0 || activation == 1, fn, ": activation must be 0 (none) or 1 (tanh_relu), got ",
              activation);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> tanh_attention_forward(const at::Tensor& q, const at::Tensor& k,
                                                          const at::Tensor& v, int64_t seed, double scale,
                                                          double dropout_p, int64_t activation, bool return_mask) {
  check_inputs("tanh_attention_forward", q, k, v, seed, dropout_p, activation);
  at::Tensor o = at::empty({q.size(0), q.size(1), v.size(2)}, q.options());
  const bool with_mask = return_mask && dropout_p > 0.0;
  at::Tensor mask = at::empty(with_mask ? at::IntArrayRef{q.size(0), q.size(1), k.size(1)} : at::IntArrayRef{0},
                              q.options().dtype(at::kBool));
  if (o.numel() == 0) return {o, mask};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "tanh_attention_forward", [&] {
    const Problem<scalar_t> P = make_problem<scalar_t>(q, k, v, seed, scale, dropout_p, activation);
    scalar_t* o_ptr = o.data_ptr<scalar_t>();
    bool* mask_ptr = with_mask ? mask.data_ptr<bool>() : nullptr;
    if (forward_on_16bit_unit(P, o_ptr, mask_ptr)) return;
    parallel_for(0, P.tasks(), 1, [&](int64_t begin, int64_t end) {
      AVK_DISPATCH_ISA(forward_tasks, scalar_t, P, o_ptr, mask_ptr, begin, end);
    });
  });
  return {o, mask};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> tanh_attention_backward(const at::Tensor& dout, const at::Tensor& q,
                                                                       const at::Tensor& k, const at::Tensor& v,
                                                                       const at::Tensor& out, int64_t seed,
                                                                       double scale, double dropout_p,
                                                                       int64_t activation, bool deterministic) {
  (void)deterministic;  // every reduction here runs in a fixed order: always deterministic
  constexpr const char* fn = "tanh_attention_backward";
  check_inputs(fn, q, k, v, seed, dropout_p, activation);
  check_float_cpu_like(dout, q, fn, "dout", "q");
  check_shape(dout, {q.size(0), q.size(1), v.size(2)}, fn, "dout", "(B, Mq, E)");
  if (activation == 1) {
    check_float_cpu_like(out, q, fn, "out", "q");
    check_shape(out, {q.size(0), q.size(1), v.size(2)}, fn, "out", "(B, Mq, E)");
  }
  at::Tensor dq = at::zeros(q.sizes(), q.options());  // contiguous, and the answer when a size is 0
  at::Tensor dk = at::zeros(k.sizes(), k.options());
  at::Tensor dv = at::zeros(v.sizes(), v.options());
  if (q.numel() == 0 || k.numel() == 0 || dout.numel() == 0) return {dq, dk, dv};

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), fn, [&] {
    using S = scalar_t;
    const Problem<S> P = make_problem<S>(q, k, v, seed, scale, dropout_p, activation);
    Gradients<S> G;
    G.dout = dout.data_ptr<S>();
    G.out = activation == 1 ? out.data_ptr<S>() : nullptr;
    for (int d = 0; d < 3; ++d) {
      G.sdo[d] = dout.stride(d);
      G.so[d] = activation == 1 ? out.stride(d) : 0;
    }
    G.dq = dq.data_ptr<S>();
    G.dk = dk.data_ptr<S>();
    G.dv = dv.data_ptr<S>();
    // dk[b] sums the chunks of batch element b; so does dv, or all tasks when v is shared by the batch. Partials
    // only where an output row has several tasks (every task writes its whole slice: no zeroing).
    const int64_t tasks = P.tasks(), v_groups = v.size(0), dv_parts = tasks / v_groups;
    const at::TensorOptions part_options = q.options().dtype(compute_dtype(q.scalar_type()));
    const at::Tensor dk_part = at::empty({P.chunks > 1 ? tasks : 0, P.keys, P.head}, part_options);
    const at::Tensor dv_part = at::empty({dv_parts > 1 ? tasks : 0, P.keys, P.value}, part_options);
    using T = compute_t<S>;
    G.dk_part = P.chunks > 1 ? dk_part.data_ptr<T>() : nullptr;
    G.dv_part = dv_parts > 1 ? dv_part.data_ptr<T>() : nullptr;
    if (!backward_on_16bit_unit(P, G)) {
      parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
        AVK_DISPATCH_ISA(backward_tasks, S, P, G, begin, end);
      });
    }
    if (G.dk_part != nullptr) sum_partials(dk.data_ptr<S>(), P.batch, P.keys, P.head, G.dk_part, P.chunks);
    if (G.dv_part != nullptr) sum_partials(dv.data_ptr<S>(), v_groups, P.keys, P.value, G.dv_part, dv_parts);
  });
  return {dq, dk, dv};
}

at::Tensor dropout_uniform(int64_t seed, int64_t first_row, int64_t rows, int64_t keys) {
  TORCH_CHECK(seed >= 0 && seed < (int64_t(1) << 31), "dropout_uniform: seed must be in [0, 2**31), got ", seed);
  TORCH_CHECK(first_row >= 0 && rows >= 0 && keys >= 0, "dropout_uniform: first_row, rows and keys must be >= 0, got ",
              first_row, ", ", rows, ", ", keys);
  at::Tensor u = at::empty({rows, keys}, at::TensorOptions().dtype(at::kFloat));
  float* out = u.data_ptr<float>();
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t j = 0; j < keys; ++j)
      out[r * keys + j] = philox::uniform(static_cast<uint64_t>(seed), static_cast<uint64_t>(first_row + r),
                                          static_cast<uint64_t>(j), static_cast<uint64_t>(keys));
  return u;
}

at::Tensor dropout_keep(int64_t seed, int64_t first_row, int64_t rows, int64_t keys, double dropout_p) {
  TORCH_CHECK(seed >= 0 && seed < (int64_t(1) << 31), "dropout_keep: seed must be in [0, 2**31), got ", seed);
  TORCH_CHECK(first_row >= 0 && rows >= 0 && keys >= 0, "dropout_keep: first_row, rows and keys must be >= 0, got ",
              first_row, ", ", rows, ", ", keys);
  at::Tensor kept = at::empty({rows, keys}, at::TensorOptions().dtype(at::kBool));
  bool* out = kept.data_ptr<bool>();
  const uint64_t calls_per_row = philox::calls_per_row(keys);
  constexpr int64_t kBlock = 64;  // the fp32 kernels' key block
  float flags[kBlock];
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t j0 = 0; j0 < keys; j0 += kBlock) {
      const int64_t n = std::min(kBlock, keys - j0);
      keep_flags(static_cast<uint64_t>(seed), (first_row + r) * calls_per_row + j0 / kKeysPerCall,
                 (n + kKeysPerCall - 1) / kKeysPerCall, static_cast<float>(dropout_p), flags);
      for (int64_t j = 0; j < n; ++j) out[r * keys + j0 + j] = flags[j] != 0.0f;
    }
  }
  return kept;
}

}  // namespace cpu
}  // namespace avk
