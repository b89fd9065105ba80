"""What every benchmark shares: providers, machine rates, the timed modes, memory measurement and the record.

A benchmark is a :class:`Case` (a module whose ``forward`` takes the inputs, the inputs, and the FLOP/byte counts of
:mod:`avkernels.flops`) run by one *provider* in one *mode*:

providers
    ``reference`` (eager PyTorch, the baseline every ratio is against), ``torch_compile`` (the reference module
    under ``torch.compile`` with default options), and each fused backend of :func:`avkernels.backends` that runs on
    the device (``cpp`` on CPU; ``triton``/``cuda`` on GPU; the Triton interpreter is never benchmarked).
modes
    ``forward`` (training mode: dropout on, graph recorded), ``backward`` (the gradients of a recorded forward;
    the forward runs untimed before each round), ``full`` for ops / ``train`` for models (forward + backward, and
    for models an Adam step with learning rate 0: the same arithmetic as training, but every round and every
    provider times the same weights; a model whose gates drift into saturation round after round would time
    differently per provider, since saturated gates make subnormal numbers that slow plain PyTorch on x86),
    ``inference`` (eval mode under ``torch.no_grad``).
time
    ``benchmark.pedantic`` after one untimed warm-up call (two for ``torch_compile`` and for any first call slower
    than ``COMPILE_SUSPECT_S``, since the first compiles); the last warm-up call sizes the number of rounds to about
    ``--bench-target-s`` seconds, at least ``MIN_ROUNDS``. On GPU every timed call ends
    in ``torch.cuda.synchronize()`` and CUDA events time each round too (``cuda_event_median_s``).
memory
    one more call after timing. ``peak_bytes``: the highest amount of memory allocated during the call above what
    was allocated when it started (GPU: ``torch.cuda.max_memory_allocated``; CPU: the running sum of every
    allocation and free of PyTorch's CPU allocator, recorded by ``torch.profiler`` with ``profile_memory=True``).
    ``retained_bytes``: what is still allocated when the call returns and its result is held (in ``forward`` mode:
    the outputs plus everything saved for backward).
"""

from __future__ import annotations

import functools
import math
import os
import platform
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

import avkernels
from avkernels.flops import Cost

LOAD_AT_START = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
BASELINES = ("reference", "torch_compile")
MIN_ROUNDS = 3
MAX_ROUNDS = 50
COMPILE_SUSPECT_S = 5.0  # a first call slower than this may have been compiling (Triton): warm up once more


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def fused_backends(dev: torch.device) -> List[str]:
    """The fused backends that can run on ``dev`` for real (never the Triton interpreter)."""
    runnable = {"cpu": ("cpp",), "cuda": ("triton", "cuda")}[dev.type]
    return [name for name in avkernels.backends() if name in runnable]


def providers(dev: torch.device) -> List[str]:
    return list(BASELINES) + fused_backends(dev)


