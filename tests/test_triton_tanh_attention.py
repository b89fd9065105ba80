"""The triton backend of tanh_attention against fp64 references (runs in Triton's interpreter without a GPU).

Two references: the library's plain-PyTorch ``avkernels.reference.tanh_attention`` run in fp64, and an independent
few-line fp64 formula written here (so a shared mistake in the library's reference cannot hide a kernel bug).
Tolerances: fp64 to ~1e-12 relative to the tensor's scale; fp32 to 2e-5 of it; fp16/bf16 by flash-attention's rule,
``max|ours - ref64| <= 2 * max|ref_in_dtype - ref64| + floor`` with ``floor`` the rounding error of storing the
exact answer in that dtype.
"""

import pytest
import torch

import avkernels
from avkernels import reference
from avkernels.ops.triton import tanh_attention as triton_tanh_attention

from conftest import DEVICE

pytestmark = pytest.mark.skipif("triton" not in avkernels.backends(), reason="triton backend unavailable here")

GRAD_NAMES = ("dq", "dk", "dv")


def formula64(q, k, v, scale, activation=None, mask=None, p=0.0):
    """SPEC 1 in fp64, written independently of avkernels.reference."""
    c = torch.tanh(scale * torch.einsum("bmd,bnd->bmn", q.double(), k.double()))
    if mask is not None:
        c = torch.where(mask, c / (1.0 - p), torch.zeros_like(c))
    o = torch.einsum("bmn,bne->bme", c, v.double().expand(q.shape[0], -1, -1))
    return torch.relu(torch.tanh(o)) if activation == "tanh_relu" else o


def run(q, k, v, do, **kwargs):
    """Output and input gradients of the public op (fresh leaves, so the inputs' own layouts reach the kernels)."""
    q, k, v = (x.detach().requires_grad_(True) for x in (q, k, v))
    out = avkernels.tanh_attention(q, k, v, **kwargs)
    o, mask = out if kwargs.get("return_mask") else (out, None)
    grads = torch.autograd.grad(o, (q, k, v), do)
    return o.detach(), grads, mask


def run_formula(q, k, v, do, scale, activation=None, mask=None, p=0.0):
    q, k, v = (x.detach().double().requires_grad_(True) for x in (q, k, v))
    o = formula64(q, k, v, scale, activation, mask, p)
    return o.detach(), torch.autograd.grad(o, (q, k, v), do.double())


def assert_close_scaled(name, ours, ref64, rel):
    """max|ours - ref64| <= rel * max(1, max|ref64|): a tolerance relative to the tensor's scale."""
    err = (ours.double() - ref64).abs().max().item()
    bound = rel * max(1.0, ref64.abs().max().item())
    assert err <= bound, f"{name}: max error {err:.3e} exceeds {bound:.3e}"


def assert_flash_rule(name, ours, ref_dtype, ref64):
    err = (ours.double() - ref64).abs().max().item()
    ref_err = (ref_dtype.double() - ref64).abs().max().item()
    floor = 2 * (ref64.to(ours.dtype).double() - ref64).abs().max().item()
    assert err <= 2 * ref_err + floor + 1e-12, (
        f"{name}: max error {err:.3e} > 2 * {ref_err:.3e} (reference in {ours.dtype}) + {floor:.3e}"
    )


def make_inputs(b, mq, n, d, e, dtype, v_batch=None):
    q = torch.randn(b, mq, d, dtype=dtype, device=DEVICE)
    k = torch.randn(b, n, d, dtype=dtype, device=DEVICE)
    v = torch.randn(b if v_batch is None else v_batch, n, e, dtype=dtype, device=DEVICE)
    do = torch.randn(b, mq, e, dtype=dtype, device=DEVICE)
    return q, k, v, do


