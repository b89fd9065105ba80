"""The functional ops on the "reference" backend (SPEC 1 and 3), checked against tests/reference_spec.py.

Every test forces ``backend="reference"``; the fused backends have their own files and are compared with the
reference there.
"""

import math

import pytest
import torch

import avkernels
from avkernels import reference as lib_reference
import reference_spec as spec  # tests/ is on sys.path (pytest's rootdir-less conftest layout)

F64 = torch.float64
REF = {"backend": "reference"}


pytestmark = pytest.mark.usefixtures("single_torch_thread")


def rand(*shape, dtype=F64, requires_grad=False):
    return torch.randn(*shape, dtype=dtype, requires_grad=requires_grad)


def assert_close(actual, expected, dtype=F64):
    tol = {torch.float64: 1e-10, torch.float32: 2e-5}[dtype]
    torch.testing.assert_close(actual.to(F64), expected.to(F64), rtol=tol, atol=tol)


# ----------------------------------------------------------------------------------------------------------------
# tanh_attention: values
# ----------------------------------------------------------------------------------------------------------------

# Odd and prime sizes; (B, Mq, N, D, E).
SHAPES = [(1, 1, 1, 1, 1), (3, 7, 5, 11, 2), (2, 13, 17, 3, 19), (5, 2, 31, 16, 7)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", SHAPES)
def test_tanh_attention_matches_spec(shape, dtype):
    B, Mq, N, D, E = shape
    q, k, v = rand(B, Mq, D, dtype=dtype), rand(B, N, D, dtype=dtype), rand(B, N, E, dtype=dtype)
    scale = 0.37
    o = avkernels.tanh_attention(q, k, v, scale=scale, **REF)
    assert o.shape == (B, Mq, E) and o.dtype == dtype
    assert_close(o, spec.tanh_attention(q, k, v, scale), dtype)


def test_tanh_attention_non_contiguous_inputs():
    B, Mq, N, D, E = 3, 5, 7, 4, 6
    q = rand(B, D, Mq).transpose(1, 2)
    k = rand(N, B, D).transpose(0, 1)
    v = rand(B, N, 2 * E)[..., ::2]
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    assert_close(avkernels.tanh_attention(q, k, v, **REF), spec.tanh_attention(q, k, v))


def test_tanh_attention_worked_by_hand():
    # scale = ln(3)/2 makes the map simple: tanh(ln(3)/2) = (3-1)/(3+1) = 0.5 and tanh(ln 3) = (9-1)/(9+1) = 0.8.
    # q = I, so (q k^T)[i, j] = k[j, i]:  k = [[1, 2], [0, -1]]  ->  q k^T = [[1, 0], [2, -1]]
    #   tanh(scale * q k^T) = [[0.5, 0], [0.8, -0.5]]
    #   o = [[0.5, 0], [0.8, -0.5]] @ [[1, 2], [3, 4]] = [[0.5, 1.0], [0.8 - 1.5, 1.6 - 2.0]]
    #     = [[0.5, 1.0], [-0.7, -0.4]]
    q = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]], dtype=F64)
    k = torch.tensor([[[1.0, 2.0], [0.0, -1.0]]], dtype=F64)
    v = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]], dtype=F64)
    scale = math.log(3.0) / 2
    o = avkernels.tanh_attention(q, k, v, scale=scale, **REF)
    torch.testing.assert_close(o, torch.tensor([[[0.5, 1.0], [-0.7, -0.4]]], dtype=F64), rtol=0, atol=1e-14)
    # tanh_relu epilogue: ReLU(tanh(o)) = [[tanh(0.5), tanh(1)], [0, 0]].
    o = avkernels.tanh_attention(q, k, v, scale=scale, activation="tanh_relu", **REF)
    expected = torch.tensor([[[math.tanh(0.5), math.tanh(1.0)], [0.0, 0.0]]], dtype=F64)
    torch.testing.assert_close(o, expected, rtol=0, atol=1e-14)


