"""What belongs to the Triton tanh_attention kernels alone (avkernels/ops/triton/tanh_attention.py): the looped-head
path at RJCMA-like sizes, their dropout stream's seeding, opcheck, torch.compile, determinism, the int32 map limit.
The op against the fp64 reference on every backend, dtype and shape is tests/test_conformance.py (runs in Triton's
interpreter without a GPU).
"""

import pytest
import torch

import avkernels
from avkernels.ops.triton import tanh_attention as triton_tanh_attention

from conftest import DEVICE
from test_conformance import conforms

pytestmark = pytest.mark.skipif("triton" not in avkernels.backends(), reason="triton backend unavailable here")

def run(q, k, v, do, **kwargs):
    """Output and input gradients of the public op (fresh leaves, so the inputs' own layouts reach the kernels)."""
    q, k, v = (x.detach().requires_grad_(True) for x in (q, k, v))
    out = avkernels.tanh_attention(q, k, v, **kwargs)
    o, mask = out if kwargs.get("return_mask") else (out, None)
    grads = torch.autograd.grad(o, (q, k, v), do)
    return o.detach(), grads, mask


def make_inputs(b, mq, n, d, e, dtype, v_batch=None):
    q = torch.randn(b, mq, d, dtype=dtype, device=DEVICE)
    k = torch.randn(b, n, d, dtype=dtype, device=DEVICE)
    v = torch.randn(b if v_batch is None else v_batch, n, e, dtype=dtype, device=DEVICE)
    do = torch.randn(b, mq, e, dtype=dtype, device=DEVICE)
    return q, k, v, do


def test_dropout_mask_statistics_and_seeding():
    b, mq, n, d, e, p = 3, 40, 50, 4, 4, 0.6
    q, k, v, _ = make_inputs(b, mq, n, d, e, torch.float32)

    def draw(seed):
        torch.manual_seed(seed)
        return avkernels.tanh_attention(q, k, v, dropout_p=p, training=True, return_mask=True, backend="triton")

    o1, m1 = draw(1)
    o2, m2 = draw(1)
    o3, m3 = draw(2)
    # Keep-rate within 6 standard deviations of 1 - p (a fixed seed: this is a check of the generator, not a flake).
    count = m1.numel()
    sigma = (p * (1 - p) / count) ** 0.5
    assert abs(m1.float().mean().item() - (1 - p)) <= 6 * sigma
    # Batch elements draw different masks (the batch index is part of the Philox counter).
    assert not torch.equal(m1[0], m1[1])
    assert torch.equal(m1, m2) and torch.equal(o1, o2)
    assert not torch.equal(m1, m3)
    # Without training (or with p = 0) nothing is dropped and no mask is returned.
    o_eval, m_eval = avkernels.tanh_attention(q, k, v, dropout_p=p, training=False, return_mask=True,
                                              backend="triton")
    assert m_eval is None
    assert torch.equal(o_eval, avkernels.tanh_attention(q, k, v, backend="triton"))


def test_large_head_and_map():
    """RJCMA-like sizes: D = 300 (heads looped in chunks; E = 40 keeps the interpreter's time down) and N around 300,
    in fp64 (its tiles are taller than fp32's TF32x3 ones, so the interpreter runs it faster; the conformance shapes
    cover fp32's looped class)."""
    q, k, v, do = make_inputs(1, 5, 301, 300, 40, torch.float64)
    call = lambda name: lambda q, k, v: avkernels.tanh_attention(q, k, v, activation="tanh_relu", backend=name)
    conforms("triton", call, [q, k, v], [do], ("o", "dq", "dk", "dv"))


def test_opcheck():
    q, k, v, _ = make_inputs(2, 5, 6, 4, 3, torch.float32)
    for x in (q, k, v):
        x.requires_grad_(True)
    seed = torch.tensor([7], dtype=torch.int64)
    for args in ((q, k, v, torch.empty(0, dtype=torch.int64), 0.5, 0.0, "tanh_relu", False),
                 (q, k, v, seed, 0.5, 0.25, "none", True)):
        torch.library.opcheck(
            torch.ops.avkernels.triton_tanh_attention.default,
            args,
            test_utils=("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic"),
        )


def test_torch_compile_fullgraph():
    q, k, v, do = make_inputs(2, 9, 11, 5, 4, torch.float32)

    def fn(q, k, v):
        return avkernels.tanh_attention(q, k, v, activation="tanh_relu", backend="triton")

    compiled = torch.compile(fn, fullgraph=True)
    o_eager, g_eager, _ = run(q, k, v, do, activation="tanh_relu", backend="triton")
    leaves = [x.detach().requires_grad_(True) for x in (q, k, v)]
    o_compiled = compiled(*leaves)
    g_compiled = torch.autograd.grad(o_compiled, leaves, do)
    assert torch.equal(o_compiled.detach(), o_eager)
    for g_c, g_e in zip(g_compiled, g_eager):
        assert torch.equal(g_c, g_e)


def test_backward_is_deterministic():
    q, k, v, do = make_inputs(3, 30, 45, 16, 16, torch.float32)
    v = v[:1]  # shared v: the dv reduction over the batch must be deterministic too
    runs = []
    for _ in range(2):
        torch.manual_seed(5)  # the same dropout seed: the runs must then agree bit for bit
        runs.append(run(q, k, v, do, dropout_p=0.2, training=True, return_mask=True, backend="triton"))
    assert torch.equal(runs[0][2], runs[1][2])
    for a, b in zip(runs[0][1], runs[1][1]):
        assert torch.equal(a, b)


def test_map_too_large_is_refused():
    """The kernels index one batch element's (Mq, N) map in int32; a larger map is an error, not a wraparound: dispatch
    refuses it by name (and backend=None passes triton over), and a direct launch is refused too."""
    q = torch.zeros(1, 2**16, 1, device=DEVICE)
    k = torch.zeros(1, 2**15, 1, device=DEVICE)
    with pytest.raises(RuntimeError, match="backend 'triton' .* Mq \\* N < 2\\*\\*31"):
        avkernels.tanh_attention(q, k, k, backend="triton")
    with pytest.raises(ValueError, match="Mq \\* N < 2\\*\\*31"):
        triton_tanh_attention.forward(q, k, k, 0, 1.0, 0.0, "none", False, "tanh", 0.0)
