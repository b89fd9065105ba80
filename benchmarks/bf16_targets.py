"""Issue 22's bf16 targets, measured with a plain loop: GRJCA at the official shape, each row in the mode it names.

    python benchmarks/bf16_targets.py [--batches 8,64] [--rounds 7] [--threads 2] [--rows default-bf16,cpp-fp32,...]
                                      [--clock wall|cpu] [--profile] [--json out.json]

Rows: ``default-bf16`` (no backend named, bf16 autocast: what a user gets), ``cpp-fp32``, ``eager-bf16``
(``reference`` backend under bf16 autocast), ``eager-fp32``. Every row has its own module (same seed, same weights),
so that no other row's mode can leak into it: training rows run ``module.train()`` (dropout 0.6 on the map and in
the residual MLP) and time forward, backward from fixed random output gradients and an Adam step at learning rate 0;
inference rows run ``module.eval()`` under ``torch.no_grad()``. Rounds are interleaved (one call of every row per
round, after warm-up) and each row reports its median and its peak memory (torch's CPU allocations during one call,
from the profiler). ``--clock cpu`` times the calling thread's CPU time instead of wall time: on a machine shared with
other work, wall time measures the other work too; it needs ``--threads 1`` (torch then runs every op on the calling
thread). ``--profile`` prints a torch.profiler table of the default row's top operators instead.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import avkernels  # noqa: E402
from harness import _cpu_peak, cpu_model  # noqa: E402

ROWS = {  # name: (backend, autocast dtype or None)
    "default-bf16": (None, torch.bfloat16),
    "cpp-fp32": ("cpp", None),
    "eager-bf16": ("reference", torch.bfloat16),
    "eager-fp32": ("reference", None),
}
DIMS, SEQ_LEN = (512, 512), 16


def build(row: str, batch: int, mode: str):
    """(setup, fn): fn() runs one training step or one inference call of a fresh GRJCA in the row's mode."""
    backend, dtype = ROWS[row]
    torch.manual_seed(0)
    module = avkernels.GRJCA(DIMS, SEQ_LEN, backend=backend)
    training = mode == "train"
    module.train(training)
    torch.manual_seed(1)
    inputs = [torch.randn(batch, SEQ_LEN, d, requires_grad=training) for d in DIMS]
    params = list(module.parameters())
    optimizer = torch.optim.Adam(params, lr=0.0) if training else None
    grads = []

    def forward():
        with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
            out = module(*inputs)
        return out if isinstance(out, tuple) else (out,)

    def fn():
        assert module.training == training, f"{row}: module in the wrong mode"
        if not training:
            with torch.no_grad():
                return forward()
        outs = forward()
        if not grads:
            grads.extend(torch.randn_like(o) for o in outs)
        torch.autograd.backward(outs, grads)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        for x in inputs:
            x.grad = None
        return outs

    return (lambda: ((), {})), fn


CLOCKS = {"wall": time.perf_counter, "cpu": time.thread_time}


def measure(rows, batches, modes, rounds: int, clock=time.perf_counter):
    results = []
    for batch in batches:
        for mode in modes:
            built = {row: build(row, batch, mode) for row in rows}
            times = {row: [] for row in rows}
            for row in rows:  # warm-up
                built[row][1]()
            for _ in range(rounds):
                for row in rows:
                    start = clock()
                    built[row][1]()
                    times[row].append(clock() - start)
            for row in rows:
                peak, _ = _cpu_peak(*built[row])
                median = 1e3 * statistics.median(times[row])
                results.append({"row": row, "batch": batch, "mode": mode, "median_ms": median,
                                "times_ms": [1e3 * t for t in times[row]], "peak_mib": peak / 2**20})
                print(f"B={batch:3d} {mode:9s} {row:13s} {median:9.2f} ms  peak {peak / 2**20:8.1f} MiB", flush=True)
    return results


def profile(batch: int, mode: str, row: str, steps: int = 3) -> None:
    from torch.profiler import ProfilerActivity, profile as torch_profile

    _, fn = build(row, batch, mode)
    fn()
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            fn()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", default="8,64")
    parser.add_argument("--modes", default="inference,train")
    parser.add_argument("--rows", default=",".join(r for r in ROWS if r != "eager-fp32"))
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--clock", choices=tuple(CLOCKS), default="wall")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--json")
    args = parser.parse_args()
    if args.clock == "cpu" and args.threads != 1:
        parser.error("--clock cpu times the calling thread only: pass --threads 1")
    torch.set_num_threads(args.threads)
    batches = [int(b) for b in args.batches.split(",")]
    modes = args.modes.split(",")
    rows = args.rows.split(",")
    if args.profile:
        for batch in batches:
            for mode in modes:
                for row in rows:
                    print(f"== B={batch} {mode} {row}")
                    profile(batch, mode, row)
        return
    load_before = os.getloadavg()
    results = measure(rows, batches, modes, args.rounds, CLOCKS[args.clock])
    info = {
        "cpu": cpu_model(), "machine": platform.machine(), "threads": args.threads, "clock": args.clock,
        "torch": torch.__version__, "cpu_features": avkernels.cpu_features(), "load_before": load_before,
        "load_after": os.getloadavg(), "rounds": args.rounds, "results": results,
    }
    print(json.dumps({k: v for k, v in info.items() if k != "results"}))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(info, f, indent=1)


if __name__ == "__main__":
    main()
