"""The last step of scripts/gpu_check.sh: gather every stage's result into OUTDIR/summary.json and summary.md.

    python scripts/gpu_check_report.py OUTDIR [--elapsed SECONDS]

Standard library only, so a report is written even when torch or the package fails to import. Reads what the
stages left: stages.tsv, logs/, env.json, junit/*.xml, bench/*.json and *.md, and the committed cost model
(benchmarks/results/gpu-cost-model.json) to set its predictions beside the measured kernel times. Prints the
markdown; exits 1 when a stage failed or timed out.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import sys
import xml.etree.ElementTree as ET

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COST_MODEL = os.path.join(ROOT, "benchmarks", "results", "gpu-cost-model.json")
TAIL_LINES = 15
OK_TAIL_LINES = 4
# The triton backend refuses fp64 on CUDA by design (avkernels/ops/triton/); the interpreter suites' fp64 checks meet
# that refusal when they run on a GPU. Counted apart, so that real failures stand out. Both spellings: the
# dispatcher's, and the launcher's own check behind it.
FP64_REFUSAL = re.compile(r"triton backend computes (float64 only in the interpreter|in [^\n]*got float64 inputs)")


def _read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _tail(path, lines=TAIL_LINES):
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:]).rstrip()
    except OSError:
        return ""


def read_stages(outdir):
    stages = []
    try:
        with open(os.path.join(outdir, "stages.tsv")) as f:
            rows = [line.rstrip("\n").split("\t") for line in f][1:]
    except OSError:
        rows = []
    for name, status, rc, seconds, budget in rows:
        stages.append({"name": name, "status": status, "rc": None if rc == "-" else int(rc),
                       "seconds": float(seconds), "budget_s": int(budget),
                       "log_tail": _tail(os.path.join(outdir, "logs", f"{name}.log"))})
    return stages


def read_junit(path):
    """Counts and the failed tests of one pytest junit file (pytest writes one <testsuite>)."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError) as exc:
        return {"error": str(exc)}
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    failed = []
    for suite in root.iter("testsuite"):
        for key in counts:
            counts[key] += int(suite.get(key, 0))
    for case in root.iter("testcase"):
        for kind in ("failure", "error"):
            node = case.find(kind)
            if node is not None:
                message = (node.get("message") or node.text or "").strip().splitlines()
                text = (node.get("message") or "") + (node.text or "")
                failed.append({"test": f"{case.get('classname')}::{case.get('name')}", "kind": kind,
                               "message": message[0][:300] if message else "",
                               "fp64_refused_on_cuda": bool(FP64_REFUSAL.search(text))})
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    counts["fp64_refused_on_cuda"] = sum(f["fp64_refused_on_cuda"] for f in failed)
    return {**counts, "failed": failed}


def read_benchmarks(outdir):
    """Every pytest-benchmark JSON of benchmarks/run.py: one row per benchmark, its median and provider."""
    out = {}
    for path in sorted(glob.glob(os.path.join(outdir, "bench", "*.json"))):
        data = _read_json(path)
        if not isinstance(data, dict) or "benchmarks" not in data:
            continue
        rows = []
        for bench in data["benchmarks"]:
            info = bench.get("extra_info", {})
            median = info.get("cuda_event_median_s", bench.get("stats", {}).get("median"))
            rows.append({"name": bench.get("name"), "median_s": median,
                         **{k: info[k] for k in ("provider", "mode", "fraction_of_floor", "peak_bytes") if k in info}})
        name = os.path.splitext(os.path.basename(path))[0]
        table = os.path.splitext(path)[0] + ".md"
        out[name] = {"rows": rows, "table_md": table if os.path.exists(table) else None}
    return out


def _fmt_s(seconds):
    if seconds is None:
        return "-"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.1f} us"
    if seconds < 1:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds:.2f} s"


def _predictions():
    """Cost-model predictions by (kernel, dtype label, shape name, mode), from the committed JSON."""
    model = _read_json(COST_MODEL) or {}
    return {(r["kernel"], r["dtype"], r["shape"], r["mode"]): r for r in model.get("kernels", [])}


