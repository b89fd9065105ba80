// The bf16 kernel bodies of tanh_attention.cpp: the same tiles, task partition, Philox draws and epilogue as the
// fp32 bodies there, with every matrix product on bf16 pairs (dot16.h: vdpbf16ps or its stand-in) instead of fp32
// FMAs. Included by tanh_attention.cpp inside its unnamed namespace, after the fp32 bodies it shares helpers with.
//
// S = q k^T is exact products of the bf16 inputs either way. The forward's o = C v stays fp32 (the fp32 micro-kernel
// on the fp32 map tile): rounding C to bf16 there moved o by ~2^-9 relative, enough to flip the sign of near-zero
// pre-activations under tanh_relu, and each flipped ReLU moved a row of dq by O(1) (measured: more than the rule of
// tests/comparison.py allows on some seeds; the fp32 o never flipped). The backward rounds, beyond its bf16 inputs,
// the map tile C before C^T do', the map gradient dS before dS k and dS^T q, and do' (the output gradient through the
// epilogue): as the reference run in bf16 does, which materialises each in bf16; every sum stays fp32.
//
// Only for VB = 64 (entry points compiled for AVX-512, with or without AVX-512 BF16): the backward interleaves its
// two rows per step (Blocking<float, 64>::kBwdRows) into pairs along rows.
#pragma once

#include "dot16.h"

#if AVK_X86_DISPATCH && !defined(__clang__)
#define AVK_HAVE_DOT16 1

namespace avk {
namespace cpu {
namespace {

using BF16 = BFloat16;
using dot16::VF;

// The packed key/value blocks of KeyValuePanels as bf16 pairs along each product's contraction.
struct PairPanels {
  std::vector<uint32_t> k_panels;  // (key_blocks, ceil(D/2), BN): S = q k^T
  std::vector<uint32_t> k_blocks;  // (key_blocks, BN/2, Dp): dq = dS k (backward only)
  std::vector<uint32_t> v_panels;  // (key_blocks, ceil(E/2), BN): dZ = do' v^T (backward only)
  int64_t batch_index = -1;

