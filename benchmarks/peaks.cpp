// The machine's physical peaks for the roofline floor (benchmarks/roofs.py compiles and runs this, and caches the
// result per machine): tight loops of the instructions the CPU kernels can use, on one core and on every core at
// once, the memory bandwidth at working sets from L1 to DRAM, and the cpp kernels' own tanh (csrc/cpu/simd.h).
//
// Compiled for baseline x86-64; each loop carries its own target attribute and runs only when the CPU reports the
// feature (__builtin_cpu_supports), so one binary measures whatever the machine has and names what it lacks.
// Prints one JSON object: {"one_core": {...}, "all_cores": {...}, "absent": {...}, "bandwidth": [...], ...}.
//
//   fma_fp32_avx512  vfmadd*ps zmm, 24 independent chains   GFLOP/s (a multiply-add counts 2)
//   fma_fp32_avx2    vfmadd*ps ymm, 12 independent chains   GFLOP/s
//   dot_bf16_avx512  vdpbf16ps zmm (pairs of bf16 products accumulated in fp32), 24 chains   GFLOP/s
//   amx_bf16         tdpbf16ps, 4 accumulator tiles of 16x16 fp32 (A 16x32 bf16, B 16x32 bf16 pairs)   GFLOP/s
//   tanh_avx512/avx2 avk::cpu::tanh_vec of the kernels over an L1-resident buffer   G tanh/s
//   bandwidth        per total working set: memcpy (bytes read + written) and a read-only sum, GB/s

#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <string>
#include <thread>
#include <vector>

#include "simd.h"

