"""The backend registry (choice, forcing, errors) and the custom-op plumbing that every fused backend goes through.

The plumbing (``torch.ops.avkernels.*``: seeds, masks, saved tensors, gradient routing, the batch-shared ``v``) is
exercised with a stand-in backend registered for the duration of a test under the name "cpp": it implements the
OpImpl contracts documented at the top of ``avkernels/ops/{tanh_attention,gate,stage_gate}.py`` in plain PyTorch,
drawing its dropout mask from the seed it is given and writing its backward from the SPEC's formulas, so a
plumbing bug (a wrong seed in backward, a gradient routed to the wrong input, a missing reduction) shows up as a
mismatch with the reference backend.
"""

import importlib
import re

import pytest
import torch

import avkernels
import reference_spec as spec  # tests/ is on sys.path (pytest's rootdir-less conftest layout)
from avkernels import reference as lib_reference
from avkernels.dispatch import BACKEND_ENV_VAR, BackendInfo, Inputs, OpImpl

# The module, not the function avkernels.backends() that the package exports under the same name.
registry = importlib.import_module("avkernels.dispatch")
F64 = torch.float64
CPU = torch.device("cpu")


def rand(*shape, requires_grad=False):
    return torch.randn(*shape, dtype=F64, requires_grad=requires_grad)


@pytest.fixture(autouse=True)
def _no_env(monkeypatch):
    monkeypatch.delenv(BACKEND_ENV_VAR, raising=False)


# ----------------------------------------------------------------------------------------------------------------
# A stand-in backend implementing the OpImpl contracts
# ----------------------------------------------------------------------------------------------------------------


def _keep_mask(seed, shape, p, device):
    generator = torch.Generator().manual_seed(seed)
    return (torch.rand(shape, generator=generator, dtype=F64) >= p).to(device)


def _tanh_attention_impl(calls):
    def forward(q, k, v, seed, scale, dropout_p, activation, return_mask, map, map_bias):
        assert q.dim() == k.dim() == v.dim() == 3 and v.shape[0] in (1, q.shape[0])
        assert isinstance(seed, int) and 0 <= seed < 2**31 and activation in ("none", "tanh_relu")
        assert map in ("tanh", "sigmoid") and isinstance(map_bias, float)
        calls.append(("tanh_attention", "forward", seed, dropout_p, tuple(v.shape)))
        keep = _keep_mask(seed, (q.shape[0], q.shape[1], k.shape[1]), dropout_p, q.device) if dropout_p > 0 else None
        act = None if activation == "none" else activation
        o, _ = lib_reference.tanh_attention(q, k, v, scale, dropout_p, act, dropout_mask=keep, map=map,
                                            map_bias=map_bias)
        return o.contiguous(), (keep if return_mask else None)

    def backward(do, q, k, v, o, seed, scale, dropout_p, activation, map, map_bias):
        calls.append(("tanh_attention", "backward", seed, dropout_p, tuple(v.shape)))
        keep = _keep_mask(seed, (q.shape[0], q.shape[1], k.shape[1]), dropout_p, q.device) if dropout_p > 0 else None
        if activation == "tanh_relu":  # o = ReLU(tanh(z)): do/dz = (o > 0) * (1 - o^2)
            do = do * (o > 0) * (1 - o * o)
        else:
            assert o.numel() == 0
        grads = spec.tanh_attention_backward(do, q, k, v, scale, keep, dropout_p, map=map, map_bias=map_bias)
        return tuple(g.to(x.dtype).contiguous() for g, x in zip(grads, (q, k, v)))

    return OpImpl(forward, backward)


def _softmax_backward(y, dy, tau):
    return y * (dy - (y * dy).sum(-1, keepdim=True)) / tau


def _gate_impl(calls):
    def forward(attended, unattended, weight, bias, tau):
        calls.append(("gate", "forward"))
        out, g = lib_reference.gate(attended, unattended, weight, bias, tau)
        return out.contiguous(), g.contiguous()

    def backward(dout, dg, attended, unattended, weight, g, out, tau):
        calls.append(("gate", "backward"))
        dpre = dout * (out > 0)
        dg = dg + torch.stack([(dpre * unattended).sum(-1), (dpre * attended).sum(-1)], dim=-1)
        dlogits = _softmax_backward(g, dg, tau)
        d_att = dpre * g[..., 1:] + dlogits @ weight
        d_unatt = dpre * g[..., :1]
        d_weight = torch.einsum("blk,bld->kd", dlogits, attended)
        return d_att.contiguous(), d_unatt.contiguous(), d_weight, dlogits.sum((0, 1))

    return OpImpl(forward, backward)