def synchronize(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _best_time(fn: Callable[[], object], dev: torch.device, repeats: int) -> float:
    """The fastest of ``repeats`` calls after one warm-up: a roof is a peak rate, and on a loaded machine the
    fastest call is the one least disturbed."""
    fn()
    synchronize(dev)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(dev)
        times.append(time.perf_counter() - start)
    return min(times)


@functools.lru_cache(maxsize=None)
def machine_rates(dev_type: str, quick: bool = False) -> Dict[str, float]:
    """The roofs of this machine, measured with torch: fp32 GEMM FLOP/s, copy bandwidth, tanh throughput.

    ``matmul_gflops``: a square fp32 GEMM (2048 on CPU, 8192 on GPU). ``bandwidth_gbs``: bytes read plus written
    by copying a 256 MiB tensor. ``tanh_gelems``: ``torch.tanh`` on a 4 MiB tensor (L2/L3-resident on CPU), in
    billions of elements per second. Each is the fastest of 7 timed calls. ``quick`` (the smoke level) uses
    sizes 16 times smaller and 2 calls: a check that the code runs, not a measurement.
    """
    dev = torch.device(dev_type)
    n = 8192 if dev.type == "cuda" else 2048
    shrink, repeats = (16, 2) if quick else (1, 7)
    n //= 4 if quick else 1
    a, b = torch.randn(n, n, device=dev), torch.randn(n, n, device=dev)
    gemm = _best_time(lambda: torch.mm(a, b), dev, repeats)
    big = torch.empty(64 * 2**20 // shrink, device=dev)
    big_out = torch.empty_like(big)
    copy = _best_time(lambda: big_out.copy_(big), dev, repeats)
    small = torch.randn(2**20 // shrink, device=dev)
    small_out = torch.empty_like(small)
    reps = 64 if dev.type == "cuda" else 4

    def tanh_loop():
        for _ in range(reps):
            torch.tanh(small, out=small_out)

    tanh = _best_time(tanh_loop, dev, repeats)
    return {
        "matmul_gflops": 2 * n**3 / gemm / 1e9,
        "bandwidth_gbs": 2 * big.numel() * big.element_size() / copy / 1e9,
        "tanh_gelems": reps * small.numel() / tanh / 1e9,
    }


def floor_seconds(cost: Cost, rates: Dict[str, float]) -> float:
    """The roofline floor of ``cost``: the slowest of its matmul, memory-traffic and tanh times at this machine's
    measured rates."""
    return max(
        cost.flops / (rates["matmul_gflops"] * 1e9),
        cost.bytes / (rates["bandwidth_gbs"] * 1e9),
        cost.transcendentals / (rates["tanh_gelems"] * 1e9),
    )


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(dev: torch.device, quick: bool = False) -> Dict[str, object]:
    """The machine, versions and roofs, for pytest-benchmark's ``machine_info`` (called at the end of the run)."""
    info: Dict[str, object] = {
        "cpu_model": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "avkernels_version": avkernels.__version__,
        "avkernels_backends": avkernels.backends(),
        "avkernels_backend_status": avkernels.backend_status(),  # why a backend is missing from the results
        "device": dev.type,
        "gpu_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None,
        # other work on the machine while the suite ran (1-minute load average at the start and at the end)
        "load_average_start": LOAD_AT_START,
        "load_average_end": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }
    # the roofs are peak rates: keep the better of the start-of-run measurement and a fresh one at the end
    start, end = machine_rates(dev.type, quick), machine_rates.__wrapped__(dev.type, quick)
    info.update({name: max(start[name], end[name]) for name in start})
    return info


@dataclass
class Case:
    """One benchmarked computation at one shape.

    Attributes:
        op: what is measured (``"tanh_attention"``, ``"gate"``, ``"RJCA"``, ...).
        shape: a label for the shape family (``"official"``, ``"rjcma"``, ``"sweep_batch"``, ...).
        params: the sizes (``batch``, ``seq_len``, ``dims``, ...), recorded in ``extra_info``.
        make_module: ``backend -> nn.Module`` whose ``forward(*inputs)`` returns a tensor or a tuple of tensors.
        make_inputs: ``(device, requires_grad) -> list of tensors``.
        cost: ``mode -> avkernels.flops.Cost``.
        graded_outputs: how many leading outputs the loss uses (``None``: all).
    """

    op: str
    shape: str
    params: Dict[str, object]
    make_module: Callable[[str], nn.Module]
    make_inputs: Callable[[torch.device, bool], List[torch.Tensor]]
    cost: Callable[[str], Cost]
    graded_outputs: Optional[int] = None
    key: Tuple = field(default=(), repr=False)

    @property
    def id(self) -> str:
        return f"{self.op}-{self.shape}-B{self.params['batch']}-L{self.params['seq_len']}"


class Unavailable(Exception):
    """Raised by a ``cases`` function whose subject cannot run here; the message is the skip reason."""


def benchmarks(cases: Callable[[str], List["Case"]], modes: Sequence[str]):
    """Marks a test function as a benchmark over ``cases(level)`` x ``modes`` x providers (see conftest.py)."""

    def mark(test):
        test.bench_cases, test.bench_modes = cases, tuple(modes)
        return test

    return mark


_MODULES: Dict[Tuple, nn.Module] = {}


def _module(case: Case, provider: str, dev: torch.device) -> nn.Module:
    """One module per (op, configuration, provider), shared by every mode and batch size, so that torch.compile
    compiles each graph once and recompiles only for what changes (shape, train/eval), as in real use."""
    key = (case.op, case.key, provider)
    if key not in _MODULES:
        torch.manual_seed(0)
        backend = "reference" if provider in BASELINES else provider
        module = case.make_module(backend).to(dev)
        _MODULES[key] = torch.compile(module) if provider == "torch_compile" else module
    return _MODULES[key]


def _as_tuple(out) -> Tuple[torch.Tensor, ...]:
    return out if isinstance(out, tuple) else (out,)


def build_mode(case: Case, provider: str, mode: str, dev: torch.device):
    """``(setup, fn)`` for ``benchmark.pedantic``: ``setup()`` returns ``(args, kwargs)``, ``fn(*args)`` is timed."""
    module = _module(case, provider, dev)
    training = mode != "inference"
    module.train(training)
    torch.manual_seed(1)
    inputs = case.make_inputs(dev, training)
    params = [p for p in module.parameters() if p.requires_grad]
    leaves = [x for x in inputs if x.requires_grad] + params
    optimizer = torch.optim.Adam(params, lr=0.0) if mode == "train" and params else None  # see ``train`` above
    grads: List[torch.Tensor] = []

    def forward():
        return _as_tuple(module(*inputs))[: case.graded_outputs]

    def backward(outs):
        if not grads:  # fixed random output gradients, drawn once
            grads.extend(torch.randn_like(o) for o in outs)
        torch.autograd.backward(outs, grads)

    def clear_grads():
        for x in leaves:
            x.grad = None

    if mode == "forward":
        def setup():
            return (), {}

        def fn():
            return forward()
    elif mode == "backward":
        def setup():
            clear_grads()
            outs = forward()
            synchronize(dev)
            return (outs,), {}

        def fn(outs):
            backward(outs)
    elif mode in ("full", "train"):
        def setup():
            clear_grads()
            return (), {}

        def fn():
            backward(forward())
            if optimizer is not None:
                optimizer.step()
    elif mode == "inference":
        def setup():
            return (), {}

        def fn():
            with torch.no_grad():
                return forward()
    else:
        raise ValueError(f"mode: unknown {mode!r}")

    if dev.type == "cuda":
        timed = fn

        def fn(*args):  # noqa: F811 - the synchronised version of the same call
            out = timed(*args)
            torch.cuda.synchronize(dev)
            return out

    return setup, fn


def _timed_call(setup, fn, dev: torch.device) -> float:
    args, kwargs = setup()
    start = time.perf_counter()
    fn(*args, **kwargs)
    synchronize(dev)
    return time.perf_counter() - start


def _cpu_peak(setup, fn) -> Tuple[int, int]:
    from torch.profiler import ProfilerActivity, profile

    args, kwargs = setup()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn(*args, **kwargs)  # noqa: F841 - held so that retained memory counts the outputs
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    current = peak = 0
    for event in events:
        if str(event.device_type()) == "DeviceType.CPU":
            current += event.nbytes()
            peak = max(peak, current)
    return peak, current


def _cuda_peak(setup, fn, dev) -> Tuple[int, int]:
    args, kwargs = setup()
    torch.cuda.synchronize(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    base = torch.cuda.memory_allocated(dev)
    result = fn(*args, **kwargs)  # noqa: F841
    torch.cuda.synchronize(dev)
    return torch.cuda.max_memory_allocated(dev) - base, torch.cuda.memory_allocated(dev) - base


def run(benchmark, case: Case, provider: str, mode: str, *, target_s: float = 1.0, smoke: bool = False) -> None:
    """Time ``case`` under ``provider`` and ``mode`` with ``benchmark.pedantic`` and record everything in
    ``benchmark.extra_info``."""
    dev = device()
    setup, fn = build_mode(case, provider, mode, dev)
    if smoke:
        rounds = 1
    else:
        once = _timed_call(setup, fn, dev)  # compiles (torch.compile, Triton) and warms caches
        if provider == "torch_compile" or once > COMPILE_SUSPECT_S:
            once = _timed_call(setup, fn, dev)  # the first call may have compiled: size the rounds on a second
        rounds = int(min(MAX_ROUNDS, max(MIN_ROUNDS, math.ceil(target_s / max(once, 1e-6)))))

    events: List[Tuple[torch.cuda.Event, torch.cuda.Event]] = []
    timed = fn
    if dev.type == "cuda":
        def timed(*args, **kwargs):  # noqa: F811 - the same call, bracketed by CUDA events
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = fn(*args, **kwargs)
            end.record()
            events.append((start, end))
            return out

    benchmark.pedantic(timed, setup=setup, rounds=rounds, iterations=1)

    peak, retained = _cuda_peak(setup, fn, dev) if dev.type == "cuda" else _cpu_peak(setup, fn)
    cost = case.cost(mode)
    rates = machine_rates(dev.type, smoke)
    info = benchmark.extra_info
    info.update({"op": case.op, "shape": case.shape, "provider": provider, "mode": mode, "device": dev.type})
    info.update(case.params)
    info.update(cost.as_dict())
    info.update({"peak_bytes": int(peak), "retained_bytes": int(retained), "floor_s": floor_seconds(cost, rates)})
    median = benchmark.stats.stats.median if benchmark.stats else None
    if events:
        torch.cuda.synchronize(dev)
        event_times = sorted(s.elapsed_time(e) / 1e3 for s, e in events[-rounds:])
        info["cuda_event_median_s"] = event_times[len(event_times) // 2]
        median = info["cuda_event_median_s"]
    if median:
        info["median_s"] = median
        info["fraction_of_floor"] = info["floor_s"] / median
        info["gflops_achieved"] = cost.flops / median / 1e9


def rand(dev: torch.device, requires_grad: bool, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, device=dev).requires_grad_(requires_grad)


def features(dims: Sequence[int], batch: int, seq_len: int):
    """``make_inputs`` for a fusion model: one ``(B, L, d_m)`` tensor per modality."""

    def make(dev: torch.device, requires_grad: bool) -> List[torch.Tensor]:
        return [rand(dev, requires_grad, batch, seq_len, d) for d in dims]

    return make
