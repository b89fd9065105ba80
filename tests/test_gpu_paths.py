"""GPU-only checks of the fused backends that the interpreter-first suites cannot make (skipped without a GPU).

The other suites run on CUDA too when a GPU is there (scripts/gpu_check.sh runs them), but their exact checks are in
fp64, which the triton backend refuses on CUDA by design. Here every fused GPU backend (``triton``, ``cuda``) runs
in fp32, bf16 and fp16 at the layouts the models launch, against an fp64 oracle: the output and every gradient,
dropout through the returned mask, autocast inside a fusion model, ``torch.compile`` with the default (inductor)
backend, and bit-for-bit determinism at the official size.

Tolerances: fp32 within 2e-5 of the tensor's scale; fp16/bf16 by flash-attention's rule (error against fp64 at most
twice that of the reference backend computing in the same dtype, plus the rounding of the exact answer to it).
"""

import copy

import pytest
import torch

import avkernels

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

DEVICE = "cuda"
GPU_BACKENDS = ("triton", "cuda")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _backend(name):
    if name not in avkernels.backends():
        pytest.skip(f"{name} backend unavailable: {avkernels.backend_status().get(name)}")
    return name


def _run(backend, q, k, v, do, **kwargs):
    leaves = [x.detach().requires_grad_(True) for x in (q, k, v)]
    out = avkernels.tanh_attention(*leaves, backend=backend, **kwargs)
    o, mask = out if kwargs.get("return_mask") else (out, None)
    return [o.detach(), *torch.autograd.grad(o, leaves, do.to(o.dtype))], mask


def _oracle(q, k, v, do, scale, activation=None, mask=None, p=0.0):
    """SPEC 1 in fp64 (v may be shared: batch 1)."""
    leaves = [x.detach().double().requires_grad_(True) for x in (q, k, v)]
    q64, k64, v64 = leaves
    c = torch.tanh(scale * torch.einsum("bmd,bnd->bmn", q64, k64))
    if mask is not None:
        c = torch.where(mask, c / (1.0 - p), torch.zeros_like(c))
    o = torch.einsum("bmn,bne->bme", c, v64.expand(q64.shape[0], -1, -1))
    if activation == "tanh_relu":
        o = torch.relu(torch.tanh(o))
    return [o.detach(), *torch.autograd.grad(o, leaves, do.double())]


def _check(label, ours, in_dtype, oracle):
    for name, a, b, c in zip(("o", "dq", "dk", "dv"), ours, in_dtype, oracle):
        assert a.dtype == b.dtype and a.shape == c.shape, f"{label} {name}: {a.dtype} {tuple(a.shape)}"
        err = (a.double() - c).abs().max().item()
        if a.dtype == torch.float32:
            bound = 2e-5 * max(1.0, c.abs().max().item())
        else:
            ref_err = (b.double() - c).abs().max().item()
            bound = 2 * ref_err + 2 * (c.to(a.dtype).double() - c).abs().max().item() + 1e-12
        assert err <= bound, f"{label} {name}: max error {err:.3e} > {bound:.3e}"


def _dense_block_inputs(b, mq, n, d, dtype):
    """The dense block's call: q = Q^T and v = V_m^T are transposed views, k is contiguous."""
    q = torch.randn(b, d, mq, device=DEVICE, dtype=dtype).transpose(1, 2)
    k = torch.randn(b, n, d, device=DEVICE, dtype=dtype)
    v = torch.randn(b, d, n, device=DEVICE, dtype=dtype).transpose(1, 2)
    do = torch.randn(b, mq, d, device=DEVICE, dtype=dtype)
    return q, k, v, do


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_official_call_matches_fp64_oracle(backend, dtype):
    """One modality of the official dense block (Mq 1024, N 512, D = E = 16, tanh_relu), every gradient."""
    q, k, v, do = _dense_block_inputs(2, 1024, 512, 16, dtype)
    kwargs = dict(scale=1024**-0.5, activation="tanh_relu")
    ours, _ = _run(_backend(backend), q, k, v, do, **kwargs)
    in_dtype, _ = _run("reference", q, k, v, do, **kwargs)
    _check(f"{backend} {dtype}", ours, in_dtype, _oracle(q, k, v, do, **kwargs))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_wide_head_and_shared_v_match_fp64_oracle(backend, dtype):
    """The long shape's head (D = E = 64) with tails, and the additive form's batch-shared v."""
    torch.manual_seed(1)
    q = torch.randn(3, 300, 64, device=DEVICE, dtype=dtype)
    k = torch.randn(3, 257, 64, device=DEVICE, dtype=dtype)
    do = torch.randn(3, 300, 64, device=DEVICE, dtype=dtype)
    for v in (torch.randn(3, 257, 64, device=DEVICE, dtype=dtype), torch.randn(1, 257, 64, device=DEVICE, dtype=dtype)):
        ours, _ = _run(_backend(backend), q, k, v, do)
        in_dtype, _ = _run("reference", q, k, v, do)
        _check(f"{backend} {dtype} v{tuple(v.shape)}", ours, in_dtype, _oracle(q, k, v, do, 64**-0.5))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_dropout_through_the_mask(backend):
    """Training-mode dropout equals the fp64 formula with the mask the kernel reports, in every gradient too."""
    q, k, v, do = _dense_block_inputs(2, 256, 128, 16, torch.float32)
    kwargs = dict(scale=0.25, activation="tanh_relu", dropout_p=0.6, training=True, return_mask=True)
    torch.manual_seed(3)
    ours, mask = _run(_backend(backend), q, k, v, do, **kwargs)
    keep = mask.float().mean().item()
    assert abs(keep - 0.4) < 0.01, f"keep rate {keep}"
    oracle = _oracle(q, k, v, do, 0.25, "tanh_relu", mask=mask, p=0.6)
    _check(backend, ours, ours, oracle)


