"""benchmarks/streaming.py (issue 13's streaming measurement) runs end to end on a tiny model and reports every
provider: timed, or with the reason it could not run."""

import importlib.util
import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

MISSING = [m for m in ("onnx", "onnxscript", "onnxruntime") if importlib.util.find_spec(m) is None]


@pytest.mark.slow
@pytest.mark.skipif(bool(MISSING), reason=f"the onnx extra is not installed (missing: {', '.join(MISSING)})")
def test_streaming_benchmark_writes_every_provider(tmp_path):
    import streaming

    streaming.main(["--dims", "8,6", "--seq-len", "4", "--minutes", "0.02", "--batch", "3", "--rounds", "2",
                    "--latency-calls", "2", "--threads", "1", "--providers", "eager,onnxruntime",
                    "--out-dir", str(tmp_path), "--name", "smoke"])
    result = json.loads((tmp_path / "smoke.json").read_text())
    rows = {row["provider"]: row for row in result["rows"]}
    assert set(rows) == {"eager-fp32", "onnxruntime-fp32", "eager-bf16", "onnxruntime-bf16"}
    assert result["windows"] == 9  # 0.02 min * 60 s * 30 fps / 4 clips per window, rounded up
    for name in ("eager-fp32", "onnxruntime-fp32", "eager-bf16"):
        row = rows[name]
        assert row["error"] is None, row["error"]
        assert len(result["per_round"][name]["video_s"]) == 2
        assert row["video_s"] > 0 and row["latency_ms"] > 0
    assert rows["onnxruntime-fp32"]["max_abs_diff_vs_eager_fp32"] < 1e-5
    assert rows["eager-bf16"]["max_abs_diff_vs_eager_fp32"] < 5e-2
    # whatever it gave, a provider that does not run is in the table with its reason
    for row in rows.values():
        assert row["error"] is not None or row["latency_ms"] > 0
    table = (tmp_path / "smoke").with_suffix(".md").read_text()
    assert all(name in table for name in rows)