def _stage_gate_impl(calls):
    def forward(stages, weight, bias, tau):
        calls.append(("stage_gate", "forward"))
        out, s = lib_reference.stage_gate(stages, weight, bias, tau)
        return out.contiguous(), s.contiguous()

    def backward(dout, ds, stages, weight, s, out, tau):
        calls.append(("stage_gate", "backward"))
        dpre = dout * (out > 0)
        ds = ds + torch.stack([(dpre * x).sum(-1) for x in stages], dim=-1)
        dlogits = _softmax_backward(s, ds, tau)
        d_cat = (dlogits @ weight).split(stages[0].shape[-1], dim=-1)
        d_stages = torch.stack([dpre * s[..., t : t + 1] + d_cat[t] for t in range(len(stages))])
        d_weight = torch.einsum("blk,bld->kd", dlogits, torch.cat(stages, dim=-1))
        return d_stages.contiguous(), d_weight, dlogits.sum((0, 1))

    return OpImpl(forward, backward)


@pytest.fixture
def isolated_registry(monkeypatch):
    """The registry's tables, restored after the test whatever it registers."""
    monkeypatch.setattr(registry, "_BACKENDS", dict(registry._BACKENDS))
    monkeypatch.setattr(registry, "_IMPLS", dict(registry._IMPLS))
    monkeypatch.setattr(registry, "_PASSED_OVER", {})


def _register_standin(calls, input_reason=lambda inputs: None, supports=None, name="cpp", rank=0):
    registry.register_backend(BackendInfo(name, lambda: None, input_reason, preference={"cpu": rank}))
    for op, impl in (("tanh_attention", _tanh_attention_impl), ("gate", _gate_impl), ("stage_gate", _stage_gate_impl)):
        standin_impl = impl(calls)
        registry.register_impl(op, name, OpImpl(standin_impl.forward, standin_impl.backward, supports=supports))


@pytest.fixture
def standin(isolated_registry):
    """Registers the stand-in as "cpp" (first choice on CPU); yields the list of calls it receives."""
    calls = []
    _register_standin(calls)
    return calls


def inputs_of(op="tanh_attention", dtype=torch.float32, device=CPU, **sizes):
    return Inputs(op, device, dtype, sizes)


OP_SIZES = {  # the sizes of the OP_CALLS below, as dispatch sees them
    "tanh_attention": {"B": 2, "Mq": 3, "N": 7, "D": 5, "E": 4},
    "gate": {"B": 2, "L": 3, "d": 5},
    "stage_gate": {"T": 3, "B": 2, "L": 3, "d": 5},
}
OP_CALLS = {  # op -> a call of the public op on (B=2)-batched inputs of the given dtype
    "tanh_attention": lambda dtype, **kw: avkernels.tanh_attention(
        torch.randn(2, 3, 5, dtype=dtype), torch.randn(2, 7, 5, dtype=dtype), torch.randn(2, 7, 4, dtype=dtype), **kw
    ),
    "gate": lambda dtype, **kw: avkernels.gate(
        *(torch.randn(2, 3, 5, dtype=dtype) for _ in range(2)), torch.randn(2, 5, dtype=dtype),
        torch.randn(2, dtype=dtype), **kw
    ),
    "stage_gate": lambda dtype, **kw: avkernels.stage_gate(
        [torch.randn(2, 3, 5, dtype=dtype) for _ in range(3)], torch.randn(3, 15, dtype=dtype),
        torch.randn(3, dtype=dtype), **kw
    ),
}


# ----------------------------------------------------------------------------------------------------------------
# Choosing a backend
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("op", registry.OPS)
def test_default_is_first_backend_of_the_preference_that_can_run_the_inputs(op):
    order = registry.preference("cpu")
    assert order[-1] == "reference"
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        inputs = inputs_of(op, dtype, **OP_SIZES[op])
        first = next(name for name in order if not registry.why_not(name, inputs))
        assert registry.resolve(None, inputs) == first