def _long_prediction(predicted, mode, shape):
    """The triton kernels' predicted time for one long-shape call: the forward kernel, plus both backward kernels
    for forward + backward. None when the run's shape is not the model's (the dry run's tiny one)."""
    kernels = ["_tanh_attention_fwd_kernel"] + (["_tanh_attention_bwd_dq_kernel", "_tanh_attention_bwd_dkdv_kernel"]
                                               if mode == "full" else [])
    rows = [predicted.get((k, "bf16", "long", "forward" if k.endswith("fwd_kernel") else "backward")) for k in kernels]
    if not all(rows) or any(rows[0]["sizes"][k] != shape.get(k) for k in ("B", "Mq", "N", "D", "E")):
        return None
    return sum(r["predicted_s"] for r in rows)


def long_section(long):
    lines = []
    predicted = _predictions()
    shape = long.get("long", {}).get("shape", {})
    rows = long.get("long", {}).get("rows", [])
    kernels = []
    if rows:
        lines += [f"### Long shape: B {shape.get('B')}, Mq = N = {shape.get('Mq')}, D = E = {shape.get('D')}, "
                  f"{shape.get('dtype')}", "",
                  "| provider | mode | median | TFLOP/s | cost model (triton kernels) | accuracy vs fp64 (max err / "
                  "bf16 reference's err) |", "|---|---|---|---|---|---|"]
        for r in rows:
            acc = r.get("accuracy")
            acc_text = ", ".join(f"{k} {v['ratio']:.2f}" if v.get("ratio") is not None else f"{k} -"
                                 for k, v in acc.items()) if acc else ""
            model = _fmt_s(_long_prediction(predicted, r["mode"], shape)) if r["provider"] == "triton" else ""
            kernels += [(k, s) for k, s in r.get("kernels", {}).items() if "tanh_attention" in k]
            if "error" in r:
                lines.append(f"| {r['provider']} | {r['mode']} | **error** | | | {r['error'][:200]} |")
            else:
                lines.append(f"| {r['provider']} | {r['mode']} | {_fmt_s(r['median_s'])} | {r['tflops']:.1f} | "
                             f"{model} | {acc_text} |")
        lines.append("")
        if kernels:
            lines += ["Triton kernels of the forward + backward, per call (torch.profiler) vs the cost model:", "",
                      "| kernel | measured | predicted | predicted bound |", "|---|---|---|---|"]
            for kernel, seconds in sorted(kernels):
                base = kernel.split("(")[0].strip()
                p = predicted.get((base, "bf16", "long", "forward" if base.endswith("fwd_kernel") else "backward"), {})
                lines.append(f"| {base} | {_fmt_s(seconds)} | {_fmt_s(p.get('predicted_s'))} | {p.get('bound', '-')} |")
            lines.append("")
    official = long.get("official_kernels", {})
    if official.get("rows"):
        lines += ["### Official call of the dense block, triton, per kernel (torch.profiler) vs the cost model", "",
                  "| dtype | kernel | measured | predicted | predicted bound |", "|---|---|---|---|---|"]
        for r in official["rows"]:
            if "error" in r:
                lines.append(f"| {r['dtype']} | **error** | {r['error'][:200]} | | |")
                continue
            if r["dtype"] == "float32":
                label = "fp32-tf32x3" if r.get("fp32_matmul_precision") == "highest" else "fp32-tf32"
            else:
                label = {"bfloat16": "bf16", "float16": "fp16"}.get(r["dtype"], r["dtype"])
            for kernel, seconds in sorted(r.get("kernels", {}).items()):
                if "tanh_attention" not in kernel:
                    continue
                base = kernel.split("(")[0].strip()
                p = predicted.get((base, label, "official", "train" if base.endswith("fwd_kernel") else "backward"), {})
                lines.append(f"| {label} | {base} | {_fmt_s(seconds)} | {_fmt_s(p.get('predicted_s'))} | "
                             f"{p.get('bound', '-')} |")
        lines.append("")
    return lines


