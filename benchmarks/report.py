"""Turn a pytest-benchmark JSON of this suite into markdown tables of ratios against eager PyTorch.

    python benchmarks/report.py benchmarks/results/cpu.json [--out benchmarks/results/cpu.md] [--note "..."]

Table 1 (time): per op/model, shape and mode, the eager reference's median time, then for every other provider its
median time, its speedup over eager fp32 in the same run (``eager / provider``) and the fraction of the roofline
floor it reaches (``floor / time``; the floor is ``max(FLOPs / matmul rate, bytes / bandwidth, tanh / tanh rate)``
at the rates measured in the same run, see ``harness.machine_rates``). The floor is the *best* floor of the machine:
the lowest over fp32, bf16 and fp16 (each precision's GEMM roof, its element size for the bytes), so rows of every
precision are measured against the same yardstick; a 16-bit provider's cell adds its fraction of its own precision's
floor. A provider that failed shows ``failed [n]``, the reason listed under the table. Table 2 (precision): for
each implementation run at fp32 and at 16 bits, the fp32 time over the 16-bit time (above 1: the 16-bit run is
faster). Table 3 (memory): peak bytes allocated during the call, and the ratio to eager's.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import OrderedDict
from typing import Callable, Dict, List, Tuple

import roofs

BASELINE = "reference"
IMPL_ORDER = ("reference", "torch_compile", "default", "cpp", "triton", "cuda")
PRECISION_ORDER = ("fp32", "bf16", "fp16")
PROVIDER_ORDER = tuple(impl if p == "fp32" else f"{impl}-{p}" for p in PRECISION_ORDER for impl in IMPL_ORDER)


def split_provider(provider: str) -> Tuple[str, str]:
    """``"cpp-bf16"`` -> ``("cpp", "bf16")`` (as ``harness.split_provider``, without importing torch)."""
    impl, _, suffix = provider.rpartition("-")
    return (impl, suffix) if impl and suffix in PRECISION_ORDER else (provider, "fp32")


def load(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def _row_key(info: dict) -> Tuple:
    dims = info.get("dims")
    size = f"dims={'/'.join(map(str, dims))}" if dims else ", ".join(
        f"{k}={info[k]}" for k in ("mq", "n", "dim", "stages") if k in info)
    return (info["op"], info["shape"], info["batch"], info["seq_len"], size, info["mode"])


def floor_seconds(info: dict, machine: dict, precision: str = None) -> float:
    """The roofline floor of one result at ``precision``'s roofs in ``machine_info`` (the better of the start and
    end measurements; each result's own ``extra_info["floor_s"]`` used the start measurement only); by default at
    the result's own precision."""
    precision = precision or info.get("precision", "fp32")
    nbytes = info.get(f"bytes_{precision}", info["bytes"])
    return roofs.floor_seconds(info["flops"], nbytes, info["transcendentals"], machine, precision)


def best_floor_seconds(info: dict, machine: dict) -> float:
    """The lowest floor over the precisions whose roofs this run measured."""
    measured = [p for p in PRECISION_ORDER if p == "fp32" or f"matmul_gflops_{p}" in machine]
    return min(floor_seconds(info, machine, p) for p in measured)


def collect(report: dict, stat: str = "median") -> Tuple[List[str], "OrderedDict[Tuple, Dict[str, dict]]"]:
    """Every result by row and provider; a failed provider's entry has ``"error"`` and no time."""
    rows: "OrderedDict[Tuple, Dict[str, dict]]" = OrderedDict()
    seen = set()
    machine = report["machine_info"]
    for bench in report["benchmarks"]:
        info = dict(bench["extra_info"])
        if "median_s" not in info:
            continue
        info.setdefault("precision", split_provider(info["provider"])[1])
        if stat != "median" or "cuda_event_median_s" not in info:
            info["median_s"] = bench["stats"][stat]  # the tables' time, whichever statistic was asked for
        info["floor_s"] = floor_seconds(info, machine)
        info["fraction_of_floor"] = info["floor_s"] / info["median_s"]
        info["best_floor_s"] = best_floor_seconds(info, machine)
        info["fraction_of_best_floor"] = info["best_floor_s"] / info["median_s"]
        rows.setdefault(_row_key(info), {})[info["provider"]] = info
        seen.add(info["provider"])
    for failure in report.get("failures", []):
        by_provider = rows.setdefault(_row_key(failure), {})
        by_provider.setdefault(failure["provider"], dict(failure))
        seen.add(failure["provider"])
    providers = [p for p in PROVIDER_ORDER if p in seen] + sorted(seen - set(PROVIDER_ORDER))
    return providers, rows