namespace {

// Independent accumulators, at least latency x instructions per clock of each unit (vdpbf16ps on Zen 4 needed more
// than 12: 12 chains measured about half of what torch's bf16 GEMM reached); AVX2 has 16 registers, AVX-512 32.
constexpr int kChains512 = 24, kChains256 = 12;
volatile float g_sink;        // results go here, so that no loop is optimised away

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// Runs work(thread index) on `threads` threads released together; the wall time from release to the last finish.
double run_threads(int threads, const std::function<void(int)>& work) {
  std::atomic<int> ready{0};
  std::atomic<bool> go{false};
  std::vector<std::thread> pool;
  for (int t = 0; t < threads; ++t)
    pool.emplace_back([&, t] {
      ready.fetch_add(1);
      while (!go.load(std::memory_order_acquire)) {
      }
      work(t);
    });
  while (ready.load() < threads) {
  }
  const auto t0 = std::chrono::steady_clock::now();
  go.store(true, std::memory_order_release);
  for (auto& th : pool) th.join();
  return seconds_since(t0);
}

// Best rate of `trials` runs of `per_thread_work` units (e.g. FLOPs) per thread, each run `iters` loop trips.
double best_rate(int threads, int trials, double units_per_iter, int64_t iters,
                 const std::function<void(int64_t)>& loop) {
  double best = 0;
  for (int trial = 0; trial < trials; ++trial) {
    const double wall = run_threads(threads, [&](int) { loop(iters); });
    best = std::max(best, threads * units_per_iter * static_cast<double>(iters) / wall);
  }
  return best;
}

// Loop trips that take about `target_s` on one thread.
int64_t calibrate(const std::function<void(int64_t)>& loop, double target_s) {
  int64_t iters = 1000;
  for (;;) {
    const auto t0 = std::chrono::steady_clock::now();
    loop(iters);
    const double s = seconds_since(t0);
    if (s > target_s / 8) return std::max<int64_t>(1, static_cast<int64_t>(iters * target_s / s));
    iters *= 8;
  }
}

__attribute__((target("avx512f"))) void fma_avx512(int64_t iters) {
  __m512 acc[kChains512];
  for (int j = 0; j < kChains512; ++j) acc[j] = _mm512_set1_ps(0.5f + 0.01f * j);
  const __m512 b = _mm512_set1_ps(0.999999f), c = _mm512_set1_ps(1e-7f);
  for (int64_t i = 0; i < iters; ++i)
#pragma GCC unroll 32  // every accumulator in a register (GCC stops unrolling at 16 and keeps them in memory)
    for (int j = 0; j < kChains512; ++j) acc[j] = _mm512_fmadd_ps(acc[j], b, c);
  __m512 s = acc[0];
  for (int j = 1; j < kChains512; ++j) s = _mm512_add_ps(s, acc[j]);
  g_sink = _mm512_reduce_add_ps(s);
}

__attribute__((target("avx2,fma"))) void fma_avx2(int64_t iters) {
  __m256 acc[kChains256];
  for (int j = 0; j < kChains256; ++j) acc[j] = _mm256_set1_ps(0.5f + 0.01f * j);
  const __m256 b = _mm256_set1_ps(0.999999f), c = _mm256_set1_ps(1e-7f);
  for (int64_t i = 0; i < iters; ++i)
#pragma GCC unroll 32  // every accumulator in a register (GCC stops unrolling at 16 and keeps them in memory)
    for (int j = 0; j < kChains256; ++j) acc[j] = _mm256_fmadd_ps(acc[j], b, c);
  __m256 s = acc[0];
  for (int j = 1; j < kChains256; ++j) s = _mm256_add_ps(s, acc[j]);
  float lanes[8];
  _mm256_storeu_ps(lanes, s);
  g_sink = lanes[0] + lanes[7];
}

__attribute__((target("avx512f,avx512bf16"))) void dot_bf16_avx512(int64_t iters) {
  __m512 acc[kChains512];
  for (int j = 0; j < kChains512; ++j) acc[j] = _mm512_setzero_ps();
  const __m512bh a = _mm512_cvtne2ps_pbh(_mm512_set1_ps(1e-3f), _mm512_set1_ps(2e-3f));
  const __m512bh b = _mm512_cvtne2ps_pbh(_mm512_set1_ps(3e-3f), _mm512_set1_ps(1e-3f));
  for (int64_t i = 0; i < iters; ++i)
#pragma GCC unroll 32  // every accumulator in a register (GCC stops unrolling at 16 and keeps them in memory)
    for (int j = 0; j < kChains512; ++j) acc[j] = _mm512_dpbf16_ps(acc[j], a, b);
  __m512 s = acc[0];
  for (int j = 1; j < kChains512; ++j) s = _mm512_add_ps(s, acc[j]);
  g_sink = _mm512_reduce_add_ps(s);
}

// AMX: Linux hands out the tile data state only on request (arch_prctl ARCH_REQ_XCOMP_PERM, XTILEDATA = 18).
bool amx_permitted() {
  constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
}

struct alignas(64) TileConfig {
  uint8_t palette, start_row, reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

__attribute__((target("amx-tile,amx-bf16"))) void amx_bf16(int64_t iters) {
  TileConfig cfg{};
  cfg.palette = 1;
  for (int t = 0; t < 8; ++t) cfg.colsb[t] = 64, cfg.rows[t] = 16;  // 16 rows of 64 bytes: 16 fp32 / 32 bf16
  _tile_loadconfig(&cfg);
  alignas(64) static thread_local uint16_t ab[16 * 32];
  alignas(64) static thread_local float c[16 * 16];
  for (int i = 0; i < 16 * 32; ++i) ab[i] = 0x3a83;  // bf16 ~1e-3
  _tile_loadd(4, ab, 64);
  _tile_loadd(5, ab, 64);
  _tile_loadd(6, ab, 64);
  _tile_loadd(7, ab, 64);
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  for (int64_t i = 0; i < iters; ++i) {
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 4, 7);
    _tile_dpbf16ps(2, 5, 6);
    _tile_dpbf16ps(3, 5, 7);
  }
  _tile_stored(0, c, 64);
  g_sink = c[0];
  _tile_release();
}

// The kernels' tanh: 2048 floats in, 2048 out (16 KiB, L1-resident), inputs spread over [-10, 10].
constexpr int kTanhN = 2048;

template <int VB>
AVK_INLINE void tanh_loop_body(int64_t iters) {
  alignas(64) static thread_local float in[kTanhN], out[kTanhN];
  for (int i = 0; i < kTanhN; ++i) in[i] = -10.0f + 20.0f * i / kTanhN;
  constexpr int lanes = VB / 4;
  for (int64_t r = 0; r < iters; ++r) {
    asm volatile("" ::: "memory");  // each pass must load and compute again: nothing hoisted out of the loop
    for (int i = 0; i < kTanhN; i += lanes)
      avk::cpu::store<float, VB>(out + i, avk::cpu::tanh_vec<VB>(avk::cpu::load<float, VB>(in + i)));
  }
  g_sink = out[kTanhN / 3];
}

AVK_TARGET_AVX512 void tanh_avx512(int64_t iters) { tanh_loop_body<64>(iters); }
AVK_TARGET_AVX2 void tanh_avx2(int64_t iters) { tanh_loop_body<32>(iters); }

struct Loop {
  const char* name;
  bool available;
  const char* absent_unit;  // the unit named when it is absent
  double units_per_iter;
  void (*fn)(int64_t);
};

// Bandwidth at one total working set, split over `threads`: GB/s of memcpy (read + written) and of a read-only sum.
__attribute__((target("avx512f"))) float sum_avx512(const float* p, size_t n) {
  __m512 s0 = _mm512_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
  for (size_t i = 0; i + 64 <= n; i += 64) {
    s0 = _mm512_add_ps(s0, _mm512_loadu_ps(p + i));
    s1 = _mm512_add_ps(s1, _mm512_loadu_ps(p + i + 16));
    s2 = _mm512_add_ps(s2, _mm512_loadu_ps(p + i + 32));
    s3 = _mm512_add_ps(s3, _mm512_loadu_ps(p + i + 48));
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(s0, s1), _mm512_add_ps(s2, s3)));
}

