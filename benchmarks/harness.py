"""What every benchmark shares: providers, machine rates, the timed modes, memory measurement and the record.

A benchmark is a :class:`Case` (a module whose ``forward`` takes the inputs, the inputs, and the FLOP/byte counts of
:mod:`avkernels.flops`) run by one *provider* in one *mode*:

providers
    ``reference`` (eager PyTorch, the baseline every ratio is against), ``torch_compile`` (the reference module
    under ``torch.compile`` with default options), and each fused backend of :func:`avkernels.backends` that runs on
    the device (``cpp`` on CPU; ``triton``/``cuda`` on GPU; the Triton interpreter is never benchmarked), and on
    request ``default`` (``backend=None``: whatever the library's dispatch picks for the inputs).
precisions
    a provider name may end in ``-bf16`` or ``-fp16`` (``reference-bf16``, ``cpp-bf16``, ...): the forward then runs
    under ``torch.autocast(device, dtype)``, as a user's mixed-precision training would; the inputs and the module's
    parameters stay fp32 (autocast and the library's ops cast them), and backward and the optimizer run outside the
    autocast region, as PyTorch recommends. A bare name is fp32. A provider that cannot run a precision (an op
    without 16-bit kernels) is recorded with its error in ``FAILURES`` instead of stopping the run.
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

import contextlib
import functools
import math
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

import avkernels
import roofs
from avkernels.dispatch import OPS, preference
from avkernels.flops import Cost

LOAD_AT_START = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
BASELINES = ("reference", "torch_compile")
# "-<suffix>" of a provider name -> the autocast dtype of its forward; fp32 is the bare name
PRECISIONS: Dict[str, Optional[torch.dtype]] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
ITEMSIZE = {"fp32": 4, "bf16": 2, "fp16": 2}
# what failed, for the record (conftest.py adds it to the JSON): op, shape, sizes, mode, provider, error
FAILURES: List[Dict[str, object]] = []
MIN_ROUNDS = 3
MAX_ROUNDS = 50
COMPILE_SUSPECT_S = 5.0  # a first call slower than this may have been compiling (Triton): warm up once more


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def fused_backends(dev: torch.device) -> List[str]:
    """The fused backends that can run on ``dev`` for real (never the Triton interpreter)."""
    runnable = {"cpu": ("cpp",), "cuda": ("triton", "cuda")}[dev.type]
    return [name for name in avkernels.backends() if name in runnable]


def providers(dev: torch.device, precisions: Sequence[str] = ("fp32",)) -> List[str]:
    """Every provider of this device at each of ``precisions``, fp32 first."""
    impls = list(BASELINES) + fused_backends(dev)
    return [provider_name(impl, precision) for precision in precisions for impl in impls]


def provider_name(impl: str, precision: str) -> str:
    return impl if precision == "fp32" else f"{impl}-{precision}"


def split_provider(provider: str) -> Tuple[str, str]:
    """``"cpp-bf16"`` -> ``("cpp", "bf16")``; ``"cpp"`` -> ``("cpp", "fp32")``."""
    impl, _, suffix = provider.rpartition("-")
    if impl and suffix in PRECISIONS:
        return impl, suffix
    return provider, "fp32"


def implementations(dev: torch.device) -> List[str]:
    """What a provider name may start with on ``dev``."""
    return list(BASELINES) + ["default"] + fused_backends(dev)


def module_backend(impl: str) -> Optional[str]:
    """The ``backend=`` argument a provider's module is built with."""
    if impl in BASELINES:
        return "reference"
    return None if impl == "default" else impl


