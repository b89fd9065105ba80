"""The conformance suite catches wrong backends: each test here registers a Python backend with one deliberate bug
(in one op's output or in one gradient) and checks that the suite's own check (``conforms`` and the comparison
helper of tests/comparison.py) rejects it, naming the wrong result.

The planted backend computes everything with the reference's autograd, then applies its bug, a mistake a kernel
could plausibly make (a dropped factor, a swapped index, a mask redrawn from the wrong seed).
"""

import importlib
import re

import pytest
import torch

import avkernels
from avkernels import reference
from avkernels.dispatch import BackendInfo, OpImpl
from test_conformance import ATTENTION_SHAPES, GATE_SHAPES, attention_case, conforms, gate_grad_outputs, gate_leaves

registry = importlib.import_module("avkernels.dispatch")
NAME = "planted"


@pytest.fixture
def plant(monkeypatch):
    """plant(op, forward, backward) registers the planted backend's implementation of op; restored afterwards."""
    monkeypatch.setattr(registry, "_BACKENDS", dict(registry._BACKENDS))
    monkeypatch.setattr(registry, "_IMPLS", dict(registry._IMPLS))
    registry.register_backend(BackendInfo(NAME, lambda: None, lambda inputs: None, preference={}))

    def register(op, forward, backward):
        registry.register_impl(op, NAME, OpImpl(forward, backward))

    return register


# ------------------------------------------------------------------------------------------------- tanh_attention


def _keep(seed, shape, p):
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed)) >= p


ATTENTION_BUGS = {  # bug -> (which result it breaks, activation, dropout_p, map)
    "forward without tanh": ("o", None, 0.0, "tanh"),
    "dq without the tanh derivative": ("dq", None, 0.0, "tanh"),
    "dk scaled twice": ("dk", None, 0.0, "tanh"),
    "dv misses the last key": ("dv", None, 0.0, "tanh"),
    "tanh_relu backward ignores the epilogue": ("dq", "tanh_relu", 0.0, "tanh"),
    "dropout backward redraws another mask": ("dq", None, 0.3, "tanh"),
    "the epilogue's ReLU drops NaN": ("o", "tanh_relu", 0.0, "tanh"),
    "sigmoid forward drops the bias": ("o", None, 0.0, "sigmoid"),
    "sigmoid backward takes the tanh derivative": ("dq", None, 0.0, "sigmoid"),
}


def _planted_attention(bug):
    def mapped(q, k, scale, p, seed, map, map_bias):
        """The map c = f(scale q k^T) (SPEC 1) and its dropout-scaled form."""
        s = scale * q @ k.transpose(-1, -2)
        if map == "sigmoid":
            c = torch.sigmoid(s if bug == "sigmoid forward drops the bias" else s + map_bias)
        else:
            c = torch.tanh(s)
        if p == 0:
            return c, c, None
        keep = _keep(seed, c.shape, p)
        return c, c * keep / (1 - p), keep

    def slope(c, map):
        """f' from the value c = f(x)."""
        if map == "sigmoid" and bug != "sigmoid backward takes the tanh derivative":
            return c * (1 - c)
        return 1 - c * c

    def forward(q, k, v, seed, scale, p, activation, return_mask, map, map_bias):
        c, dropped, keep = mapped(q, k, scale, p, seed, map, map_bias)
        if bug == "forward without tanh":
            dropped = scale * q @ k.transpose(-1, -2)
        o = dropped @ v
        if activation == "tanh_relu":
            o = torch.tanh(o)
            # a comparison-based ReLU: NaN > 0 is false, so NaN becomes 0 (the bug of issue 19)
            o = torch.where(o > 0, o, 0.0) if bug == "the epilogue's ReLU drops NaN" else torch.relu(o)
        return o.contiguous(), (keep if return_mask and p > 0 else None)

    def backward(do, q, k, v, o, seed, scale, p, activation, map, map_bias):
        """SPEC 1's gradients, written out (a custom op's backward runs below autograd), then the bug."""
        redrawn = seed + 1 if bug == "dropout backward redraws another mask" else seed
        c, dropped, keep = mapped(q, k, scale, p, redrawn, map, map_bias)
        if activation == "tanh_relu" and bug != "tanh_relu backward ignores the epilogue":
            do = do * (1 - o * o) * (o > 0)  # o = ReLU(tanh(o_pre)): its derivative where it is positive
        dv = dropped.transpose(-1, -2) @ do
        dc = do @ v.transpose(-1, -2)
        if keep is not None:
            dc = dc * keep / (1 - p)
        ds = dc if bug == "dq without the tanh derivative" else dc * slope(c, map)
        dq = scale * ds @ k
        dk = scale * (dc * slope(c, map)).transpose(-1, -2) @ q
        if bug == "dk scaled twice":
            dk = dk * scale
        if bug == "dv misses the last key":
            dv[:, -1] = 0
        return dq.contiguous(), dk.contiguous(), dv.sum(0, keepdim=True) if v.shape[0] == 1 else dv

    return forward, backward


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("bug", list(ATTENTION_BUGS))
def test_suite_rejects_a_wrong_tanh_attention(plant, bug, dtype):
    wrong, activation, p, map = ATTENTION_BUGS[bug]
    map_bias = -0.8 if map == "sigmoid" else 0.0
    plant("tanh_attention", *_planted_attention(bug))
    if bug == "the epilogue's ReLU drops NaN":  # finite inputs cannot show it: the suite's NaN cases must
        from test_conformance import test_tanh_attention_nonfinite as nonfinite_check  # local: not collected here

        with pytest.raises(AssertionError, match=f"^{re.escape(wrong)}: NaN/inf differ from the reference's"):
            nonfinite_check(NAME, dtype, activation, 0, float("nan"))
        nonfinite_check(NAME, dtype, None, 0, float("nan"))  # the control: no epilogue, no bug
        return
    (q, k, v), grad_outputs = attention_case(ATTENTION_SHAPES["odd"], dtype, torch.device("cpu"))
    if p == 0:
        call = lambda name: lambda q, k, v: avkernels.tanh_attention(q, k, v, activation=activation, map=map,  # noqa
                                                                     map_bias=map_bias, backend=name)
        with pytest.raises(AssertionError, match=f"^{re.escape(wrong)}: max error"):
            conforms(NAME, call, [q, k, v], grad_outputs, ("o", "dq", "dk", "dv"))
    else:  # the dropout case compares against the reference replaying the mask the backend returned
        from test_conformance import test_tanh_attention_dropout as dropout_check  # local: not collected here

        with pytest.raises(AssertionError, match=f"^{re.escape(wrong)}: max error"):
            dropout_check(NAME, dtype, activation, map, map_bias)


