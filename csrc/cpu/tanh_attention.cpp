// Fused tanh attention on CPU: o = Drop_p(map(scale * q @ k^T + bias)) @ v (SPEC 1), forward and backward, for
// every map of attention_map.h (a template parameter of the kernel bodies; tanh by default).
//
// The (Mq x N) map is never stored. A task owns a chunk of query rows of one batch element, packs that element's
// k and v once (zero-padded key blocks of kBN columns), and for each block of kBM rows sweeps the key blocks: the S
// tile (kBM x kBN) is computed from the packed q rows and key block, passed through the map and the dropout mask in
// registers, parked in an L1-sized buffer and immediately contracted with the value block. Backward recomputes each
// tile (and redraws its dropout mask from the same Philox offsets) instead of reading a saved map. The matrix
// products (rows_times_panel, accumulate_rows) know nothing of the map; the element-wise code between them is the
// map_tile / grad_tile functions (all in attention_tiles.h).
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

#include <algorithm>
#include <vector>

#include "attention_map.h"
#include "attention_tiles.h"
#include "common/philox.h"
#include "convert.h"
#include "dropout.h"
#include "parallel.h"
#include "simd.h"

namespace avk {
namespace cpu {
namespace {

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
  AttentionMap map;
  T map_bias;
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
Problem<S> make_problem(const Tensor& q, const Tensor& k, const Tensor& v, const TanhAttentionArgs& args) {
  using T = compute_t<S>;
  Problem<S> P;
  P.q = q.mutable_data_ptr<S>();
  P.k = k.mutable_data_ptr<S>();
  P.v = v.mutable_data_ptr<S>();
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
  P.scale = static_cast<T>(args.scale);
  P.dropout = args.dropout_p > 0.0;
  P.p = static_cast<float>(args.dropout_p);
  P.inv_keep = static_cast<T>(1.0 / (1.0 - args.dropout_p));
  P.seed = static_cast<uint64_t>(args.seed);
  P.tanh_relu = args.tanh_relu;
  P.map = args.map;
  P.map_bias = static_cast<T>(args.map_bias);
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
// Grid: P.tasks() independent tasks (disjoint output rows), split over threads by parallel_for (parallel.h).
// Rows i0 .. i0 + n_rows of batch element b's q as a (kBM, head_pad) tile, zero past n_rows and D.
template <typename S, typename T>
AVK_INLINE void pack_query_rows(const Problem<S>& P, T* q_tile, int64_t b, int64_t i0, int64_t n_rows) {
  pack(q_tile, P.head_pad, Tile<T>::kBM, P.q + b * P.sq[0] + i0 * P.sq[1], P.sq[1], P.sq[2], n_rows, P.head);
}

template <typename S, int VB, template <typename, int> class Map>
AVK_INLINE void forward_tasks(const Problem<S>& P, S* o, bool* mask, int64_t begin, int64_t end) {
  using T = compute_t<S>;
  using Vt = Vec<T, VB>;
  constexpr int BN = Tile<T>::kBN, BM = Tile<T>::kBM, R = Tile<T>::kAccRows;
  constexpr int W = Blocking<T, VB>::kW, G = Blocking<T, VB>::kGroup, RF = Blocking<T, VB>::kFwdRows;
  const int64_t D = P.head, Dp = P.head_pad, Ep = P.value_pad;
  const Map<T, VB> map(P.scale, P.map_bias);
  std::vector<T> buffer(BM * Dp + BM * Ep + BM * BN);
  T* q_tile = buffer.data();      // (BM, Dp)  query rows
  T* o_tile = q_tile + BM * Dp;   // (BM, Ep)  output accumulator
  T* c_tile = o_tile + BM * Ep;   // (BM, BN)  Drop(map(S)) of the current key block
  std::vector<float> keep(RF * BN, 1.0f);
  KeyValuePanels<S> panels;

  for (int64_t task = begin; task < end; ++task) {
    const int64_t b = task / P.chunks;
    panels.pack_for(P, b, /*backward=*/false);
    for (int64_t block = P.first_block(task); block < P.end_block(task); ++block) {
      const int64_t i0 = block * BM, n_rows = std::min<int64_t>(BM, P.rows - i0);
      pack_query_rows(P, q_tile, b, i0, n_rows);
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
            map_tile<T, VB, RF>(map, s, P.dropout ? keep.data() + col0 : nullptr, P.inv_keep,
                                c_tile + i * BN + col0);
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
  const int64_t E = P.value, Ep = P.value_pad;
  pack_query_rows(P, q_tile, b, i0, n_rows);
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
// Per tile: S = q k^T, t = map(scale S + bias), f = keep / (1 - p), C = t f, dZ = do' v^T (do' = do through the
// tanh_relu epilogue), dS = dZ f map'(t) scale; dq += dS k, dk += dS^T q, dv += C^T do'.
// Grid: P.tasks() tasks with private outputs, split over threads by parallel_for (parallel.h).
template <typename S, int VB, template <typename, int> class Map>
AVK_INLINE void backward_tasks(const Problem<S>& P, const Gradients<S>& G, int64_t begin, int64_t end) {
  using T = compute_t<S>;
  using Vt = Vec<T, VB>;
  constexpr int BN = Tile<T>::kBN, BM = Tile<T>::kBM, R = Tile<T>::kAccRows;
  constexpr int W = Blocking<T, VB>::kW, NG = Blocking<T, VB>::kGroup, RB = Blocking<T, VB>::kBwdRows;
  const int64_t D = P.head, E = P.value, Dp = P.head_pad, Ep = P.value_pad;
  const Map<T, VB> map(P.scale, P.map_bias);
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
            grad_tile<T, VB, RB>(map, s, dz, P.dropout ? keep.data() + col0 : nullptr, P.inv_keep, P.scale,
                                 c_tile + i * BN + col0, ds_tile + i * BN + col0);
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

// One entry point per ISA around each kernel body (see simd.h), with that ISA's vector width; each picks the map
// (attention_map.h) once per call.
#define AVK_DEFINE_ISA_ENTRY(attributes, suffix, vector_bytes)                                         \
  template <typename S>                                                                                \
  attributes void forward_tasks_##suffix(const Problem<S>& P, S* o, bool* mask, int64_t b, int64_t e) { \
    if (P.map == AttentionMap::kSigmoid)                                                               \
      forward_tasks<S, vector_bytes, SigmoidMap>(P, o, mask, b, e);                                    \
    else                                                                                               \
      forward_tasks<S, vector_bytes, TanhMap>(P, o, mask, b, e);                                       \
  }                                                                                                    \
  template <typename S>                                                                                \
  attributes void backward_tasks_##suffix(const Problem<S>& P, const Gradients<S>& G, int64_t b,       \
                                          int64_t e) {                                                 \
    if (P.map == AttentionMap::kSigmoid)                                                               \
      backward_tasks<S, vector_bytes, SigmoidMap>(P, G, b, e);                                         \
    else                                                                                               \
      backward_tasks<S, vector_bytes, TanhMap>(P, G, b, e);                                            \
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

bool forward_on_16bit_unit(const Problem<BFloat16>& P, BFloat16* o, bool* mask) {
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

bool backward_on_16bit_unit(const Problem<BFloat16>& P, const Gradients<BFloat16>& G) {
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

}  // namespace

std::tuple<Tensor, Tensor> tanh_attention_forward(const Tensor& q, const Tensor& k,
                                                  const Tensor& v, const TanhAttentionArgs& args,
                                                  bool return_mask) {
  Tensor o = make_empty(q, {q.size(0), q.size(1), v.size(2)});
  const bool with_mask = return_mask && args.dropout_p > 0.0;
  const std::vector<int64_t> mask_shape =
      with_mask ? std::vector<int64_t>{q.size(0), q.size(1), k.size(1)} : std::vector<int64_t>{0};
  Tensor mask = make_empty(q, mask_shape, ScalarType::Bool);
  if (o.numel() == 0) return {o, mask};
  AVK_DISPATCH_FLOATING(q.scalar_type(), "tanh_attention_forward", [&] {
    const Problem<scalar_t> P = make_problem<scalar_t>(q, k, v, args);
    scalar_t* o_ptr = o.mutable_data_ptr<scalar_t>();
    bool* mask_ptr = with_mask ? mask.mutable_data_ptr<bool>() : nullptr;
    if (forward_on_16bit_unit(P, o_ptr, mask_ptr)) return;
    parallel_for(0, P.tasks(), 1, [&](int64_t begin, int64_t end) {
      AVK_DISPATCH_ISA(forward_tasks, scalar_t, P, o_ptr, mask_ptr, begin, end);
    });
  });
  return {o, mask};
}

std::tuple<Tensor, Tensor, Tensor> tanh_attention_backward(const Tensor& dout, const Tensor& q,
                                                           const Tensor& k, const Tensor& v,
                                                           const Tensor& out,
                                                           const TanhAttentionArgs& args) {
  Tensor dq = make_zeros(q, q.sizes());  // contiguous, and the answer when a size is 0
  Tensor dk = make_zeros(k, k.sizes());
  Tensor dv = make_zeros(v, v.sizes());
  if (q.numel() == 0 || k.numel() == 0 || dout.numel() == 0) return {dq, dk, dv};

  AVK_DISPATCH_FLOATING(q.scalar_type(), "tanh_attention_backward", [&] {
    using S = scalar_t;
    const Problem<S> P = make_problem<S>(q, k, v, args);
    Gradients<S> G;
    G.dout = dout.mutable_data_ptr<S>();
    G.out = args.tanh_relu ? out.mutable_data_ptr<S>() : nullptr;
    for (int d = 0; d < 3; ++d) {
      G.sdo[d] = dout.stride(d);
      G.so[d] = args.tanh_relu ? out.stride(d) : 0;
    }
    G.dq = dq.mutable_data_ptr<S>();
    G.dk = dk.mutable_data_ptr<S>();
    G.dv = dv.mutable_data_ptr<S>();
    // dk[b] sums the chunks of batch element b; so does dv, or all tasks when v is shared by the batch. Partials
    // only where an output row has several tasks (every task writes its whole slice: no zeroing).
    const int64_t tasks = P.tasks(), v_groups = v.size(0), dv_parts = tasks / v_groups;
    const ScalarType part_dtype = compute_dtype(q.scalar_type());
    const Tensor dk_part = make_empty(q, {P.chunks > 1 ? tasks : 0, P.keys, P.head}, part_dtype);
    const Tensor dv_part = make_empty(q, {dv_parts > 1 ? tasks : 0, P.keys, P.value}, part_dtype);
    using T = compute_t<S>;
    G.dk_part = P.chunks > 1 ? dk_part.mutable_data_ptr<T>() : nullptr;
    G.dv_part = dv_parts > 1 ? dv_part.mutable_data_ptr<T>() : nullptr;
    if (!backward_on_16bit_unit(P, G)) {
      parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
        AVK_DISPATCH_ISA(backward_tasks, S, P, G, begin, end);
      });
    }
    if (G.dk_part != nullptr) sum_partials(dk.mutable_data_ptr<S>(), P.batch, P.keys, P.head, G.dk_part, P.chunks);
    if (G.dv_part != nullptr) sum_partials(dv.mutable_data_ptr<S>(), v_groups, P.keys, P.value, G.dv_part, dv_parts);
  });
  return {dq, dk, dv};
}

}  // namespace cpu
}  // namespace avk