def test_default_prefers_a_built_cpu_backend(standin):
    assert registry.resolve(None, inputs_of()) == "cpp"
    avkernels.tanh_attention(rand(1, 2, 3), rand(1, 4, 3), rand(1, 4, 2))
    assert [c[:2] for c in standin] == [("tanh_attention", "forward")]


def test_default_skips_a_backend_that_cannot_run_the_device(isolated_registry):
    _register_standin([], input_reason=lambda inputs: "it runs on the moon only")
    assert registry.resolve(None, inputs_of()) == "reference"
    assert "passed over for the last tanh_attention call" in avkernels.backend_status("tanh_attention")["cpp"]
    assert "it runs on the moon only" in avkernels.backend_status("tanh_attention")["cpp"]
    with pytest.raises(RuntimeError, match=re.escape("backend 'cpp'") + ".*it runs on the moon only"):
        registry.resolve("cpp", inputs_of())


def test_default_falls_through_on_dtype_and_a_named_backend_says_why(isolated_registry):
    calls = []
    _register_standin(calls, input_reason=lambda inputs: registry.dtype_reason(inputs.dtype, (F64,), "cpp"))
    avkernels.tanh_attention(rand(1, 2, 3), rand(1, 4, 3), rand(1, 4, 2))
    assert len(calls) == 1
    out = OP_CALLS["tanh_attention"](torch.float16)  # falls through to the reference, in float16
    assert out.dtype == torch.float16 and len(calls) == 1
    status = avkernels.backend_status("tanh_attention")["cpp"]
    assert status.startswith("available; passed over") and "float16" in status and "computes in float64" in status
    msg = "tanh_attention: backend 'cpp' (from backend) cannot run tanh_attention on cpu in float16"
    with pytest.raises(RuntimeError, match=re.escape(msg) + ".*the cpp backend computes in float64, got float16"):
        OP_CALLS["tanh_attention"](torch.float16, backend="cpp")
    avkernels.tanh_attention(rand(1, 2, 3), rand(1, 4, 3), rand(1, 4, 2))  # a call that runs clears the record
    assert avkernels.backend_status("tanh_attention")["cpp"] == "available"


def test_default_falls_through_on_sizes_and_options(isolated_registry):
    calls = []
    def no_masks_no_long_keys(inputs):
        if inputs.options.get("return_mask"):
            return "it cannot return the dropout mask"
        return "it takes N <= 8" if inputs.sizes.get("N", 0) > 8 else None
    _register_standin(calls, supports=no_masks_no_long_keys)
    q = rand(1, 2, 3)
    avkernels.tanh_attention(q, rand(1, 8, 3), rand(1, 8, 2))
    avkernels.tanh_attention(q, rand(1, 9, 3), rand(1, 9, 2))
    avkernels.tanh_attention(q, rand(1, 8, 3), rand(1, 8, 2), dropout_p=0.5, training=True, return_mask=True)
    assert len(calls) == 1  # the second and third calls fell through to the reference
    with pytest.raises(RuntimeError, match="it takes N <= 8"):
        avkernels.tanh_attention(q, rand(1, 9, 3), rand(1, 9, 2), backend="cpp")


def test_a_new_backend_needs_no_central_list(isolated_registry):
    calls = []
    _register_standin(calls, name="mine", rank=-1)  # ranked before every built-in CPU backend
    assert "mine" in avkernels.backends() and registry.preference("cpu")[0] == "mine"
    avkernels.gate(rand(1, 2, 3), rand(1, 2, 3), rand(2, 3), rand(2))
    assert calls == [("gate", "forward")]
    model = avkernels.DCA((3, 5), 2, backend="mine").double()
    model(rand(1, 2, 3), rand(1, 2, 5))
    assert {c[0] for c in calls} == {"tanh_attention", "gate"}


def test_reference_always_available():
    assert "reference" in avkernels.backends()
    assert set(avkernels.backends()) <= set(registry.registered())
    for op in (None, *registry.OPS):
        status = avkernels.backend_status(op)
        assert set(status) == set(registry.registered()) and status["reference"] == "available"
        assert all(isinstance(reason, str) and reason for reason in status.values())