def render(summary):
    env = summary.get("env") or {}
    lines = [f"# avkernels GPU check{' (dry run, CPU)' if summary['dry_run'] else ''}", "",
             f"- device: **{env.get('device', 'unknown')}**"
             + (f" (sm_{env['capability'].replace('.', '')}, {env.get('sms')} SMs)" if env.get("capability") else ""),
             f"- python {env.get('python', '?')}, torch {env.get('torch', '?')} (CUDA {env.get('torch_cuda')}), "
             f"triton {env.get('triton', '?')}, {env.get('cores', '?')} cores, nvcc: {env.get('nvcc')}, "
             f"ninja: {'yes' if env.get('ninja') else 'no (serial extension build)'}",
             f"- backends: {', '.join(f'{k}: {v}' for k, v in (env.get('backends') or {}).items()) or '?'}",
             f"- total time: {summary['elapsed_s']} s", "",
             "## Stages", "", "| stage | status | time | budget |", "|---|---|---|---|"]
    for s in summary["stages"]:
        lines.append(f"| {s['name']} | {s['status'] if s['status'] == 'ok' else '**' + s['status'] + '**'} | "
                     f"{s['seconds']:.1f} s | {s['budget_s']} s |")
    lines += ["", "## Tests", "",
              "Failed and errors include the fp64 checks that the triton backend refuses on CUDA by design (counted "
              "again in the last column).", "",
              "| stage | passed | failed | errors | skipped | of the failed: fp64 refused on CUDA |",
              "|---|---|---|---|---|---|"]
    for name, t in summary["tests"].items():
        if "error" in t:
            lines.append(f"| {name} | no junit file ({t['error'][:80]}) | | | | |")
        else:
            lines.append(f"| {name} | {t['passed']} | {t['failures']} | {t['errors']} | {t['skipped']} | "
                         f"{t['fp64_refused_on_cuda']} |")
    failed = [(name, f) for name, t in summary["tests"].items() for f in t.get("failed", [])
              if not f["fp64_refused_on_cuda"]]
    if failed:
        lines += ["", "Failed tests:", ""]
        lines += [f"- `{f['test']}` ({name}): {f['message']}" for name, f in failed[:60]]
        if len(failed) > 60:
            lines.append(f"- ... and {len(failed) - 60} more (junit/)")
    lines += ["", "## Benchmarks", ""]
    if summary.get("long"):
        lines += long_section(summary["long"])
    for name, bench in summary["benchmarks"].items():
        if bench.get("table_md"):
            with open(bench["table_md"]) as f:
                lines += [f"### benchmarks/run.py: {name}", "", f.read().strip(), ""]
    lines += ["## Log tails", "", f"The last {OK_TAIL_LINES} lines of each stage that passed, {TAIL_LINES} of the others "
              "(whole logs in logs/).", ""]
    for s in summary["stages"]:
        tail = s["log_tail"].splitlines()[-OK_TAIL_LINES:] if s["status"] == "ok" else s["log_tail"].splitlines()
        if tail:
            lines += [f"### {s['name']} ({s['status']})", "", "```", *tail, "```", ""]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("outdir")
    parser.add_argument("--elapsed", type=int, default=None)
    args = parser.parse_args(argv)
    outdir = args.outdir
    try:
        with open(os.path.join(outdir, "dry_run")) as f:
            dry_run = f.read().strip() == "1"
    except OSError:
        dry_run = False
    summary = {
        "dry_run": dry_run,
        "elapsed_s": args.elapsed,
        "env": _read_json(os.path.join(outdir, "env.json")),
        "stages": read_stages(outdir),
        "tests": {os.path.splitext(os.path.basename(p))[0]: read_junit(p)
                  for p in sorted(glob.glob(os.path.join(outdir, "junit", "*.xml")))},
        "long": _read_json(os.path.join(outdir, "bench", "long.json")),
        "benchmarks": read_benchmarks(outdir),
    }
    for stage in summary["stages"]:  # a test stage that wrote no junit (killed, or collection crashed)
        name = stage["name"]
        if name.startswith("tests-") and name not in summary["tests"] and stage["status"] != "skipped":
            summary["tests"][name] = {"error": f"stage {stage['status']}"}
    summary["device"] = (summary["env"] or {}).get("device")
    summary["ok"] = all(s["status"] in ("ok", "skipped") for s in summary["stages"])
    text = render(summary)
    with open(os.path.join(outdir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    with open(os.path.join(outdir, "summary.md"), "w") as f:
        f.write(text)
    print(text)
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