def autocast(dev: torch.device, precision: str):
    dtype = PRECISIONS[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(dev.type, dtype=dtype)


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


def _gemm_gflops(dev: torch.device, dtype: torch.dtype, n: int, repeats: int) -> Dict[str, float]:
    """GFLOP/s of an ``n x n x n`` product in two layouts: ``a @ b`` (both row-major) and ``a @ b.T`` (the
    layout of ``nn.Linear``'s forward). Where a dtype has no optimised kernel they differ by far more than for
    fp32: bf16 on an AVX2 Zen 3 without AVX-512 BF16 or AMX ran 1.0 GFLOP/s in the first and 21 in the second."""
    a = torch.randn(n, n, device=dev).to(dtype)
    b = torch.randn(n, n, device=dev).to(dtype)
    flops = 2 * n**3 / 1e9
    return {
        "nn": flops / _best_time(lambda: torch.mm(a, b), dev, repeats),
        "nt": flops / _best_time(lambda: torch.mm(a, b.t()), dev, repeats),
    }


@functools.lru_cache(maxsize=None)
def machine_rates(dev_type: str, quick: bool = False) -> Dict[str, float]:
    """What torch reaches on this machine (GEMM FLOP/s per dtype, copy bandwidth, ``torch.tanh`` throughput) and,
    on CPU, the physical peaks of ``roofs.py`` at the current thread count (``peak_*``), which the floors use: torch's
    rates are no limit for the kernels (their own tanh beats ``torch.tanh``), so they stay for reference only, and
    for the GPU, which has no peaks measurement yet.

    ``matmul_gflops``: the fp32 GEMM, the better of the two layouts of :func:`_gemm_gflops` (2048 on CPU, 8192 on
    GPU). ``matmul_gflops_bf16`` / ``matmul_gflops_fp16``: the same for 16-bit inputs (torch accumulates them in
    fp32); on CPU at 1024, since where the dtype has no fast kernel a 2048 product takes 10-20 s; the
    ``..._nn``/``..._nt`` entries keep both layouts. ``bandwidth_gbs``: bytes read plus written by copying a
    256 MiB tensor. ``tanh_gelems``: ``torch.tanh`` on a 4 MiB fp32 tensor (L2/L3-resident on CPU), in billions of
    elements per second. Each is the fastest of 7 timed calls (5 for the 16-bit GEMMs). ``quick`` (the smoke level)
    uses sizes 16 times smaller and 2 calls: a check that the code runs, not a measurement.
    """
    dev = torch.device(dev_type)
    n = 8192 if dev.type == "cuda" else 2048
    n16 = n if dev.type == "cuda" else 1024
    shrink, repeats, repeats16 = (16, 2, 2) if quick else (1, 7, 5)
    if quick:
        n, n16 = n // 4, n16 // 8
    rates: Dict[str, float] = {}
    for name, dtype, size, reps in (("", torch.float32, n, repeats), ("_bf16", torch.bfloat16, n16, repeats16),
                                    ("_fp16", torch.float16, n16, repeats16)):
        by_layout = _gemm_gflops(dev, dtype, size, reps)
        rates[f"matmul_gflops{name}"] = max(by_layout.values())
        rates.update({f"matmul_gflops{name}_{layout}": v for layout, v in by_layout.items()})
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
    rates.update({
        "bandwidth_gbs": 2 * big.numel() * big.element_size() / copy / 1e9,
        "tanh_gelems": reps * small.numel() / tanh / 1e9,
    })
    if dev.type == "cpu":
        try:
            rates.update(roofs.rates(roofs.peaks(), torch.get_num_threads()))
        except (OSError, RuntimeError, ValueError) as exc:  # no compiler: the floors use torch's rates, and say so
            rates["peak_error"] = failure_reason(exc)
    return rates


def floor_seconds(cost: Cost, rates: Dict[str, float], precision: str = "fp32") -> float:
    """The roofline floor of ``cost`` (counted at ``precision``'s element size) at ``precision``'s roofs: the
    slowest of its matmul, memory-traffic and tanh times at this machine's physical peaks (``roofs.py``)."""
    return roofs.floor_seconds(cost.flops, cost.bytes, cost.transcendentals, rates, precision)


def best_floor_seconds(costs: Dict[str, Cost], rates: Dict[str, float]) -> Tuple[float, str]:
    """The lowest floor over the precisions in ``costs`` (precision -> the cost counted at its element size),
    with the precision that reaches it: how fast the machine could possibly run the computation, whatever
    arithmetic a provider chooses."""
    return min((floor_seconds(cost, rates, p), p) for p, cost in costs.items())


def cpu_model() -> str:
    name = roofs.cpu_identity()["model_name"]
    return name if name != "?" else platform.processor() or platform.machine()


def _cpp_features() -> Optional[Dict[str, object]]:
    """The cpp extension's view of the CPU (ISA variant, 16-bit hardware, how it computes 16-bit inputs)."""
    if "cpp" not in avkernels.backends():
        return None
    return avkernels.cpu_features()


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
        "cpp_cpu_features": _cpp_features(),
        "device": dev.type,
        "gpu_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None,
        # other work on the machine while the suite ran (1-minute load average at the start and at the end)
        "load_average_start": LOAD_AT_START,
        "load_average_end": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }
    # the roofs are peak rates: keep the better of the start-of-run measurement and a fresh one at the end
    start, end = machine_rates(dev.type, quick), machine_rates.__wrapped__(dev.type, quick)
    info.update({name: max(start[name], end[name]) if isinstance(start[name], float) else start[name]
                 for name in start})
    best = max(("fp32", "bf16", "fp16"), key=lambda p: roofs.gemm_roof(info, p))
    info["matmul_best_precision"] = best
    info["matmul_gflops_best"] = roofs.gemm_roof(info, best)
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
        cost: ``(mode, itemsize) -> avkernels.flops.Cost`` (``itemsize``: bytes per element of the precision).
        graded_outputs: how many leading outputs the loss uses (``None``: all).
    """

    op: str
    shape: str
    params: Dict[str, object]
    make_module: Callable[[str], nn.Module]
    make_inputs: Callable[[torch.device, bool], List[torch.Tensor]]
    cost: Callable[[str, int], Cost]
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
    compiles each graph once and recompiles only for what changes (shape, train/eval), as in real use. Each
    precision has its own instance (same seed, same weights), so that a graph compiled under autocast is never the
    one an fp32 row times."""
    key = (case.op, case.key, provider)
    if key not in _MODULES:
        impl, _ = split_provider(provider)
        torch.manual_seed(0)
        module = case.make_module(module_backend(impl)).to(dev)
        _MODULES[key] = torch.compile(module) if impl == "torch_compile" else module
    return _MODULES[key]