@pytest.mark.gpu
def test_triton_and_cuda_draw_the_same_mask():
    _backend("triton"), _backend("cuda")
    q, k, v, _ = _dense_block_inputs(2, 100, 70, 16, torch.float32)
    masks = []
    for backend in GPU_BACKENDS:
        torch.manual_seed(11)
        masks.append(avkernels.tanh_attention(q, k, v, dropout_p=0.3, training=True, return_mask=True,
                                              backend=backend)[1])
    assert torch.equal(masks[0], masks[1])


@pytest.mark.gpu
@pytest.mark.parametrize("form", ["dense", "additive"])
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_autocast_bf16_fusion_model(backend, form):
    """GRJCA under torch.autocast(bf16) on a fused backend agrees with the reference backend under autocast."""
    _backend(backend)
    torch.manual_seed(0)
    model = avkernels.GRJCA(dims=(64, 32), seq_len=16, form=form, dropout=0.0).to(DEVICE)
    twin = copy.deepcopy(model)
    model.set_backend(backend)
    twin.set_backend("reference")
    features = [torch.randn(4, 16, d, device=DEVICE) for d in (64, 32)]
    results = []
    for m in (model, twin):
        leaves = [x.clone().requires_grad_(True) for x in features]
        with torch.autocast("cuda", dtype=torch.bfloat16):
            outs = m(*leaves)
        loss = sum((o.float() ** 2).mean() for o in outs)
        grads = torch.autograd.grad(loss, leaves)
        results.append([o.float() for o in outs] + list(grads))
    for i, (a, b) in enumerate(zip(*results)):
        scale = max(1.0, b.abs().max().item())
        assert (a - b).abs().max().item() <= 5e-2 * scale, f"tensor {i}: autocast results differ"


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_torch_compile_inductor(backend):
    """The default torch.compile backend (inductor, which generates its own Triton around the custom op)."""
    _backend(backend)
    q, k, v, do = _dense_block_inputs(2, 128, 64, 16, torch.float32)

    def fn(q, k, v):
        return avkernels.tanh_attention(q, k, v, activation="tanh_relu", backend=backend) * 2.0 + 1.0

    leaves = [x.detach().requires_grad_(True) for x in (q, k, v)]
    compiled = torch.compile(fn, fullgraph=True)
    o_c = compiled(*leaves)
    g_c = torch.autograd.grad(o_c, leaves, do)
    o_e = fn(*leaves)
    g_e = torch.autograd.grad(o_e, leaves, do)
    torch.testing.assert_close(o_c, o_e, rtol=1e-6, atol=1e-6)
    for a, b in zip(g_c, g_e):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_backward_bitwise_reproducible_at_official_size(backend):
    """Batch 8 of the official call with dropout, twice under torch.use_deterministic_algorithms: same bits."""
    _backend(backend)
    q, k, v, do = _dense_block_inputs(8, 1024, 512, 16, torch.float32)
    kwargs = dict(scale=1024**-0.5, activation="tanh_relu", dropout_p=0.6, training=True)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        runs = []
        for _ in range(2):
            torch.manual_seed(5)
            runs.append(_run(backend, q, k, v[:1], do, **kwargs)[0])
    finally:
        torch.use_deterministic_algorithms(previous)
    for a, b in zip(*runs):
        assert torch.equal(a, b)
