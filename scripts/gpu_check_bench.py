"""Helpers of scripts/gpu_check.sh: the machine record and the benchmarks that benchmarks/ does not have.

    python scripts/gpu_check_bench.py env --out env.json
    python scripts/gpu_check_bench.py long [--tiny] --out long.json

``long``: ``tanh_attention`` at the long shape (B 8, Mq = N = 4096, D = E = 64, bf16, no dropout) on every fused
backend and the reference, against ``scaled_dot_product_attention``'s flash kernel at the same shape and FLOPs;
each output and gradient checked against the fp64 oracle (batch element 0, flash-attention's rule: the error
over the bf16 reference's own error). Then the official call of the dense block (B 64, Mq 1024, N 512, D = E = 16,
``tanh_relu``, dropout 0.6) in fp32 and bf16, per kernel through ``torch.profiler``, for
``benchmarks/cost_model.py``'s predictions. ``--tiny`` shrinks every shape for the CPU dry run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import avkernels  # noqa: E402
from avkernels.flops import tanh_attention_cost  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")


def env_record() -> dict:
    record = {
        "device": torch.cuda.get_device_name() if CUDA else f"cpu ({platform.processor() or platform.machine()})",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cores": os.cpu_count(),
        "dry_run": not CUDA,
        "backends": avkernels.backend_status(),
    }
    try:
        import triton

        record["triton"] = triton.__version__
    except ImportError as exc:
        record["triton"] = f"not importable: {exc}"
    # The build's tools: without ninja, torch's extension build compiles one file at a time whatever MAX_JOBS says.
    record["ninja"] = shutil.which("ninja")
    try:
        from torch.utils.cpp_extension import CUDA_HOME

        nvcc = os.path.join(CUDA_HOME, "bin", "nvcc") if CUDA_HOME else None
        if nvcc and os.path.exists(nvcc):
            version = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout.strip()
            record["nvcc"] = version.splitlines()[-1] if version else None
        else:
            record["nvcc"] = None
    except Exception as exc:  # noqa: BLE001 - a record, never a failure
        record["nvcc"] = f"unknown: {exc}"
    if CUDA:
        props = torch.cuda.get_device_properties(0)
        record.update(capability=f"{props.major}.{props.minor}", sms=props.multi_processor_count,
                      memory_gib=round(props.total_memory / 2**30, 1))
    return record


def _sync():
    if CUDA:
        torch.cuda.synchronize()


def time_call(fn, target_s: float, warmup: int = 2) -> dict:
    """Median of rounds of ``fn`` (CUDA events on GPU), after ``warmup`` untimed calls that also compile."""
    for _ in range(warmup):
        fn()
    _sync()
    t0 = time.perf_counter()
    fn()
    _sync()
    once = max(time.perf_counter() - t0, 1e-6)
    rounds = int(min(200, max(3, target_s / once)))
    times = []
    for _ in range(rounds):
        if CUDA:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "min_s": min(times), "rounds": rounds}


def _leaves(*xs):
    return [x.detach().requires_grad_(True) for x in xs]


def _op(backend, **kwargs):
    return lambda q, k, v: avkernels.tanh_attention(q, k, v, backend=backend, **kwargs)


def _sdpa_fn(flash: bool):
    """SDPA on (B, 1, L, D) views: one head, so its grid and FLOPs match tanh_attention's."""
    def fn(q, k, v):
        args = (q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1))
        if flash:
            from torch.nn.attention import SDPBackend, sdpa_kernel

            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return torch.nn.functional.scaled_dot_product_attention(*args).squeeze(1)
        return torch.nn.functional.scaled_dot_product_attention(*args).squeeze(1)
    return fn


def _flash_rule(ours, ref_dtype, ref64) -> dict:
    err = (ours.double() - ref64).abs().max().item()
    ref_err = (ref_dtype.double() - ref64).abs().max().item()
    return {"max_abs_err": err, "reference_in_dtype_err": ref_err, "ratio": err / ref_err if ref_err else None,
            "scale": ref64.abs().max().item()}


def accuracy(fn, q, k, v, do) -> dict:
    """Batch element 0 of ``fn`` against the fp64 formula, beside the reference backend in the same dtype."""
    q0, k0, v0, do0 = (x[:1] for x in (q, k, v, do))
    results = {}
    for name, f, xs in (("ours", fn, _leaves(q0, k0, v0)),
                        ("ref", _op("reference"), _leaves(q0, k0, v0)),
                        ("ref64", _op("reference"),
                         _leaves(*(x.double() for x in (q0, k0, v0))))):
        o = f(*xs)
        grads = torch.autograd.grad(o, xs, do0.to(o.dtype))
        results[name] = [o.detach(), *grads]
    return {label: _flash_rule(a, b, c)
            for label, a, b, c in zip(("o", "dq", "dk", "dv"), results["ours"], results["ref"], results["ref64"])}


