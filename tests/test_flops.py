"""FLOP and byte counts of :mod:`avkernels.flops` against hand arithmetic and against torch's own FLOP counter, plus
a smoke test that the benchmark suite collects and one tiny benchmark runs (the suite itself is never timed here)."""

import json
import os
import subprocess
import sys

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import avkernels
from avkernels.flops import Cost, fusion_cost, gate_cost, linear_cost, lstm_cost, stage_gate_cost, tanh_attention_cost

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def counted_flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def test_cost_arithmetic():
    a = Cost(flops=1, recompute_flops=2, transcendentals=3, bytes=4)
    assert a + a == Cost(2, 4, 6, 8)
    assert 3 * a == a * 3 == Cost(3, 6, 9, 12)
    assert a.as_dict() == {"flops": 1, "recompute_flops": 2, "transcendentals": 3, "bytes": 4}


def test_tanh_attention_counts_by_hand():
    # B=2, Mq=3, N=5, D=7, E=11: the map has 30 elements
    fwd = tanh_attention_cost(2, 3, 5, 7, 11)
    assert fwd.flops == 2 * 30 * 7 + 2 * 30 * 11 == 1080
    assert fwd.transcendentals == 30 and fwd.recompute_flops == 0
    assert fwd.bytes == 4 * (2 * 3 * 7 + 2 * 5 * 7 + 2 * 5 * 11 + 2 * 3 * 11)
    bwd = tanh_attention_cost(2, 3, 5, 7, 11, mode="backward")
    assert bwd.flops == 2 * fwd.flops
    assert bwd.recompute_flops == 2 * 30 * 7 and bwd.transcendentals == 30
    assert bwd.bytes == 4 * (66 + 2 * (42 + 70 + 110))
    assert tanh_attention_cost(2, 3, 5, 7, 11, mode="full") == fwd + bwd
    act = tanh_attention_cost(2, 3, 5, 7, 11, activation="tanh_relu")
    assert act.transcendentals == 30 + 66 and act.flops == fwd.flops
    shared = tanh_attention_cost(2, 3, 5, 7, 11, shared_v=True, itemsize=8)
    assert shared.bytes == 8 * (42 + 70 + 55 + 66)


def test_gate_and_stage_gate_counts_by_hand():
    # B=2, L=3, d=5: 6 rows, 30 features
    g = gate_cost(2, 3, 5)
    assert g == Cost(flops=120, transcendentals=12, bytes=4 * (90 + 10 + 2 + 12))
    assert gate_cost(2, 3, 5, mode="backward") == Cost(flops=240, bytes=4 * (150 + 24 + 20 + 2))
    s = stage_gate_cost(2, 3, 5, 2)  # W is (2, 10)
    assert s == Cost(flops=2 * 6 * 10 * 2, transcendentals=12, bytes=4 * (60 + 22 + 30 + 12))
    assert stage_gate_cost(2, 3, 5, 2, mode="backward").flops == 2 * s.flops


def test_linear_counts_by_hand():
    assert linear_cost(4, 3, 2) == Cost(flops=48, bytes=4 * (12 + 6 + 2 + 8))
    assert linear_cost(4, 3, 2, bias=False, mode="backward") == Cost(flops=96, bytes=4 * (8 + 24 + 12))


@pytest.mark.parametrize("mode", ["forward", "full"])
def test_op_flops_match_torch_flop_counter(mode):
    q = torch.randn(3, 7, 5, requires_grad=True)
    k = torch.randn(3, 11, 5, requires_grad=True)
    v = torch.randn(3, 11, 13, requires_grad=True)

    def run():
        o = avkernels.tanh_attention(q, k, v, activation="tanh_relu", backend="reference")
        if mode == "full":
            o.backward(torch.ones_like(o))

    assert counted_flops(run) == tanh_attention_cost(3, 7, 11, 5, 13, mode=mode).flops
    attended, unattended = torch.randn(2, 3, 17, requires_grad=True), torch.randn(2, 3, 17, requires_grad=True)
    lin = torch.nn.Linear(17, 2)

    def run_gate():
        out, _ = avkernels.gate(attended, unattended, lin.weight, lin.bias, backend="reference")
        if mode == "full":
            out.sum().backward()

    assert counted_flops(run_gate) == gate_cost(2, 3, 17, mode=mode).flops


