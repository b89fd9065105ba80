// GRJCA's stage gate (SPEC 3), one pass over the T candidate stages per row:
//   s = softmax((concat_t X_t W^T + b) / tau) per row (b, l),  out = ReLU(sum_t s_t X_t)
// with W (T, T * d). Backward returns d_stages as one (T, B, L, d) tensor and reduces the weight and bias gradients
// per chunk of rows, then over chunks in a fixed order (deterministic).
//
// bf16 / fp16 stages are widened to fp32 row by row as they are read and the outputs rounded once on their final
// store (convert.h), so one row loop serves every dtype; the weight-gradient partials stay in fp32 until the end.

#include "ops.h"

#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include <string>
#include <vector>

#include "checks.h"
#include "convert.h"
#include "rows.h"

namespace avk {
namespace cpu {
namespace {

void check_stage_inputs(const char* fn, const std::vector<at::Tensor>& stages, const at::Tensor& weight) {
  TORCH_CHECK(!stages.empty(), fn, ": stages must be a non-empty list of (B, L, d) tensors");
  check_float_cpu(stages[0], fn, "stages[0]");
  check_shape(stages[0], {-1, -1, -1}, fn, "stages[0]", "(B, L, d)");
  for (size_t t = 1; t < stages.size(); ++t) {
    const std::string name = "stages[" + std::to_string(t) + "]";
    check_float_cpu_like(stages[t], stages[0], fn, name.c_str(), "stages[0]");
    check_shape(stages[t], stages[0].sizes(), fn, name.c_str(), "(B, L, d) like stages[0]");
  }
  const int64_t n = static_cast<int64_t>(stages.size());
  check_float_cpu_like(weight, stages[0], fn, "weight", "stages[0]");
  check_shape(weight, {n, n * stages[0].size(2)}, fn, "weight", "(T, T * d)");
}

template <typename T>
std::vector<RowView<T>> row_views(const std::vector<at::Tensor>& tensors) {
  std::vector<RowView<T>> views;
  for (const at::Tensor& t : tensors) views.emplace_back(t);
  return views;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> stage_gate_forward(const std::vector<at::Tensor>& stages, const at::Tensor& weight,
                                                      const at::Tensor& bias, double tau) {
  constexpr const char* fn = "stage_gate_forward";
  check_stage_inputs(fn, stages, weight);
  const int64_t n = static_cast<int64_t>(stages.size());
  check_float_cpu_like(bias, stages[0], fn, "bias", "stages[0]");
  check_shape(bias, {n}, fn, "bias", "(T,)");
  TORCH_CHECK(tau > 0.0, fn, ": tau must be positive, got ", tau);
  const auto shape = stages[0].sizes();
  const int64_t d = shape[2], rows = shape[0] * shape[1];
  at::Tensor out = at::empty(shape, stages[0].options());
  at::Tensor s = at::empty({shape[0], shape[1], n}, stages[0].options());
  if (rows == 0) return {out, s};
  const at::ScalarType compute = compute_dtype(stages[0].scalar_type());
  const at::Tensor w = weight.contiguous().to(compute), bias_c = bias.contiguous().to(compute);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, stages[0].scalar_type(), fn, [&] {
    using S = scalar_t;
    using T = compute_t<S>;
    const std::vector<RowView<S>> x_rows = row_views<S>(stages);
    const T* w_p = w.data_ptr<T>();
    const T* bias_p = bias_c.data_ptr<T>();
    S* out_p = out.data_ptr<S>();
    S* s_p = s.data_ptr<S>();
    parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
      std::vector<T> scratch(n * d + d), z(n);  // the stage rows and the out row in T (16-bit only); logits
      std::vector<RowAs<S, T>> x(n);
      for (int64_t r = begin; r < end; ++r) {
        for (int64_t t = 0; t < n; ++t) x[t] = row_as<T>(x_rows[t].row(r), x_rows[t].s2, d, scratch.data() + t * d);
        for (int64_t t = 0; t < n; ++t) {
          T acc = bias_p[t];
          for (int64_t src = 0; src < n; ++src) acc += dot(x[src].data, x[src].stride, w_p + (t * n + src) * d, d);
          z[t] = acc;
        }
        softmax_in_place(z.data(), n, static_cast<T>(tau));
        narrow_row(s_p + r * n, z.data(), n);
        const RowOut<S, T> out_row(out_p + r * d, d, scratch.data() + n * d);
        T* o = out_row.data;
        std::fill(o, o + d, T(0));
        for (int64_t t = 0; t < n; ++t)
          for (int64_t i = 0; i < d; ++i) o[i] += z[t] * x[t].data[i * x[t].stride];
        for (int64_t i = 0; i < d; ++i) o[i] = std::max(o[i], T(0));
        out_row.commit();
      }
    });
  });
  return {out, s};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> stage_gate_backward(const at::Tensor& dout, const at::Tensor& ds,
                                                                   const std::vector<at::Tensor>& stages,
                                                                   const at::Tensor& weight, const at::Tensor& s,
                                                                   const at::Tensor& out, double tau,
                                                                   bool deterministic) {
  (void)deterministic;  // the chunked reduction is always deterministic
  constexpr const char* fn = "stage_gate_backward";
  check_stage_inputs(fn, stages, weight);
  const int64_t n = static_cast<int64_t>(stages.size());
  const auto shape = stages[0].sizes();
  check_float_cpu_like(dout, stages[0], fn, "dout", "stages[0]");
  check_shape(dout, shape, fn, "dout", "(B, L, d) like stages[0]");
  check_float_cpu_like(out, stages[0], fn, "out", "stages[0]");
  check_shape(out, shape, fn, "out", "(B, L, d) like stages[0]");
  check_float_cpu_like(ds, stages[0], fn, "ds", "stages[0]");
  check_shape(ds, {shape[0], shape[1], n}, fn, "ds", "(B, L, T)");
  check_float_cpu_like(s, stages[0], fn, "s", "stages[0]");
  check_shape(s, {shape[0], shape[1], n}, fn, "s", "(B, L, T)");
  TORCH_CHECK(tau > 0.0, fn, ": tau must be positive, got ", tau);

  const int64_t d = shape[2], rows = shape[0] * shape[1];
  at::Tensor d_stages = at::empty({n, shape[0], shape[1], d}, stages[0].options());
  at::Tensor d_weight = at::zeros({n, n * d}, stages[0].options());
  at::Tensor d_bias = at::zeros({n}, stages[0].options());
  if (rows == 0) return {d_stages, d_weight, d_bias};
  const at::ScalarType compute = compute_dtype(stages[0].scalar_type());
  const at::Tensor w = weight.contiguous().to(compute);
  const int64_t chunks = (rows + kRowsPerChunk - 1) / kRowsPerChunk;
  const int64_t part_size = n * n * d + n;  // weight gradient, then bias gradient
  at::Tensor part = at::zeros({chunks, part_size}, stages[0].options().dtype(compute));

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, stages[0].scalar_type(), fn, [&] {
    using S = scalar_t;
    using T = compute_t<S>;
    const std::vector<RowView<S>> x_rows = row_views<S>(stages);
    const RowView<S> o_rows(out), do_rows(dout), s_rows(s), ds_rows(ds);
    const T* w_p = w.data_ptr<T>();
    S* dx_p = d_stages.data_ptr<S>();
    T* part_p = part.data_ptr<T>();
    parallel_for(0, chunks, 1, [&](int64_t chunk_begin, int64_t chunk_end) {
      std::vector<T> dpre(d), gate(n), dgate(n), dz(n);
      // The stage, out and dout rows in T, then the n d_stages rows (16-bit only).
      std::vector<T> scratch(2 * n * d + 2 * d);
      std::vector<RowAs<S, T>> x(n);
      std::vector<RowOut<S, T>> dx_rows;
      dx_rows.reserve(n);
      for (int64_t chunk = chunk_begin; chunk < chunk_end; ++chunk) {
        T* dw = part_p + chunk * part_size;
        T* db = dw + n * n * d;
        for (int64_t r = chunk * kRowsPerChunk; r < std::min(rows, (chunk + 1) * kRowsPerChunk); ++r) {
          T* buf = scratch.data();
          const auto o = row_as<T>(o_rows.row(r), o_rows.s2, d, buf + n * d);
          const auto dy = row_as<T>(do_rows.row(r), do_rows.s2, d, buf + n * d + d);
          for (int64_t i = 0; i < d; ++i) {
            const T grad = dy.data[i * dy.stride];  // loaded unconditionally, so that the select vectorises
            dpre[i] = o.data[i * o.stride] > T(0) ? grad : T(0);
          }
          dx_rows.clear();
          for (int64_t t = 0; t < n; ++t) {
            x[t] = row_as<T>(x_rows[t].row(r), x_rows[t].s2, d, buf + t * d);
            dx_rows.emplace_back(dx_p + (t * rows + r) * d, d, buf + (n + 2 + t) * d);
          }
          for (int64_t t = 0; t < n; ++t) {
            gate[t] = widen<T>(s_rows.row(r)[t * s_rows.s2]);
            T acc = widen<T>(ds_rows.row(r)[t * ds_rows.s2]);
            const T* xt = x[t].data;
            const int64_t xs = x[t].stride;
            T* dx = dx_rows[t].data;
_Pragma("omp simd reduction(+ : acc)")
            for (int64_t i = 0; i < d; ++i) {
              dx[i] = dpre[i] * gate[t];
              acc += dpre[i] * xt[i * xs];
            }
            dgate[t] = acc;
          }
          softmax_backward(gate.data(), dgate.data(), dz.data(), n, static_cast<T>(tau));
          // Every stage feeds every logit: dX_src += sum_t dz_t W[t, src], dW[t, src] += dz_t X_src.
          for (int64_t src = 0; src < n; ++src) {
            const T* xs_row = x[src].data;
            const int64_t xs = x[src].stride;
            T* dx = dx_rows[src].data;
            for (int64_t t = 0; t < n; ++t) {
              const T* w_row = w_p + t * n * d + src * d;
              T* dw_row = dw + t * n * d + src * d;
_Pragma("omp simd")
              for (int64_t i = 0; i < d; ++i) {
                dx[i] += dz[t] * w_row[i];
                dw_row[i] += dz[t] * xs_row[i * xs];
              }
            }
          }
          for (const RowOut<S, T>& dx : dx_rows) dx.commit();
          for (int64_t t = 0; t < n; ++t) db[t] += dz[t];
        }
      }
    });
    at::Tensor total = at::empty({part_size}, part.options());
    sum_chunks(part_p, chunks, part_size, total.data_ptr<T>());
    d_weight.copy_(total.narrow(0, 0, n * n * d).view({n, n * d}));
    d_bias.copy_(total.narrow(0, n * n * d, n));
  });
  return {d_stages, d_weight, d_bias};
}

}  // namespace cpu
}  // namespace avk
