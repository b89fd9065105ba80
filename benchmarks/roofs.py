"""The machine's physical roofs and the roofline floor of a benchmark row (no torch: report.py reads it too).

    python benchmarks/roofs.py [--refresh] [--threads N]   # measure (or show the cached) peaks of this machine

A floor is a time no implementation can beat on this machine: ``max(flops / matrix roof, bytes / bandwidth,
transcendentals / tanh roof)``. Its roofs are the peaks of ``peaks.cpp``: tight loops of the instructions the CPU
kernels can use -- fp32 FMA (AVX-512 and AVX2), the bf16 dot product ``vdpbf16ps`` (AVX-512 BF16), the AMX tile
product ``tdpbf16ps`` where the CPU has AMX (named as absent where not) -- on one core and on every core at once;
memory bandwidth (memcpy and a read-only sum) at working sets from 32 KiB to 256 MiB; and the fastest tanh the
project has, the cpp kernels' own ``tanh_vec`` (csrc/cpu/simd.h, compiled in). Earlier floors used what torch
reached (its GEMM, its copy, ``torch.tanh``): the kernels' own tanh beat ``torch.tanh`` by several times, and rows
came out at 123-162% of their "floor".

Roofs per precision: fp32 products run at the best fp32 FMA rate; bf16 products at the best of that, ``vdpbf16ps``
and AMX (a bf16 product can always be computed in fp32); fp16 at the fp32 rate (no fp16 unit is measured).
A row run with ``t`` torch threads gets ``min(all cores, t x one core)`` of each peak. The bandwidth term uses the
rate measured at the largest working set not above the row's bytes (a working set that small could sit in that
cache level), so an op whose inputs and outputs fit in L2 is held to L2's rate, not DRAM's.

Peaks are cached per machine (CPU model, family/model, ISA flags, logical CPUs, and a hash of the sources) under
``$AVKERNELS_PEAKS_CACHE`` or ``~/.cache/avkernels/peaks``; ``--refresh`` measures again and keeps the higher value
of each peak (a peak is a maximum: a run disturbed by other work only measures lower).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import runpy
import subprocess
import sys
import tempfile
import time
from typing import Dict, Optional, Sequence

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SOURCE = os.path.join(HERE, "peaks.cpp")
KERNEL_HEADERS = ("simd.h", "tanh_table.h")  # the kernels' tanh, compiled into the measurement
ISA_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_fp16")
PRECISIONS = ("fp32", "bf16", "fp16")
FMA_LOOPS = ("fma_fp32_avx512", "fma_fp32_avx2")
BF16_LOOPS = FMA_LOOPS + ("dot_bf16_avx512", "amx_bf16")
TANH_LOOPS = ("tanh_avx512", "tanh_avx2")


def cpu_identity() -> Dict[str, object]:
    """Model name, family and model numbers, the ISA flags that decide the roofs, logical CPUs."""
    fields: Dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    flags = set(fields.get("flags", "").split())
    return {"model_name": fields.get("model name", "?"), "family": fields.get("cpu family", "?"),
            "model": fields.get("model", "?"), "isa": {f: f in flags for f in ISA_FLAGS},
            "logical_cpus": os.cpu_count()}


def _sources_hash() -> str:
    digest = hashlib.sha256()
    for path in [SOURCE] + [os.path.join(ROOT, "csrc", "cpu", h) for h in KERNEL_HEADERS]:
        with open(path, "rb") as f:
            digest.update(f.read())
    return digest.hexdigest()[:16]


def cache_path() -> str:
    ident = cpu_identity()
    key = hashlib.sha256(json.dumps([ident, _sources_hash()], sort_keys=True).encode()).hexdigest()[:16]
    base = os.environ.get("AVKERNELS_PEAKS_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "avkernels",
                                                                   "peaks")
    return os.path.join(base, f"peaks-{key}.json")


def _compile(workdir: str) -> str:
    """peaks.cpp with the extension's own optimisation flags (avkernels/_build_config.py), minus OpenMP."""
    config = runpy.run_path(os.path.join(ROOT, "avkernels", "_build_config.py"))
    flags = [f for f in config["CPU_CXX_FLAGS"] if f != "-fopenmp"]
    binary = os.path.join(workdir, "peaks")
    cmd = [os.environ.get("CXX", "g++"), "-std=c++17", *flags, "-Wno-psabi", "-pthread",
           "-I", os.path.join(ROOT, "csrc", "cpu"), SOURCE, "-o", binary]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"roofs: compiling {SOURCE} failed ({' '.join(cmd)}):\n{proc.stderr[-2000:]}")
    return binary


