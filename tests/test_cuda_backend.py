"""GPU tests of the "cuda" backend: the CUDA kernels that avkernels._C_cuda registers for the ops (csrc/cuda).

The ops ``torch.ops.avkernels.*`` are called directly on CUDA tensors (and through a small autograd wrapper for
gradcheck), so these tests do not depend on the Python registrations; one test goes through the public API. Every result is compared with the plain-PyTorch reference run in float64; in lower
precisions FlashAttention's rule applies: our error against the fp64 reference is at most twice the error of the
reference itself run in that dtype, plus a small floor.

Everything here skips, with the reason, where there is no CUDA GPU or the extension was not built.
"""

from __future__ import annotations

import math

import pytest
import torch

import avkernels
from avkernels import reference
from avkernels.ops import native
from comparison import assert_close, deterministic_call

if not torch.cuda.is_available():
    pytest.skip("no CUDA GPU: the cuda backend's kernels run only on a GPU", allow_module_level=True)
if "cuda" not in native._LIBRARIES:
    pytest.skip(f"the cuda op library is not loaded: {avkernels.backend_status()['cuda']}", allow_module_level=True)
C = torch.ops.avkernels  # the ops (csrc/cpu/library.cpp), whose CUDA kernels avkernels._C_cuda registers

DEVICE = "cuda"
LOW_PRECISION = (torch.float16, torch.bfloat16)
SEED = 1234567


def _seed(seed):
    """The ops' dropout seed argument."""
    return torch.tensor([seed])


def _rand(*shape, dtype=torch.float32):
    return torch.randn(*shape, device=DEVICE, dtype=dtype)


# ----------------------------------------------------------------------------------------------------------------
# tanh_attention
# ----------------------------------------------------------------------------------------------------------------


def _reference_attention(q, k, v, do, scale, p, activation, mask):
    """Reference output and gradients in q's dtype, replaying the kernel's keep-mask."""
    q, k, v = (x.detach().clone().requires_grad_(True) for x in (q, k, v))
    o, _ = reference.tanh_attention(q, k, v, scale, p, None if activation == "none" else activation, dropout_mask=mask)
    o.backward(do.to(o.dtype))
    return o.detach(), q.grad, k.grad, v.grad


def _run_attention(q, k, v, do, scale, p, activation, deterministic=True, seed=SEED):
    o, mask = C.tanh_attention(q, k, v, _seed(seed), scale, p, activation, True)
    saved_o = o if activation != "none" else o.new_empty(0)
    dq, dk, dv = deterministic_call(C.tanh_attention_backward, do, q, k, v, saved_o, _seed(seed), scale, p,
                                    activation, enabled=deterministic)
    return o, (mask if p > 0 else None), dq, dk, dv


def _compare_attention(q, k, v, scale, p, activation, dtype):
    do = torch.randn(q.shape[0], q.shape[1], v.shape[-1], device=DEVICE, dtype=dtype)
    o, mask, dq, dk, dv = _run_attention(q, k, v, do, scale, p, activation)
    if p > 0:
        assert mask is not None and mask.dtype == torch.bool and mask.shape == (q.shape[0], q.shape[1], k.shape[1])
    ref64 = _reference_attention(q.double(), k.double(), v.double(), do.double(), scale, p, activation, mask)
    ref_lowp = _reference_attention(q, k, v, do, scale, p, activation, mask)
    for name, ours, r, r64 in zip(("o", "dq", "dk", "dv"), (o, dq, dk, dv), ref_lowp, ref64):
        assert ours.dtype == dtype and ours.is_contiguous(), name
        assert_close(name, ours, r, r64)