CASES = [
    # (B, Mq, N, D, E, activation, scale)
    (1, 1, 1, 1, 1, None, None),
    (2, 7, 13, 5, 3, None, None),
    (3, 13, 7, 16, 16, "tanh_relu", None),
    (2, 33, 70, 9, 20, None, 0.37),
    (1, 130, 17, 16, 16, "tanh_relu", 0.05),  # two Mq blocks of 128 with a tail
    (2, 5, 40, 45, 33, "tanh_relu", None),  # the 64-wide head class
    (1, 17, 29, 70, 13, None, 0.02),  # D above one head block: chunked contraction and split dq columns
    (1, 11, 9, 8, 130, "tanh_relu", None),  # E above one head block: split output columns, chunked dP
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(str(x) for x in c[:5]) + f"-{c[5]}-{c[6]}")
def test_matches_fp64_references(case, dtype):
    b, mq, n, d, e, activation, scale = case
    q, k, v, do = make_inputs(b, mq, n, d, e, dtype)
    o, grads, _ = run(q, k, v, do, scale=scale, activation=activation, backend="triton")
    eff_scale = scale if scale is not None else d**-0.5
    o64, grads64 = run_formula(q, k, v, do, eff_scale, activation)
    rel = 1e-12 if dtype == torch.float64 else 2e-5
    assert o.dtype == dtype and o.shape == (b, mq, e)
    assert_close_scaled("o", o, o64, rel)
    for name, g, g64, x in zip(GRAD_NAMES, grads, grads64, (q, k, v)):
        assert g.shape == x.shape and g.dtype == dtype
        assert_close_scaled(name, g, g64, rel)
    # The library's own reference, run in fp64, agrees with the formula (and so with the kernels).
    lib_o, _ = reference.tanh_attention(q.double(), k.double(), v.double(), eff_scale, 0.0, activation)
    assert_close_scaled("reference o", lib_o, o64, 1e-12)


def test_large_head_and_map():
    """RJCMA-like sizes: D = 300 (heads looped in chunks; E = 40 keeps the interpreter's time down) and N around 300,
    in fp64 (its tiles are taller than fp32's TF32x3 ones, so the interpreter runs it faster; the CASES above cover
    fp32's looped class)."""
    q, k, v, do = make_inputs(1, 5, 301, 300, 40, torch.float64)
    o, grads, _ = run(q, k, v, do, backend="triton", activation="tanh_relu")
    o64, grads64 = run_formula(q, k, v, do, 300**-0.5, "tanh_relu")
    assert_close_scaled("o", o, o64, 1e-12)
    for name, g, g64 in zip(GRAD_NAMES, grads, grads64):
        assert_close_scaled(name, g, g64, 1e-12)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("activation", [None, "tanh_relu"])
def test_half_precision_flash_rule(dtype, activation):
    q, k, v, do = make_inputs(2, 19, 37, 16, 12, dtype)
    o, grads, _ = run(q, k, v, do, activation=activation, backend="triton")
    o64, grads64 = run_formula(q, k, v, do, 0.25, activation)
    o_pt, grads_pt, _ = run(q, k, v, do, activation=activation, backend="reference")
    assert o.dtype == dtype
    assert_flash_rule("o", o, o_pt, o64)
    for name, g, g_pt, g64 in zip(GRAD_NAMES, grads, grads_pt, grads64):
        assert g.dtype == dtype
        assert_flash_rule(name, g, g_pt, g64)


@pytest.mark.parametrize("layout", ["(N, E)", "(1, N, E)", "expanded"])
def test_shared_v(layout):
    """v shared over the batch: its gradient is the sum over the batch, in the shape v was given in."""
    b, mq, n, d, e = 3, 9, 14, 6, 5
    q, k, _, do = make_inputs(b, mq, n, d, e, torch.float64)
    base = torch.randn(1, n, e, dtype=torch.float64, device=DEVICE, requires_grad=True)
    v = {"(N, E)": base[0], "(1, N, E)": base, "expanded": base.expand(b, n, e)}[layout]
    q.requires_grad_(True)
    k.requires_grad_(True)
    o = avkernels.tanh_attention(q, k, v, activation="tanh_relu", backend="triton")
    dq, dk, dbase = torch.autograd.grad(o, (q, k, base), do)
    o64, (dq64, dk64, dv64) = run_formula(q, k, base, do, d**-0.5, "tanh_relu")
    assert dbase.shape == base.shape
    for name, ours, ref in (("o", o, o64), ("dq", dq, dq64), ("dk", dk, dk64), ("dv", dbase, dv64)):
        assert_close_scaled(name, ours, ref, 1e-12)


