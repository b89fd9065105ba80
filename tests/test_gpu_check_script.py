"""scripts/gpu_check.sh --dry-run: every stage of the GPU check runs on CPU and the report holds what a GPU run
would (GPU time is too scarce to find a broken script there)."""

import json
import os
import shutil
import subprocess

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
