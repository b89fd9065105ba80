"""The roofline floor is a physical limit: no recorded row and no fresh run beats it (a fraction of the floor above
100% is a bug in the model: a roof below what the machine does, or a count above the work), and the peaks behind it
are at least what torch's own GEMMs reach. Also the floor's arithmetic on made-up peaks."""

import glob
import json
import os
import sys
import time

import pytest
import torch

import avkernels

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import roofs  # noqa: E402

RESULTS = sorted(glob.glob(os.path.join(ROOT, "benchmarks", "results", "*.json")))
PEAKS = {"one_core": {"fma_fp32_avx512": 100.0, "fma_fp32_avx2": 90.0, "dot_bf16_avx512": 250.0,
                      "tanh_avx512": 4.0, "tanh_avx2": 2.0},
         "all_cores": {"fma_fp32_avx512": 190.0, "fma_fp32_avx2": 170.0, "dot_bf16_avx512": 480.0,
                       "tanh_avx512": 7.0, "tanh_avx2": 3.5},
         "absent": {"amx_bf16": "AMX-BF16 (amx_tile, amx_bf16) absent"},
         "bandwidth_one_core": [[32768, 200.0, 300.0], [2**20, 60.0, 80.0], [2**28, 20.0, 25.0]],
         "bandwidth_all_cores": [[32768, 390.0, 600.0], [2**20, 110.0, 150.0], [2**28, 30.0, 40.0]]}


def test_rates_take_the_best_unit_per_precision_and_scale_with_threads():
    two = roofs.rates(PEAKS, 2)
    assert two["peak_gflops_fp32"] == 190.0 and two["peak_gflops_bf16"] == 480.0 and two["peak_gflops_fp16"] == 190.0
    assert two["peak_tanh_gelems"] == 7.0 and two["peak_dram_gbs"] == 40.0
    one = roofs.rates(PEAKS, 1)
    assert one["peak_gflops_fp32"] == 100.0 and one["peak_gflops_bf16"] == 250.0 and one["peak_tanh_gelems"] == 4.0
    assert roofs.rates(PEAKS, 8)["peak_gflops_fp32"] == 190.0  # never above every core's peak
    assert "AMX" in two["peak_absent"]["amx_bf16"]
    disturbed = json.loads(json.dumps(PEAKS))
    disturbed["all_cores"]["fma_fp32_avx512"] = 50.0  # an all-core run that other work slowed
    assert roofs.rates(disturbed, 1)["peak_gflops_fp32"] == 100.0  # one core's peak still holds


def test_bandwidth_is_the_rate_of_the_largest_working_set_that_fits():
    r = roofs.rates(PEAKS, 2)
    assert roofs.bandwidth_gbs(r, 1000) == 600.0  # below the smallest set: the fastest rate
    assert roofs.bandwidth_gbs(r, 2**20) == 150.0
    assert roofs.bandwidth_gbs(r, 2**25) == 150.0  # 32 MiB may sit where a 1 MiB set did, never faster
    assert roofs.bandwidth_gbs(r, 2**30) == 40.0


def test_floor_is_the_slowest_resource():
    r = roofs.rates(PEAKS, 2)
    assert roofs.floor_seconds(190e9, 0, 0, r) == pytest.approx(1.0)
    assert roofs.floor_seconds(190e9, 0, 0, r, "bf16") == pytest.approx(190 / 480)
    assert roofs.floor_seconds(1e9, 0, 14e9, r) == pytest.approx(2.0)
    assert roofs.floor_seconds(0, 2**30 * 80.0, 0, r) == pytest.approx(2**30 * 2 / 1e9)
    legacy = {"matmul_gflops": 100.0, "bandwidth_gbs": 10.0, "tanh_gelems": 1.0}  # results before the peaks
    assert roofs.floor_seconds(100e9, 0, 0, legacy, "bf16") == pytest.approx(1.0)


def test_merge_keeps_the_higher_peak():
    low = json.loads(json.dumps(PEAKS))
    low["all_cores"]["fma_fp32_avx512"] = 10.0
    low["bandwidth_all_cores"][0][2] = 1.0
    merged = roofs.merge(PEAKS, low)
    assert merged["all_cores"]["fma_fp32_avx512"] == 190.0 and merged["bandwidth_all_cores"][0][2] == 600.0


