// The softmax mix of both gates (softmax_mix.h, SPEC 3), one pass over the C candidates per row.
//
// bf16 / fp16 candidates are widened to fp32 row by row as they are read (convert.h: row_as) and the outputs rounded
// once on their final store (RowOut), so one row loop serves every dtype; the weight-gradient partials stay in fp32
// (fp64 for float64) until the end. Every inner loop runs over the d features of one row, so it vectorises whatever
// C is (a runtime value).

#include "softmax_mix.h"

#include <cmath>
#include <type_traits>

#include "convert.h"
#include "rows.h"

namespace avk {
namespace cpu {
namespace {

template <typename T>
std::vector<RowView<T>> row_views(const std::vector<Tensor>& tensors) {
  std::vector<RowView<T>> views;
  for (const Tensor& t : tensors) views.emplace_back(t);
  return views;
}

// Feature strides of the rows: runtime values, or 1 known at compile time (the usual case, and the one the row loops
// vectorise: with a runtime stride they stay scalar). `of(stride)` is the stride a loop uses.
struct UnitStride {
  static constexpr int64_t of(int64_t) { return 1; }
};
struct RuntimeStride {
  static int64_t of(int64_t stride) { return stride; }
};

template <typename S, typename T>
bool all_unit(const std::vector<RowAs<S, T>>& rows) {
  for (const RowAs<S, T>& row : rows)
    if (row.stride != 1) return false;
  return true;
}

// The row loops take the candidates (and the logits) two at a time (kPair; a last odd one alone): one pass over the
// features serves a pair, with the pair's sums in named scalars, which GCC vectorises; a loop over the candidates
// inside the loop over features, or an array of sums, it did not (measured 2-12x slower). So the gate reads each
// row once per pass, as its own kernel did before the two gates shared this one, and a T-stage gate ceil(T / 2) times.

// Calls f(std::bool_constant<pair>()).
template <typename F>
void with_pair(bool pair, const F& f) {
  if (pair)
    f(std::true_type());
  else
    f(std::false_type());
}

// One pass of the mix over x[0] (and x[1] if kPair): o = [o +] z_0 X_0 [+ z_1 X_1] (o not read in the first pass),
// then the ReLU if `last`.
template <bool kPair, typename St, typename S, typename T>
void mix_pass(const RowAs<S, T>* x, const T* z, int64_t d, bool first, bool last, T* __restrict o) {
  const T* __restrict x0 = x[0].data;
  const T* __restrict x1 = x[kPair ? 1 : 0].data;
  const int64_t s0 = St::of(x[0].stride), s1 = St::of(x[kPair ? 1 : 0].stride);
  const T z0 = z[0], z1 = z[kPair ? 1 : 0];
  for (int64_t i = 0; i < d; ++i) {
    T acc = first ? z0 * x0[i * s0] : o[i] + z0 * x0[i * s0];
    if constexpr (kPair) acc += z1 * x1[i * s1];
    o[i] = last ? std::max(acc, T(0)) : acc;
  }
}

// o = ReLU(sum_c z_c X_c), summed in candidate order.
template <typename St, typename S, typename T>
void mix_row(const RowAs<S, T>* x, const T* z, int64_t n, int64_t d, T* o) {
  for (int64_t c = 0; c < n; c += 2)
    with_pair(c + 1 < n, [&](auto pair) { mix_pass<pair.value, St>(x + c, z + c, d, c == 0, c + 2 >= n, o); });
}

// One row (b, l) of the backward: its inputs, outputs, and its chunk's weight-gradient partials `dw`.
template <typename S, typename T>
struct BackwardRow {
  const RowAs<S, T>* x;  // the n candidate rows
  RowAs<S, T> o, dy;     // the forward's output and its incoming gradient
  T* const* dx;          // the n candidate-gradient rows (written)
  const T *gate, *ds;    // the saved gate values and their incoming gradients
  T *dgate, *dz;         // scratch: the gradients of the gate values, then of the logits (dz is read by the caller)
  int64_t n, first_logit, d;
  const T* w;  // (n, w_cols)
  int64_t w_cols;
  T* dw;  // (n, w_cols)
  double tau;
};

// Candidates c (and c + 1 if kPair): dpre = dout [out > 0], dX_c = s_c dpre and ds~_c = ds_c + <dpre, X_c>.
// noinline: inlined into the 16-bit row loop, GCC kept the second sum on the stack (1.5x slower gate backward).
template <bool kPair, typename St, typename S, typename T>
__attribute__((noinline)) void gate_grad_pass(const BackwardRow<S, T>& p, int64_t c) {
  const int64_t c1 = kPair ? c + 1 : c;
  const T *__restrict o = p.o.data, *__restrict dy = p.dy.data;
  const int64_t o_s = St::of(p.o.stride), dy_s = St::of(p.dy.stride);
  const T *__restrict x0 = p.x[c].data, *__restrict x1 = p.x[c1].data;
  const int64_t s0 = St::of(p.x[c].stride), s1 = St::of(p.x[c1].stride);
  T *__restrict dx0 = p.dx[c], *__restrict dx1 = p.dx[c1];
  const T g0 = p.gate[c], g1 = p.gate[c1];
  T acc0 = 0, acc1 = 0;
  // `omp simd` lets the reductions run in vector lanes (a fixed reassociation: still reproducible).
#pragma omp simd reduction(+ : acc0, acc1)
  for (int64_t i = 0; i < p.d; ++i) {
    const T grad = dy[i * dy_s];  // loaded unconditionally, so that the select vectorises
    const T dpre = o[i * o_s] <= T(0) ? T(0) : grad;  // torch's ReLU backward: an output NaN passes grad on
    dx0[i] = dpre * g0;
    acc0 += dpre * x0[i * s0];
    if constexpr (kPair) {
      dx1[i] = dpre * g1;
      acc1 += dpre * x1[i * s1];
    }
  }
  p.dgate[c] = p.ds[c] + acc0;
  if constexpr (kPair) p.dgate[c1] = p.ds[c1] + acc1;
}

// The gate values' gradients of every candidate.
template <typename St, typename S, typename T>
void gate_grads(const BackwardRow<S, T>& p) {
  for (int64_t c = 0; c < p.n; c += 2)
    with_pair(c + 1 < p.n, [&](auto pair) { gate_grad_pass<pair.value, St>(p, c); });
}

// Candidate c feeds the logits through the block `block` of W's columns; logits k (and k + 1 if kPair):
// dX_c += dz_k W[k, block] [+ dz_{k+1} W[k+1, block]], dW[k, block] += dz_k X_c [, dW[k+1, block] += dz_{k+1} X_c].
template <bool kPair, typename St, typename S, typename T>
void logit_grad_pass(const BackwardRow<S, T>& p, int64_t c, int64_t k) {
  const int64_t block = (c - p.first_logit) * p.d, k1 = kPair ? k + 1 : k;
  const T* __restrict xc = p.x[c].data;
  const int64_t xs = St::of(p.x[c].stride);
  T* __restrict dx = p.dx[c];
  const T *__restrict w0 = p.w + k * p.w_cols + block, *__restrict w1 = p.w + k1 * p.w_cols + block;
  T *__restrict dw0 = p.dw + k * p.w_cols + block, *__restrict dw1 = p.dw + k1 * p.w_cols + block;
  const T dz0 = p.dz[k], dz1 = p.dz[k1];
#pragma omp simd
  for (int64_t i = 0; i < p.d; ++i) {
    const T xi = xc[i * xs];
    if constexpr (kPair) {
      dx[i] += dz0 * w0[i] + dz1 * w1[i];
      dw1[i] += dz1 * xi;
    } else {
      dx[i] += dz0 * w0[i];
    }
    dw0[i] += dz0 * xi;
  }
}

// The whole backward of one row; p.dz holds the logits' gradients after it.
template <typename St, typename S, typename T>
void backward_row(const BackwardRow<S, T>& p) {
  gate_grads<St>(p);
  softmax_backward(p.gate, p.dgate, p.dz, p.n, p.tau);
  for (int64_t c = p.first_logit; c < p.n; ++c)
    for (int64_t k = 0; k < p.n; k += 2)
      with_pair(k + 1 < p.n, [&](auto pair) { logit_grad_pass<pair.value, St>(p, c, k); });
}

}  // namespace

std::tuple<Tensor, Tensor> softmax_mix_forward(const std::vector<Tensor>& candidates,
                                               int64_t first_logit, const Tensor& weight,
                                               const Tensor& bias, double tau) {
  const Tensor& ref = candidates[0];
  const int64_t n = static_cast<int64_t>(candidates.size());
  const auto shape = ref.sizes();
  const int64_t d = shape[2], rows = shape[0] * shape[1];
  Tensor out = make_empty(ref, shape);
  Tensor s = make_empty(ref, {shape[0], shape[1], n});
  if (rows == 0) return {out, s};
  const ScalarType compute = compute_dtype(ref.scalar_type());
  const Tensor w = contiguous_as(weight, compute), bias_c = contiguous_as(bias, compute);  // small
  const int64_t w_cols = (n - first_logit) * d;

  AVK_DISPATCH_FLOATING(ref.scalar_type(), "softmax_mix_forward", [&] {
    using S = scalar_t;
    using T = compute_t<S>;
    const std::vector<RowView<S>> x_rows = row_views<S>(candidates);
    const T* w_p = w.mutable_data_ptr<T>();
    const T* bias_p = bias_c.mutable_data_ptr<T>();
    S* out_p = out.mutable_data_ptr<S>();
    S* s_p = s.mutable_data_ptr<S>();
    const bool unit_stride = !std::is_same_v<S, T>;  // widened rows are unit-stride
    parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
      std::vector<T> scratch(n * d + d), z(n);  // the candidate rows and the out row in T (16-bit only); gates
      std::vector<Logit> logits(n);
      std::vector<RowAs<S, T>> x(n);
      for (int64_t r = begin; r < end; ++r) {
        for (int64_t c = 0; c < n; ++c) x[c] = row_as<T>(x_rows[c].row(r), x_rows[c].s2, d, scratch.data() + c * d);
        for (int64_t k = 0; k < n; ++k) {
          Logit acc = bias_p[k];
          for (int64_t c = first_logit; c < n; ++c)
            acc += dot<Logit>(x[c].data, x[c].stride, w_p + k * w_cols + (c - first_logit) * d, d);
          logits[k] = acc;
        }
        softmax_in_place(logits.data(), n, static_cast<Logit>(tau));
        std::copy(logits.begin(), logits.end(), z.begin());
        narrow_row(s_p + r * n, z.data(), n);
        const RowOut<S, T> out_row(out_p + r * d, d, scratch.data() + n * d);
        if (unit_stride || all_unit(x))
          mix_row<UnitStride>(x.data(), z.data(), n, d, out_row.data);
        else
          mix_row<RuntimeStride>(x.data(), z.data(), n, d, out_row.data);
        out_row.commit();
      }
    });
  });
  return {out, s};
}