def test_tanh_attention_default_scale_is_one_over_sqrt_d():
    q, k, v = rand(2, 3, 9), rand(2, 4, 9), rand(2, 4, 5)
    default = avkernels.tanh_attention(q, k, v, **REF)
    assert_close(default, avkernels.tanh_attention(q, k, v, scale=1 / 3, **REF))
    assert_close(default, spec.tanh_attention(q, k, v, scale=1 / 3))
    assert not torch.allclose(default, avkernels.tanh_attention(q, k, v, scale=1.0, **REF))


@pytest.mark.parametrize("form", ["2d", "batch1", "expanded"])
def test_tanh_attention_shared_v(form):
    B, Mq, N, D, E = 4, 3, 5, 2, 7
    q, k = rand(B, Mq, D, requires_grad=True), rand(B, N, D, requires_grad=True)
    w = rand(N, E, requires_grad=True)  # one value matrix for the whole batch, e.g. a weight
    v = {"2d": w, "batch1": w.unsqueeze(0), "expanded": w.unsqueeze(0).expand(B, N, E)}[form]
    o = avkernels.tanh_attention(q, k, v, **REF)
    expected = spec.tanh_attention(q, k, w.detach().unsqueeze(0).expand(B, N, E).contiguous())
    assert_close(o, expected)
    do = rand(B, Mq, E)
    o.backward(do)
    _, _, dw = spec.tanh_attention_backward(do, q.detach(), k.detach(), w.detach(), 1 / math.sqrt(D))
    assert w.grad.shape == (N, E)
    assert_close(w.grad, dw)  # dv summed over the batch
    manual = sum((torch.tanh(q[b] @ k[b].T / math.sqrt(D))).T @ do[b] for b in range(B))
    assert_close(w.grad, manual.detach())


def test_tanh_attention_tanh_relu_matches_spec():
    q, k, v = rand(3, 5, 4), rand(3, 6, 4), rand(3, 6, 7) * 3
    o = avkernels.tanh_attention(q, k, v, activation="tanh_relu", **REF)
    assert_close(o, spec.tanh_attention(q, k, v, activation="tanh_relu"))
    assert (o >= 0).all() and (o < 1).all()
    assert (o == 0).any() and (o > 0).any()  # the ReLU is exercised on both sides


# ----------------------------------------------------------------------------------------------------------------
# tanh_attention: gradients
# ----------------------------------------------------------------------------------------------------------------


def test_tanh_attention_gradients_match_spec_formulas():
    B, Mq, N, D, E = 3, 5, 7, 4, 6
    q, k, v = rand(B, Mq, D, requires_grad=True), rand(B, N, D, requires_grad=True), rand(B, N, E, requires_grad=True)
    do = rand(B, Mq, E)
    avkernels.tanh_attention(q, k, v, scale=0.7, **REF).backward(do)
    dq, dk, dv = spec.tanh_attention_backward(do, q.detach(), k.detach(), v.detach(), 0.7)
    assert_close(q.grad, dq)
    assert_close(k.grad, dk)
    assert_close(v.grad, dv)


def test_tanh_attention_gradients_with_mask_match_spec_formulas():
    B, Mq, N, D, E, p = 2, 4, 5, 3, 3, 0.4
    q, k, v = rand(B, Mq, D, requires_grad=True), rand(B, N, D, requires_grad=True), rand(B, N, E, requires_grad=True)
    keep = torch.rand(B, Mq, N) >= p
    o, _ = lib_reference.tanh_attention(q, k, v, 0.5, p, dropout_mask=keep)
    do = rand(B, Mq, E)
    o.backward(do)
    dq, dk, dv = spec.tanh_attention_backward(do, q.detach(), k.detach(), v.detach(), 0.5, keep, p)
    assert_close(q.grad, dq)
    assert_close(k.grad, dk)
    assert_close(v.grad, dv)


@pytest.mark.parametrize("activation", [None, "tanh_relu"])
@pytest.mark.parametrize("shared_v", [False, True])
def test_tanh_attention_gradcheck(activation, shared_v):
    B, Mq, N, D, E = 2, 3, 4, 5, 2
    q, k = rand(B, Mq, D, requires_grad=True), rand(B, N, D, requires_grad=True)
    v = rand(N, E, requires_grad=True) if shared_v else rand(B, N, E, requires_grad=True)
    fn = lambda q, k, v: avkernels.tanh_attention(q, k, v, activation=activation, **REF)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, k, v))
    assert torch.autograd.gradgradcheck(fn, (q, k, v))