SHAPES = [  # (B, Mq, N, D, E): odd and prime sizes, tile edges (64 fp32, 32 fp64), D and E over one tile
    (2, 37, 53, 16, 16),
    (1, 1, 1, 1, 1),
    (3, 65, 129, 33, 70),
    (2, 64, 64, 64, 64),
    (2, 131, 17, 100, 9),
    (1, 5, 300, 7, 130),
]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("activation", ["none", "tanh_relu"])
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_tanh_attention_fp32(shape, activation, p):
    b, mq, n, d, e = shape
    q, k, v = _rand(b, mq, d), _rand(b, n, d), _rand(b, n, e)
    _compare_attention(q, k, v, 1 / math.sqrt(d), p, activation, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("activation", ["none", "tanh_relu"])
def test_tanh_attention_dtypes(dtype, activation):
    q, k, v = _rand(2, 45, 16, dtype=dtype), _rand(2, 71, 16, dtype=dtype), _rand(2, 71, 24, dtype=dtype)
    _compare_attention(q, k, v, 0.25, 0.2, activation, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_tanh_attention_jca_shape(dtype):
    # The dense JCA call: q = Q^T (a transposed view), k = K_m, v = V_m^T, D = E = L = 16, Mq = d, N = d_m.
    big_q = _rand(4, 16, 96, dtype=dtype)
    q = big_q.transpose(1, 2)
    k, v = _rand(4, 48, 16, dtype=dtype), _rand(4, 16, 48, dtype=dtype).transpose(1, 2)
    _compare_attention(q, k, v, 1 / math.sqrt(96), 0.6, "tanh_relu", dtype)


@pytest.mark.parametrize("deterministic", [True, False])
def test_tanh_attention_shared_v_and_strided_inputs(deterministic):
    q = _rand(3, 90, 40)[:, ::2, ::2]  # (3, 45, 20) with strides 2
    k = _rand(3, 20, 33).transpose(1, 2)  # (3, 33, 20), unit stride along keys
    v = _rand(1, 33, 70)  # one value matrix shared over the batch
    do = _rand(3, 70, 45).transpose(1, 2)  # non-contiguous incoming gradient
    o, mask, dq, dk, dv = _run_attention(q, k, v, do, 0.3, 0.25, "none", deterministic=deterministic)
    assert dv.shape == (1, 33, 70)
    ref = _reference_attention(q.double(), k.double(), v.double(), do.double(), 0.3, 0.25, "none", mask)
    ref32 = _reference_attention(q, k, v, do, 0.3, 0.25, "none", mask)
    for name, ours, r, r64 in zip(("o", "dq", "dk", "dv"), (o, dq, dk, dv), ref32, ref):
        assert_close(name, ours, r, r64)


def test_tanh_attention_dropout_mask_statistics_and_seeds():
    q, k, v = _rand(2, 200, 16), _rand(2, 300, 16), _rand(2, 300, 8)
    o1, m1 = C.tanh_attention(q, k, v, _seed(7), 0.25, 0.4, "none", True)
    o2, m2 = C.tanh_attention(q, k, v, _seed(7), 0.25, 0.4, "none", True)
    _, m3 = C.tanh_attention(q, k, v, _seed(8), 0.25, 0.4, "none", True)
    assert torch.equal(m1, m2) and torch.equal(o1, o2), "same seed must redraw the same mask and output"
    assert not torch.equal(m1, m3), "different seeds must draw different masks"
    keep = m1.float().mean().item()
    # 120000 Bernoulli(0.6) draws: the standard deviation of the mean is 0.0014.
    assert abs(keep - 0.6) < 0.01, keep
    _, empty = C.tanh_attention(q, k, v, _seed(7), 0.25, 0.4, "none", False)
    assert empty.numel() == 0


def test_tanh_attention_backward_is_deterministic_with_shared_v():
    q, k, v = _rand(8, 70, 16), _rand(8, 90, 16), _rand(1, 90, 40)
    do = _rand(8, 70, 40)
    runs = [deterministic_call(C.tanh_attention_backward, do, q, k, v, q.new_empty(0), _seed(3), 0.25, 0.1, "none")
            for _ in range(3)]
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert torch.equal(a, b), "deterministic backward must give identical bits run to run"


def test_tanh_attention_mask_matches_cpp_backend():
    # The cuda library is loaded only after the cpp one, which defines the ops: the CPU kernels are there too.
    q, k, v = _rand(2, 33, 8), _rand(2, 47, 8), _rand(2, 47, 5)
    _, mask_cuda = C.tanh_attention(q, k, v, _seed(99), 0.3, 0.35, "none", True)
    _, mask_cpu = C.tanh_attention(q.cpu(), k.cpu(), v.cpu(), _seed(99), 0.3, 0.35, "none", True)
    assert torch.equal(mask_cuda.cpu(), mask_cpu), "CUDA and C++ backends must draw the same mask for one seed"


class _CudaTanhAttention(torch.autograd.Function):
    """The compiled forward/backward as an autograd function, for gradcheck."""

    @staticmethod
    def forward(ctx, q, k, v, scale, p, activation):
        o, _ = C.tanh_attention(q, k, v, _seed(SEED), scale, p, activation, False)
        ctx.save_for_backward(q, k, v, o)
        ctx.args = (scale, p, activation)
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o = ctx.saved_tensors
        scale, p, activation = ctx.args
        dq, dk, dv = deterministic_call(C.tanh_attention_backward, do.contiguous(), q, k, v, o, _seed(SEED), scale, p,
                                   activation)
        return dq, dk, dv, None, None, None


@pytest.mark.parametrize("activation", ["none", "tanh_relu"])
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_tanh_attention_gradcheck_fp64(activation, p):
    q = _rand(2, 7, 5, dtype=torch.float64).requires_grad_(True)
    k = _rand(2, 9, 5, dtype=torch.float64).requires_grad_(True)
    v = _rand(1, 9, 3, dtype=torch.float64).requires_grad_(True)
    # The seed is fixed inside the wrapper, so the mask is the same in every perturbed evaluation.
    assert torch.autograd.gradcheck(lambda q, k, v: _CudaTanhAttention.apply(q, k, v, 0.4, p, activation), (q, k, v))


def test_tanh_attention_rejects_bad_inputs():
    q, k, v = _rand(2, 5, 4), _rand(2, 6, 4), _rand(2, 6, 3)
    with pytest.raises(RuntimeError, match="q must be a float32, float64, bfloat16 or float16 CUDA tensor"):
        C.tanh_attention(q.cpu(), k, v, _seed(0), 1.0, 0.0, "none", False)
    with pytest.raises(RuntimeError, match="q must be a float32, float64, bfloat16 or float16 CUDA tensor"):
        C.tanh_attention(q.int(), k, v, _seed(0), 1.0, 0.0, "none", False)
    with pytest.raises(RuntimeError, match=r"k must have the dtype of q \(Float\), got Double"):
        C.tanh_attention(q, k.double(), v, _seed(0), 1.0, 0.0, "none", False)
    with pytest.raises(RuntimeError, match=r"k must have shape \(B, N, D\) = \[2, -1, 4\]"):
        C.tanh_attention(q, _rand(2, 6, 5), v, _seed(0), 1.0, 0.0, "none", False)
    with pytest.raises(RuntimeError, match=r"v must have batch size 2 \(like q\) or 1 \(shared\), got 3"):
        C.tanh_attention(q, k, _rand(3, 6, 3), _seed(0), 1.0, 0.0, "none", False)
    with pytest.raises(RuntimeError, match=r"seed must be in \[0, 2\*\*31\)"):
        C.tanh_attention(q, k, v, _seed(2**31), 1.0, 0.1, "none", False)
    with pytest.raises(RuntimeError, match=r"dropout_p must be in \[0, 1\)"):
        C.tanh_attention(q, k, v, _seed(0), 1.0, 1.0, "none", False)
    with pytest.raises(RuntimeError, match='activation must be "none" or "tanh_relu"'):
        C.tanh_attention(q, k, v, _seed(0), 1.0, 0.0, "gelu", False)
    with pytest.raises(RuntimeError, match=r"dout must have shape \(B, Mq, E\) = \[2, 5, 3\]"):
        C.tanh_attention_backward(_rand(2, 5, 4), q, k, v, q.new_empty(0), _seed(0), 1.0, 0.0, "none")


def test_public_api_runs_the_cuda_backend():
    import avkernels

    if "cuda" not in avkernels.backends():
        pytest.skip("the cuda backend is not registered (avkernels/ops/native.py)")
    q, k, v = _rand(2, 20, 8, dtype=torch.float64), _rand(2, 30, 8, dtype=torch.float64), _rand(2, 30, 6).double()
    q.requires_grad_(True)
    o = avkernels.tanh_attention(q, k, v, backend="cuda")
    ref, _ = reference.tanh_attention(q, k, v, 1 / math.sqrt(8))
    torch.testing.assert_close(o, ref, rtol=1e-10, atol=1e-10)
    o.sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()


# ----------------------------------------------------------------------------------------------------------------
# gate and stage_gate
# ----------------------------------------------------------------------------------------------------------------


def _reference_gate(attended, unattended, weight, bias, tau, dout, dg):
    leaves = [x.detach().clone().requires_grad_(True) for x in (attended, unattended, weight, bias)]
    out, g = reference.gate(*leaves, tau)
    torch.autograd.backward([out, g], [dout.to(out.dtype), dg.to(g.dtype)])
    return (out.detach(), g.detach()), tuple(x.grad for x in leaves)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(2, 16, 512), (3, 7, 37), (1, 1, 1), (5, 3, 300)])
