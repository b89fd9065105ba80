"""The three functional ops, each wrapped in a module so that every provider (and torch.compile) runs it alike.

Shapes:
- ``tanh_attention`` ``official``: one modality of the dense JCA block at the official setting (``Mq = d = 1024``,
  ``N = d_m = 512``, ``D = E = L = 16``, ``"tanh_relu"`` epilogue, dropout 0.6 in training).
- ``tanh_attention`` ``rjcma``: the video modality of RJCMA's block (``d = 256 + 128 + 128``, ``d_m = 256``,
  ``L = 300``).
- ``tanh_attention`` ``additive``: the CVPRW additive form (``q = K_m``, ``k = J^T``, a shared ``(d, 32)`` value).
- ``tanh_attention`` ``thin`` (the memory sweep): ``Mq = 1``, ``D = E`` in 1, 4, 16, no epilogue, at ``B = 64``,
  ``N = 20000`` (and ``B = 256``, ``N = 100000`` with ``--bench-full``).
- ``gate`` and ``stage_gate`` (``T = 2``) on ``(B, 16, 512)``, and the gate on RJCMA's ``(B, 300, 256)``.
"""

import math

import torch
from torch import nn

import avkernels
import harness
from avkernels.flops import gate_cost, stage_gate_cost, tanh_attention_cost

MODES = ("forward", "backward", "full", "inference")
DROPOUT = 0.6


class TanhAttention(nn.Module):
    def __init__(self, backend, scale, activation, shared_v=None):
        super().__init__()
        self.backend, self.scale, self.activation = backend, scale, activation
        self.shared_v = nn.Parameter(shared_v) if shared_v is not None else None

    def forward(self, q, k, v=None):
        v = self.shared_v if v is None else v
        return avkernels.tanh_attention(q, k, v, scale=self.scale, dropout_p=DROPOUT, training=self.training,
                                        activation=self.activation, backend=self.backend)


class Gate(nn.Module):
    def __init__(self, backend, dim):
        super().__init__()
        self.backend, self.linear = backend, nn.Linear(dim, 2)

    def forward(self, attended, unattended):
        return avkernels.gate(attended, unattended, self.linear.weight, self.linear.bias, backend=self.backend)


class StageGate(nn.Module):
    def __init__(self, backend, dim, stages):
        super().__init__()
        self.backend, self.linear = backend, nn.Linear(stages * dim, stages)

    def forward(self, *stages):
        return avkernels.stage_gate(list(stages), self.linear.weight, self.linear.bias, backend=self.backend)


def tanh_attention_case(shape, batch, mq, n, seq_len, *, hidden=None, activation="tanh_relu"):
    """``q (B, Mq, L)``, ``k (B, N, L)``; dense: ``v (B, N, L)`` with ``activation`` (the dense JCA block's epilogue
    by default); additive: shared ``v (N, hidden)``, no epilogue."""
    joint = mq if hidden is None else n
    scale = 1.0 / math.sqrt(joint)
    activation = activation if hidden is None else None
    e = seq_len if hidden is None else hidden

    def make_module(backend):
        torch.manual_seed(0)
        return TanhAttention(backend, scale, activation, None if hidden is None else torch.randn(n, hidden))

    def make_inputs(dev, requires_grad):
        qk = [harness.rand(dev, requires_grad, batch, mq, seq_len), harness.rand(dev, requires_grad, batch, n, seq_len)]
        return qk if hidden is not None else qk + [harness.rand(dev, requires_grad, batch, n, seq_len)]

    params = {"batch": batch, "seq_len": seq_len, "mq": mq, "n": n, "d": seq_len, "e": e}
    return harness.Case(
        "tanh_attention", shape, params, make_module, make_inputs,
        cost=lambda mode, itemsize=4: tanh_attention_cost(batch, mq, n, seq_len, e, shared_v=hidden is not None,
                                                          activation=activation, mode=mode, itemsize=itemsize),
        key=(shape, mq, n, seq_len, hidden, activation),
    )


def gate_case(shape, batch, seq_len, dim):
    def make_inputs(dev, requires_grad):
        return [harness.rand(dev, requires_grad, batch, seq_len, dim) for _ in range(2)]

    return harness.Case(
        "gate", shape, {"batch": batch, "seq_len": seq_len, "dim": dim}, lambda backend: Gate(backend, dim),
        make_inputs, cost=lambda mode, itemsize=4: gate_cost(batch, seq_len, dim, mode=mode, itemsize=itemsize),
        graded_outputs=1,
        key=(dim,),
    )


def stage_gate_case(shape, batch, seq_len, dim, stages=2):
    def make_inputs(dev, requires_grad):
        return [harness.rand(dev, requires_grad, batch, seq_len, dim) for _ in range(stages)]

    return harness.Case(
        "stage_gate", shape, {"batch": batch, "seq_len": seq_len, "dim": dim, "stages": stages},
        lambda backend: StageGate(backend, dim, stages), make_inputs,
        cost=lambda mode, itemsize=4: stage_gate_cost(batch, seq_len, dim, stages, mode=mode,
                                                           itemsize=itemsize), graded_outputs=1,
        key=(dim, stages),
    )


def official_batches(level):
    return {"smoke": (), "default": (1, 8), "full": (1, 8, 64)}[level]


def tanh_attention_cases(level):
    if level == "smoke":
        return [tanh_attention_case("tiny", 1, 8, 4, 4)]
    cases = [tanh_attention_case("official", b, 1024, 512, 16) for b in official_batches(level)]
    cases += [tanh_attention_case("rjcma", b, 512, 256, 300) for b in ((1,) if level == "default" else (1, 12))]
    cases += [tanh_attention_case("additive", 8, 512, 1024, 16, hidden=32)]
    return cases


def thin_cases(level):
    """The memory sweep of thin heads: one query row (``Mq = 1``) over many keys, ``D = E`` in 1, 4, 16, at large
    batch and ``N``, where per-task buffers padded to a vector width or per batch would dwarf the inputs; every
    provider's peak memory is recorded beside its time (table 3 of report.py)."""
    if level == "smoke":
        return [tanh_attention_case("thin", 3, 1, 37, d, activation=None) for d in (1, 4)]
    sizes = ((64, 20000),) + (((256, 100000),) if level == "full" else ())
    return [tanh_attention_case("thin", b, 1, n, d, activation=None) for b, n in sizes for d in (1, 4, 16)]


def gate_cases(level):
    if level == "smoke":
        return [gate_case("tiny", 1, 4, 8)]
    return [gate_case("official", b, 16, 512) for b in (1, 8, 64)] + [gate_case("rjcma", 12, 300, 256)]


def stage_gate_cases(level):
    if level == "smoke":
        return [stage_gate_case("tiny", 1, 4, 8)]
    return [stage_gate_case("official", b, 16, 512) for b in (1, 8, 64)]


@harness.benchmarks(tanh_attention_cases, MODES)
def test_tanh_attention(bench, case, mode, provider):
    bench(case, mode, provider)


@harness.benchmarks(thin_cases, MODES)
def test_tanh_attention_thin(bench, case, mode, provider):
    bench(case, mode, provider)


@harness.benchmarks(gate_cases, MODES)
def test_gate(bench, case, mode, provider):
    bench(case, mode, provider)


@harness.benchmarks(stage_gate_cases, MODES)
def test_stage_gate(bench, case, mode, provider):
    bench(case, mode, provider)