std::tuple<Tensor, Tensor> softmax_mix_backward(const Tensor& dout,
                                                const Tensor& dgates,
                                                const std::vector<Tensor>& candidates, int64_t first_logit,
                                                const Tensor& weight, const Tensor& gates,
                                                const Tensor& out, double tau,
                                                const std::vector<Tensor>& d_candidates) {
  const Tensor& ref = candidates[0];
  const int64_t n = static_cast<int64_t>(candidates.size());
  const auto shape = ref.sizes();
  const int64_t d = shape[2], rows = shape[0] * shape[1];
  const int64_t w_cols = (n - first_logit) * d;
  Tensor d_weight = make_zeros(ref, {n, w_cols});
  Tensor d_bias = make_zeros(ref, {n});
  if (rows == 0) return {d_weight, d_bias};
  const ScalarType compute = compute_dtype(ref.scalar_type());
  const Tensor w = contiguous_as(weight, compute);
  const int64_t chunks = (rows + kRowsPerChunk - 1) / kRowsPerChunk;
  const int64_t part_size = n * w_cols + n;  // weight gradient, then bias gradient
  Tensor part = make_zeros(ref, {chunks, part_size}, compute);

  AVK_DISPATCH_FLOATING(ref.scalar_type(), "softmax_mix_backward", [&] {
    using S = scalar_t;
    using T = compute_t<S>;
    const std::vector<RowView<S>> x_rows = row_views<S>(candidates);
    const RowView<S> o_rows(out), do_rows(dout), s_rows(gates), ds_rows(dgates);
    const T* w_p = w.mutable_data_ptr<T>();
    std::vector<S*> dx_p;
    for (const Tensor& t : d_candidates) dx_p.push_back(t.mutable_data_ptr<S>());
    T* part_p = part.mutable_data_ptr<T>();
    const bool widened = !std::is_same_v<S, T>;  // widened rows are unit-stride
    parallel_for(0, chunks, 1, [&](int64_t chunk_begin, int64_t chunk_end) {
      std::vector<T> gate(n), ds(n), dgate(n), dz(n);
      // The candidate, out and dout rows in T, then the n d_candidates rows (16-bit only).
      std::vector<T> scratch(2 * n * d + 2 * d);
      std::vector<RowAs<S, T>> x(n);
      std::vector<RowOut<S, T>> dx_rows;
      std::vector<T*> dx(n);
      dx_rows.reserve(n);
      for (int64_t chunk = chunk_begin; chunk < chunk_end; ++chunk) {
        T* dw = part_p + chunk * part_size;
        T* db = dw + n * w_cols;
        for (int64_t r = chunk * kRowsPerChunk; r < std::min(rows, (chunk + 1) * kRowsPerChunk); ++r) {
          T* buf = scratch.data();
          const auto o = row_as<T>(o_rows.row(r), o_rows.s2, d, buf + n * d);
          const auto dy = row_as<T>(do_rows.row(r), do_rows.s2, d, buf + n * d + d);
          dx_rows.clear();
          for (int64_t c = 0; c < n; ++c) {
            x[c] = row_as<T>(x_rows[c].row(r), x_rows[c].s2, d, buf + c * d);
            dx_rows.emplace_back(dx_p[c] + r * d, d, buf + (n + 2 + c) * d);
            dx[c] = dx_rows[c].data;
            gate[c] = widen<T>(s_rows.row(r)[c * s_rows.s2]);
            ds[c] = widen<T>(ds_rows.row(r)[c * ds_rows.s2]);
          }
          const BackwardRow<S, T> row{x.data(),  o,           dy, dx.data(), gate.data(), ds.data(), dgate.data(),
                                      dz.data(), n,           first_logit, d, w_p, w_cols, dw, tau};
          if (widened || (o.stride == 1 && dy.stride == 1 && all_unit(x)))
            backward_row<UnitStride>(row);
          else
            backward_row<RuntimeStride>(row);
          for (const RowOut<S, T>& out_row : dx_rows) out_row.commit();
          for (int64_t k = 0; k < n; ++k) db[k] += dz[k];
        }
      }
    });
    Tensor total = make_empty(part, {part_size});
    sum_chunks(part_p, chunks, part_size, total.mutable_data_ptr<T>());
    copy_into(d_weight, viewed(narrowed(total, 0, 0, n * w_cols), {n, w_cols}));
    copy_into(d_bias, narrowed(total, 0, n * w_cols, n));
  });
  return {d_weight, d_bias};
}

}  // namespace cpu
}  // namespace avk