def _timed(by_provider: Dict[str, dict]) -> List[dict]:
    return [info for info in by_provider.values() if "median_s" in info]


def _ms(seconds: float) -> str:
    ms = seconds * 1e3
    return f"{ms:.3g}" if ms < 100 else f"{ms:.0f}"


def _mb(nbytes: float) -> str:
    mb = nbytes / 2**20
    return f"{mb:.3g}" if mb < 100 else f"{mb:.0f}"


def _pct(fraction: float) -> str:
    return f"{fraction:.0%}" if fraction >= 0.1 else f"{100 * fraction:.2g}%"


def roofs_line(m: dict) -> str:
    parts = [f"fp32 GEMM {m['matmul_gflops']:.0f} GFLOP/s"]
    for p in ("bf16", "fp16"):
        if f"matmul_gflops_{p}" in m:
            layouts = [f"{m[k]:.1f} {name}" for name, k in (("a@b", f"matmul_gflops_{p}_nn"),
                                                           ("a@b.T", f"matmul_gflops_{p}_nt")) if k in m]
            parts.append(f"{p} GEMM {m[f'matmul_gflops_{p}']:.1f} GFLOP/s ({', '.join(layouts)})")
    best = max(PRECISION_ORDER, key=lambda p: roofs.gemm_roof(m, p))
    torch_rates = (f"{'; '.join(parts)}; copy bandwidth {m['bandwidth_gbs']:.1f} GB/s, torch.tanh "
                   f"{m['tanh_gelems']:.2f} G/s")
    if "peak_gflops_fp32" in m:
        return f"{roofs.summary(m)} Best matrix roof: {best}. What torch reached in the same run: {torch_rates}."
    why = f" (the peaks could not be measured: {m['peak_error']})" if m.get("peak_error") else ""
    return (f"Roofs measured with torch in the same run, not physical limits{why}: {torch_rates} (best: {best}).")


def header(report: dict, note: str = "") -> str:
    m = report["machine_info"]
    lines = [
        f"Run of {report.get('datetime', '?')} on {m.get('gpu_name') or m.get('cpu_model')} "
        f"({m.get('cpu_cores')} CPU cores, {m.get('torch_threads')} torch threads), torch {m.get('torch_version')}, "
        f"avkernels {m.get('avkernels_version')} (backends: {', '.join(m.get('avkernels_backends', []))}), "
        f"commit {report.get('commit_info', {}).get('id', '?')[:10]}.",
        roofs_line(m) + f" Load average (1 min) at start / end: {m.get('load_average_start')} / "
        f"{m.get('load_average_end')}.",
    ]
    if note:
        lines.append(note)
    return "\n".join(lines)


class Failures:
    """Numbers the distinct failure reasons of a table, for ``failed [n]`` cells and the list under it."""

    def __init__(self):
        self.reasons: List[str] = []

    def cell(self, info: dict) -> str:
        if info["error"] not in self.reasons:
            self.reasons.append(info["error"])
        return f"failed [{self.reasons.index(info['error']) + 1}]"

    def legend(self) -> str:
        return "\n".join(f"[{i}] {reason}" + "  " for i, reason in enumerate(self.reasons, 1))


def _table(providers: List[str], rows, head: List[str], other_head: str,
           row_cells: Callable[[dict], List[str]], base_cell: Callable[[dict], str],
           other_cell: Callable[[dict, dict], str], failures: "Failures" = None) -> str:
    """One markdown row per (op, shape, sizes, mode): fixed cells, the eager cell, then one cell per provider."""
    failures = failures or Failures()
    others = [p for p in providers if p != BASELINE]
    head = ["op", "shape", "B", "L", "sizes", "mode"] + head + [f"{p}: {other_head}" for p in others]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def cell(info, make):
        return failures.cell(info) if "error" in info else make(info)

    for key, by_provider in rows.items():
        base = by_provider.get(BASELINE)
        base = base if base and "error" not in base else None
        timed = _timed(by_provider)
        cells = [str(k) for k in key] + row_cells(timed[0] if timed else None)
        if BASELINE in by_provider:
            cells.append(cell(by_provider[BASELINE], base_cell))
        else:
            cells.append("-")
        cells += [cell(by_provider[p], lambda info: other_cell(info, base)) if p in by_provider else "-"
                  for p in others]
        out.append("| " + " | ".join(cells) + " |")
    if failures.reasons:
        out += ["", failures.legend()]
    return "\n".join(out)