__attribute__((target("avx2"))) float sum_avx2(const float* p, size_t n) {
  __m256 s0 = _mm256_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
  for (size_t i = 0; i + 32 <= n; i += 32) {
    s0 = _mm256_add_ps(s0, _mm256_loadu_ps(p + i));
    s1 = _mm256_add_ps(s1, _mm256_loadu_ps(p + i + 8));
    s2 = _mm256_add_ps(s2, _mm256_loadu_ps(p + i + 16));
    s3 = _mm256_add_ps(s3, _mm256_loadu_ps(p + i + 24));
  }
  float lanes[8];
  _mm256_storeu_ps(lanes, _mm256_add_ps(_mm256_add_ps(s0, s1), _mm256_add_ps(s2, s3)));
  return lanes[0] + lanes[5];
}

float sum_plain(const float* p, size_t n) {
  float s = 0;
  for (size_t i = 0; i < n; ++i) s += p[i];
  return s;
}

std::string bandwidth_json(int threads, int trials) {
  const bool avx512 = __builtin_cpu_supports("avx512f"), avx2 = __builtin_cpu_supports("avx2");
  float (*sum)(const float*, size_t) = avx512 ? sum_avx512 : avx2 ? sum_avx2 : sum_plain;
  std::string out = "[";
  for (size_t total = 32 << 10; total <= (size_t{256} << 20); total *= 4) {
    const size_t per = total / threads / 2 / 256 * 256;  // bytes of each of a thread's two buffers (copy)
    std::vector<std::vector<char>> src(threads, std::vector<char>(2 * per, 1)), dst(threads, std::vector<char>(per));
    const int reps = static_cast<int>(std::max<size_t>(1, (size_t{64} << 20) / total));
    double copy = 0, read = 0;
    for (int trial = 0; trial < trials; ++trial) {
      double wall = run_threads(threads, [&](int t) {
        for (int r = 0; r < reps; ++r) {
          asm volatile("" ::: "memory");  // every copy happens (aligned: rep movsb is slow misaligned on Zen)
          std::memcpy(dst[t].data(), src[t].data(), per);
        }
      });
      copy = std::max(copy, 2.0 * per * threads * reps / wall / 1e9);
      wall = run_threads(threads, [&](int t) {  // the read-only pass reads both halves' worth: `total` bytes
        float s = 0;
        for (int r = 0; r < reps; ++r) s += sum(reinterpret_cast<const float*>(src[t].data()), 2 * per / 4);
        g_sink = s;
      });
      read = std::max(read, 2.0 * per * threads * reps / wall / 1e9);
    }
    char row[160];
    std::snprintf(row, sizeof(row), "%s[%zu, %.3f, %.3f]", out.size() > 1 ? ", " : "", 2 * per * threads, copy, read);
    out += row;
  }
  return out + "]";
}

}  // namespace