def measure(threads: Optional[int] = None, target_s: float = 0.002, trials: int = 25) -> Dict[str, object]:
    """Compile and run peaks.cpp: the peaks on one core and on ``threads`` (default: every logical CPU), each the
    best of ``trials`` runs of about ``target_s``: on a machine shared with other work a short run has a chance to
    go undisturbed, and a peak is what an undisturbed run reaches."""
    threads = threads or os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as workdir:
        binary = _compile(workdir)
        load_start = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
        proc = subprocess.run([binary, str(threads), str(target_s), str(trials)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"roofs: peaks run failed with {proc.returncode}: {proc.stderr[-2000:]}")
    result = json.loads(proc.stdout)
    result.update(cpu=cpu_identity(), sources=_sources_hash(),
                  measured_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                  load_average=[load_start, os.getloadavg()[0] if hasattr(os, "getloadavg") else None])
    return result


def merge(old: Dict[str, object], new: Dict[str, object]) -> Dict[str, object]:
    """The higher of each peak of two measurements of one machine (bandwidth per working set too)."""
    out = dict(new)
    for scope in ("one_core", "all_cores"):
        out[scope] = {k: max(v, old.get(scope, {}).get(k, 0.0)) for k, v in new[scope].items()}
    for scope in ("bandwidth_one_core", "bandwidth_all_cores"):
        before = {row[0]: row for row in old.get(scope, [])}
        out[scope] = [[size, max(copy, before.get(size, [0, 0, 0])[1]), max(read, before.get(size, [0, 0, 0])[2])]
                      for size, copy, read in new[scope]]
    out["measurements"] = int(old.get("measurements", 1)) + 1
    return out


def peaks(refresh: bool = False, threads: Optional[int] = None) -> Dict[str, object]:
    """This machine's peaks: from the cache, else measured (and cached); ``refresh`` measures again and keeps the
    higher value of each peak."""
    path = cache_path()
    cached = None
    if os.path.exists(path):
        with open(path) as f:
            cached = json.load(f)
        if not refresh:
            return cached
    result = measure(threads)
    result = merge(cached, result) if cached else dict(result, measurements=1)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=1)
    os.replace(tmp, path)
    return result


def _at_threads(p: Dict[str, object], name: str, threads: int) -> float:
    """``min(all cores, threads x one core)``; every core at once is never slower than one (a lower all-core
    figure was a run disturbed by other work)."""
    one = p["one_core"].get(name, 0.0)
    return min(max(p["all_cores"].get(name, 0.0), one), one * threads)


def rates(p: Dict[str, object], threads: int) -> Dict[str, object]:
    """The roofs of a row run with ``threads`` threads, as the flat keys :func:`floor_seconds` reads."""
    gemm = {"fp32": max(_at_threads(p, n, threads) for n in FMA_LOOPS)}
    gemm["bf16"] = max(_at_threads(p, n, threads) for n in BF16_LOOPS)
    gemm["fp16"] = gemm["fp32"]
    one = {row[0]: max(row[1:]) for row in p["bandwidth_one_core"]}
    curve = [[size, min(max(copy, read, one.get(size, 0.0)), one.get(size, 0.0) * threads)]
             for size, copy, read in p["bandwidth_all_cores"]]
    out: Dict[str, object] = {f"peak_gflops_{k}": v for k, v in gemm.items()}
    out.update(peak_tanh_gelems=max(_at_threads(p, n, threads) for n in TANH_LOOPS),
               peak_bandwidth_curve=curve, peak_dram_gbs=curve[-1][1], peak_threads=threads,
               peak_absent=dict(p.get("absent", {})))
    return out