def _of_floor(info: dict) -> str:
    text = _pct(info["fraction_of_best_floor"])
    if info.get("precision", "fp32") != "fp32" or abs(info["floor_s"] - info["best_floor_s"]) > 1e-12:
        text += f" ({_pct(info['fraction_of_floor'])} of {info.get('precision', 'fp32')}'s)"
    return text


def time_table(providers: List[str], rows) -> str:
    def other(info, base):
        speedup = f"{base['median_s'] / info['median_s']:.2f}x" if base else "?"
        return f"{_ms(info['median_s'])}, **{speedup}**, {_of_floor(info)}"

    return _table(providers, rows, ["best floor ms", "eager ms (of floor)"], "ms, speedup, of floor",
                  lambda info: [_ms(info["best_floor_s"]) if info else "-"],
                  lambda base: f"{_ms(base['median_s'])} ({_of_floor(base)})", other)


def precision_table(providers: List[str], rows) -> str:
    """fp32 time / 16-bit time for every implementation measured at both, per row ("" when none was)."""
    pairs = [(split_provider(p)[0], p) for p in providers if split_provider(p)[1] != "fp32"]
    pairs = [(impl, p) for impl, p in pairs if impl in providers]
    if not pairs:
        return ""
    head = ["op", "shape", "B", "L", "sizes", "mode"] + [f"{p} vs {impl}" for impl, p in pairs]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key, by_provider in rows.items():
        cells = []
        for impl, p in pairs:
            a, b = by_provider.get(impl), by_provider.get(p)
            if a and b and "median_s" in a and "median_s" in b:
                cells.append(f"{a['median_s'] / b['median_s']:.2f}x")
            else:
                cells.append("failed" if b and "error" in b else "-")
        if any(c != "-" for c in cells):
            out.append("| " + " | ".join([str(k) for k in key] + cells) + " |")
    return "\n".join(out)


def memory_table(providers: List[str], rows) -> str:
    def cell(info):
        return f"{_mb(info['peak_bytes'])} ({_mb(info['retained_bytes'])})"

    def other(info, base):
        ratio = f"{info['peak_bytes'] / base['peak_bytes']:.2f}x" if base and base["peak_bytes"] else "?"
        return f"{cell(info)}, {ratio}"

    return _table(providers, rows, ["eager peak MB (retained)"], "peak MB (retained), peak ratio",
                  lambda info: [], cell, other, Failures())


def render(report: dict, note: str = "", stat: str = "median") -> str:
    providers, rows = collect(report, stat)
    resolved = sorted({f"`{info['provider']}` ran {info['resolved_backend']}"
                       + (f" (passed over: {'; '.join(info['passed_over'].values())})" if info.get("passed_over") else "")
                       for by_provider in rows.values() for info in by_provider.values()
                       if info.get("resolved_backend")})
    parts = [
        header(report, note),
        f"### Time ({stat} of the rounds; speedup = eager fp32 time / provider time, same run; best floor = the "
        "lowest roofline floor over fp32/bf16/fp16 at the roofs above, 'of floor' = floor / time; a 16-bit "
        "provider adds, in brackets, its fraction of its own precision's floor)",
        time_table(providers, rows),
    ]
    if resolved:
        parts.append("What `backend=None` picked: " + " / ".join(resolved))
    precision = precision_table(providers, rows)
    if precision:
        parts += ["### Precision: fp32 time / 16-bit time of the same implementation, same run (above 1x: the "
                  "16-bit run under autocast is faster)", precision]
    parts += [
        "### Memory (MB): peak allocated during the call above what was allocated before it, and (retained) what "
        "is still allocated after it while its result is held; ratio of peaks to eager",
        memory_table(providers, rows),
    ]
    return "\n\n".join(parts) + "\n"


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