# ------------------------------------------------------------------------------------------------------- the gates

# The gates' planted backwards follow SPEC 3's gradient formulas, written out (the backward contract has the saved
# gate values, not the bias, so autograd cannot recompute the forward), then apply the bug.


def _softmax_mix_grads(dout, dgates, candidates, gates, out, tau):
    """dpre, the candidates' direct gradients s_c dpre, and dz (the logits' gradient), per SPEC 3."""
    dpre = dout * (out > 0)
    ds = dgates + torch.stack([(dpre * x).sum(-1) for x in candidates], -1)
    dz = gates * (ds - (gates * ds).sum(-1, keepdim=True)) / tau
    return dpre, [gates[..., c:c + 1] * dpre for c in range(len(candidates))], dz


GATE_BUGS = {  # bug -> the result it breaks
    "gate values weigh the wrong candidates": "out",
    "g written in reverse order": "g",
    "d_attended misses the logit term": "d_attended",
    "d_unattended weighted by the attended gate": "d_unattended",
    "d_weight misses 1 / tau": "d_weight",
    "d_bias ignores the gate values' gradient": "d_bias",
}


def _planted_gate(bug):
    def forward(a, u, w, b, tau):
        out, g = reference.gate(a, u, w, b, tau)
        if bug == "gate values weigh the wrong candidates":
            out = torch.relu(g[..., 1:] * u + g[..., :1] * a)
        if bug == "g written in reverse order":
            g = g.flip(-1)
        return out.contiguous(), g.contiguous()

    def backward(dout, dg, a, u, w, g, out, tau):
        dpre, (du, da), dz = _softmax_mix_grads(dout, dg, (u, a), g, out, tau)
        if bug != "d_attended misses the logit term":
            da = da + dz @ w
        if bug == "d_unattended weighted by the attended gate":
            du = g[..., 1:] * dpre
        dw = dz.reshape(-1, 2).T @ a.reshape(-1, a.shape[-1])
        if bug == "d_weight misses 1 / tau":
            dw = dw * tau
        if bug == "d_bias ignores the gate values' gradient":
            dz = _softmax_mix_grads(dout, torch.zeros_like(dg), (u, a), g, out, tau)[2]
        return da.contiguous(), du.contiguous(), dw, dz.reshape(-1, 2).sum(0)

    return forward, backward


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("bug", list(GATE_BUGS))
def test_suite_rejects_a_wrong_gate(plant, bug, dtype):
    plant("gate", *_planted_gate(bug))
    shape = GATE_SHAPES["odd"]
    call = lambda name: lambda a, u, w, bias: avkernels.gate(a, u, w, bias, tau=0.1, backend=name)
    with pytest.raises(AssertionError, match=f"^{re.escape(GATE_BUGS[bug])}: max error"):
        conforms(NAME, call, gate_leaves(shape, dtype, torch.device("cpu")),
                 gate_grad_outputs(shape, 2, dtype, torch.device("cpu")),
                 ("out", "g", "d_attended", "d_unattended", "d_weight", "d_bias"))


STAGE_BUGS = {  # bug -> the result it breaks
    "the mix misses the last stage": "out",
    "s written in reverse order": "s",
    "d_stages[0] misses the logit term": "d_stages[0]",
    "d_weight blocks transposed": "d_weight",
    "d_bias misses 1 / tau": "d_bias",
}


