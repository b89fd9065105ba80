"""Turn a pytest-benchmark JSON of this suite into markdown tables of ratios against eager PyTorch.

    python benchmarks/report.py benchmarks/results/cpu.json [--out benchmarks/results/cpu.md] [--note "..."]

Table 1 (time): per op/model, shape and mode, the eager reference's median time, then for every other provider its
median time, its speedup over eager in the same run (``eager / provider``) and the fraction of the roofline floor
it reaches (``floor / time``; the floor is ``max(FLOPs / matmul rate, bytes / bandwidth, tanh / tanh rate)`` at the
rates measured in the same run, see ``harness.machine_rates``). Table 2 (memory): peak bytes allocated during the
call, and the ratio to eager's.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import OrderedDict
from typing import Dict, List, Tuple

BASELINE = "reference"
PROVIDER_ORDER = ("reference", "torch_compile", "cpp", "triton", "cuda")


def load(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def _row_key(info: dict) -> Tuple:
    dims = info.get("dims")
    size = f"dims={'/'.join(map(str, dims))}" if dims else ", ".join(
        f"{k}={info[k]}" for k in ("mq", "n", "dim", "stages") if k in info)
    return (info["op"], info["shape"], info["batch"], info["seq_len"], size, info["mode"])


def collect(report: dict) -> Tuple[List[str], "OrderedDict[Tuple, Dict[str, dict]]"]:
    rows: "OrderedDict[Tuple, Dict[str, dict]]" = OrderedDict()
    seen = set()
    for bench in report["benchmarks"]:
        info = bench["extra_info"]
        if "median_s" not in info:
            continue
        rows.setdefault(_row_key(info), {})[info["provider"]] = info
        seen.add(info["provider"])
    providers = [p for p in PROVIDER_ORDER if p in seen] + sorted(seen - set(PROVIDER_ORDER))
    return providers, rows


def _ms(seconds: float) -> str:
    ms = seconds * 1e3
    return f"{ms:.3g}" if ms < 100 else f"{ms:.0f}"


def _mb(nbytes: float) -> str:
    mb = nbytes / 2**20
    return f"{mb:.3g}" if mb < 100 else f"{mb:.0f}"


def _pct(fraction: float) -> str:
    return f"{fraction:.0%}" if fraction >= 0.1 else f"{100 * fraction:.2g}%"


def header(report: dict, note: str = "") -> str:
    m = report["machine_info"]
    lines = [
        f"Run of {report.get('datetime', '?')} on {m.get('gpu_name') or m.get('cpu_model')} "
        f"({m.get('cpu_cores')} CPU cores, {m.get('torch_threads')} torch threads), torch {m.get('torch_version')}, "
        f"avkernels {m.get('avkernels_version')} (backends: {', '.join(m.get('avkernels_backends', []))}), "
        f"commit {report.get('commit_info', {}).get('id', '?')[:10]}.",
        f"Roofs measured in the same run: fp32 GEMM {m['matmul_gflops']:.0f} GFLOP/s, "
        f"copy bandwidth {m['bandwidth_gbs']:.1f} GB/s, tanh {m['tanh_gelems']:.2f} G/s. "
        f"Load average (1 min) at start / end: {m.get('load_average_start')} / {m.get('load_average_end')}.",
    ]
    if note:
        lines.append(note)
    return "\n".join(lines)


def time_table(providers: List[str], rows) -> str:
    others = [p for p in providers if p != BASELINE]
    head = ["op", "shape", "B", "L", "sizes", "mode", "floor ms", "eager ms (of floor)"]
    head += [f"{p}: ms, speedup, of floor" for p in others]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (op, shape, batch, seq_len, size, mode), by_provider in rows.items():
        base = by_provider.get(BASELINE)
        any_info = next(iter(by_provider.values()))
        cells = [op, shape, str(batch), str(seq_len), size, mode, _ms(any_info["floor_s"])]
        cells.append(f"{_ms(base['median_s'])} ({_pct(base['fraction_of_floor'])})" if base else "-")
        for p in others:
            info = by_provider.get(p)
            if info is None:
                cells.append("-")
                continue
            speedup = f"{base['median_s'] / info['median_s']:.2f}x" if base else "?"
            cells.append(f"{_ms(info['median_s'])}, **{speedup}**, {_pct(info['fraction_of_floor'])}")
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def memory_table(providers: List[str], rows) -> str:
    others = [p for p in providers if p != BASELINE]
    head = ["op", "shape", "B", "L", "sizes", "mode", "eager peak MB (retained)"]
    head += [f"{p}: peak MB, ratio" for p in others]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (op, shape, batch, seq_len, size, mode), by_provider in rows.items():
        base = by_provider.get(BASELINE)
        cells = [op, shape, str(batch), str(seq_len), size, mode]
        cells.append(f"{_mb(base['peak_bytes'])} ({_mb(base['retained_bytes'])})" if base else "-")
        for p in others:
            info = by_provider.get(p)
            if info is None:
                cells.append("-")
                continue
            ratio = f"{info['peak_bytes'] / base['peak_bytes']:.2f}x" if base and base["peak_bytes"] else "?"
            cells.append(f"{_mb(info['peak_bytes'])}, {ratio}")
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def render(report: dict, note: str = "") -> str:
    providers, rows = collect(report)
    return "\n\n".join([
        header(report, note),
        "### Time (median of the rounds; speedup = eager time / provider time, same run)",
        time_table(providers, rows),
        "### Peak memory during the call (MB above what was allocated before it; ratio to eager)",
        memory_table(providers, rows),
    ]) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", help="pytest-benchmark JSON written by benchmarks/run.py")
    parser.add_argument("--out", help="markdown file to write (default: the JSON path with .md)")
    parser.add_argument("--note", default="", help="a line added under the header (e.g. about machine load)")
    args = parser.parse_args(argv)
    text = render(load(args.json), args.note)
    out = args.out or args.json.rsplit(".", 1)[0] + ".md"
    with open(out, "w") as f:
        f.write(text)
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
