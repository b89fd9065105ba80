"""Where a provider's step spends its time: a torch.profiler breakdown by kind of work.

    python benchmarks/profile_step.py [--model GRJCA] [--batch 8] [--mode train]
                                      [--providers cpp,cpp-bf16,default-bf16,reference-bf16] [--steps 3]

Every profiled operator's self time goes to the first of these that applies:

``optimizer``  anything under ``Optimizer.step`` (Adam; the parameters stay fp32 under autocast, so it costs the
               same at every precision).
``fused ops``  anything under an ``avkernels::*`` op (the attention, gate and stage-gate ops and their backward,
               whatever backend runs them).
``casts``      the nearest enclosing operator is a dtype conversion (``aten::to``/``_to_copy``, its backward):
               what autocast adds to move fp32 parameters and activations to 16 bits and back.
``linear``     the nearest enclosing operator is a 2-D matrix product (``aten::linear``/``addmm``/``mm`` or its
               backward node): the layers every provider runs through PyTorch.
``bmm``        the nearest enclosing operator is a batched product (``aten::bmm``/``baddbmm``, backward): the
               eager attention's products (the fused backends run them inside their ops).
``dropout``    the residual MLP's dropout (``bernoulli_``, ``native_dropout`` and backward).
``other``      everything else the profiler saw (elementwise ops, reductions, autograd bookkeeping).

``python/untraced`` is the wall time of the step less the sum of all of these: Python, the autograd engine's own
work, and waits. The matrix products' FLOPs come from the profiler (``with_flops=True``), so each breakdown also
states the GFLOP/s the linear layers and batched products reach together. A step is the harness's (``harness.build_mode``): the same modules,
inputs, autocast region and Adam at learning rate 0 as the benchmarks time.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from collections import defaultdict
from typing import Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

CATEGORIES = ("linear", "bmm", "fused ops", "casts", "optimizer", "dropout", "other", "python/untraced")
_LINEAR = re.compile(r"^(aten::(linear|addmm|mm|addmv|mv|_addmm_activation)|(Addmm|Mm|Linear|Mv|Addmv)Backward\d*)$")
_BMM = re.compile(r"^(aten::(bmm|baddbmm)|(Bmm|Baddbmm)Backward\d*)$")
_CAST = re.compile(r"^(aten::(to|_to_copy|_autocast_to_reduced_precision|_autocast_to_full_precision)|"
                   r"ToCopyBackward\d*)$")
_DROPOUT = re.compile(r"^(aten::(bernoulli_|bernoulli|dropout|native_dropout|native_dropout_backward)|"
                      r"NativeDropoutBackward\d*)$")


def _strip(name: str) -> str:
    """``autograd::engine::evaluate_function: AddmmBackward0`` -> ``AddmmBackward0``."""
    return name.split(": ", 1)[1] if name.startswith("autograd::engine::evaluate_function: ") else name


def category(event) -> str:
    chain = []
    node = event
    while node is not None:
        chain.append(_strip(node.name))
        node = node.cpu_parent
    if any(name.startswith("Optimizer.step") for name in chain):
        return "optimizer"
    if any("avkernels" in name for name in chain):  # the ops and their autograd nodes (GeneratedBackwardFor_...)
        return "fused ops"
    for name in chain:  # nearest enclosing operator decides
        if _CAST.match(name):
            return "casts"
        if _LINEAR.match(name):
            return "linear"
        if _BMM.match(name):
            return "bmm"
        if _DROPOUT.match(name):
            return "dropout"
    return "other"


def breakdown(case, provider: str, mode: str = "train", steps: int = 3) -> Dict[str, object]:
    """Milliseconds per step by category (see the module docstring), the step's wall time, the linear layers'
    FLOPs and rate, and the ten most expensive operators by self time."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    import harness

    dev = harness.device()
    setup, fn = harness.build_mode(case, provider, mode, dev)
    harness._timed_call(setup, fn, dev)  # warm-up (and torch.compile's compile) outside the profile
    harness._timed_call(setup, fn, dev)
    walls: List[float] = []
    with profile(activities=[ProfilerActivity.CPU], with_flops=True) as prof:
        for _ in range(steps):
            walls.append(harness._timed_call(setup, fn, dev))
    ms: Dict[str, float] = defaultdict(float)
    by_op: Dict[str, float] = defaultdict(float)
    linear_flops = 0
    for event in prof.events():
        self_ms = event.self_cpu_time_total / 1e3 / steps
        kind = category(event)
        ms[kind] += self_ms
        by_op[f"{_strip(event.name)} [{kind}]"] += self_ms
        if kind in ("linear", "bmm") and event.flops:
            linear_flops += event.flops
    wall_ms = sum(walls) / steps * 1e3
    profiled = sum(ms.values())
    ms["python/untraced"] = max(0.0, wall_ms - profiled)
    linear_gflops = linear_flops / steps / 1e9  # of the linear layers and the bmm together
    top = sorted(by_op.items(), key=lambda kv: -kv[1])[:10]
    return {
        "provider": provider, "mode": mode, "steps": steps, "wall_ms": wall_ms,
        "ms": {k: ms.get(k, 0.0) for k in CATEGORIES},
        "linear_gflop": linear_gflops,
        "linear_gflops_rate": linear_gflops / ((ms["linear"] + ms["bmm"]) / 1e3) if ms["linear"] else None,
        "top_ops_ms": top,
        "threads": torch.get_num_threads(),
    }