int main(int argc, char** argv) {
  const int threads = argc > 1 ? std::atoi(argv[1]) : static_cast<int>(std::thread::hardware_concurrency());
  const double target_s = argc > 2 ? std::atof(argv[2]) : 0.05;
  const int trials = argc > 3 ? std::atoi(argv[3]) : 3;
  __builtin_cpu_init();
  const bool amx = __builtin_cpu_supports("amx-tile") && __builtin_cpu_supports("amx-bf16") && amx_permitted();
  const Loop loops[] = {
      {"fma_fp32_avx512", (bool)__builtin_cpu_supports("avx512f"), "AVX-512 (avx512f)", kChains512 * 16 * 2.0,
       fma_avx512},
      {"fma_fp32_avx2", __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"), "AVX2 + FMA (avx2, fma)",
       kChains256 * 8 * 2.0, fma_avx2},
      {"dot_bf16_avx512", __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bf16"),
       "AVX-512 BF16 (avx512_bf16)", kChains512 * 32 * 2.0, dot_bf16_avx512},
      {"amx_bf16", amx, "AMX-BF16 (amx_tile, amx_bf16, with the kernel's permission for tile data)",
       4 * 16 * 16 * 32 * 2.0, amx_bf16},
      {"tanh_avx512", (bool)__builtin_cpu_supports("avx512f"), "AVX-512 (avx512f)", kTanhN, tanh_avx512},
      {"tanh_avx2", __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"), "AVX2 + FMA (avx2, fma)",
       kTanhN, tanh_avx2},
  };
  std::string one = "{", all = "{", absent = "{";
  for (const Loop& loop : loops) {
    if (!loop.available) {
      absent += std::string(absent.size() > 1 ? ", " : "") + "\"" + loop.name + "\": \"" + loop.absent_unit +
                " absent\"";
      continue;
    }
    const int64_t iters = calibrate(loop.fn, target_s);
    const double scale = 1e-9;  // GFLOP/s, or G tanh/s
    char cell[120];
    std::snprintf(cell, sizeof(cell), "%s\"%s\": %.4f", one.size() > 1 ? ", " : "", loop.name,
                  best_rate(1, trials, loop.units_per_iter, iters, loop.fn) * scale);
    one += cell;
    std::snprintf(cell, sizeof(cell), "%s\"%s\": %.4f", all.size() > 1 ? ", " : "", loop.name,
                  best_rate(threads, trials, loop.units_per_iter, iters, loop.fn) * scale);
    all += cell;
  }
  std::printf("{\"threads\": %d, \"one_core\": %s}, \"all_cores\": %s}, \"absent\": %s}, ", threads, one.c_str(),
              all.c_str(), absent.c_str());
  // Each bandwidth trial moves 64 MiB or more: a fifth of the loops' trials (they last 2 ms) is as many seconds.
  const int bw_trials = std::max(3, trials / 5);
  std::printf("\"bandwidth_one_core\": %s, \"bandwidth_all_cores\": %s}\n", bandwidth_json(1, bw_trials).c_str(),
              bandwidth_json(threads, bw_trials).c_str());
  return 0;
}