def test_backend_status_of_an_unknown_op():
    with pytest.raises(ValueError, match="op: expected None or one of .* got 'softmax'"):
        avkernels.backend_status("softmax")


def test_unknown_backend_name():
    msg = f"must be one of {registry.registered()} or None, got 'gpu'"
    with pytest.raises(ValueError, match=re.escape(msg)):
        avkernels.tanh_attention(rand(1, 2, 3), rand(1, 4, 3), rand(1, 4, 2), backend="gpu")
    with pytest.raises(ValueError, match="got 'Reference'"):
        avkernels.gate(rand(1, 2, 3), rand(1, 2, 3), rand(2, 3), rand(2), backend="Reference")
    with pytest.raises(ValueError, match="backend: expected None or one of"):
        avkernels.JCA((3, 5), 2, backend="gpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the 'cuda' backend may be usable on a machine with a GPU")
@pytest.mark.parametrize("op", registry.OPS)
def test_known_but_unavailable_backend(op):
    # The message names the op, the backend, the call and a non-empty reason.
    with pytest.raises(RuntimeError, match=rf"{op}: backend 'cuda' \(from backend\) cannot run {op} on cpu in float64 "
                                           rf"\(.*\): \S+"):
        OP_CALLS[op](torch.float64, backend="cuda")


def test_backend_without_the_op(isolated_registry):
    registry.register_backend(BackendInfo("cpp", lambda: None, lambda inputs: None, preference={"cpu": 0}))
    registry._IMPLS.pop(("gate", "cpp"), None)  # the real cpp backend, when built, has one
    with pytest.raises(RuntimeError, match=re.escape("backend 'cpp'") + ".*it has no implementation of gate"):
        avkernels.gate(rand(1, 2, 3), rand(1, 2, 3), rand(2, 3), rand(2), backend="cpp")
    assert registry.resolve(None, inputs_of("gate")) == "reference"
    assert avkernels.backend_status("gate")["cpp"] == "it has no implementation of gate"


def test_environment_variable_forces_a_backend(standin, monkeypatch):
    q, k, v = rand(1, 2, 3), rand(1, 4, 3), rand(1, 4, 2)
    monkeypatch.setenv(BACKEND_ENV_VAR, "reference")
    avkernels.tanh_attention(q, k, v)
    assert standin == []  # "cpp" would be the default; the variable forced the reference
    monkeypatch.setenv(BACKEND_ENV_VAR, "cpp")
    avkernels.tanh_attention(q, k, v)
    assert len(standin) == 1
    avkernels.tanh_attention(q, k, v, backend="reference")  # an explicit argument wins over the variable
    assert len(standin) == 1
    monkeypatch.setenv(BACKEND_ENV_VAR, "")  # empty means unset
    assert registry.resolve(None, inputs_of()) == "cpp"


def test_environment_variable_invalid_or_unavailable(monkeypatch):
    x = rand(1, 2, 3)
    monkeypatch.setenv(BACKEND_ENV_VAR, "fast")
    with pytest.raises(ValueError, match=re.escape(f"${BACKEND_ENV_VAR} must be one of") + ".*got 'fast'"):
        avkernels.tanh_attention(x, x, x)
    if not torch.cuda.is_available():
        monkeypatch.setenv(BACKEND_ENV_VAR, "cuda")
        msg = f"backend 'cuda' (from ${BACKEND_ENV_VAR}) cannot run tanh_attention on cpu"
        with pytest.raises(RuntimeError, match=re.escape(msg)):
            avkernels.JCA((3, 5), 2)(rand(1, 2, 3).float(), rand(1, 2, 5).float())


def test_register_errors(isolated_registry):
    before = dict(registry._BACKENDS)
    with pytest.raises(ValueError, match=re.escape("backend name must be an identifier") + ".*got 'my backend'"):
        registry.register_backend(BackendInfo("my backend", lambda: None, lambda inputs: None))
    assert registry._BACKENDS == before
    with pytest.raises(ValueError, match=re.escape("op must be one of") + ".*got 'softmax'"):
        registry.register_impl("softmax", "reference", OpImpl(None, None))
    registry._BACKENDS.pop("cpp", None)  # the isolated copy: a real "cpp" build stays registered
    with pytest.raises(ValueError, match=re.escape("register_backend('cpp') must come before register_impl")):
        registry.register_impl("gate", "cpp", _gate_impl([]))


