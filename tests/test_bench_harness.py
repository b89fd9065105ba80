"""The benchmark harness times what a row names: every training row (forward, backward, full, train) runs its module
in training mode with dropout drawing, every inference row in eval mode, whichever rows were built before it and in
whatever order they are timed (the pytest suite builds and times one row at a time; compare.py builds every row,
then interleaves them; profile_step.py builds, warms and profiles)."""

import os
import sys

import pytest
import torch
from torch import nn

import avkernels
from avkernels.flops import Cost

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import compare  # noqa: E402
import harness  # noqa: E402
import profile_step  # noqa: E402

TRAINING_MODES = ("forward", "backward", "full", "train")
MODES = TRAINING_MODES + ("inference",)
CPU = torch.device("cpu")


class Probe(nn.Module):
    """Records, at every call, whether it ran in training mode and whether its dropout dropped anything."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(3))
        self.calls = []

    def forward(self, x):
        dropped = nn.functional.dropout(torch.ones(512), 0.5, self.training)
        self.calls.append({"training": self.training, "dropout": bool((dropped == 0).any())})
        return x * self.weight


def probe_case(key):
    """A case whose provider modules are all one Probe per ``key``, as the real cases share one per provider."""
    return harness.Case("probe", "tiny", {"batch": 2, "seq_len": 3}, lambda backend: Probe(),
                        lambda dev, grad: [harness.rand(dev, grad, 2, 3)], cost=lambda mode, itemsize=4: Cost(),
                        key=(key,))


def expect(mode):
    training = mode != "inference"
    return {"training": training, "dropout": training}


def module_of(case, provider="reference"):
    return harness._module(case, provider, CPU)


@pytest.mark.parametrize("order", [MODES, tuple(reversed(MODES))], ids=["inference-built-last", "inference-first"])
def test_rows_built_together_are_timed_in_their_own_mode(order):
    case = probe_case(f"together-{order[0]}")
    rows = {mode: harness.build_mode(case, "reference", mode, CPU) for mode in order}  # every row built first
    probe = module_of(case)
    for mode in order + order:  # then timed, twice over, as interleaved rounds do
        del probe.calls[:]
        harness._timed_call(*rows[mode], CPU)
        assert probe.calls, mode
        assert probe.calls[-1] == expect(mode), f"{mode} row ran with {probe.calls[-1]}"


def test_memory_call_runs_in_the_rows_mode():
    case = probe_case("memory")
    train = harness.build_mode(case, "reference", "train", CPU)
    harness.build_mode(case, "reference", "inference", CPU)
    probe = module_of(case)
    harness._cpu_peak(*train)
    assert probe.calls[-1] == expect("train")


def test_compare_interleaved_rows_run_in_their_mode():
    """compare.py's own flow: prepare every entry (train and inference of one provider), then interleaved rounds."""
    case = probe_case("compare")
    entries = [compare.Entry(case, mode, "reference") for mode in ("train", "inference")]
    for entry in entries:
        compare.prepare(entry, CPU)
        assert entry.error is None, entry.error
    probe = module_of(case)
    seen = []
    for entry in entries:  # what each entry's timed call saw, round after round
        fn = entry.fn

        def recording(*args, _fn=fn, _mode=entry.mode, **kwargs):
            out = _fn(*args, **kwargs)
            seen.append((_mode, probe.calls[-1]))
            return out

        entry.fn = recording
    assert compare.interleave(entries, CPU, rounds=3, min_rounds=3, budget_s=60) == 3
    assert len(seen) == 6
    for mode, call in seen:
        assert call == expect(mode), f"{mode} row ran with {call}"


def test_profiled_training_step_runs_in_training_mode():
    case = probe_case("profile")
    harness.build_mode(case, "reference", "inference", CPU)
    profile_step.breakdown(case, "reference", "train", steps=1)
    assert all(call == expect("train") for call in module_of(case).calls)


class FakeBenchmark:
    """pytest-benchmark's ``benchmark`` as harness.run uses it: pedantic rounds of setup + call."""

    stats = None

    def __init__(self):
        self.extra_info = {}

    def pedantic(self, fn, setup, rounds, iterations):
        for _ in range(rounds):
            args, kwargs = setup()
            fn(*args, **kwargs)


def test_suite_rows_run_in_their_mode_after_other_rows(monkeypatch):
    monkeypatch.setattr(harness, "machine_rates", lambda dev_type, quick=False: {  # the floors are not the subject
        "matmul_gflops": 1.0, "bandwidth_gbs": 1.0, "tanh_gelems": 1.0})
    case = probe_case("suite")
    probe = module_of(case)
    for mode in ("inference",) + TRAINING_MODES + ("inference",):
        del probe.calls[:]
        harness.run(FakeBenchmark(), case, "reference", mode, smoke=True)
        assert probe.calls and all(call == expect(mode) for call in probe.calls), (mode, probe.calls)


@pytest.mark.parametrize("provider", ["reference"] + (["cpp"] if "cpp" in avkernels.backends() else []))
def test_fusion_model_training_row_runs_every_submodule_in_training_mode(provider):
    """A real fusion model (GRJCA, tiny dims): after its inference row is built, the training row's timed call runs
    the model and every submodule in training mode (which is what turns on the blocks' dropout)."""
    from test_bench_fusion import fusion_case

    case = fusion_case("GRJCA", "tiny", (8, 6), 4, 2)
    train = harness.build_mode(case, provider, "train", CPU)
    harness.build_mode(case, provider, "inference", CPU)
    model = module_of(case, provider)
    states = []
    hooks = [m.register_forward_pre_hook(lambda m, args: states.append(m.training)) for m in model.modules()]
    try:
        harness._timed_call(*train, CPU)
    finally:
        for hook in hooks:
            hook.remove()
    assert states and all(states)