def _as_tuple(out) -> Tuple[torch.Tensor, ...]:
    return out if isinstance(out, tuple) else (out,)


def build_mode(case: Case, provider: str, mode: str, dev: torch.device):
    """``(setup, fn)`` for ``benchmark.pedantic``: ``setup()`` returns ``(args, kwargs)``, ``fn(*args)`` is timed."""
    module = _module(case, provider, dev)
    _, precision = split_provider(provider)
    training = mode != "inference"
    torch.manual_seed(1)
    inputs = case.make_inputs(dev, training)
    params = [p for p in module.parameters() if p.requires_grad]
    leaves = [x for x in inputs if x.requires_grad] + params
    optimizer = torch.optim.Adam(params, lr=0.0) if mode == "train" and params else None  # see ``train`` above
    grads: List[torch.Tensor] = []

    def forward():
        with autocast(dev, precision):
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

    # The module is shared by every mode and batch of its provider, and a caller may build several rows before it
    # times them (compare.py builds every row, then interleaves them): a mode set here, at build time, would be the
    # last-built row's mode when an earlier row is timed. So every setup, i.e. every timed call, sets it.
    mode_free_setup = setup

    def setup():  # noqa: F811 - the same setup, in this row's mode
        module.train(training)
        return mode_free_setup()

    if dev.type == "cuda":
        timed = fn

        def fn(*args):  # noqa: F811 - the synchronised version of the same call
            out = timed(*args)
            torch.cuda.synchronize(dev)
            return out

    return setup, fn


# How a call is timed: "wall" (time.perf_counter, the default) or "cpu" (time.process_time, the CPU time of this
# process): with one torch thread on a machine shared with other work, CPU time leaves out the time the process
# waited for a core, which wall time counts (on a 2-core machine at load average 10, several times the call).
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def _timed_call(setup, fn, dev: torch.device, clock: str = "wall") -> float:
    now = CLOCKS[clock]
    args, kwargs = setup()
    start = now()
    fn(*args, **kwargs)
    synchronize(dev)
    return now() - start


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


class ProviderFailed(Exception):
    """A provider could not run a case (recorded in ``FAILURES``); the message is the reason."""


def _labels(case: Case, provider: str, mode: str, dev: torch.device) -> Dict[str, object]:
    impl, precision = split_provider(provider)
    labels: Dict[str, object] = {"op": case.op, "shape": case.shape, "provider": provider, "impl": impl,
                                 "precision": precision, "mode": mode, "device": dev.type}
    if impl == "default":
        labels["resolved_backend"], labels["passed_over"] = resolved_backend(case, dev)
    labels.update(case.params)
    return labels


def _dispatch_record() -> Dict[str, Dict[str, str]]:
    """The dispatch's record of what the last ``backend=None`` call of each op passed over (``{}``: its first
    choice ran). Private to avkernels.dispatch; read here because ``backend_status(op)`` cannot tell an op that was
    not called from one whose first choice ran."""
    return getattr(sys.modules["avkernels.dispatch"], "_PASSED_OVER", {})