def test_strided_inputs_and_grad_output():
    """Transposed and step-sliced inputs and a non-contiguous grad_output are read through their strides."""
    b, mq, n, d, e = 2, 11, 13, 7, 6
    q = torch.randn(b, d, mq, dtype=torch.float64, device=DEVICE).transpose(1, 2)
    k = torch.randn(b, 2 * n, d + 3, dtype=torch.float64, device=DEVICE)[:, ::2, 1 : d + 1]
    v = torch.randn(e, b, n, dtype=torch.float64, device=DEVICE).permute(1, 2, 0)
    do = torch.randn(b, e, mq, dtype=torch.float64, device=DEVICE).transpose(1, 2)
    assert not any(x.is_contiguous() for x in (q, k, v, do))
    o, grads, _ = run(q, k, v, do, activation="tanh_relu", scale=0.3, backend="triton")
    o64, grads64 = run_formula(q, k, v, do, 0.3, "tanh_relu")
    assert_close_scaled("o", o, o64, 1e-12)
    for name, g, g64 in zip(GRAD_NAMES, grads, grads64):
        assert_close_scaled(name, g, g64, 1e-12)


@pytest.mark.parametrize("activation", [None, "tanh_relu"])
def test_dropout_matches_reference_with_same_mask(activation):
    b, mq, n, d, e, p = 2, 21, 35, 8, 7, 0.3
    q, k, v, do = make_inputs(b, mq, n, d, e, torch.float64)
    o, grads, mask = run(q, k, v, do, dropout_p=p, training=True, return_mask=True, activation=activation,
                         backend="triton")
    assert mask.dtype == torch.bool and mask.shape == (b, mq, n)
    o64, grads64 = run_formula(q, k, v, do, d**-0.5, activation, mask=mask, p=p)
    assert_close_scaled("o", o, o64, 1e-12)
    for name, g, g64 in zip(GRAD_NAMES, grads, grads64):
        assert_close_scaled(name, g, g64, 1e-12)
    # The same mask through the library's reference.
    lib_o, _ = reference.tanh_attention(q, k, v, d**-0.5, p, activation, dropout_mask=mask)
    assert_close_scaled("reference o", o, lib_o, 1e-12)


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


@pytest.mark.parametrize("activation", [None, "tanh_relu"])
def test_gradcheck_fp64(activation):
    q, k, v, _ = make_inputs(1, 3, 4, 3, 2, torch.float64)
    inputs = tuple(x.requires_grad_(True) for x in (q, k, v))
    fn = lambda q, k, v: avkernels.tanh_attention(q, k, v, scale=0.7, activation=activation, backend="triton")
    assert torch.autograd.gradcheck(fn, inputs)


def test_gradcheck_fp64_with_dropout():
    """Dropout is a fixed function of the seed: reseeding before every evaluation makes it differentiable."""
    q, k, v, _ = make_inputs(1, 3, 4, 2, 2, torch.float64)
    inputs = tuple(x.requires_grad_(True) for x in (q, k, v))

    def fn(q, k, v):
        torch.manual_seed(123)
        return avkernels.tanh_attention(q, k, v, dropout_p=0.4, training=True, backend="triton")

    assert torch.autograd.gradcheck(fn, inputs)


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
        triton_tanh_attention.forward(q, k, k, 0, 1.0, 0.0, "none", False)
