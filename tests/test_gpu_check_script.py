"""scripts/gpu_check.sh --dry-run: every stage of the GPU check runs on CPU and the report holds what a GPU run
would (GPU time is too scarce to find a broken script there)."""

import json
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGES = ["env", "build", "tests-cuda", "tests-triton", "tests-gpu", "bench-long", "bench-ops", "bench-fusion",
          "bench-compile"]


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    if shutil.which("bash") is None or shutil.which("timeout") is None:
        pytest.skip("needs bash and coreutils' timeout")
    out = tmp_path_factory.mktemp("gpu_check")
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPU_CHECK_")}
    env["PYTHON"] = sys.executable
    result = subprocess.run(["bash", os.path.join(ROOT, "scripts", "gpu_check.sh"), "--dry-run", str(out)],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    return result, out


def test_every_stage_passes(dry_run):
    result, out = dry_run
    summary = json.loads((out / "summary.json").read_text())
    assert [s["name"] for s in summary["stages"]] == STAGES
    bad = [(s["name"], s["status"], s["log_tail"]) for s in summary["stages"] if s["status"] not in ("ok", "skipped")]
    assert not bad, bad
    assert summary["ok"] and result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert summary["dry_run"] is True


def test_summary_records_device_tests_and_benchmarks(dry_run):
    result, out = dry_run
    summary = json.loads((out / "summary.json").read_text())
    assert summary["device"] and summary["device"] == summary["env"]["device"]
    assert set(summary["tests"]) == {"tests-cuda", "tests-triton", "tests-gpu"}
    assert summary["tests"]["tests-triton"]["passed"] >= 1
    assert summary["tests"]["tests-gpu"]["skipped"] >= 1  # GPU-only tests skip cleanly on CPU
    long_rows = summary["long"]["long"]["rows"]
    assert {r["provider"] for r in long_rows} >= {"reference", "triton", "sdpa"}
    assert all("error" not in r and r["median_s"] > 0 for r in long_rows)
    assert {"ops", "fusion"} <= set(summary["benchmarks"])
    assert all(b["rows"] for b in summary["benchmarks"].values())
    for stage in summary["stages"]:
        assert stage["seconds"] >= 0 and (out / "logs" / f"{stage['name']}.log").exists()


def test_markdown_summary_is_printed_and_saved(dry_run):
    result, out = dry_run
    text = (out / "summary.md").read_text()
    assert text.strip() in result.stdout
    for heading in ("## Stages", "## Tests", "## Benchmarks", "Long shape"):
        assert heading in text
    assert all(f"| {name} |" in text for name in STAGES)


def test_report_of_a_gpu_run(tmp_path):
    """The report's GPU-only paths, on the files a GPU run leaves: the fp64 refusals counted apart from real
    failures, a stage without its junit file, and the cost model's predictions beside the measured kernels."""
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    import gpu_check_report

    for sub in ("logs", "junit", "bench"):
        (tmp_path / sub).mkdir()
    (tmp_path / "stages.tsv").write_text("stage\tstatus\trc\tseconds\tbudget\nbuild\tok\t0\t80.5\t180\n"
                                         "tests-triton\tfailed\t1\t100.0\t180\ntests-cuda\ttimeout\t124\t90.0\t90\n")
    (tmp_path / "logs" / "tests-cuda.log").write_text("collected 70 items\n....")
    (tmp_path / "env.json").write_text(json.dumps({"device": "NVIDIA H200", "capability": "9.0", "sms": 132}))
    (tmp_path / "junit" / "tests-triton.xml").write_text(
        '<testsuites><testsuite tests="4" failures="3" errors="0" skipped="0">'
        '<testcase classname="tests.test_x" name="test_fp64"><failure message="TypeError: tanh_attention: the triton '
        'backend computes float64 only in the interpreter">tb</failure></testcase>'
        '<testcase classname="tests.test_x" name="test_fp64_dispatch"><failure message="ValueError: backend triton '
        'cannot run tanh_attention: the triton backend computes in float32, bfloat16, float16, got float64 inputs">'
        'tb</failure></testcase>'
        '<testcase classname="tests.test_x" name="test_real"><failure message="AssertionError: o: max error">tb'
        '</failure></testcase><testcase classname="tests.test_x" name="test_ok"/></testsuite></testsuites>')
    model = json.loads(open(gpu_check_report.COST_MODEL).read())
    fwd = next(r for r in model["kernels"] if r["shape"] == "official" and r["dtype"] == "bf16"
               and r["mode"] == "train" and r["kernel"].endswith("fwd_kernel"))
    (tmp_path / "bench" / "long.json").write_text(json.dumps({
        "long": {"shape": {"B": 8, "Mq": 4096, "N": 4096, "D": 64, "E": 64, "dtype": "bf16"},
                 "rows": [{"provider": "triton", "mode": "forward", "median_s": 1e-3, "tflops": 137.4},
                          {"provider": "triton", "mode": "full", "median_s": 2e-3, "tflops": 103.0,
                           "kernels": {"_tanh_attention_bwd_dq_kernel": 4e-4}}]},
        "official_kernels": {"rows": [{"dtype": "bfloat16", "fp32_matmul_precision": "highest",
                                       "kernels": {"_tanh_attention_fwd_kernel": 2.5e-4}}]}}))
    assert gpu_check_report.main([str(tmp_path), "--elapsed", "400"]) == 1  # stages failed
    summary = json.loads((tmp_path / "summary.json").read_text())
    triton = summary["tests"]["tests-triton"]
    assert (triton["passed"], triton["failures"], triton["fp64_refused_on_cuda"]) == (1, 3, 2)
    assert summary["tests"]["tests-cuda"] == {"error": "stage timeout"}
    text = (tmp_path / "summary.md").read_text()
    assert "NVIDIA H200" in text and "test_real" in text and "test_fp64" not in text.split("Failed tests:")[1]
    predicted = f"{fwd['predicted_s'] * 1e6:.1f} us | {fwd['bound']} |"
    assert f"| bf16 | _tanh_attention_fwd_kernel | 250.0 us | {predicted}" in text
    predicted_long = next(r for r in model["kernels"] if r["shape"] == "long" and r["kernel"].endswith("fwd_kernel"))
    assert f"| {predicted_long['predicted_s'] * 1e6:.1f} us |" in text
    dq_long = next(r for r in model["kernels"] if r["shape"] == "long" and r["kernel"].endswith("dq_kernel"))
    assert f"| _tanh_attention_bwd_dq_kernel | 400.0 us | {dq_long['predicted_s'] * 1e6:.1f} us |" in text
    assert "collected 70 items" in text  # the failed stage's log tail