def forget_dispatch() -> None:
    """Clear the record before a provider's call, so that :func:`resolved_backend` reports only its ops."""
    _dispatch_record().clear()


def resolved_backend(case: Case, dev: torch.device) -> Tuple[str, Dict[str, str]]:
    """What ``backend=None`` picked for each fused op called since :func:`forget_dispatch`: the first backend of the
    device's preference order that the dispatch did not pass over, and the reasons of those it passed over, by op."""
    record = _dispatch_record()
    picks, passed_over = {}, {}
    for op in OPS:
        if op not in record:
            continue
        picks[op] = next((name for name in preference(dev.type) if name not in record[op]), "?")
        if record[op]:
            passed_over[op] = "; ".join(f"{name}: {why}" for name, why in record[op].items())
    if not picks:
        return "no fused op called", passed_over
    if len(set(picks.values())) == 1:
        return next(iter(picks.values())), passed_over
    return ", ".join(f"{op}: {pick}" for op, pick in picks.items()), passed_over


def failure_reason(exc: BaseException) -> str:
    """One line: the exception's type and the first line of its message (the library's errors name the op, the
    backend and what it cannot do on the first line)."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


def run(benchmark, case: Case, provider: str, mode: str, *, target_s: float = 1.0, smoke: bool = False) -> None:
    """Time ``case`` under ``provider`` and ``mode`` with ``benchmark.pedantic`` and record everything in
    ``benchmark.extra_info``. If the provider fails, the failure goes to ``FAILURES`` and :class:`ProviderFailed`
    is raised with the reason."""
    dev = device()
    try:
        _run(benchmark, case, provider, mode, dev, target_s=target_s, smoke=smoke)
    except Exception as exc:
        reason = failure_reason(exc)
        FAILURES.append(dict(_labels(case, provider, mode, dev), error=reason))
        raise ProviderFailed(reason) from exc


def costs_by_precision(case: Case, mode: str) -> Dict[str, Cost]:
    return {p: case.cost(mode, ITEMSIZE[p]) for p in PRECISIONS}


def _run(benchmark, case: Case, provider: str, mode: str, dev: torch.device, *, target_s: float,
         smoke: bool) -> None:
    forget_dispatch()
    setup, fn = build_mode(case, provider, mode, dev)
    if smoke:
        rounds = 1
    else:
        once = _timed_call(setup, fn, dev)  # compiles (torch.compile, Triton) and warms caches
        if split_provider(provider)[0] == "torch_compile" or once > COMPILE_SUSPECT_S:
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

    forget_dispatch()
    peak, retained = _cuda_peak(setup, fn, dev) if dev.type == "cuda" else _cpu_peak(setup, fn)
    precision = split_provider(provider)[1]
    costs = costs_by_precision(case, mode)
    cost = costs[precision]
    rates = machine_rates(dev.type, smoke)
    best_floor, best_precision = best_floor_seconds(costs, rates)
    info = benchmark.extra_info
    info.update(_labels(case, provider, mode, dev))
    info.update(cost.as_dict())
    info.update({f"bytes_{p}": c.bytes for p, c in costs.items()})
    info.update({"peak_bytes": int(peak), "retained_bytes": int(retained),
                 "floor_s": floor_seconds(cost, rates, precision),
                 "best_floor_s": best_floor, "best_floor_precision": best_precision})
    median = benchmark.stats.stats.median if benchmark.stats else None
    if events:
        torch.cuda.synchronize(dev)
        event_times = sorted(s.elapsed_time(e) / 1e3 for s, e in events[-rounds:])
        info["cuda_event_median_s"] = event_times[len(event_times) // 2]
        median = info["cuda_event_median_s"]
    if median:
        info["median_s"] = median
        info["fraction_of_floor"] = info["floor_s"] / median
        info["fraction_of_best_floor"] = best_floor / median
        info["gflops_achieved"] = cost.flops / median / 1e9


def rand(dev: torch.device, requires_grad: bool, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, device=dev).requires_grad_(requires_grad)


def features(dims: Sequence[int], batch: int, seq_len: int):
    """``make_inputs`` for a fusion model: one ``(B, L, d_m)`` tensor per modality."""

    def make(dev: torch.device, requires_grad: bool) -> List[torch.Tensor]:
        return [rand(dev, requires_grad, batch, seq_len, d) for d in dims]

    return make