def markdown(results: List[Dict[str, object]], title: str) -> str:
    head = ["provider", "step ms (profiled)"] + list(CATEGORIES) + ["linear + bmm GFLOP/s"]
    out = [title, "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        if "error" in r:
            out.append(f"| {r['provider']} | failed: {r['error']} |" + " |" * (len(head) - 2))
            continue
        cells = [r["provider"], f"{r['wall_ms']:.1f}"]
        cells += [f"{r['ms'][k]:.1f} ({r['ms'][k] / r['wall_ms']:.0%})" for k in CATEGORIES]
        rate = r["linear_gflops_rate"]
        cells.append(f"{rate:.1f} ({r['linear_gflop']:.2f} GFLOP)" if rate else "-")
        out.append("| " + " | ".join(cells) + " |")
    out.append("")
    for r in results:
        if "top_ops_ms" in r:
            ops = "; ".join(f"{name} {t:.1f}" for name, t in r["top_ops_ms"])
            out.append(f"- `{r['provider']}` top operators by self ms per step: {ops}")
    return "\n".join(out) + "\n"


def profile_all(case, providers: List[str], mode: str, steps: int) -> List[Dict[str, object]]:
    import harness

    results = []
    for provider in providers:
        try:
            results.append(breakdown(case, provider, mode, steps))
        except Exception as exc:  # a provider that cannot run this precision is a finding, not a crash
            results.append({"provider": provider, "mode": mode, "error": harness.failure_reason(exc)})
    return results


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="GRJCA")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--mode", default="train", choices=("train", "forward", "backward", "inference"))
    parser.add_argument("--providers", default="cpp,cpp-bf16,default-bf16,reference-bf16")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=None, help="markdown file to write (default: print only)")
    args = parser.parse_args(argv)

    import torch

    from test_bench_fusion import OFFICIAL_DIMS, fusion_case

    if args.threads:
        torch.set_num_threads(args.threads)
    case = fusion_case(args.model, "official", OFFICIAL_DIMS, 16, args.batch)
    start = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    results = profile_all(case, [p.strip() for p in args.providers.split(",") if p.strip()], args.mode,
                          args.steps)
    title = (f"### Profile: {args.model} {args.mode} step, official shape, batch {args.batch}, "
             f"{torch.get_num_threads()} threads, mean of {args.steps} steps, ms per step ({start})")
    text = markdown(results, title)
    sys.stdout.write(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