MODELS = [
    ("JCA", {}),
    ("RJCA", {"iterations": 3}),
    ("DCA", {}),
    ("GRJCA", {"stage_include_input": True}),
    ("RJCA", {"form": "additive", "hidden": 6}),
    ("GRJCA", {"form": "additive", "hidden": 6}),
]


@pytest.mark.parametrize("name,kwargs", MODELS, ids=[f"{n}-{k.get('form', 'dense')}" for n, k in MODELS])
@pytest.mark.parametrize("mode", ["forward", "train"])
def test_fusion_flops_match_torch_flop_counter(name, kwargs, mode):
    """The hand count of a whole fusion model equals what torch counts when the reference runs it."""
    dims, seq_len, batch = (6, 4, 5), 7, 3
    model = getattr(avkernels, name)(dims, seq_len, backend="reference", **kwargs)
    features = [torch.randn(batch, seq_len, d, requires_grad=True) for d in dims]

    def run():
        out = model(*features)
        if mode == "train":
            torch.autograd.backward(out, [torch.ones_like(o) for o in out])

    assert counted_flops(run) == fusion_cost(model, batch, mode=mode).flops


def test_fusion_cost_official_shape_by_hand():
    """RJCA at the official shape, forward: the cost model of docs/architecture.md, counted by hand."""
    model = avkernels.RJCA((512, 512), 16, backend="reference")
    b, l, d = 8, 16, 1024
    per_modality = 2 * b * l * 512 * 512 + 2 * b * 512 * l * l + 2 * b * d * 512 * (2 * l) + 2 * b * l * d * 512
    per_iteration = 2 * b * l * d * d + 2 * per_modality
    cost = fusion_cost(model, b)
    assert cost.flops == 2 * per_iteration
    assert cost.transcendentals == 2 * 2 * (b * d * 512 + b * d * l)
    assert fusion_cost(model, b, mode="backward").recompute_flops == 2 * 2 * (2 * b * d * 512 * l)


def test_bad_mode_is_named():
    with pytest.raises(ValueError, match="mode"):
        tanh_attention_cost(1, 1, 1, 1, 1, mode="sideways")


def test_benchmark_suite_collects_and_one_tiny_benchmark_runs(tmp_path):
    """The benchmark suite collects, and one tiny case (the gate, forward + backward, eager) runs once and records
    its counts and memory."""
    out = tmp_path / "bench.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [
        sys.executable, "-m", "pytest", "benchmarks", "-q", "-p", "no:cacheprovider", "--bench-smoke",
        "-k", "test_gate and tiny and full and reference", f"--benchmark-json={out}",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "deselected" in proc.stdout  # the whole suite was collected, the rest deselected
    report = json.loads(out.read_text())
    assert report["machine_info"]["matmul_gflops"] > 0
    bench = report["benchmarks"]
    assert len(bench) == 1
    info = bench[0]["extra_info"]
    assert info["provider"] == "reference" and info["op"] == "gate"
    assert info["flops"] == gate_cost(info["batch"], info["seq_len"], info["dim"], mode=info["mode"]).flops
    assert info["peak_bytes"] >= 0 and bench[0]["stats"]["rounds"] >= 1


def test_lstm_counts_by_hand():
    # B=2, L=3, in=5, H=4, two bidirectional layers: layer 2 reads 8 features
    cost = lstm_cost(2, 3, 5, 4, num_layers=2, bidirectional=True)
    steps = 2 * 3 * 2
    assert cost.flops == steps * 2 * 16 * (5 + 4) + steps * 2 * 16 * (8 + 4)
    assert cost.transcendentals == 2 * steps * 20
    assert lstm_cost(2, 3, 5, 4, mode="backward").flops == 2 * lstm_cost(2, 3, 5, 4).flops
