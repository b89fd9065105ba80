// The two-way gate of DCA / GRJCA (SPEC 3), one pass over the inputs per row:
//   g = softmax((a W^T + b) / tau) per row (b, l),  out = ReLU(g0 * u + g1 * a)
// with a = attended, u = unattended, W (2, d). Backward reads each row once more and reduces the weight and bias
// gradients per chunk of rows, then over chunks in a fixed order (deterministic).
//
// bf16 / fp16 rows are widened to fp32 as they are read (convert.h: row_as) and the output rows rounded once as they
// are written (RowOut), so the row loops below are the fp32 ones; the weight-gradient partials and their sum stay
// in fp32 and are rounded at the very end. A widened row is unit-stride, so strided 16-bit inputs take the
// vectorised backward loop too.

#include "ops.h"

#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include "checks.h"
#include "convert.h"
#include "rows.h"

namespace avk {
namespace cpu {
namespace {

void check_gate_inputs(const char* fn, const at::Tensor& attended, const at::Tensor& unattended,
                       const at::Tensor& weight) {
  check_float_cpu(attended, fn, "attended");
  check_shape(attended, {-1, -1, -1}, fn, "attended", "(B, L, d)");
  check_float_cpu_like(unattended, attended, fn, "unattended", "attended");
  check_shape(unattended, attended.sizes(), fn, "unattended", "(B, L, d) like attended");
  check_float_cpu_like(weight, attended, fn, "weight", "attended");
  check_shape(weight, {2, attended.size(2)}, fn, "weight", "(2, d)");
}

// Feature strides of the rows the backward reads: runtime values, or all 1 known at compile time (the usual case,
// and the one the row loops vectorise well: a runtime stride makes them scalar).
struct RowStrides {
  int64_t a, u, o, dy;
};
struct UnitStrides {
  static constexpr int64_t a = 1, u = 1, o = 1, dy = 1;
};

// One row (b, l) of the backward: its inputs, the weight rows, its outputs and its chunk's weight-gradient partials.
template <typename T>
struct RowPointers {
  const T *a, *u, *o, *dy, *w0, *w1;
  T *da, *du, *dw0, *dw1;
};

// da, du of one row and its contribution to the weight-gradient partials; dz <- gradient of the row's two logits.
template <typename T, typename S>
inline void backward_row(const RowPointers<T>& p, const S& s, int64_t d, const T gate[2], const T dg[2], T tau,
                         T dz[2]) {
  const T *__restrict a = p.a, *__restrict u = p.u, *__restrict o = p.o, *__restrict dy = p.dy;
  const T *__restrict w0 = p.w0, *__restrict w1 = p.w1;
  T *__restrict da = p.da, *__restrict du = p.du, *__restrict dw0 = p.dw0, *__restrict dw1 = p.dw1;
  T dgate0 = 0, dgate1 = 0;
  // `omp simd` lets the two reductions run in vector lanes (a fixed reassociation: still reproducible).
#pragma omp simd reduction(+ : dgate0, dgate1)
  for (int64_t x = 0; x < d; ++x) {
    const T grad = dy[x * s.dy];  // loaded unconditionally, so that the select below vectorises
    const T dpre = o[x * s.o] > T(0) ? grad : T(0);  // through the ReLU
    du[x] = dpre * gate[0];
    da[x] = dpre * gate[1];
    dgate0 += dpre * u[x * s.u];
    dgate1 += dpre * a[x * s.a];
  }
  const T dgate[2] = {dg[0] + dgate0, dg[1] + dgate1};
  softmax_backward(gate, dgate, dz, 2, tau);
#pragma omp simd
  for (int64_t x = 0; x < d; ++x) {
    const T ax = a[x * s.a];
    da[x] += dz[0] * w0[x] + dz[1] * w1[x];  // the logits are computed from the attended features
    dw0[x] += dz[0] * ax;
    dw1[x] += dz[1] * ax;
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> gate_forward(const at::Tensor& attended, const at::Tensor& unattended,
                                                const at::Tensor& weight, const at::Tensor& bias, double tau) {
  constexpr const char* fn = "gate_forward";
  check_gate_inputs(fn, attended, unattended, weight);
  check_float_cpu_like(bias, attended, fn, "bias", "attended");
  check_shape(bias, {2}, fn, "bias", "(2,)");
  TORCH_CHECK(tau > 0.0, fn, ": tau must be positive, got ", tau);
  const int64_t d = attended.size(2), rows = attended.size(0) * attended.size(1);
  at::Tensor out = at::empty(attended.sizes(), attended.options());
  at::Tensor g = at::empty({attended.size(0), attended.size(1), 2}, attended.options());
  if (rows == 0) return {out, g};
  const at::ScalarType compute = compute_dtype(attended.scalar_type());
  const at::Tensor w = weight.contiguous().to(compute), bias_c = bias.contiguous().to(compute);  // 2 x d: small

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, attended.scalar_type(), fn, [&] {
    using S = scalar_t;
    using T = compute_t<S>;
    const RowView<S> a_rows(attended), u_rows(unattended);
    const T* w0 = w.data_ptr<T>();
    const T* w1 = w0 + d;
    const T* bias_p = bias_c.data_ptr<T>();
    S* out_p = out.data_ptr<S>();
    S* g_p = g.data_ptr<S>();
    parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
      std::vector<T> scratch(3 * d);  // a, u and out rows in T (16-bit inputs only)
      for (int64_t r = begin; r < end; ++r) {
        const auto a = row_as<T>(a_rows.row(r), a_rows.s2, d, scratch.data());
        const auto u = row_as<T>(u_rows.row(r), u_rows.s2, d, scratch.data() + d);
        T z[2] = {bias_p[0] + dot(a.data, a.stride, w0, d), bias_p[1] + dot(a.data, a.stride, w1, d)};
        softmax_in_place(z, 2, static_cast<T>(tau));
        narrow_row(g_p + 2 * r, z, 2);
        const RowOut<S, T> o(out_p + r * d, d, scratch.data() + 2 * d);
        for (int64_t x = 0; x < d; ++x)
          o.data[x] = std::max(z[0] * u.data[x * u.stride] + z[1] * a.data[x * a.stride], T(0));
        o.commit();
      }
    });
  });
  return {out, g};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> gate_backward(
    const at::Tensor& dout, const at::Tensor& dg, const at::Tensor& attended, const at::Tensor& unattended,
    const at::Tensor& weight, const at::Tensor& g, const at::Tensor& out, double tau, bool deterministic) {
  (void)deterministic;  // the chunked reduction is always deterministic
  constexpr const char* fn = "gate_backward";
  check_gate_inputs(fn, attended, unattended, weight);
  const auto shape = attended.sizes();
  check_float_cpu_like(dout, attended, fn, "dout", "attended");
  check_shape(dout, shape, fn, "dout", "(B, L, d) like attended");
  check_float_cpu_like(out, attended, fn, "out", "attended");
  check_shape(out, shape, fn, "out", "(B, L, d) like attended");
  check_float_cpu_like(dg, attended, fn, "dg", "attended");
  check_shape(dg, {shape[0], shape[1], 2}, fn, "dg", "(B, L, 2)");
  check_float_cpu_like(g, attended, fn, "g", "attended");
  check_shape(g, {shape[0], shape[1], 2}, fn, "g", "(B, L, 2)");
  TORCH_CHECK(tau > 0.0, fn, ": tau must be positive, got ", tau);

  const int64_t d = shape[2], rows = shape[0] * shape[1];
  at::Tensor d_attended = at::empty(shape, attended.options());
  at::Tensor d_unattended = at::empty(shape, attended.options());
  at::Tensor d_weight = at::zeros({2, d}, attended.options());
  at::Tensor d_bias = at::zeros({2}, attended.options());
  if (rows == 0) return {d_attended, d_unattended, d_weight, d_bias};
  const at::ScalarType compute = compute_dtype(attended.scalar_type());
  const at::Tensor w = weight.contiguous().to(compute);
  const int64_t chunks = (rows + kRowsPerChunk - 1) / kRowsPerChunk;
  // Per chunk: 2 * d weight-gradient entries, then the 2 bias-gradient entries.
  at::Tensor part = at::zeros({chunks, 2 * d + 2}, attended.options().dtype(compute));

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, attended.scalar_type(), fn, [&] {
    using S = scalar_t;
    using T = compute_t<S>;
    const RowView<S> a_rows(attended), u_rows(unattended), o_rows(out), do_rows(dout), g_rows(g), dg_rows(dg);
    const T* w0 = w.data_ptr<T>();
    const T* w1 = w0 + d;
    S* da_p = d_attended.data_ptr<S>();
    S* du_p = d_unattended.data_ptr<S>();
    T* part_p = part.data_ptr<T>();
    const RowStrides strides{a_rows.s2, u_rows.s2, o_rows.s2, do_rows.s2};
    const bool unit_stride = !std::is_same_v<S, T> ||  // widened rows are unit-stride
                             (a_rows.s2 == 1 && u_rows.s2 == 1 && o_rows.s2 == 1 && do_rows.s2 == 1);
    parallel_for(0, chunks, 1, [&](int64_t chunk_begin, int64_t chunk_end) {
      std::vector<T> scratch(6 * d);  // a, u, out, dout, d_attended and d_unattended rows in T (16-bit only)
      for (int64_t chunk = chunk_begin; chunk < chunk_end; ++chunk) {
        T* dw0 = part_p + chunk * (2 * d + 2);
        T* dw1 = dw0 + d;
        T* db = dw1 + d;
        for (int64_t r = chunk * kRowsPerChunk; r < std::min(rows, (chunk + 1) * kRowsPerChunk); ++r) {
          const T gate[2] = {widen<T>(g_rows.row(r)[0]), widen<T>(g_rows.row(r)[g_rows.s2])};
          const T dg_row[2] = {widen<T>(dg_rows.row(r)[0]), widen<T>(dg_rows.row(r)[dg_rows.s2])};
          T* buf = scratch.data();
          const RowOut<S, T> da(da_p + r * d, d, buf + 4 * d), du(du_p + r * d, d, buf + 5 * d);
          const RowPointers<T> row{row_as<T>(a_rows.row(r), a_rows.s2, d, buf).data,
                                   row_as<T>(u_rows.row(r), u_rows.s2, d, buf + d).data,
                                   row_as<T>(o_rows.row(r), o_rows.s2, d, buf + 2 * d).data,
                                   row_as<T>(do_rows.row(r), do_rows.s2, d, buf + 3 * d).data,
                                   w0, w1, da.data, du.data, dw0, dw1};
          T dz[2];
          if (unit_stride)
            backward_row(row, UnitStrides(), d, gate, dg_row, static_cast<T>(tau), dz);
          else
            backward_row(row, strides, d, gate, dg_row, static_cast<T>(tau), dz);
          da.commit();
          du.commit();
          db[0] += dz[0];
          db[1] += dz[1];
        }
      }
    });
    at::Tensor total = at::empty({2 * d + 2}, part.options());
    sum_chunks(part_p, chunks, 2 * d + 2, total.data_ptr<T>());
    d_weight.copy_(total.narrow(0, 0, 2 * d).view({2, d}));
    d_bias.copy_(total.narrow(0, 2 * d, 2));
  });
  return {d_attended, d_unattended, d_weight, d_bias};
}

}  // namespace cpu
}  // namespace avk