def test_tanh_attention_gradcheck_with_fixed_dropout_mask():
    B, Mq, N, D, E, p = 2, 3, 4, 3, 2, 0.5
    q, k, v = rand(B, Mq, D, requires_grad=True), rand(B, N, D, requires_grad=True), rand(B, N, E, requires_grad=True)
    keep = torch.rand(B, Mq, N) >= p
    assert keep.any() and not keep.all()
    fn = lambda q, k, v: lib_reference.tanh_attention(q, k, v, 0.8, p, "tanh_relu", dropout_mask=keep)[0]  # noqa
    assert torch.autograd.gradcheck(fn, (q, k, v))


# ----------------------------------------------------------------------------------------------------------------
# tanh_attention: the sigmoid map
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("map_bias", [0.0, -2.5])
def test_sigmoid_map_values_and_gradients_match_spec(map_bias):
    B, Mq, N, D, E, p = 2, 5, 7, 4, 3, 0.3
    q, k, v = rand(B, Mq, D, requires_grad=True), rand(B, N, D, requires_grad=True), rand(1, N, E, requires_grad=True)
    keep = torch.rand(B, Mq, N) >= p
    o, _ = lib_reference.tanh_attention(q, k, v, 0.6, p, dropout_mask=keep, map="sigmoid", map_bias=map_bias)
    assert_close(o, spec.tanh_attention(q, k, v, 0.6, keep, p, map="sigmoid", map_bias=map_bias))
    do = rand(B, Mq, E)
    o.backward(do)
    grads = spec.tanh_attention_backward(do, q.detach(), k.detach(), v.detach(), 0.6, keep, p, map="sigmoid",
                                         map_bias=map_bias)
    for ours, expected in zip((q.grad, k.grad, v.grad), grads):
        assert_close(ours, expected)


def test_sigmoid_map_worked_by_hand():
    """One key and one query: o = sigmoid(scale q k + bias) v; with q k = 0 and bias 0 the map is exactly 1/2."""
    q, k, v = torch.tensor([[[2.0]]], dtype=F64), torch.tensor([[[0.5]]], dtype=F64), torch.tensor([[[3.0]]], dtype=F64)
    o = avkernels.tanh_attention(q, k, v, scale=1.0, map="sigmoid", map_bias=-1.0, **REF)
    assert_close(o, torch.tensor([[[1.5]]], dtype=F64))  # sigmoid(2 * 0.5 - 1) = 1/2
    o = avkernels.tanh_attention(q, k, v, scale=2.0, map="sigmoid", map_bias=-1.0, **REF)
    assert_close(o, torch.tensor([[[3.0 / (1.0 + math.exp(-1.0))]]], dtype=F64))


def test_sigmoid_map_gradcheck():
    q, k, v = rand(2, 3, 4, requires_grad=True), rand(2, 5, 4, requires_grad=True), rand(5, 2, requires_grad=True)
    fn = lambda q, k, v: avkernels.tanh_attention(q, k, v, map="sigmoid", map_bias=0.3, activation="tanh_relu",  # noqa
                                                  **REF)
    assert torch.autograd.gradcheck(fn, (q, k, v))


def test_map_arguments_are_checked():
    q = rand(1, 2, 3)
    with pytest.raises(ValueError, match=r"map: expected one of \('tanh', 'sigmoid'\), got 'relu'"):
        avkernels.tanh_attention(q, q, q, map="relu", **REF)
    with pytest.raises(ValueError, match="map_bias: only the sigmoid map takes a bias"):
        avkernels.tanh_attention(q, q, q, map_bias=1.0, **REF)
    with pytest.raises(TypeError, match="map_bias: expected a finite float"):
        avkernels.tanh_attention(q, q, q, map="sigmoid", map_bias=float("nan"), **REF)


