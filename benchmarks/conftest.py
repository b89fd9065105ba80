"""Benchmark-session setup: options, the parametrisation of every ``test_bench_*`` file, and the machine record.

Each benchmark is a test function decorated with ``@harness.benchmarks(cases, modes)``, where ``cases(level)``
returns a list of ``harness.Case``; it is run for every combination of case, mode and provider. ``level`` is ``"smoke"`` (tiny shapes, one
round: for the CI check that the suite runs), ``"default"`` or ``"full"`` (``--bench-full``: adds batch 64 and the
larger sweeps, slow on CPU).
"""

import os

# Benchmarks run real kernels only: never let the Triton interpreter stand in for a GPU.
if os.environ.get("TRITON_INTERPRET") == "1":
    os.environ["TRITON_INTERPRET"] = "0"

import pytest  # noqa: E402
import torch  # noqa: E402
import torch._dynamo.config  # noqa: E402

import harness  # noqa: E402

# Every benchmarked graph must really be compiled: a silent fall-back to eager after too many recompiles would
# report eager times under the torch_compile name.
torch._dynamo.config.recompile_limit = 256
torch._dynamo.config.accumulated_recompile_limit = 4096
torch._dynamo.config.fail_on_recompile_limit_hit = True


def pytest_addoption(parser):
    group = parser.getgroup("avkernels benchmarks")
    group.addoption("--bench-full", action="store_true", help="also run batch 64, RJCMA batch 12 and wide sweeps")
    group.addoption("--bench-smoke", action="store_true", help="tiny shapes, one round (CI check of the suite)")
    group.addoption("--bench-providers", default=None,
                    help="comma-separated providers (default: reference, torch_compile and every fused backend that "
                         "runs on this device, at each of --bench-precisions); a name may end in -bf16 or -fp16 "
                         "(its forward under torch.autocast with that dtype), and 'default' is backend=None")
    group.addoption("--bench-precisions", default="fp32",
                    help="comma-separated precisions of the default providers: fp32, bf16, fp16 (default: fp32); "
                         "ignored when --bench-providers names the providers")
    group.addoption("--bench-threads", type=int, default=None,
                    help="torch.set_num_threads for the run (default: torch's choice); 1 on a loaded shared machine, "
                         "where every multi-threaded op waits for its preempted threads")
    group.addoption("--bench-target-s", type=float, default=1.0,
                    help="approximate timed seconds per benchmark (rounds are sized to it, at least 3)")


def pytest_configure(config):
    threads = config.getoption("--bench-threads", default=None)
    if threads:
        torch.set_num_threads(threads)


def _level(config) -> str:
    if config.getoption("--bench-smoke"):
        return "smoke"
    return "full" if config.getoption("--bench-full") else "default"


def _split(option: str):
    return [p.strip() for p in option.split(",") if p.strip()]


def _providers(config):
    dev = harness.device()
    precisions = _split(config.getoption("--bench-precisions") or "fp32")
    unknown = [p for p in precisions if p not in harness.PRECISIONS]
    if unknown:
        raise pytest.UsageError(f"--bench-precisions: {unknown} unknown; known: {list(harness.PRECISIONS)}")
    wanted = config.getoption("--bench-providers")
    if not wanted:
        return harness.providers(dev, precisions)
    chosen = _split(wanted)
    impls = harness.implementations(dev)
    unknown = [p for p in chosen if harness.split_provider(p)[0] not in impls]
    if unknown:
        raise pytest.UsageError(f"--bench-providers: {unknown} not available here; available: {impls}, each "
                                f"optionally with -bf16 or -fp16")
    return chosen


def pytest_generate_tests(metafunc):
    test = metafunc.function
    if not hasattr(test, "bench_cases"):
        return
    providers = _providers(metafunc.config)
    level = _level(metafunc.config)
    try:
        cases = test.bench_cases(level)
    except harness.Unavailable as exc:
        cases, reason = [], str(exc)
    else:
        reason = f"no {test.__name__} cases at the {level!r} level"
    if not cases:
        skip = pytest.param(None, None, None, marks=pytest.mark.skip(reason=reason))
        metafunc.parametrize(("case", "mode", "provider"), [skip], ids=["unavailable"])
        return
    params, ids = [], []
    for case in cases:
        for mode in test.bench_modes:
            for provider in providers:
                params.append((case, mode, provider))
                ids.append(f"{case.id}-{mode}-{provider}")
    metafunc.parametrize(("case", "mode", "provider"), params, ids=ids)


@pytest.fixture
def bench(benchmark, request):
    """``bench(case, mode, provider)`` times one combination and records it (see :func:`harness.run`)."""
    smoke = _level(request.config) == "smoke"
    target_s = request.config.getoption("--bench-target-s")

    def run(case, mode, provider):
        try:
            harness.run(benchmark, case, provider, mode, target_s=target_s, smoke=smoke)
        except harness.ProviderFailed as exc:
            # A provider without 16-bit kernels is a finding for the table, not a broken suite; an fp32 failure is
            # a bug and fails the test (both are in the JSON's "failures").
            if harness.split_provider(provider)[1] != "fp32":
                pytest.xfail(str(exc))
            raise

    return run


def pytest_benchmark_update_json(config, benchmarks, output_json):
    output_json["failures"] = list(harness.FAILURES)


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info.update(harness.machine_info(harness.device(), quick=_level(config) == "smoke"))