def _planted_stage_gate(bug):
    def forward(stages, w, b, tau):
        out, s = reference.stage_gate(stages, w, b, tau)
        if bug == "the mix misses the last stage":
            out = torch.relu(sum(s[..., t:t + 1] * x for t, x in enumerate(stages[:-1])))
        if bug == "s written in reverse order":
            s = s.flip(-1)
        return out.contiguous(), s.contiguous()

    def backward(dout, ds, stages, w, s, out, tau):
        n, d = len(stages), stages[0].shape[-1]
        _, d_stages, dz = _softmax_mix_grads(dout, ds, stages, s, out, tau)
        from_logits = dz @ w  # (B, L, T * d): block t belongs to stage t
        d_stages = [dx + from_logits[..., t * d:(t + 1) * d] for t, dx in enumerate(d_stages)]
        if bug == "d_stages[0] misses the logit term":
            d_stages[0] = s[..., :1] * dout * (out > 0)
        dw = dz.reshape(-1, n).T @ torch.cat(stages, -1).reshape(-1, n * d)
        if bug == "d_weight blocks transposed":
            dw = dw.reshape(n, n, d).transpose(0, 1).reshape(n, n * d)
        db = dz.reshape(-1, n).sum(0)
        if bug == "d_bias misses 1 / tau":
            db = db * tau
        return torch.stack(d_stages).contiguous(), dw.contiguous(), db

    return forward, backward


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("bug", list(STAGE_BUGS))
def test_suite_rejects_a_wrong_stage_gate(plant, bug, dtype):
    plant("stage_gate", *_planted_stage_gate(bug))
    device, n = torch.device("cpu"), 3
    b, length, d, _ = GATE_SHAPES["odd"]
    stages = [torch.randn(b, length, d, dtype=dtype) for _ in range(n)]
    weight, bias = torch.randn(n, n * d, dtype=dtype) * 0.3 / (n * d) ** 0.5, torch.randn(n, dtype=dtype) * 0.1
    call = lambda name: lambda w, bias, *x: avkernels.stage_gate(list(x), w, bias, tau=0.2, backend=name)
    names = ["out", "s", "d_weight", "d_bias"] + [f"d_stages[{t}]" for t in range(n)]
    with pytest.raises(AssertionError, match=f"^{re.escape(STAGE_BUGS[bug])}: max error"):
        conforms(NAME, call, [weight, bias, *stages], gate_grad_outputs(GATE_SHAPES["odd"], n, dtype, device), names)


@pytest.mark.parametrize("op", ["tanh_attention", "tanh_attention_dropout", "gate", "stage_gate"])
def test_planted_backend_without_its_bug_conforms(plant, op):
    """The control: the same planted backend with no bug passes the same checks, so each rejection above is its bug."""
    dtype, device = torch.float32, torch.device("cpu")
    if op.startswith("tanh_attention"):
        plant("tanh_attention", *_planted_attention(None))
        if op == "tanh_attention_dropout":
            from test_conformance import test_tanh_attention_dropout as dropout_check  # local: not collected here

            for map, map_bias in (("tanh", 0.0), ("sigmoid", -0.8)):
                dropout_check(NAME, dtype, "tanh_relu", map, map_bias)
            return
        (q, k, v), grad_outputs = attention_case(ATTENTION_SHAPES["odd"], dtype, device)
        for activation, map, map_bias in ((None, "tanh", 0.0), ("tanh_relu", "tanh", 0.0), (None, "sigmoid", -0.8)):
            call = lambda name: lambda q, k, v: avkernels.tanh_attention(q, k, v, activation=activation, map=map,  # noqa
                                                                         map_bias=map_bias, backend=name)
            conforms(NAME, call, [q, k, v], grad_outputs, ("o", "dq", "dk", "dv"))
    elif op == "gate":
        plant("gate", *_planted_gate(None))
        shape = GATE_SHAPES["odd"]
        call = lambda name: lambda a, u, w, bias: avkernels.gate(a, u, w, bias, tau=0.1, backend=name)
        conforms(NAME, call, gate_leaves(shape, dtype, device), gate_grad_outputs(shape, 2, dtype, device),
                 ("out", "g", "d_attended", "d_unattended", "d_weight", "d_bias"))
    else:
        plant("stage_gate", *_planted_stage_gate(None))
        b, length, d, _ = GATE_SHAPES["odd"]
        stages = [torch.randn(b, length, d, dtype=dtype) for _ in range(3)]
        weight, bias = torch.randn(3, 3 * d, dtype=dtype) * 0.05, torch.randn(3, dtype=dtype) * 0.1
        call = lambda name: lambda w, bias, *x: avkernels.stage_gate(list(x), w, bias, tau=0.2, backend=name)
        names = ["out", "s", "d_weight", "d_bias"] + [f"d_stages[{t}]" for t in range(3)]
        conforms(NAME, call, [weight, bias, *stages], gate_grad_outputs(GATE_SHAPES["odd"], 3, dtype, device), names)