# ----------------------------------------------------------------------------------------------------------------
# tanh_attention: dropout
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("activation", [None, "tanh_relu"])
def test_dropout_mask_reproduces_output(activation):
    B, Mq, N, D, E, p = 3, 6, 7, 4, 5, 0.3
    q, k, v = rand(B, Mq, D), rand(B, N, D), rand(B, N, E)
    o, mask = avkernels.tanh_attention(
        q, k, v, dropout_p=p, training=True, activation=activation, return_mask=True, **REF
    )
    assert mask.dtype == torch.bool and mask.shape == (B, Mq, N)
    # Replaying the mask through the reference gives the same bits; the SPEC implementation agrees to fp64 rounding.
    replay, _ = lib_reference.tanh_attention(q, k, v, 1 / math.sqrt(D), p, activation, dropout_mask=mask)
    assert torch.equal(o, replay)
    assert_close(o, spec.tanh_attention(q, k, v, keep=mask, p=p, activation=activation))
    assert not torch.allclose(o, avkernels.tanh_attention(q, k, v, activation=activation, **REF))


def test_return_mask_without_dropout_is_none():
    q, k, v = rand(1, 2, 3), rand(1, 4, 3), rand(1, 4, 2)
    for kwargs in ({"dropout_p": 0.0, "training": True}, {"dropout_p": 0.5, "training": False}):
        o, mask = avkernels.tanh_attention(q, k, v, return_mask=True, **kwargs, **REF)
        assert mask is None
        assert_close(o, spec.tanh_attention(q, k, v))


def _six_sigma(p_keep, n):
    return 6.0 * math.sqrt(p_keep * (1.0 - p_keep) / n)


@pytest.mark.parametrize("p", [0.1, 0.6])
def test_dropout_keep_rate(p):
    B, Mq, N = 4, 50, 60  # 12,000 Bernoulli draws per call
    q, k, v = rand(B, Mq, 3), rand(B, N, 3), rand(B, N, 2)
    _, mask = avkernels.tanh_attention(q, k, v, dropout_p=p, training=True, return_mask=True, **REF)
    assert abs(mask.double().mean().item() - (1 - p)) < _six_sigma(1 - p, mask.numel())


def test_dropout_without_mask_is_inverted_and_keeps_rate():
    # With q k^T constant and v = identity, o *is* the dropped map: every entry is 0 or tanh(c)/(1-p).
    B, M, p = 3, 40, 0.25
    q = torch.ones(B, M, 1, dtype=F64)
    k = torch.full((B, M, 1), 0.5, dtype=F64)
    v = torch.eye(M, dtype=F64)
    o = avkernels.tanh_attention(q, k, v, scale=1.0, dropout_p=p, training=True, **REF)
    kept_value = math.tanh(0.5) / (1 - p)
    kept = torch.isclose(o, torch.tensor(kept_value, dtype=F64), rtol=1e-12, atol=0)
    assert torch.logical_or(kept, o == 0).all()
    assert abs(kept.double().mean().item() - (1 - p)) < _six_sigma(1 - p, kept.numel())


def test_dropout_preserves_expectation():
    # E[o] = o_no_dropout (inverted dropout). Per entry, o = sum_n c_n v_n z_n / (1-p) with z_n ~ Bernoulli(1-p):
    # Var(o) = p/(1-p) * sum_n (c_n v_n)^2, so the mean over R draws lies within 6 sigma / sqrt(R) of E[o].
    B, Mq, N, D, E, p, R = 2, 3, 5, 4, 3, 0.5, 400
    q, k, v = rand(B, Mq, D), rand(B, N, D), rand(B, N, E)
    expected = spec.tanh_attention(q, k, v)
    c = torch.tanh(torch.einsum("bmd,bnd->bmn", q, k) / 2.0)
    var = p / (1 - p) * torch.einsum("bmn,bne->bme", c**2, v**2)
    mean = sum(avkernels.tanh_attention(q, k, v, dropout_p=p, training=True, **REF) for _ in range(R)) / R
    assert ((mean - expected).abs() <= 6 * torch.sqrt(var / R) + 1e-12).all()