def test_gate_forward_and_backward(dtype, shape):
    b, length, d = shape
    attended = _rand(b, length, 2 * d, dtype=dtype)[:, :, ::2]  # strided
    unattended = _rand(length, b, d, dtype=dtype).transpose(0, 1)  # batch not outermost
    weight, bias = 0.1 * _rand(2, d, dtype=dtype), _rand(2, dtype=dtype)
    dout, dg = _rand(b, length, d, dtype=dtype), _rand(b, length, 2, dtype=dtype)
    tau = 0.1
    out, g = C.gate(attended, unattended, weight, bias, tau)
    grads = deterministic_call(C.gate_backward, dout, dg, attended, unattended, weight, g, out, tau)
    inputs64 = (x.double() for x in (attended, unattended, weight, bias))
    ref64 = _reference_gate(*inputs64, tau, dout.double(), dg.double())
    ref_lowp = _reference_gate(attended, unattended, weight, bias, tau, dout, dg)
    names = ("out", "g", "d_attended", "d_unattended", "d_weight", "d_bias")
    for name, ours, r, r64 in zip(names, (out, g, *grads), (*ref_lowp[0], *ref_lowp[1]), (*ref64[0], *ref64[1])):
        assert ours.is_contiguous() and ours.dtype == dtype, name
        assert_close(name, ours, r, r64)