def gemm_roof(r: Dict[str, object], precision: str) -> float:
    """GFLOP/s of ``precision``'s matrix roof: the physical peak where measured, else (results recorded before the
    peaks existed) torch's GEMM rate, fp32's for a precision without its own."""
    if "peak_gflops_fp32" in r:
        return r[f"peak_gflops_{precision}"]
    key = "matmul_gflops" if precision == "fp32" else f"matmul_gflops_{precision}"
    return r.get(key, r["matmul_gflops"])


def bandwidth_gbs(r: Dict[str, object], nbytes: float) -> float:
    """GB/s for ``nbytes`` of traffic: the rate at the largest measured working set not above it (the smallest
    set's rate below that), or the single copy rate of older results."""
    curve = r.get("peak_bandwidth_curve")
    if not curve:
        return r["bandwidth_gbs"]
    fitting = [gbs for size, gbs in curve if size <= nbytes]
    return fitting[-1] if fitting else max(gbs for _, gbs in curve)


def tanh_roof(r: Dict[str, object]) -> float:
    return r.get("peak_tanh_gelems", r.get("tanh_gelems"))


def floor_seconds(flops: float, nbytes: float, transcendentals: float, r: Dict[str, object],
                  precision: str = "fp32") -> float:
    """The slowest of the matrix, memory and tanh times at the roofs ``r`` (see the module docstring)."""
    return max(flops / (gemm_roof(r, precision) * 1e9), nbytes / (bandwidth_gbs(r, nbytes) * 1e9),
               transcendentals / (tanh_roof(r) * 1e9))


def summary(r: Dict[str, object]) -> str:
    """One line for a table's header."""
    if "peak_gflops_fp32" not in r:
        return ""
    absent = "; ".join(r.get("peak_absent", {}).values())
    threads = f"{r['peak_threads']} thread" + ("s" if r["peak_threads"] != 1 else "")
    return (f"Physical roofs ({threads}, peaks.cpp): fp32 FMA {r['peak_gflops_fp32']:.0f} GFLOP/s, "
            f"bf16 {r['peak_gflops_bf16']:.0f} GFLOP/s, kernels' tanh {r['peak_tanh_gelems']:.2f} G/s, "
            f"DRAM {r['peak_dram_gbs']:.0f} GB/s, fastest cache {max(g for _, g in r['peak_bandwidth_curve']):.0f} "
            f"GB/s" + (f" ({absent})" if absent else "") + ".")


def table(p: Dict[str, object]) -> str:
    """The peaks as markdown."""
    cpu = p["cpu"]
    flags = ", ".join(f for f, on in cpu["isa"].items() if on)
    lines = [f"Peaks of **{cpu['model_name']}** (family {cpu['family']} model {cpu['model']}, {cpu['logical_cpus']} "
             f"logical CPUs; {flags}), measured {p['measured_at']} ({p.get('measurements', 1)} run(s), best kept; "
             f"load average {p['load_average']}).", "",
             "| loop | one core | all cores |", "|---|---|---|"]
    for name, one in p["one_core"].items():
        unit = "G tanh/s" if name.startswith("tanh") else "GFLOP/s"
        lines.append(f"| {name} | {one:.2f} {unit} | {p['all_cores'][name]:.2f} {unit} |")
    lines += [f"| {name} | {why} | |" for name, why in p.get("absent", {}).items()]
    lines += ["", "| working set | copy, one core | read, one core | copy, all cores | read, all cores |",
              "|---|---|---|---|---|"]
    for (size, c1, r1), (_, ca, ra) in zip(p["bandwidth_one_core"], p["bandwidth_all_cores"]):
        lines.append(f"| {size / 2**20:.3g} MiB | {c1:.1f} GB/s | {r1:.1f} | {ca:.1f} | {ra:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--refresh", action="store_true", help="measure again, keeping the higher value of each peak")
    parser.add_argument("--threads", type=int, default=None, help="threads of the all-core peaks (default: all)")
    parser.add_argument("--out", default=None, help="also write the peaks to this JSON file")
    args = parser.parse_args(argv)
    p = peaks(refresh=args.refresh, threads=args.threads)
    sys.stdout.write(table(p))
    print(f"cached in {cache_path()}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(p, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