def test_no_dropout_when_not_training():
    q, k, v = rand(2, 3, 4), rand(2, 5, 4), rand(2, 5, 6)
    o = avkernels.tanh_attention(q, k, v, dropout_p=0.9, training=False, **REF)
    assert_close(o, spec.tanh_attention(q, k, v))
    assert torch.equal(o, avkernels.tanh_attention(q, k, v, dropout_p=0.9, **REF))  # training defaults to False


# ----------------------------------------------------------------------------------------------------------------
# gate and stage_gate
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tau", [0.1, 1.0])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_gate_matches_spec(tau, dtype):
    B, L, d = 3, 7, 5
    a, u = rand(B, L, d, dtype=dtype), rand(B, L, d, dtype=dtype)
    w, b = rand(2, d, dtype=dtype), rand(2, dtype=dtype)  # nn.Linear(d, 2) layout
    out, g = avkernels.gate(a, u, w, b, tau=tau, **REF)
    eout, eg = spec.gate(a, u, w.T, b, tau)
    assert out.shape == (B, L, d) and g.shape == (B, L, 2)
    assert_close(out, eout, dtype)
    assert_close(g, eg, dtype)
    assert_close(g.sum(-1), torch.ones(B, L, dtype=F64), dtype)


def test_gate_default_tau_is_0_1():
    a, u, w, b = rand(2, 3, 4), rand(2, 3, 4), rand(2, 4), rand(2)
    out, g = avkernels.gate(a, u, w, b, **REF)
    eout, eg = spec.gate(a, u, w.T, b, 0.1)
    assert_close(out, eout)
    assert_close(g, eg)


@pytest.mark.parametrize("winner", [0, 1])
def test_gate_small_tau_picks_larger_logit(winner):
    # Logits x.w + b where w = 0 and b[winner] is larger by 1: at tau = 1e-4 the softmax is exactly one-hot.
    B, L, d = 2, 3, 4
    a, u = rand(B, L, d), rand(B, L, d)
    w = torch.zeros(2, d, dtype=F64)
    b = torch.zeros(2, dtype=F64)
    b[winner] = 1.0
    out, g = avkernels.gate(a, u, w, b, tau=1e-4, **REF)
    assert torch.equal(g[..., winner], torch.ones(B, L, dtype=F64))
    assert torch.equal(g[..., 1 - winner], torch.zeros(B, L, dtype=F64))
    chosen = u if winner == 0 else a  # index 0 = unattended, 1 = attended
    assert torch.equal(out, torch.relu(chosen))


def test_gate_logits_come_from_attended_only():
    a, w, b = rand(2, 3, 4), rand(2, 4), rand(2)
    _, g1 = avkernels.gate(a, rand(2, 3, 4), w, b, **REF)
    _, g2 = avkernels.gate(a, rand(2, 3, 4), w, b, **REF)
    assert torch.equal(g1, g2)


@pytest.mark.parametrize("n_stages", [1, 2, 3])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_stage_gate_matches_spec(n_stages, dtype):
    B, L, d = 2, 5, 3
    stages = [rand(B, L, d, dtype=dtype) for _ in range(n_stages)]
    w, b = rand(n_stages, n_stages * d, dtype=dtype), rand(n_stages, dtype=dtype)
    out, s = avkernels.stage_gate(stages, w, b, tau=0.3, **REF)
    eout, es = spec.stage_gate(stages, w.T, b, 0.3)
    assert out.shape == (B, L, d) and s.shape == (B, L, n_stages)
    assert_close(out, eout, dtype)
    assert_close(s, es, dtype)
    out_t, s_t = avkernels.stage_gate(tuple(stages), w, b, tau=0.3, **REF)  # a tuple works like a list
    assert torch.equal(out, out_t) and torch.equal(s, s_t)


def test_stage_gate_small_tau_picks_larger_logit():
    B, L, d, T = 2, 3, 4, 3
    stages = [rand(B, L, d) for _ in range(T)]
    w, b = torch.zeros(T, T * d, dtype=F64), torch.tensor([0.0, 1.0, 0.5], dtype=F64)
    out, s = avkernels.stage_gate(stages, w, b, tau=1e-4, **REF)
    assert torch.equal(s, torch.tensor([0.0, 1.0, 0.0], dtype=F64).expand(B, L, T))
    assert torch.equal(out, torch.relu(stages[1]))