def long_shape(tiny: bool, target_s: float) -> dict:
    b, mq, n, d = (1, 64, 64, 16) if tiny else (8, 4096, 4096, 64)
    dtype = torch.bfloat16
    torch.manual_seed(0)
    q, k, v, do = (torch.randn(b, size, d, device=DEVICE, dtype=dtype) for size in (mq, n, n, mq))
    cost = {mode: tanh_attention_cost(b, mq, n, d, d, mode=mode, itemsize=2).as_dict() for mode in ("forward", "full")}
    providers = {name: _op(name) for name in avkernels.backends() if name != "cpp"}  # cpp: fp32/fp64 on CPU only
    providers["sdpa_flash" if CUDA else "sdpa"] = _sdpa_fn(flash=CUDA)
    rows = []
    for name, fn in providers.items():
        for mode in ("forward", "full"):
            row = {"provider": name, "mode": mode, "shape": [b, mq, n, d, d], "dtype": "bf16",
                   "flops": cost[mode]["flops"]}
            try:
                if mode == "forward":
                    with torch.no_grad():
                        row.update(time_call(lambda: fn(q, k, v), target_s))
                else:
                    leaves = _leaves(q, k, v)
                    step = lambda: torch.autograd.grad(fn(*leaves), leaves, do)  # noqa: E731
                    row.update(time_call(step, target_s))
                    if name == "triton":  # per kernel, beside the cost model's predictions
                        row["kernels"] = kernel_times(step, 3)
                row["tflops"] = row["flops"] / row["median_s"] / 1e12
                if mode == "forward" and name not in ("reference", "sdpa", "sdpa_flash"):
                    row["accuracy"] = accuracy(fn, q, k, v, do)
            except Exception as exc:  # noqa: BLE001 - one provider's failure is a result, not the end of the run
                row["error"] = f"{type(exc).__name__}: {exc}"[:2000]
            rows.append(row)
            print(json.dumps(row), flush=True)
    return {"shape": {"B": b, "Mq": mq, "N": n, "D": d, "E": d, "dtype": "bf16", "dropout": 0.0}, "rows": rows}


def kernel_times(fn, iters: int) -> dict:
    """Mean device time of each CUDA kernel over ``iters`` calls of ``fn``, by kernel name (empty on CPU)."""
    if not CUDA:
        return {}
    from torch.profiler import ProfilerActivity, profile

    fn()
    _sync()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        _sync()
    times = {}
    for event in prof.key_averages():
        device_us = getattr(event, "device_time_total", None)
        if device_us is None:
            device_us = getattr(event, "cuda_time_total", 0)
        if device_us:
            times[event.key] = device_us / 1e6 / iters
    return times


def official_kernels(tiny: bool, target_s: float) -> dict:
    """Per-kernel times of the dense block's ``tanh_attention`` call on the triton backend (forward in training
    mode, and its backward), the setting ``benchmarks/cost_model.py`` predicts."""
    b, mq, n, d = (1, 32, 16, 16) if tiny else (64, 1024, 512, 16)
    out = {"shape": {"B": b, "Mq": mq, "N": n, "D": d, "E": d, "dropout": 0.6, "activation": "tanh_relu"},
           "rows": []}
    if "triton" not in avkernels.backends():
        out["error"] = "triton backend unavailable"
        return out
    for dtype, precision in ((torch.float32, "highest"), (torch.float32, "high"), (torch.bfloat16, "highest")):
        torch.set_float32_matmul_precision(precision)
        torch.manual_seed(0)
        # The block's layouts: q = Q^T and v = V^T are transposed views, k is contiguous.
        q = torch.randn(b, d, mq, device=DEVICE, dtype=dtype).transpose(1, 2)
        k = torch.randn(b, n, d, device=DEVICE, dtype=dtype)
        v = torch.randn(b, d, n, device=DEVICE, dtype=dtype).transpose(1, 2)
        do = torch.randn(b, mq, d, device=DEVICE, dtype=dtype)
        leaves = _leaves(q, k, v)
        call = lambda: avkernels.tanh_attention(*leaves, dropout_p=0.6, training=True, activation="tanh_relu",
                                                backend="triton", scale=1 / 32)
        row = {"dtype": str(dtype).replace("torch.", ""), "fp32_matmul_precision": torch.get_float32_matmul_precision()}
        try:
            row["forward"] = time_call(lambda: call(), target_s)
            o = call()
            row["backward"] = time_call(lambda: torch.autograd.grad(o, leaves, do, retain_graph=True), target_s)
            row["kernels"] = kernel_times(lambda: torch.autograd.grad(call(), leaves, do), 5)
        except Exception as exc:  # noqa: BLE001
            row["error"] = f"{type(exc).__name__}: {exc}"[:2000]
        out["rows"].append(row)
        print(json.dumps(row), flush=True)
    torch.set_float32_matmul_precision("highest")
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=("env", "long"))
    parser.add_argument("--out", required=True)
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (the CPU dry run)")
    parser.add_argument("--target-s", type=float, default=0.3, help="timed seconds per measurement")
    args = parser.parse_args(argv)
    if args.what == "env":
        result = env_record()
        print(json.dumps(result, indent=1))
    else:
        result = {"long": long_shape(args.tiny, args.target_s),
                  "official_kernels": official_kernels(args.tiny, args.target_s)}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    failed = [r for r in result.get("long", {}).get("rows", []) if "error" in r]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