  void pack_for(const Problem<BF16>& P, KeyValuePanels<BF16>& wide, int64_t b, bool backward) {
    constexpr int BN = Tile<float>::kBN;
    if (b == batch_index) return;
    wide.pack_for(P, b, backward);
    const int64_t D = P.head, E = P.value, Dp = P.head_pad, D2 = (D + 1) / 2, E2 = (E + 1) / 2;
    k_panels.resize(P.key_blocks * D2 * BN);
    if (backward) {
      k_blocks.resize(P.key_blocks * BN / 2 * Dp);
      v_panels.resize(P.key_blocks * E2 * BN);
    }
    for (int64_t kb = 0; kb < P.key_blocks; ++kb) {
      dot16::pairs_along_rows(k_panels.data() + kb * D2 * BN, wide.k_panels.data() + kb * D * BN, BN, D, BN);
      if (backward) {
        dot16::pairs_along_rows(k_blocks.data() + kb * BN / 2 * Dp, wide.k_blocks.data() + kb * BN * Dp, Dp, BN, Dp);
        dot16::pairs_along_rows(v_panels.data() + kb * E2 * BN, wide.v_panels.data() + kb * E * BN, BN, E, BN);
      }
    }
    batch_index = b;
  }
};

// x with the lanes of padded keys (col + lane >= n_keys) and padded rows cleared, so that they contribute nothing
// to the products even when a real input is infinite (inf * 0 would be NaN).
AVK_INLINE VF clear_padding16(VF x, bool padded_row, int64_t col, int64_t n_keys) {
  if (padded_row) return VF{};
  if (col + 16 <= n_keys) return x;
  dot16::VI lane;
  for (int l = 0; l < 16; ++l) lane[l] = l;
  return (dot16::VI)(lane + static_cast<int32_t>(col)) < static_cast<int32_t>(n_keys) ? x : VF{};
}

// Rows per step of dot16::accumulate_rows: each row's sum is one chain of dependent vdpbf16ps (latency ~6 cycles),
// so 8 independent rows keep the unit busy where 4 did not.
constexpr int kAccRows16 = 8;
static_assert(Tile<float>::kBM % kAccRows16 == 0 && Tile<float>::kBN % kAccRows16 == 0, "row steps");

template <typename Unit, template <typename, int> class Map>
AVK_INLINE void forward_tasks16(const Problem<BF16>& P, BF16* o, bool* mask, int64_t begin, int64_t end) {
  constexpr int VB = 64, BN = Tile<float>::kBN, BM = Tile<float>::kBM, R = Tile<float>::kAccRows;
  const Map<float, VB> map(P.scale, P.map_bias);
  constexpr int W = 16, G = Blocking<float, VB>::kGroup, RF = Blocking<float, VB>::kFwdRows;
  const int64_t D = P.head, Dp = P.head_pad, Ep = P.value_pad, D2 = (D + 1) / 2;
  std::vector<float> buffer(BM * Dp + BM * Ep + BM * BN);
  float* q_tile = buffer.data();     // (BM, Dp)
  float* o_tile = q_tile + BM * Dp;  // (BM, Ep)
  float* c_tile = o_tile + BM * Ep;  // (BM, BN)  Drop(tanh(S)), padding cleared
  std::vector<uint32_t> q_pairs(BM * Dp / 2);  // pairs along D
  std::vector<float> keep(RF * BN, 1.0f);
  KeyValuePanels<BF16> wide;
  PairPanels panels;

  for (int64_t task = begin; task < end; ++task) {
    const int64_t b = task / P.chunks;
    panels.pack_for(P, wide, b, /*backward=*/false);
    for (int64_t block = P.first_block(task); block < P.end_block(task); ++block) {
      const int64_t i0 = block * BM, n_rows = std::min<int64_t>(BM, P.rows - i0);
      pack_query_rows(P, q_tile, b, i0, n_rows);
      dot16::pairs_along_columns(q_pairs.data(), Dp / 2, q_tile, Dp, BM, Dp / 2);
      std::fill(o_tile, o_tile + BM * Ep, 0.0f);

      for (int64_t kb = 0; kb < P.key_blocks; ++kb) {
        const int64_t j0 = kb * BN, n_keys = std::min<int64_t>(BN, P.keys - j0);
        const uint32_t* k_panel = panels.k_panels.data() + kb * D2 * BN;
        const float* v_block = wide.v_blocks.data() + kb * BN * Ep;
        for (int64_t i = 0; i < BM; i += RF) {
          if (P.dropout) P.template draw_keep<RF>(b, i0 + i, j0, keep.data());
          for (int64_t col0 = 0; col0 < BN; col0 += G * W) {
            VF s[RF][G];
            dot16::rows_times_panel<Unit, RF, G>(q_pairs.data() + i * Dp / 2, Dp / 2, k_panel + col0, BN, D2, s);
            for (int r = 0; r < RF; ++r) {
              for (int c = 0; c < G; ++c) {
                const int64_t col = col0 + c * W;
                VF t = map(s[r][c]);
                if (P.dropout) t *= load_keep<float, VB>(keep.data() + r * BN + col) * P.inv_keep;
                store<float, VB>(c_tile + (i + r) * BN + col, clear_padding16(t, i + r >= n_rows, col, n_keys));
              }
            }
          }
          store_mask_rows<RF>(P, mask, keep.data(), b, i0 + i, n_rows - i, j0, n_keys);
        }
        for (int64_t i = 0; i < BM; i += R)
          accumulate_rows<float, VB>(o_tile + i * Ep, Ep, c_tile + i * BN, BN, 1, v_block, Ep, BN, Ep);
      }
      finish_output_rows<float, VB>(P, o_tile, o, b, i0, n_rows);
    }
  }
}

template <typename Unit, template <typename, int> class Map>
AVK_INLINE void backward_tasks16(const Problem<BF16>& P, const Gradients<BF16>& G, int64_t begin, int64_t end) {
  constexpr int VB = 64, BN = Tile<float>::kBN, BM = Tile<float>::kBM, R = kAccRows16;
  const Map<float, VB> map(P.scale, P.map_bias);
  constexpr int W = 16, NG = Blocking<float, VB>::kGroup, RB = Blocking<float, VB>::kBwdRows;
  static_assert(RB == 2 && NG % 2 == 0, "rows are paired two at a time, columns two vectors at a time");
  const int64_t D = P.head, E = P.value, Dp = P.head_pad, Ep = P.value_pad, D2 = (D + 1) / 2, E2 = (E + 1) / 2;
  std::vector<float> buffer(BM * Dp + BM * Ep + BM * Dp);
  float* q_tile = buffer.data();       // (BM, Dp)
  float* do_tile = q_tile + BM * Dp;   // (BM, Ep)  output gradient through the epilogue
  float* dq_tile = do_tile + BM * Ep;  // (BM, Dp)
  std::vector<uint32_t> words(BM * Dp + BM * Ep + BM * BN / 2 * 3);
  uint32_t* q_pairs = words.data();             // (BM, Dp/2)   along D, for S
  uint32_t* q_rows = q_pairs + BM * Dp / 2;     // (BM/2, Dp)   along rows, for dk = dS^T q
  uint32_t* do_pairs = q_rows + BM / 2 * Dp;    // (BM, Ep/2)   along E, for dZ
  uint32_t* do_rows = do_pairs + BM * Ep / 2;   // (BM/2, Ep)   along rows, for dv = C^T do'
  uint32_t* c_rows = do_rows + BM / 2 * Ep;     // (BM/2, BN)   C along rows
  uint32_t* ds_rows = c_rows + BM / 2 * BN;     // (BM/2, BN)   dS along rows
  uint32_t* ds_keys = ds_rows + BM / 2 * BN;    // (BM, BN/2)   dS along keys, for dq = dS k
  std::vector<float> keep(RB * BN, 1.0f);
  KeyValuePanels<BF16> wide;
  PairPanels panels;

  // The running task's dk and dv, padded like the tiles; one pair per thread, not per task (keep_task_sum).
  std::vector<float> dk_sum(P.keys_pad * Dp), dv_sum(P.keys_pad * Ep);
  float* dk_acc = dk_sum.data();
  float* dv_acc = dv_sum.data();

  for (int64_t task = begin; task < end; ++task) {
    const int64_t b = task / P.chunks;
    panels.pack_for(P, wide, b, /*backward=*/true);
    std::fill(dk_sum.begin(), dk_sum.end(), 0.0f);
    std::fill(dv_sum.begin(), dv_sum.end(), 0.0f);
    for (int64_t block = P.first_block(task); block < P.end_block(task); ++block) {
      const int64_t i0 = block * BM, n_rows = std::min<int64_t>(BM, P.rows - i0);
      pack_gradient_rows(P, G, q_tile, do_tile, b, i0, n_rows);
      dot16::pairs_along_columns(q_pairs, Dp / 2, q_tile, Dp, BM, Dp / 2);
      dot16::pairs_along_rows(q_rows, q_tile, Dp, BM, Dp);
      dot16::pairs_along_columns(do_pairs, Ep / 2, do_tile, Ep, BM, Ep / 2);
      dot16::pairs_along_rows(do_rows, do_tile, Ep, BM, Ep);
      std::fill(dq_tile, dq_tile + BM * Dp, 0.0f);

      for (int64_t kb = 0; kb < P.key_blocks; ++kb) {
        const int64_t j0 = kb * BN, n_keys = std::min<int64_t>(BN, P.keys - j0);
        const uint32_t* k_panel = panels.k_panels.data() + kb * D2 * BN;
        const uint32_t* k_block = panels.k_blocks.data() + kb * BN / 2 * Dp;
        const uint32_t* v_panel = panels.v_panels.data() + kb * E2 * BN;
        for (int64_t i = 0; i < BM; i += RB) {
          if (P.dropout) P.template draw_keep<RB>(b, i0 + i, j0, keep.data());
          for (int64_t col0 = 0; col0 < BN; col0 += NG * W) {
            VF s[RB][NG], dz[RB][NG], c_val[RB][NG], ds[RB][NG];
            dot16::rows_times_panel<Unit, RB, NG>(q_pairs + i * Dp / 2, Dp / 2, k_panel + col0, BN, D2, s);
            dot16::rows_times_panel<Unit, RB, NG>(do_pairs + i * Ep / 2, Ep / 2, v_panel + col0, BN, E2, dz);
            for (int r = 0; r < RB; ++r) {
              for (int c = 0; c < NG; ++c) {
                const int64_t col = col0 + c * W;
                const VF t = map(s[r][c]);
                VF f = splat<float, VB>(1);
                if (P.dropout) f = load_keep<float, VB>(keep.data() + r * BN + col) * P.inv_keep;
                c_val[r][c] = clear_padding16(t * f, i + r >= n_rows, col, n_keys);
                ds[r][c] = clear_padding16(dz[r][c] * f * Map<float, VB>::slope(t) * P.scale, i + r >= n_rows, col, n_keys);
              }
              for (int c = 0; c < NG; c += 2)
                store<uint32_t, VB>(ds_keys + (i + r) * BN / 2 + (col0 + c * W) / 2,
                                    Unit::round_pairs(ds[r][c], ds[r][c + 1]));
            }
            for (int c = 0; c < NG; ++c) {
              const int64_t at = i / 2 * BN + col0 + c * W;
              store<uint32_t, VB>(c_rows + at, dot16::interleave_rows<Unit>(c_val[0][c], c_val[1][c]));
              store<uint32_t, VB>(ds_rows + at, dot16::interleave_rows<Unit>(ds[0][c], ds[1][c]));
            }
          }
        }
        for (int64_t i = 0; i < BM; i += R)
          dot16::accumulate_rows<Unit, R>(dq_tile + i * Dp, Dp, ds_keys + i * BN / 2, BN / 2, 1, k_block, Dp,
                                          BN / 2, Dp);
        for (int64_t j = 0; j < BN; j += R) {
          dot16::accumulate_rows<Unit, R>(dk_acc + (j0 + j) * Dp, Dp, ds_rows + j, 1, BN, q_rows, Dp, BM / 2, Dp);
          dot16::accumulate_rows<Unit, R>(dv_acc + (j0 + j) * Ep, Ep, c_rows + j, 1, BN, do_rows, Ep, BM / 2, Ep);
        }
      }
      for (int64_t r = 0; r < n_rows; ++r) narrow_row(G.dq + (b * P.rows + i0 + r) * D, dq_tile + r * Dp, D);
    }
    keep_task_sum(dk_acc, Dp, P.keys, D, G.dk_part ? nullptr : G.dk + b * P.keys * D,
                  G.dk_part ? G.dk_part + task * P.keys * D : nullptr);
    keep_task_sum(dv_acc, Ep, P.keys, E, G.dv_part ? nullptr : G.dv + b * P.keys * E,
                  G.dv_part ? G.dv_part + task * P.keys * E : nullptr);
  }
}

__attribute__((target("arch=x86-64-v4,avx512bf16"))) void forward_tasks16_native(const Problem<BF16>& P, BF16* o,
                                                                                 bool* mask, int64_t b,
                                                                                 int64_t e) {
  if (P.map == AttentionMap::kSigmoid)
    forward_tasks16<dot16::Bf16Native, SigmoidMap>(P, o, mask, b, e);
  else
    forward_tasks16<dot16::Bf16Native, TanhMap>(P, o, mask, b, e);
}
AVK_TARGET_AVX512 void forward_tasks16_emulated(const Problem<BF16>& P, BF16* o, bool* mask, int64_t b, int64_t e) {
  if (P.map == AttentionMap::kSigmoid)
    forward_tasks16<dot16::Bf16Emulated, SigmoidMap>(P, o, mask, b, e);
  else
    forward_tasks16<dot16::Bf16Emulated, TanhMap>(P, o, mask, b, e);
}
__attribute__((target("arch=x86-64-v4,avx512bf16"))) void backward_tasks16_native(const Problem<BF16>& P,
                                                                                  const Gradients<BF16>& G,
                                                                                  int64_t b, int64_t e) {
  if (P.map == AttentionMap::kSigmoid)
    backward_tasks16<dot16::Bf16Native, SigmoidMap>(P, G, b, e);
  else
    backward_tasks16<dot16::Bf16Native, TanhMap>(P, G, b, e);
}
AVK_TARGET_AVX512 void backward_tasks16_emulated(const Problem<BF16>& P, const Gradients<BF16>& G, int64_t b,
                                                 int64_t e) {
  if (P.map == AttentionMap::kSigmoid)
    backward_tasks16<dot16::Bf16Emulated, SigmoidMap>(P, G, b, e);
  else
    backward_tasks16<dot16::Bf16Emulated, TanhMap>(P, G, b, e);
}

}  // namespace
}  // namespace cpu
}  // namespace avk
#else
#define AVK_HAVE_DOT16 0
#endif