def _reference_stage_gate(stages, weight, bias, tau, dout, ds):
    leaves = [x.detach().clone().requires_grad_(True) for x in (*stages, weight, bias)]
    out, s = reference.stage_gate(leaves[:-2], leaves[-2], leaves[-1], tau)
    torch.autograd.backward([out, s], [dout.to(out.dtype), ds.to(s.dtype)])
    return (out.detach(), s.detach()), (torch.stack([x.grad for x in leaves[:-2]]), leaves[-2].grad, leaves[-1].grad)


@pytest.mark.parametrize("n_stages", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_stage_gate_forward_and_backward(n_stages, dtype):
    b, length, d = 3, 11, 45
    stages = [_rand(b, length, d, dtype=dtype) for _ in range(n_stages)]
    stages[0] = _rand(b, d, length, dtype=dtype).transpose(1, 2)  # one non-contiguous stage
    weight, bias = 0.05 * _rand(n_stages, n_stages * d, dtype=dtype), _rand(n_stages, dtype=dtype)
    dout, ds = _rand(b, length, d, dtype=dtype), _rand(b, length, n_stages, dtype=dtype)
    out, s = C.stage_gate(stages, weight, bias, 0.1)
    d_stages, d_weight, d_bias = deterministic_call(C.stage_gate_backward, dout, ds, stages, weight, s, out, 0.1)
    assert d_stages.shape == (n_stages, b, length, d)
    ref64 = _reference_stage_gate([x.double() for x in stages], weight.double(), bias.double(), 0.1, dout.double(),
                                  ds.double())  # fmt: skip
    ref_lowp = _reference_stage_gate(stages, weight, bias, 0.1, dout, ds)
    names = ("out", "s", "d_stages", "d_weight", "d_bias")
    ours_all = (out, s, d_stages, d_weight, d_bias)
    for name, ours, r, r64 in zip(names, ours_all, (*ref_lowp[0], *ref_lowp[1]), (*ref64[0], *ref64[1])):
        assert_close(name, ours, r, r64)


def test_gate_weight_grads_are_deterministic():
    b, length, d = 64, 16, 512
    attended, unattended = _rand(b, length, d), _rand(b, length, d)
    weight, bias = 0.1 * _rand(2, d), _rand(2)
    out, g = C.gate(attended, unattended, weight, bias, 0.1)
    dout, dg = _rand(b, length, d), _rand(b, length, 2)
    first = deterministic_call(C.gate_backward, dout, dg, attended, unattended, weight, g, out, 0.1)
    second = deterministic_call(C.gate_backward, dout, dg, attended, unattended, weight, g, out, 0.1)
    for a, c in zip(first, second):
        assert torch.equal(a, c)


def test_gates_reject_bad_inputs():
    x = _rand(2, 4, 6)
    w, bias = _rand(2, 6), _rand(2)
    with pytest.raises(RuntimeError, match="unattended must be a float32, float64, bfloat16 or float16 CUDA tensor"):
        C.gate(x, x.cpu(), w, bias, 0.1)
    with pytest.raises(RuntimeError, match=r"gate_forward: weight must have shape \(2, d\) = \[2, 6\]"):
        C.gate(x, x, _rand(2, 5), bias, 0.1)
    with pytest.raises(RuntimeError, match="gate_forward: tau must be a finite positive number"):
        C.gate(x, x, w, bias, 0.0)
    with pytest.raises(RuntimeError, match=r"stages\[1\] must have shape \(B, L, d\) like stages\[0\] = \[2, 4, 6\]"):
        C.stage_gate([x, _rand(2, 4, 7)], _rand(2, 12), bias, 0.1)
    with pytest.raises(RuntimeError, match="expected 1 to 8 stages, got 9"):
        C.stage_gate([x] * 9, _rand(9, 54), _rand(9), 0.1)