# ----------------------------------------------------------------------------------------------------------------
# The device x dtype matrix: backend=None runs every op in every dtype on every device here; every backend asked by
# name either runs the call or refuses it with the reasons that why_not gives.
# ----------------------------------------------------------------------------------------------------------------

DEVICES = [CPU] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _call_on(op, dtype, device, **kw):
    torch.manual_seed(0)
    with torch.device(device):
        return OP_CALLS[op](dtype, **kw)


@pytest.mark.parametrize("device", DEVICES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("op", registry.OPS)
def test_device_dtype_matrix(op, dtype, device):
    out = _call_on(op, dtype, device)
    want = _call_on(op, dtype, device, backend="reference")
    outs, wants = (out, want) if isinstance(out, tuple) else ((out,), (want,))
    tol = {torch.float16: 1e-2, torch.bfloat16: 4e-2, torch.float32: 1e-5, torch.float64: 1e-12}[dtype]
    for got, ref in zip(outs, wants):
        assert got.dtype == dtype and got.device.type == device.type
        torch.testing.assert_close(got, ref, rtol=tol, atol=tol)
    for name in registry.registered():
        reasons = registry.why_not(name, Inputs(op, device, dtype, OP_SIZES[op]))
        if reasons:
            with pytest.raises(RuntimeError, match=re.escape(f"backend {name!r}")):
                _call_on(op, dtype, device, backend=name)
        else:
            got = _call_on(op, dtype, device, backend=name)
            assert (got[0] if isinstance(got, tuple) else got).dtype == dtype


# ----------------------------------------------------------------------------------------------------------------
# The custom-op plumbing, through the stand-in backend
# ----------------------------------------------------------------------------------------------------------------


def _grads(fn, inputs, weights):
    out = fn(*inputs)
    outs = out if isinstance(out, tuple) else (out,)
    return outs, torch.autograd.grad(sum((o * w).sum() for o, w in zip(outs, weights)), inputs)


def _compare(fn_a, fn_b, inputs):
    """Outputs and input gradients (for random output weights) of ``fn_a`` and ``fn_b`` agree."""
    first = fn_a(*inputs)
    weights = [torch.randn_like(o) for o in (first if isinstance(first, tuple) else (first,))]
    outs_a, grads_a = _grads(fn_a, inputs, weights)
    outs_b, grads_b = _grads(fn_b, inputs, weights)
    for x, y in zip((*outs_a, *grads_a), (*outs_b, *grads_b)):
        torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("activation", [None, "tanh_relu"])
@pytest.mark.parametrize("v_form", ["batched", "2d", "batch1", "expanded"])
def test_tanh_attention_custom_op_matches_reference(standin, activation, v_form):
    B, Mq, N, D, E = 3, 5, 4, 3, 6
    q, k = rand(B, Mq, D, requires_grad=True), rand(B, N, D, requires_grad=True)
    w = rand(B if v_form == "batched" else 1, N, E, requires_grad=True)

    def run(backend):
        def fn(q, k, w):
            v = {"batched": w, "2d": w[0], "batch1": w, "expanded": w.expand(B, N, E)}[v_form]
            return avkernels.tanh_attention(q, k, v, activation=activation, backend=backend)

        return fn

    _compare(run("cpp"), run("reference"), (q, k, w))
    assert standin and all(c[4][0] == (B if v_form == "batched" else 1) for c in standin)  # shared v stays shared
    assert {c[1] for c in standin} == {"forward", "backward"}


@pytest.mark.parametrize("activation", [None, "tanh_relu"])
def test_tanh_attention_custom_op_dropout(standin, activation):
    B, Mq, N, D, E, p = 2, 6, 5, 3, 4, 0.4
    q, k, v = rand(B, Mq, D, requires_grad=True), rand(B, N, D, requires_grad=True), rand(B, N, E, requires_grad=True)
    o, mask = avkernels.tanh_attention(
        q, k, v, dropout_p=p, training=True, activation=activation, return_mask=True, backend="cpp"
    )
    assert mask.dtype == torch.bool and mask.shape == (B, Mq, N) and mask.any() and not mask.all()
    replay, _ = lib_reference.tanh_attention(q, k, v, 1 / D**0.5, p, activation, dropout_mask=mask)
    torch.testing.assert_close(o, replay, rtol=1e-12, atol=1e-12)
    do = torch.randn_like(o)
    # Backward redraws the mask from the seed that forward used: the gradients are those of the replayed mask.
    torch.testing.assert_close(
        torch.autograd.grad(o, (q, k, v), do), torch.autograd.grad(replay, (q, k, v), do), rtol=1e-10, atol=1e-12
    )
    (fwd_seed,) = {c[2] for c in standin if c[1] == "forward"}
    (bwd_seed,) = {c[2] for c in standin if c[1] == "backward"}
    assert fwd_seed == bwd_seed
    # torch.manual_seed reproduces the draw; a second call draws a different mask.
    torch.manual_seed(123)
    _, m1 = avkernels.tanh_attention(q, k, v, dropout_p=p, training=True, return_mask=True, backend="cpp")
    _, m2 = avkernels.tanh_attention(q, k, v, dropout_p=p, training=True, return_mask=True, backend="cpp")
    torch.manual_seed(123)
    _, m3 = avkernels.tanh_attention(q, k, v, dropout_p=p, training=True, return_mask=True, backend="cpp")
    assert torch.equal(m1, m3) and not torch.equal(m1, m2)


def test_tanh_attention_custom_op_no_dropout_outside_training(standin):
    q, k, v = rand(2, 3, 4), rand(2, 5, 4), rand(2, 5, 6)
    o, mask = avkernels.tanh_attention(q, k, v, dropout_p=0.5, return_mask=True, backend="cpp")
    assert mask is None and standin[-1][3] == 0.0
    torch.testing.assert_close(o, spec.tanh_attention(q, k, v), rtol=1e-12, atol=1e-12)


def test_tanh_attention_custom_op_empty_uses_reference(standin):
    o = avkernels.tanh_attention(rand(0, 3, 4), rand(0, 5, 4), rand(0, 5, 6), backend="cpp")
    assert o.shape == (0, 3, 6) and standin == []


def test_gate_custom_op_matches_reference(standin):
    B, L, d = 2, 5, 3
    inputs = (rand(B, L, d, requires_grad=True), rand(B, L, d, requires_grad=True))
    inputs += (rand(2, d, requires_grad=True), rand(2, requires_grad=True))
    _compare(
        lambda *x: avkernels.gate(*x, tau=0.3, backend="cpp"),
        lambda *x: avkernels.gate(*x, tau=0.3, backend="reference"),
        inputs,
    )
    # Only one of the two outputs used: the other's gradient arrives as None and must count as zeros.
    for index in (0, 1):
        got = torch.autograd.grad(avkernels.gate(*inputs, backend="cpp")[index].sum(), inputs)
        want = torch.autograd.grad(  # g does not depend on the unattended features
            avkernels.gate(*inputs, backend="reference")[index].sum(), inputs, allow_unused=True, materialize_grads=True
        )
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_stage_gate_custom_op_matches_reference(standin):
    B, L, d, T = 2, 4, 3, 3
    stages = tuple(rand(B, L, d, requires_grad=True) for _ in range(T))
    inputs = (*stages, rand(T, T * d, requires_grad=True), rand(T, requires_grad=True))

    def run(backend):
        return lambda *x: avkernels.stage_gate(list(x[:T]), x[T], x[T + 1], tau=0.4, backend=backend)

    _compare(run("cpp"), run("reference"), inputs)
    for index in (0, 1):
        got = torch.autograd.grad(run("cpp")(*inputs)[index].sum(), inputs)
        want = torch.autograd.grad(run("reference")(*inputs)[index].sum(), inputs)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_custom_ops_opcheck(standin):
    # torch.library's own checks of the registrations: schema, fake (meta) kernels, autograd registration. The
    # stand-in has Python kernels, so it runs through ops of its own, named after the backend.
    ops = torch.ops.avkernels
    q, k, v = rand(2, 3, 4, requires_grad=True), rand(2, 5, 4, requires_grad=True), rand(1, 5, 6, requires_grad=True)
    seed = torch.tensor([7])
    for p, act, ret, map, bias in ((0.0, "none", False, "tanh", 0.0), (0.3, "tanh_relu", True, "sigmoid", -1.0)):
        torch.library.opcheck(ops.cpp_tanh_attention, (q, k, v, seed, 0.5, p, act, ret, map, bias))
    a, u = rand(2, 3, 4, requires_grad=True), rand(2, 3, 4, requires_grad=True)
    w, b = rand(2, 4, requires_grad=True), rand(2, requires_grad=True)
    torch.library.opcheck(ops.cpp_gate, (a, u, w, b, 0.2))
    torch.library.opcheck(ops.cpp_stage_gate, ([a, u], rand(2, 8, requires_grad=True), b, 0.2))


def test_custom_ops_compile_without_graph_breaks(standin):
    # The seed travels as a tensor so that torch.compile traces the public ops whole (fullgraph=True), dropout
    # included; the compiled function draws the same mask as the eager one from the same torch seed.
    def fn(q, k, v, w, b, sw, sb):
        o = avkernels.tanh_attention(q, k, v, dropout_p=0.3, training=True, activation="tanh_relu", backend="cpp")
        out, g = avkernels.gate(o, q, w, b, backend="cpp")
        z, s = avkernels.stage_gate([out, q], sw, sb, backend="cpp")
        return z, g, s

    shapes = [(2, 3, 4), (2, 5, 4), (5, 4), (2, 4), (2,), (2, 8), (2,)]
    inputs = tuple(rand(*shape, requires_grad=True) for shape in shapes)
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    def seeded(f):
        return lambda *x: (torch.manual_seed(1), f(*x))[1]

    try:
        _compare(seeded(compiled), seeded(fn), inputs)
    finally:
        torch._dynamo.reset()


@pytest.mark.parametrize("form", ["dense", "additive"])
def test_modules_route_through_the_chosen_backend(standin, form):
    model = avkernels.GRJCA((3, 5), 4, form=form, backend="cpp").double().eval()
    X = [rand(2, 4, 3, requires_grad=True), rand(2, 4, 5, requires_grad=True)]
    _compare(lambda *x: model.set_backend("cpp")(*x), lambda *x: model.set_backend("reference")(*x), tuple(X))
    ops = {c[0] for c in standin}
    assert ops == {"tanh_attention", "gate", "stage_gate"}
    if form == "additive":  # W_cm is shared by the batch: it reaches the kernel as a (1, d, k) value matrix
        assert all(c[4][0] == 1 for c in standin if c[0] == "tanh_attention")
    standin.clear()
    model.set_backend(None)(*X)  # None: the stand-in is the first choice on CPU
    assert {c[0] for c in standin} == {"tanh_attention", "gate", "stage_gate"}



@pytest.mark.skipif("triton" not in avkernels.backends(), reason="the triton backend is not usable here")
def test_triton_size_limits_are_dispatch_reasons():
    # Sizes the kernels cannot index are passed over by backend=None and refused by name, before any launch.
    big_map = Inputs("tanh_attention", CPU, torch.float32, {"B": 1, "Mq": 2**16, "N": 2**15, "D": 16, "E": 16})
    assert registry.why_not("triton", big_map) == [
        "the triton kernels index the map of one batch element in int32: Mq * N < 2**31, got Mq=65536, N=32768"
    ]
    many_rows = Inputs("gate", CPU, torch.float32, {"B": 2**16, "L": 2**15, "d": 8})
    assert "B * L < 2**31" in registry.why_not("triton", many_rows)[0]
    stages = Inputs("stage_gate", CPU, torch.float32, {"T": 3, "B": 2**16, "L": 2**15, "d": 8})
    assert "B * L < 2**31" in registry.why_not("triton", stages)[0]
    assert registry.why_not("triton", Inputs("gate", CPU, torch.float32, {"B": 4, "L": 16, "d": 8})) == []
