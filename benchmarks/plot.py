"""Plots of a benchmark run: time and speedup over eager against batch size and against sequence length.

    python benchmarks/plot.py benchmarks/results/cpu.json [--out-dir benchmarks/results/plots]

For every fusion model and mode measured at more than one batch size (at ``L = 16``, official widths) or more than
one sequence length (at batch 8), one PNG with two panels: median time per provider (log-log) and speedup over the
eager reference of the same run. Writes ``<name>-<op>-<mode>-vs-<batch|seq_len>.png``.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from report import BASELINE, PROVIDER_ORDER, load  # noqa: E402

# (x axis, the size held fixed while it varies)
SWEEPS = (("batch", ("seq_len", 16)), ("seq_len", ("batch", 8)))
OFFICIAL_DIMS = [512, 512]


def series(report: dict, x_name: str, fixed: tuple, stat: str = "median"):
    """``{(op, mode): {provider: [(x, median_s), ...]}}`` over the official widths with ``fixed`` held."""
    fixed_name, fixed_value = fixed
    out = defaultdict(lambda: defaultdict(dict))
    for bench in report["benchmarks"]:
        info = bench["extra_info"]
        if info.get("dims") != OFFICIAL_DIMS or info.get(fixed_name) != fixed_value or "median_s" not in info:
            continue
        seconds = info["median_s"] if stat == "median" and "cuda_event_median_s" in info else bench["stats"][stat]
        out[(info["op"], info["mode"])][info["provider"]][info[x_name]] = seconds
    return {key: {p: sorted(points.items()) for p, points in by_p.items()} for key, by_p in out.items()}


def plot_one(path: str, title: str, x_name: str, by_provider: dict, stat: str) -> None:
    fig, (ax_time, ax_speed) = plt.subplots(1, 2, figsize=(10, 4))
    base = dict(by_provider.get(BASELINE, []))
    for provider in [p for p in PROVIDER_ORDER if p in by_provider] + sorted(set(by_provider) - set(PROVIDER_ORDER)):
        points = by_provider[provider]
        xs, ts = [x for x, _ in points], [t * 1e3 for _, t in points]
        ax_time.plot(xs, ts, marker="o", label=provider)
        shared = [(x, base[x] / t) for x, t in points if x in base]
        if shared:
            ax_speed.plot([x for x, _ in shared], [s for _, s in shared], marker="o", label=provider)
    for ax in (ax_time, ax_speed):
        ax.set_xscale("log", base=2)
        ax.set_xlabel(x_name)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    ax_time.set_yscale("log")
    ax_time.set_ylabel(f"{stat} time (ms)")
    ax_speed.set_ylabel("speedup over eager reference")
    ax_speed.axhline(1.0, color="grey", linewidth=0.8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json")
    parser.add_argument("--out-dir", default=None, help="default: plots/ beside the JSON")
    parser.add_argument("--stat", default="median", choices=("median", "min", "mean"))
    args = parser.parse_args(argv)
    report = load(args.json)
    out_dir = args.out_dir or os.path.join(os.path.dirname(os.path.abspath(args.json)), "plots")
    os.makedirs(out_dir, exist_ok=True)
    name = os.path.splitext(os.path.basename(args.json))[0]
    device = report["machine_info"].get("gpu_name") or report["machine_info"].get("cpu_model")
    written = []
    for x_name, fixed in SWEEPS:
        for (op, mode), by_provider in sorted(series(report, x_name, fixed, args.stat).items()):
            if max(len(points) for points in by_provider.values()) < 2:
                continue
            path = os.path.join(out_dir, f"{name}-{op}-{mode}-vs-{x_name}.png")
            title = f"{op} {mode}, dims 512/512, {fixed[0]}={fixed[1]} ({device})"
            plot_one(path, title, x_name, by_provider, args.stat)
            written.append(path)
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