def _rows(path):
    """(label, fastest round s, flops, bytes, transcendentals, precision) of every timed row of a results JSON
    recorded with the physical peaks, and its machine record."""
    with open(path) as f:
        result = json.load(f)
    machine = result.get("machine_info", {})
    if "peak_gflops_fp32" not in machine:
        return machine, []
    rows = []
    for entry in result.get("entries", []):  # compare.py
        if entry.get("times_s"):
            rows.append((f"B{entry['batch']} {entry['mode']} {entry['provider']}", min(entry["times_s"]), entry))
    for bench in result.get("benchmarks", []):  # pytest-benchmark (run.py)
        rows.append((bench["name"], bench["stats"]["min"], bench["extra_info"]))
    return machine, rows


def test_recorded_results_with_physical_peaks_exist():
    assert any(_rows(path)[1] for path in RESULTS), "no results file recorded with the physical peaks"


@pytest.mark.parametrize("path", RESULTS, ids=[os.path.basename(p) for p in RESULTS])
def test_no_recorded_row_beats_its_floor(path):
    """Every round of every row, not only the median: the fastest round must not beat the floor either."""
    machine, rows = _rows(path)
    if not rows:
        pytest.skip("recorded with torch's rates, before the physical peaks (roofs.py)")
    for label, fastest, info in rows:
        precision = info.get("precision", "fp32")
        for p in ("fp32", "bf16", "fp16"):  # the best floor is the lowest of these
            nbytes = info.get(f"bytes_{p}", info["bytes"])
            floor = roofs.floor_seconds(info["flops"], nbytes, info["transcendentals"], machine, p)
            assert floor <= fastest, f"{label}: floor at {p} {floor * 1e3:.3f} ms > fastest round " \
                                     f"{fastest * 1e3:.3f} ms ({precision} row)"


@pytest.fixture(scope="module")
def rates():
    return roofs.rates(roofs.peaks(), torch.get_num_threads())


def _fastest(fn, calls=5):
    fn()
    best = float("inf")
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


@pytest.mark.parametrize("dtype,precision", [(torch.float32, "fp32"), (torch.bfloat16, "bf16")])
def test_torch_gemm_stays_below_the_matrix_peak(rates, dtype, precision):
    n = 512
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    gflops = 2 * n**3 / _fastest(lambda: torch.mm(a, b.t())) / 1e9
    assert gflops <= rates[f"peak_gflops_{precision}"], (gflops, rates)


@pytest.mark.skipif("cpp" not in avkernels.backends(), reason="the cpp extension is not built")
@pytest.mark.parametrize("mode", ["inference", "full"])
def test_fresh_cpp_rows_stay_above_their_floor(rates, mode):
    """The rows nearest their floor (the fused op at the official shape; a GRJCA inference, which came out at
    123-162% of the floor at torch.tanh's rate), run now: no call beats the floor at this run's thread count."""
    import harness
    from test_bench_fusion import OFFICIAL_DIMS, fusion_case
    from test_bench_ops import tanh_attention_case

    cases = [tanh_attention_case("official", 1, 1024, 512, 16)]
    if mode == "inference":
        cases.append(fusion_case("GRJCA", "official", OFFICIAL_DIMS, 16, 1))
    for case in cases:
        setup, fn = harness.build_mode(case, "cpp", mode, torch.device("cpu"))
        fastest = _fastest(lambda: fn(*setup()[0]))  # setup inside the timing only adds: a looser check
        for precision, cost in harness.costs_by_precision(case, mode).items():
            floor = roofs.floor_seconds(cost.flops, cost.bytes, cost.transcendentals, rates, precision)
            assert floor <= fastest, \
                f"{case.id} {mode}: floor {floor * 1e3:.3f} ms at {precision} > fastest call {fastest * 1e3:.3f} ms"


def test_every_peak_is_measured_or_its_unit_named():
    p = roofs.peaks()
    for loop in roofs.BF16_LOOPS + roofs.TANH_LOOPS:
        if loop in p["absent"]:
            assert "absent" in p["absent"][loop] and "(" in p["absent"][loop]  # e.g. "AMX-BF16 (amx_tile, ...)"
        else:
            assert p["one_core"][loop] > 0 and p["all_cores"][loop] > 0
