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
from typing import Callable, Dict, List, Tuple

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


def floor_seconds(info: dict, machine: dict) -> float:
    """The roofline floor of one result at the roofs in ``machine_info`` (the better of the start and end
    measurements; each result's own ``extra_info["floor_s"]`` used the start measurement only)."""
    return max(info["flops"] / (machine["matmul_gflops"] * 1e9), info["bytes"] / (machine["bandwidth_gbs"] * 1e9),
               info["transcendentals"] / (machine["tanh_gelems"] * 1e9))


def collect(report: dict, stat: str = "median") -> Tuple[List[str], "OrderedDict[Tuple, Dict[str, dict]]"]:
    rows: "OrderedDict[Tuple, Dict[str, dict]]" = OrderedDict()
    seen = set()
    for bench in report["benchmarks"]:
        info = dict(bench["extra_info"])
        if "median_s" not in info:
            continue
        if stat != "median" or "cuda_event_median_s" not in info:
            info["median_s"] = bench["stats"][stat]  # the tables' time, whichever statistic was asked for
        info["floor_s"] = floor_seconds(info, report["machine_info"])
        info["fraction_of_floor"] = info["floor_s"] / info["median_s"]
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


def _table(providers: List[str], rows, head: List[str], other_head: str,
           row_cells: Callable[[dict], List[str]], base_cell: Callable[[dict], str],
           other_cell: Callable[[dict, dict], str]) -> str:
    """One markdown row per (op, shape, sizes, mode): fixed cells, the eager cell, then one cell per provider."""
    others = [p for p in providers if p != BASELINE]
    head = ["op", "shape", "B", "L", "sizes", "mode"] + head + [f"{p}: {other_head}" for p in others]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key, by_provider in rows.items():
        base = by_provider.get(BASELINE)
        cells = [str(k) for k in key] + row_cells(next(iter(by_provider.values())))
        cells.append(base_cell(base) if base else "-")
        cells += [other_cell(by_provider[p], base) if p in by_provider else "-" for p in others]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def time_table(providers: List[str], rows) -> str:
    def other(info, base):
        speedup = f"{base['median_s'] / info['median_s']:.2f}x" if base else "?"
        return f"{_ms(info['median_s'])}, **{speedup}**, {_pct(info['fraction_of_floor'])}"

    return _table(providers, rows, ["floor ms", "eager ms (of floor)"], "ms, speedup, of floor",
                  lambda info: [_ms(info["floor_s"])],
                  lambda base: f"{_ms(base['median_s'])} ({_pct(base['fraction_of_floor'])})", other)


def memory_table(providers: List[str], rows) -> str:
    def cell(info):
        return f"{_mb(info['peak_bytes'])} ({_mb(info['retained_bytes'])})"

    def other(info, base):
        ratio = f"{info['peak_bytes'] / base['peak_bytes']:.2f}x" if base and base["peak_bytes"] else "?"
        return f"{cell(info)}, {ratio}"

    return _table(providers, rows, ["eager peak MB (retained)"], "peak MB (retained), peak ratio",
                  lambda info: [], cell, other)


def render(report: dict, note: str = "", stat: str = "median") -> str:
    providers, rows = collect(report, stat)
    return "\n\n".join([
        header(report, note),
        f"### Time ({stat} of the rounds; speedup = eager time / provider time, same run; floor = roofline floor "
        "at the roofs above, 'of floor' = floor / time)",
        time_table(providers, rows),
        "### Memory (MB): peak allocated during the call above what was allocated before it, and (retained) what "
        "is still allocated after it while its result is held; ratio of peaks to eager",
        memory_table(providers, rows),
    ]) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", help="pytest-benchmark JSON written by benchmarks/run.py")
    parser.add_argument("--out", help="markdown file to write (default: the JSON path with .md)")
    parser.add_argument("--note", default="", help="a line added under the header (e.g. about machine load)")
    parser.add_argument("--stat", default="median", choices=("median", "min", "mean"),
                        help="statistic of the rounds shown as the time (min: the least disturbed round, for a "
                             "loaded machine)")
    args = parser.parse_args(argv)
    text = render(load(args.json), args.note, args.stat)
    out = args.out or args.json.rsplit(".", 1)[0] + ".md"
    with open(out, "w") as f:
        f.write(text)
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
