"""What ``lengths=`` costs: forward and training step of a fusion (and the demo's regressor) with and without it.

    python benchmarks/lengths.py [--rounds 40] [--threads 1] [--batch 8] [--name lengths-cpu]

Every round times each (case, mode) once per variant, in an order rotated each round, so that the variants share the
machine's load (see ``compare.py``); the table gives medians, interquartile ranges and the median of the per-round
ratios. Variants: ``none`` (no ``lengths``), ``padded`` (half the samples padded, lengths drawn in ``[1, L - 1]``)
and ``full`` (every length ``L``: the no-padding path, after the check). Writes ``benchmarks/results/<name>.md``.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from typing import Callable, Dict, List

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import avkernels  # noqa: E402
from avkernels.models import AVRegressor  # noqa: E402

VARIANTS = ("none", "padded", "full")


def _iqr(values: List[float]) -> float:
    q = statistics.quantiles(values, n=4) if len(values) >= 4 else [min(values), 0, max(values)]
    return q[2] - q[0]


def build(case: str, batch: int):
    """``(model, features, seq_len)`` of a case."""
    torch.manual_seed(0)
    if case == "GRJCA":
        model, dims, seq_len = avkernels.GRJCA((512, 512), 16, backend="cpp"), (512, 512), 16
    elif case == "DCA additive":
        model, dims, seq_len = avkernels.DCA((512, 512), 16, form="additive", backend="cpp"), (512, 512), 16
    else:  # the regressor of `make demo` (examples/train_synthetic.py's flags), DCA fusion
        model = AVRegressor((32, 32), 16, fusion="dca", fusion_kwargs=dict(dropout=0.1, backend="cpp"),
                            encoder_layers=1, joint_dim=64, joint_layers=1, head_hidden=32, head_dropout=0.1)
        dims, seq_len = (32, 32), 16
    return model, [torch.randn(batch, seq_len, d) for d in dims], seq_len


def step(model, features, lengths, mode: str) -> Callable[[], None]:
    kwargs = {} if lengths is None else {"lengths": lengths}
    if mode == "forward":
        def run():
            model.eval()
            with torch.no_grad():
                model(*features, **kwargs)
    else:
        def run():
            model.train()
            model.zero_grad(set_to_none=True)
            out = model(*features, **kwargs)
            sum(o.float().square().mean() for o in out).backward()
    return run


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=40)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--cases", default="GRJCA,DCA additive,regressor (demo)")
    p.add_argument("--name", default="lengths-cpu")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    load_start = os.getloadavg()[0]
    entries: Dict[tuple, Callable[[], None]] = {}
    for case in args.cases.split(","):
        model, features, seq_len = build(case, args.batch)
        g = torch.Generator().manual_seed(1)
        padded = torch.where(torch.arange(args.batch) % 2 == 1,
                             torch.randint(1, seq_len, (args.batch,), generator=g), torch.full((args.batch,), seq_len))
        lengths = {"none": None, "padded": padded, "full": torch.full((args.batch,), seq_len)}
        for mode in ("forward", "train"):
            for variant in VARIANTS:
                entries[(case, mode, variant)] = step(model, features, lengths[variant], mode)
    for fn in entries.values():  # warm-up
        fn()
    times: Dict[tuple, List[float]] = {key: [] for key in entries}
    keys = list(entries)
    started = time.perf_counter()
    for r in range(args.rounds):
        for key in keys[r % len(keys):] + keys[: r % len(keys)]:
            t0 = time.perf_counter()
            entries[key]()
            times[key].append(time.perf_counter() - t0)
    elapsed = time.perf_counter() - started
    load_end = os.getloadavg()[0]

    lines = [
        "# Cost of `lengths=` (benchmarks/lengths.py)",
        "",
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs, torch {torch.__version__}, "
        f"{args.threads} thread(s), batch {args.batch}, {args.rounds} interleaved rounds in {elapsed:.0f} s; load "
        f"average {load_start:.1f} at the start, {load_end:.1f} at the end (the machine was shared with other jobs).",
        "Fusions at the official shape (d_v = d_a = 512, L = 16, dense GRJCA with 2 iterations, additive DCA), `cpp` "
        "backend, fp32, dropout 0.6 in training; the regressor with `make demo`'s sizes. `padded`: every other sample "
        "padded to a length in [1, 15]; `full`: lengths = L everywhere.",
        "",
        "| case | mode | none (ms) | padded (ms) | full (ms) | padded / none | full / none |",
        "|---|---|---|---|---|---|---|",
    ]
    for case in args.cases.split(","):
        for mode in ("forward", "train"):
            t = {v: times[(case, mode, v)] for v in VARIANTS}
            med = {v: statistics.median(t[v]) * 1e3 for v in VARIANTS}
            iqr = {v: _iqr(t[v]) * 1e3 for v in VARIANTS}
            ratio = {v: statistics.median(a / b for a, b in zip(t[v], t["none"])) for v in ("padded", "full")}
            cells = [f"{med[v]:.2f} ± {iqr[v] / 2:.2f}" for v in VARIANTS]
            lines.append(f"| {case} | {mode} | " + " | ".join(cells) +
                         f" | {ratio['padded']:.3f} | {ratio['full']:.3f} |")
    lines += ["", "± is half the interquartile range; the ratios are medians of the per-round ratios (each pair timed "
              "seconds apart)."]
    text = "\n".join(lines) + "\n"
    print(text)
    out = os.path.join(HERE, "results", f"{args.name}.md")
    with open(out, "w", encoding="utf-8") as f:
        f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