def test_gate_gradcheck():
    B, L, d = 2, 3, 4
    args = [rand(B, L, d, requires_grad=True), rand(B, L, d, requires_grad=True)]
    args += [rand(2, d, requires_grad=True), rand(2, requires_grad=True)]
    for tau in (0.1, 1.0):
        # Both outputs (out and g) are differentiated; gradcheck uses random output gradients for each.
        assert torch.autograd.gradcheck(lambda *x: avkernels.gate(*x, tau=tau, **REF), args)


def test_stage_gate_gradcheck():
    B, L, d, T = 2, 3, 2, 3
    stages = [rand(B, L, d, requires_grad=True) for _ in range(T)]
    w, b = rand(T, T * d, requires_grad=True), rand(T, requires_grad=True)
    fn = lambda *x: avkernels.stage_gate(list(x[:T]), x[T], x[T + 1], tau=0.5, **REF)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (*stages, w, b))


# ----------------------------------------------------------------------------------------------------------------
# NaN and empty inputs
# ----------------------------------------------------------------------------------------------------------------


def test_nan_propagates():
    q, k, v = rand(2, 3, 4), rand(2, 5, 4), rand(2, 5, 6)
    q[1, 2, 0] = float("nan")
    o = avkernels.tanh_attention(q, k, v, **REF)
    assert torch.isnan(o[1, 2]).all() and not torch.isnan(o[0]).any() and not torch.isnan(o[1, :2]).any()
    o = avkernels.tanh_attention(q, k, v, activation="tanh_relu", **REF)
    assert torch.isnan(o[1, 2]).all()

    a, u, w, b = rand(2, 3, 4), rand(2, 3, 4), rand(2, 4), rand(2)
    a[0, 1, 2] = float("nan")
    out, g = avkernels.gate(a, u, w, b, **REF)
    assert torch.isnan(out[0, 1]).all() and torch.isnan(g[0, 1]).all()
    assert torch.isnan(out).sum() == 4 and torch.isnan(g).sum() == 2

    stages = [rand(2, 3, 4), rand(2, 3, 4)]
    stages[1][1, 0, 3] = float("nan")
    out, s = avkernels.stage_gate(stages, rand(2, 8), rand(2), **REF)
    assert torch.isnan(out[1, 0]).all() and torch.isnan(s[1, 0]).all()
    assert torch.isnan(out).sum() == 4 and torch.isnan(s).sum() == 2


@pytest.mark.parametrize(
    "shape", [(0, 3, 4, 5, 6), (2, 0, 4, 5, 6), (2, 3, 0, 5, 6), (2, 3, 4, 0, 6), (2, 3, 4, 5, 0)]
)
def test_tanh_attention_empty(shape):
    B, Mq, N, D, E = shape
    q, k, v = rand(B, Mq, D, requires_grad=True), rand(B, N, D, requires_grad=True), rand(B, N, E, requires_grad=True)
    o = avkernels.tanh_attention(q, k, v, scale=0.5, dropout_p=0.5, training=True, **REF)
    assert o.shape == (B, Mq, E)
    assert_close(o, spec.tanh_attention(q, k, v, scale=0.5))  # N = 0 or D = 0: the sums are empty, o = 0
    o.sum().backward()
    assert q.grad.shape == q.shape and k.grad.shape == k.shape and v.grad.shape == v.shape


def test_gates_empty_batch():
    a = rand(0, 3, 4, requires_grad=True)
    out, g = avkernels.gate(a, rand(0, 3, 4), rand(2, 4), rand(2), **REF)
    assert out.shape == (0, 3, 4) and g.shape == (0, 3, 2)
    (out.sum() + g.sum()).backward()
    assert a.grad.shape == a.shape
    out, s = avkernels.stage_gate([rand(0, 3, 4)] * 2, rand(2, 8), rand(2), **REF)
    assert out.shape == (0, 3, 4) and s.shape == (0, 3, 2)
