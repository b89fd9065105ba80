"""One conformance suite: each op's test body runs on every registered backend x dtype x shape.

Backends come from the registry (``avkernels.dispatch.registered()``), so a new backend is tested by registering
it; a backend that cannot run a case is skipped with the reason dispatch gives (``why_not``). Every case goes
through the public functions (``avkernels.tanh_attention(..., backend=name)`` and so on), checks the outputs and
every gradient (including the gradient through the gate values) against the reference backend run in float64, with
the one rule of ``tests/comparison.py``. fp64 gradcheck runs wherever a backend accepts float64, and
``tests/test_conformance_planted.py`` shows that these checks reject a wrong backend.

Without a GPU, ``triton`` runs in its interpreter (tests/conftest.py), so the shapes stay small; each shape still
crosses the tile edges of some backend (named in SHAPES).
"""

from typing import Callable, List, Sequence

import pytest
import torch

import avkernels
from avkernels.dispatch import OPS, Inputs, registered, why_not
from avkernels import reference
from avkernels.ops.declaration import declarations
from comparison import assert_all_close, assert_same_nonfinite

BACKENDS = registered()
DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
F64 = torch.float64


SMALL = {"tanh_attention": {"B": 1, "Mq": 1, "N": 1, "D": 1, "E": 1}, "gate": {"B": 1, "L": 1, "d": 1},
         "stage_gate": {"T": 1, "B": 1, "L": 1, "d": 1}}


def device_for(backend: str, op: str) -> torch.device:
    """The first device the backend runs this op on here (``cpu`` for cpp and the Triton interpreter, else cuda)."""
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        if not why_not(backend, Inputs(op, torch.device(device), torch.float32, SMALL[op])):
            return torch.device(device)
    return torch.device(devices[0])


def skip_unless_runs(backend: str, inputs: Inputs) -> None:
    reasons = why_not(backend, inputs)
    if reasons:
        pytest.skip(f"{backend}: " + "; ".join(reasons))


def run(fn: Callable, leaves: Sequence[torch.Tensor], grad_outputs: Sequence[torch.Tensor]):
    """The outputs of ``fn(*leaves)`` and the gradients of ``sum_i <outputs[i], grad_outputs[i]>`` w.r.t. every leaf
    (fresh leaves, so the inputs' own layouts reach the kernels)."""
    leaves = [x.detach().requires_grad_(True) for x in leaves]
    outputs = fn(*leaves)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    if sum(o.numel() for o in outputs) == 0:  # an empty batch: nothing to differentiate, only shapes to check
        return [o.detach() for o in outputs] + [torch.zeros_like(x) for x in leaves]
    grads = torch.autograd.grad(outputs, leaves, grad_outputs[: len(outputs)], allow_unused=True)
    return [o.detach() for o in outputs] + [torch.zeros_like(x) if g is None else g for x, g in zip(leaves, grads)]


def conforms(backend: str, call: Callable, leaves: List[torch.Tensor], grad_outputs: List[torch.Tensor],
             names: Sequence[str]) -> None:
    """The suite's one check: ``call(backend)(*leaves)`` in the leaves' dtype, outputs and gradients, against the
    reference in the same dtype and in float64."""
    ours = run(call(backend), leaves, grad_outputs)
    same = run(call("reference"), leaves, grad_outputs)
    exact = run(call("reference"), [x.to(F64) for x in leaves], [g.to(F64) for g in grad_outputs])
    assert_all_close(names, ours, same, exact)


def randn(*shape, dtype, device, scale=1.0):
    return (torch.randn(*shape, dtype=F64) * scale).to(device=device, dtype=dtype)


def strided(x: torch.Tensor) -> torch.Tensor:
    """The same values through a non-contiguous view (every other element of a buffer twice as wide)."""
    wide = torch.empty(*x.shape[:-1], 2 * x.shape[-1], dtype=x.dtype, device=x.device)
    wide[..., ::2] = x
    return wide[..., ::2]


# ------------------------------------------------------------------------------------------------- tanh_attention

# id -> (B, Mq, N, D, E, activation, layout[, scale]): scale None (1 / sqrt(D)) unless given. Layouts: "contiguous"; "strided" (q, k, v and the output gradient
# every other element of a wider buffer); "transposed" (q, v and the output gradient transposed or permuted views, k
# sliced in both of its last axes); "v_shared" (v is (N, E)); "v_batch1" (v is (1, N, E)); "v_expanded" (a
# batch-expanded view of one (1, N, E) v).
ATTENTION_SHAPES = {
    "ones": (1, 1, 1, 1, 1, None, "contiguous"),
    "ones_tanh_relu": (1, 1, 1, 1, 1, "tanh_relu", "contiguous"),
    "odd": (2, 7, 13, 5, 3, None, "contiguous"),
    "odd_tanh_relu_scaled": (2, 7, 13, 5, 3, "tanh_relu", "contiguous", 0.7),
    "prime_tanh_relu": (3, 13, 7, 17, 11, "tanh_relu", "contiguous"),
    "heads_16": (3, 13, 7, 16, 16, None, "contiguous", 0.7),
    "heads_16_tanh_relu": (3, 13, 7, 16, 16, "tanh_relu", "contiguous"),
    "tile_edges": (2, 33, 65, 17, 31, None, "contiguous"),  # cpp: 32-row and 64-key tiles
    "tile_edges_tanh_relu": (2, 33, 65, 17, 31, "tanh_relu", "contiguous", 0.7),
    "keys_70_scaled": (2, 33, 70, 9, 20, None, "contiguous", 0.37),
    "mq_blocks_tanh_relu": (1, 130, 17, 16, 16, "tanh_relu", "contiguous", 0.05),  # triton: two Mq blocks, a tail
    "head_45_tanh_relu": (2, 5, 40, 45, 33, "tanh_relu", "contiguous"),  # triton: the 64-wide head class
    "wide_head": (1, 17, 29, 70, 13, None, "contiguous", 0.02),  # triton: D over one head block
    "wide_value_tanh_relu": (1, 11, 9, 8, 130, "tanh_relu", "contiguous"),  # triton: E over one head block
    "long_rows": (1, 300, 130, 7, 1, None, "contiguous", 0.7),  # cpp: many row tiles, E = 1
    "long_rows_tanh_relu": (1, 300, 130, 7, 1, "tanh_relu", "contiguous"),
    "strided": (2, 9, 11, 6, 5, "tanh_relu", "strided"),
    "transposed": (2, 11, 13, 7, 6, "tanh_relu", "transposed", 0.3),
    "v_shared": (3, 5, 7, 4, 6, None, "v_shared"),
    "v_batch1_tanh_relu": (3, 9, 14, 6, 5, "tanh_relu", "v_batch1"),
    "v_expanded": (3, 5, 7, 4, 6, "tanh_relu", "v_expanded"),
    "empty_batch": (0, 3, 5, 4, 2, None, "contiguous"),
}
ATTENTION_GRADS = ("o", "dq", "dk", "dv")
# The sigmoid map (SPEC 1) on the shapes that cross every backend's tile edges and layouts: id -> map_bias.
SIGMOID_SHAPES = {"odd": 0.0, "odd_tanh_relu_scaled": -1.0, "tile_edges_tanh_relu": 0.5, "keys_70_scaled": -2.0,
                  "wide_head": 1.0, "wide_value_tanh_relu": -0.5, "long_rows": -3.0, "transposed": -1.0,
                  "v_expanded": 0.0, "empty_batch": 0.0}
# (shape id, map, map_bias): every shape with tanh, and SIGMOID_SHAPES with the sigmoid map.
ATTENTION_CASES = [(name, "tanh", 0.0) for name in ATTENTION_SHAPES] + [
    (name, "sigmoid", bias) for name, bias in SIGMOID_SHAPES.items()]
MAPS = [("tanh", 0.0), ("sigmoid", -0.7)]


def attention_case(shape, dtype, device):
    b, mq, n, d, e, _, layout = shape[:7]
    q, k = randn(b, mq, d, dtype=dtype, device=device), randn(b, n, d, dtype=dtype, device=device)
    do = randn(b, mq, e, dtype=dtype, device=device)
    if layout == "v_shared":
        v = randn(n, e, dtype=dtype, device=device)
    elif layout in ("v_batch1", "v_expanded"):
        v = randn(1, n, e, dtype=dtype, device=device)
    else:
        v = randn(b, n, e, dtype=dtype, device=device)
    if layout == "strided":
        q, k, v, do = (strided(x) for x in (q, k, v, do))
    if layout == "transposed":
        q = q.transpose(1, 2).contiguous().transpose(1, 2)
        k = torch.cat([randn(b, n, 1, dtype=dtype, device=device), k], 2)[..., 1:]
        v = v.permute(2, 0, 1).contiguous().permute(1, 2, 0)
        do = do.transpose(1, 2).contiguous().transpose(1, 2)
    return [q, k, v], [do]


def attention_inputs(q, k, v, dtype, device, **options) -> Inputs:
    b, mq, d = q.shape
    n, e = k.shape[1], v.shape[-1]
    return Inputs("tanh_attention", device, dtype, {"B": b, "Mq": mq, "N": n, "D": d, "E": e}, options)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", ATTENTION_CASES,
                         ids=[name if map == "tanh" else f"{name}-{map}" for name, map, _ in ATTENTION_CASES])
@pytest.mark.parametrize("backend", BACKENDS)
def test_tanh_attention(backend, case, dtype):
    device = device_for(backend, "tanh_attention")
    shape, map, map_bias = ATTENTION_SHAPES[case[0]], case[1], case[2]
    activation, layout, scale = shape[5], shape[6], (shape[7] if len(shape) > 7 else None)
    (q, k, v), grad_outputs = attention_case(shape, dtype, device)
    skip_unless_runs(backend, attention_inputs(q, k, v, dtype, device, activation=activation, map=map,
                                               shared_v=layout.startswith("v_")))

    def call(name):
        def fn(q, k, v):
            v = v.expand(q.shape[0], -1, -1) if layout == "v_expanded" else v
            return avkernels.tanh_attention(q, k, v, scale=scale, activation=activation, map=map, map_bias=map_bias,
                                            backend=name)
        return fn

    conforms(backend, call, [q, k, v], grad_outputs, ATTENTION_GRADS)


@pytest.mark.parametrize("map, map_bias", MAPS, ids=[m for m, _ in MAPS])
@pytest.mark.parametrize("activation", [None, "tanh_relu"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_tanh_attention_dropout(backend, dtype, activation, map, map_bias):
    """Training-mode dropout, v shared over the batch: the backend returns the keep-mask it drew (return_mask), the
    reference replays that mask, and outputs and gradients must agree. The mask itself: boolean, of the map's shape,
    about 1 - p kept."""
    device, p = device_for(backend, "tanh_attention"), 0.3
    (q, k, v), (do,) = attention_case((2, 24, 40, 8, 6, activation, "v_batch1"), dtype, device)
    skip_unless_runs(backend, attention_inputs(q, k, v, dtype, device, dropout=True, return_mask=True,
                                               activation=activation, shared_v=True, map=map))
    scale = 8**-0.5
    leaves = [x.detach().requires_grad_(True) for x in (q, k, v)]
    o, mask = avkernels.tanh_attention(*leaves, dropout_p=p, training=True, activation=activation, return_mask=True,
                                       map=map, map_bias=map_bias, backend=backend)
    ours = [o.detach(), *torch.autograd.grad(o, leaves, do)]
    assert mask.dtype == torch.bool and mask.shape == (2, 24, 40)
    assert abs(mask.float().mean().item() - (1 - p)) < 0.06

    def replay(cast):
        leaves = [cast(x).detach().requires_grad_(True) for x in (q, k, v)]
        o, _ = reference.tanh_attention(*leaves, scale, p, activation, dropout_mask=mask, map=map, map_bias=map_bias)
        return [o.detach(), *torch.autograd.grad(o, leaves, cast(do))]

    assert_all_close(ATTENTION_GRADS, ours, replay(lambda x: x), replay(lambda x: x.to(F64)))


@pytest.mark.parametrize("map, map_bias", MAPS, ids=[m for m, _ in MAPS])
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
@pytest.mark.parametrize("activation", [None, "tanh_relu"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_tanh_attention_gradcheck(backend, activation, dropout_p, map, map_bias):
    """fp64 gradcheck of the backend's own backward, v shared over the batch (dv sums over it). Dropout is a fixed
    function of the seed, which comes from torch's generator: reseeding before every evaluation draws the same mask,
    and backward must redraw it from the seed."""
    device = device_for(backend, "tanh_attention")
    q, k, v = (torch.randn(*s, dtype=F64, device=device, requires_grad=True) for s in ((2, 3, 2), (2, 4, 2), (4, 3)))
    skip_unless_runs(backend, attention_inputs(q, k, v, F64, device, dropout=dropout_p > 0, activation=activation,
                                               shared_v=True, map=map))

    def fn(q, k, v):
        torch.manual_seed(123)
        return avkernels.tanh_attention(q, k, v, scale=0.7, dropout_p=dropout_p, training=True, activation=activation,
                                        map=map, map_bias=map_bias, backend=backend)

    assert torch.autograd.gradcheck(fn, (q, k, v))


# ------------------------------------------------------------------------------------------------------- the gates

# id -> (B, L, d, layout); layout "strided": attended / stage 0 and the output gradients non-contiguous.
GATE_SHAPES = {
    "ones": (1, 1, 1, "contiguous"),
    "odd": (3, 7, 13, "strided"),
    "one_row": (1, 1, 13, "contiguous"),
    "short_rows": (1, 17, 7, "contiguous"),
    "prime_rows": (1, 113, 13, "contiguous"),
    "batch_only": (113, 1, 1, "contiguous"),
    "long_rows": (17, 1, 300, "contiguous"),
    "mid_width": (1, 17, 300, "contiguous"),
    "row_chunks": (3, 37, 71, "strided"),  # cpp: several 32-row chunks of weight-gradient partials
    "wide": (2, 3, 1100, "contiguous"),  # triton: rows wider than one feature tile (read twice)
    "empty_batch": (0, 3, 8, "contiguous"),
}
GATE_GRADS = ("out", "g", "d_attended", "d_unattended", "d_weight", "d_bias")


def gate_leaves(shape, dtype, device):
    """Attended, unattended, weight and bias like DCA's, scaled so that tau = 0.1 gives gates away from 0 and 1."""
    b, length, d, layout = shape
    attended = randn(b, length, d, dtype=dtype, device=device)
    if layout == "strided":
        attended = strided(attended)
    return [attended, randn(b, length, d, dtype=dtype, device=device),
            randn(2, d, dtype=dtype, device=device, scale=0.3 / d**0.5),
            randn(2, dtype=dtype, device=device, scale=0.1)]


def gate_grad_outputs(shape, n_gates, dtype, device):
    b, length, d, layout = shape
    dout = randn(b, length, d, dtype=dtype, device=device)
    return [strided(dout) if layout == "strided" else dout, randn(b, length, n_gates, dtype=dtype, device=device)]


def over_gate_cases(test):
    """Parametrizes ``test(backend, shape, dtype, ...)`` over every backend x gate shape x dtype."""
    for mark in (pytest.mark.parametrize("backend", BACKENDS),
                 pytest.mark.parametrize("shape", list(GATE_SHAPES.values()), ids=list(GATE_SHAPES)),
                 pytest.mark.parametrize("dtype", DTYPES, ids=str)):
        test = mark(test)
    return test


@pytest.mark.parametrize("tau", [0.1, 1.0])
@over_gate_cases
def test_gate(backend, shape, dtype, tau):
    device = device_for(backend, "gate")
    b, length, d, _ = shape
    skip_unless_runs(backend, Inputs("gate", device, dtype, {"B": b, "L": length, "d": d}))
    call = lambda name: lambda a, u, w, bias: avkernels.gate(a, u, w, bias, tau=tau, backend=name)
    conforms(backend, call, gate_leaves(shape, dtype, device), gate_grad_outputs(shape, 2, dtype, device), GATE_GRADS)


@pytest.mark.parametrize("n_stages", [1, 2, 3])
@over_gate_cases
def test_stage_gate(backend, shape, dtype, n_stages):
    device = device_for(backend, "stage_gate")
    b, length, d, layout = shape
    skip_unless_runs(backend, Inputs("stage_gate", device, dtype, {"T": n_stages, "B": b, "L": length, "d": d}))
    stages = [randn(b, length, d, dtype=dtype, device=device) for _ in range(n_stages)]
    if layout == "strided":
        stages[0] = strided(stages[0])
    weight = randn(n_stages, n_stages * d, dtype=dtype, device=device, scale=0.3 / (n_stages * d) ** 0.5)
    bias = randn(n_stages, dtype=dtype, device=device, scale=0.1)
    call = lambda name: lambda w, bias, *x: avkernels.stage_gate(list(x), w, bias, tau=0.2, backend=name)
    names = ["out", "s", "d_weight", "d_bias"] + [f"d_stages[{t}]" for t in range(n_stages)]
    conforms(backend, call, [weight, bias, *stages], gate_grad_outputs(shape, n_stages, dtype, device), names)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gates_gradcheck(backend):
    """fp64 gradcheck (small: the Triton interpreter evaluates the op twice per input element)."""
    device = device_for(backend, "gate")
    skip_unless_runs(backend, Inputs("gate", device, F64, {"B": 2, "L": 2, "d": 3}))
    leaves = [x.requires_grad_(True) for x in gate_leaves((2, 2, 3, "contiguous"), F64, device)]
    assert torch.autograd.gradcheck(lambda *x: avkernels.gate(*x, tau=0.5, backend=backend), leaves)
    for n, fast_mode in ((2, False), (3, True)):
        skip_unless_runs(backend, Inputs("stage_gate", device, F64, {"T": n, "B": 1, "L": 2, "d": 3}))
        stages, w, b = (torch.randn(*s, dtype=F64, device=device) for s in ((n, 1, 2, 3), (n, 3 * n), (n,)))
        leaves = [x.requires_grad_(True) for x in (w, b, *stages.unbind(0))]
        assert torch.autograd.gradcheck(
            lambda w, b, *x: avkernels.stage_gate(list(x), w, b, tau=0.5, backend=backend), leaves, fast_mode=fast_mode)


# Properties of the gates on every backend: temperatures, strides of every argument, one output used, the tau -> 0
# limit, NaN, stages that are views of one buffer.


def gate_call(tau):
    return lambda name: lambda a, u, w, bias: avkernels.gate(a, u, w, bias, tau=tau, backend=name)


def stage_call(tau):
    return lambda name: lambda w, bias, *x: avkernels.stage_gate(list(x), w, bias, tau=tau, backend=name)


def stage_names(n):
    return ["out", "s", "d_weight", "d_bias"] + [f"d_stages[{t}]" for t in range(n)]


def stage_leaves(b, length, d, n, dtype, device):
    stages = [randn(b, length, d, dtype=dtype, device=device) for _ in range(n)]
    return stages, randn(n, n * d, dtype=dtype, device=device, scale=0.3 / (n * d) ** 0.5), randn(
        n, dtype=dtype, device=device, scale=0.1)


@pytest.mark.parametrize("tau", [0.1, 1.0, 10.0])
@pytest.mark.parametrize("backend", BACKENDS)
def test_gate_temperatures(backend, tau):
    device, shape = device_for(backend, "gate"), (3, 7, 13, "contiguous")
    skip_unless_runs(backend, Inputs("gate", device, F64, {"B": 3, "L": 7, "d": 13}))
    conforms(backend, gate_call(tau), gate_leaves(shape, F64, device), gate_grad_outputs(shape, 2, F64, device),
             GATE_GRADS)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gate_every_argument_strided(backend):
    """Transposed and sliced views for every input, the weight and bias included, and both incoming gradients."""
    device = device_for(backend, "gate")
    batch, length, d = 3, 5, 13
    skip_unless_runs(backend, Inputs("gate", device, F64, {"B": batch, "L": length, "d": d}))
    r = lambda *s, scale=1.0: randn(*s, dtype=F64, device=device, scale=scale)
    leaves = [r(batch, d, length).transpose(1, 2), r(batch, length, 2 * d + 1)[..., 1::2],
              r(d, 2, scale=0.3 / d**0.5).t(), r(4, scale=0.1)[::2]]
    grad_outputs = [r(length, batch, d).transpose(0, 1), r(batch, 2, length).transpose(1, 2)]
    assert not any(x.is_contiguous() for x in leaves + grad_outputs)
    conforms(backend, gate_call(0.1), leaves, grad_outputs, GATE_GRADS)


@pytest.mark.parametrize("tau", [0.1, 10.0])
@pytest.mark.parametrize("backend", BACKENDS)
def test_stage_gate_every_argument_strided(backend, tau):
    device, n = device_for(backend, "stage_gate"), 3
    batch, length, d = 3, 5, 13
    skip_unless_runs(backend, Inputs("stage_gate", device, F64, {"T": n, "B": batch, "L": length, "d": d}))
    r = lambda *s, scale=1.0: randn(*s, dtype=F64, device=device, scale=scale)
    stages = [r(batch, d, length).transpose(1, 2), r(length, batch, d).transpose(0, 1), r(batch, length, 2 * d)[..., ::2]]
    leaves = [r(n * d, n, scale=0.3 / (n * d) ** 0.5).t(), r(2 * n, scale=0.1)[::2], *stages]
    grad_outputs = [r(batch, d, length).transpose(1, 2), r(batch, n, length).transpose(1, 2)]
    assert not any(x.is_contiguous() for x in leaves + grad_outputs)
    conforms(backend, stage_call(tau), leaves, grad_outputs, stage_names(n))


@pytest.mark.parametrize("backend", BACKENDS)
def test_stage_gate_views_of_one_buffer(backend):
    """Stages that are slices of one stacked tensor (as a caller holding a (T, B, L, d) buffer would pass them)."""
    device = device_for(backend, "stage_gate")
    skip_unless_runs(backend, Inputs("stage_gate", device, F64, {"T": 3, "B": 2, "L": 5, "d": 7}))
    stacked = randn(3, 2, 5, 7, dtype=F64, device=device)
    _, w, b = stage_leaves(2, 5, 7, 3, F64, device)
    conforms(backend, stage_call(0.1), [w, b, *stacked.unbind(0)], gate_grad_outputs((2, 5, 7, ""), 3, F64, device),
             stage_names(3))


@pytest.mark.parametrize("used", ["out", "g"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_gate_one_output_used(backend, used):
    """Only one output reaches the loss: autograd hands the backward zeros for the other."""
    device = device_for(backend, "gate")
    skip_unless_runs(backend, Inputs("gate", device, F64, {"B": 2, "L": 5, "d": 7}))
    leaves = gate_leaves((2, 5, 7, "contiguous"), F64, device)

    def grads(name):
        a, u, w, b = (x.detach().requires_grad_(True) for x in leaves)
        out, g = avkernels.gate(a, u, w, b, backend=name)
        loss = (out.square() if used == "out" else g[..., 1].exp()).sum()
        # The reference's g does not depend on u at all: None there, zeros from a fused backward.
        return [torch.zeros_like(x) if gr is None else gr
                for x, gr in zip((a, u, w, b), torch.autograd.grad(loss, (a, u, w, b), allow_unused=True))]

    for ours, ref in zip(grads(backend), grads("reference")):
        torch.testing.assert_close(ours, ref, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gates_pick_the_largest_logit_as_tau_goes_to_zero(backend):
    device = device_for(backend, "gate")
    skip_unless_runs(backend, Inputs("stage_gate", device, F64, {"T": 3, "B": 4, "L": 9, "d": 11}))
    a, u, w, b = gate_leaves((4, 9, 11, "contiguous"), F64, device)
    logits = a @ w.t() + b
    out, g = avkernels.gate(a, u, w, b, tau=1e-6, backend=backend)
    pick_attended = (logits[..., 1] > logits[..., 0]).unsqueeze(-1)
    assert (logits[..., 1] - logits[..., 0]).abs().min() > 1e-4  # the draw has no near-ties
    torch.testing.assert_close(g, torch.cat([~pick_attended, pick_attended], dim=-1).to(F64), atol=1e-12, rtol=0)
    torch.testing.assert_close(out, torch.relu(torch.where(pick_attended, a, u)), atol=1e-12, rtol=0)

    stages, w, b = stage_leaves(3, 4, 9, 3, F64, device)
    logits = torch.cat(stages, dim=-1) @ w.t() + b
    out, s = avkernels.stage_gate(stages, w, b, tau=1e-6, backend=backend)
    top2 = logits.topk(2, dim=-1).values
    assert (top2[..., 0] - top2[..., 1]).min() > 1e-4
    choice = logits.argmax(-1)
    torch.testing.assert_close(s, torch.nn.functional.one_hot(choice, 3).to(F64), atol=1e-12, rtol=0)
    picked = torch.stack(stages).gather(0, choice[None, ..., None].expand(1, *stages[0].shape))[0]
    torch.testing.assert_close(out, torch.relu(picked), atol=1e-12, rtol=0)


@pytest.mark.filterwarnings("ignore:All-NaN slice")  # numpy, inside the Triton interpreter's max of a NaN row
@pytest.mark.parametrize("backend", BACKENDS)
def test_gates_propagate_nan(backend):
    """A NaN feature poisons its row's logits, so the whole row of gate values and outputs, and nothing else."""
    device, f32 = device_for(backend, "gate"), torch.float32
    skip_unless_runs(backend, Inputs("gate", device, f32, {"B": 2, "L": 5, "d": 7}))
    a, u, w, b = gate_leaves((2, 5, 7, "contiguous"), f32, device)
    a[1, 2, 3] = float("nan")
    out, g = avkernels.gate(a, u, w, b, backend=backend)
    ref_out, ref_g = reference.gate(a, u, w, b, 0.1)
    assert torch.isnan(g[1, 2]).all() and torch.isnan(out[1, 2]).all()
    torch.testing.assert_close(out, ref_out, equal_nan=True, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(g, ref_g, equal_nan=True, atol=2e-5, rtol=2e-5)

    stages, w, b = stage_leaves(2, 5, 7, 2, f32, device)
    stages[0][0, 4, 6] = float("nan")
    out, s = avkernels.stage_gate(stages, w, b, backend=backend)
    ref_out, ref_s = reference.stage_gate(stages, w, b, 0.1)
    assert torch.isnan(s[0, 4]).all() and torch.isnan(out[0, 4]).all()
    torch.testing.assert_close(out, ref_out, equal_nan=True, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(s, ref_s, equal_nan=True, atol=2e-5, rtol=2e-5)


# ---------------------------------------------------------------------------------------------- non-finite values
# NaN, +inf or -inf in one element of one input (a weight, a bias and each incoming gradient included) must come out
# where and as the reference's do (SPEC 9): no max, comparison or select may turn NaN into a number, and no padding
# may turn inf into NaN. Inputs are small enough that nothing overflows or saturates in any dtype, so the fp64
# reference's NaN/inf pattern is the answer in every dtype.

NONFINITE = {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf")}
# numpy's warnings about NaN and inf inside the Triton interpreter, which these cases mean to cause
quiet_numpy = pytest.mark.filterwarnings("ignore::RuntimeWarning")


def poison(tensors: Sequence[torch.Tensor], which: int, value: float) -> List[torch.Tensor]:
    """Copies of ``tensors`` with one element of ``tensors[which]``, away from every edge, set to ``value``."""
    out = [x.clone() for x in tensors]
    x = out[which]
    x[tuple(n // 2 for n in x.shape)] = value
    return out


def conforms_nonfinite(backend, call, leaves, grad_outputs, names, poisoned: int, value: float) -> None:
    """``conforms`` with ``value`` in input ``poisoned`` (an index into leaves + grad_outputs)."""
    both = poison(list(leaves) + list(grad_outputs), poisoned, value)
    leaves, grad_outputs = both[: len(leaves)], both[len(leaves):]
    ours = run(call(backend), leaves, grad_outputs)
    same = run(call("reference"), leaves, grad_outputs)
    exact = run(call("reference"), [x.to(F64) for x in leaves], [g.to(F64) for g in grad_outputs])
    for name, a, b, c in zip(names, ours, same, exact):
        assert_same_nonfinite(name, a, b, c)


@pytest.mark.parametrize("value", NONFINITE.values(), ids=list(NONFINITE))
@pytest.mark.parametrize("poisoned", range(4), ids=["q", "k", "v", "do"])
@pytest.mark.parametrize("activation", [None, "tanh_relu"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
@quiet_numpy
def test_tanh_attention_nonfinite(backend, dtype, activation, poisoned, value):
    device = device_for(backend, "tanh_attention")
    (q, k, v), grad_outputs = attention_case((2, 5, 13, 6, 7, activation, "contiguous"), dtype, device)
    v = v * 0.25  # tanh_relu stays away from 1, where bf16 rounds it to 1 and 1 - o^2 to 0
    skip_unless_runs(backend, attention_inputs(q, k, v, dtype, device, activation=activation))
    call = lambda name: lambda q, k, v: avkernels.tanh_attention(q, k, v, scale=0.2, activation=activation,
                                                                 backend=name)
    conforms_nonfinite(backend, call, [q, k, v], grad_outputs, ATTENTION_GRADS, poisoned, value)


@pytest.mark.parametrize("value", NONFINITE.values(), ids=list(NONFINITE))
@pytest.mark.parametrize("poisoned", range(4), ids=["q", "k", "v", "do"])
@pytest.mark.parametrize("backend", BACKENDS)
@quiet_numpy
def test_tanh_attention_dropout_nonfinite(backend, poisoned, value):
    """A dropped map element is multiplied by 0, as the reference's dropout does: a NaN there stays NaN."""
    device, p, dtype = device_for(backend, "tanh_attention"), 0.3, torch.float32
    (q, k, v), (do,) = attention_case((2, 24, 40, 8, 6, "tanh_relu", "contiguous"), dtype, device)
    skip_unless_runs(backend, attention_inputs(q, k, v, dtype, device, dropout=True, return_mask=True,
                                               activation="tanh_relu"))
    q, k, v, do = poison([q, k, v, do], poisoned, value)
    leaves = [x.detach().requires_grad_(True) for x in (q, k, v)]
    o, mask = avkernels.tanh_attention(*leaves, scale=0.2, dropout_p=p, training=True, activation="tanh_relu",
                                       return_mask=True, backend=backend)
    ours = [o.detach(), *torch.autograd.grad(o, leaves, do)]

    def replay(cast):
        leaves = [cast(x).detach().requires_grad_(True) for x in (q, k, v)]
        o, _ = reference.tanh_attention(*leaves, 0.2, p, "tanh_relu", dropout_mask=mask)
        return [o.detach(), *torch.autograd.grad(o, leaves, cast(do))]

    for name, a, b, c in zip(ATTENTION_GRADS, ours, replay(lambda x: x), replay(lambda x: x.to(F64))):
        assert_same_nonfinite(name, a, b, c)


@pytest.mark.parametrize("value", NONFINITE.values(), ids=list(NONFINITE))
@pytest.mark.parametrize("poisoned", range(6), ids=["attended", "unattended", "weight", "bias", "dout", "dg"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
@quiet_numpy
def test_gate_nonfinite(backend, dtype, poisoned, value):
    device, shape = device_for(backend, "gate"), (2, 5, 7, "contiguous")
    skip_unless_runs(backend, Inputs("gate", device, dtype, {"B": 2, "L": 5, "d": 7}))
    conforms_nonfinite(backend, gate_call(0.1), gate_leaves(shape, dtype, device),
                       gate_grad_outputs(shape, 2, dtype, device), GATE_GRADS, poisoned, value)


@pytest.mark.parametrize("value", NONFINITE.values(), ids=list(NONFINITE))
@pytest.mark.parametrize("poisoned", range(6), ids=["weight", "bias", "stages[0]", "stages[1]", "dout", "ds"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
@quiet_numpy
def test_stage_gate_nonfinite(backend, dtype, poisoned, value):
    device, n = device_for(backend, "stage_gate"), 3
    skip_unless_runs(backend, Inputs("stage_gate", device, dtype, {"T": n, "B": 2, "L": 5, "d": 7}))
    stages, w, b = stage_leaves(2, 5, 7, n, dtype, device)
    conforms_nonfinite(backend, stage_call(0.2), [w, b, *stages], gate_grad_outputs((2, 5, 7, ""), n, dtype, device),
                       stage_names(n), poisoned if poisoned < 4 else poisoned + n - 2, value)


# Small temperatures (down to 1e-4): softmax(z / tau) moves by the logits' rounding error over tau, so the fp32
# reference's own error is large, and by luck sometimes small; a backend must meet the rule all the same. In float64
# the reference is its own oracle and its rounding, magnified alike, exceeds the rule's floor below tau = 1e-3: the
# bound that holds there is stated in SPEC 8 (and checked by test_cpp_backend's small-temperature test).
SMALL_TAUS = (1e-2, 1e-4)
SMALL_TAU_SHAPE = (5, 67, 3)  # B, L, d


def skip_float64_below_1e3(dtype, tau):
    if dtype == F64 and tau < 1e-3:
        pytest.skip("float64 below tau = 1e-3: the float64 reference's own error exceeds the floor (SPEC 8)")


@pytest.mark.parametrize("tau", SMALL_TAUS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_gate_small_temperatures(backend, dtype, tau):
    skip_float64_below_1e3(dtype, tau)
    device, (b, length, d) = device_for(backend, "gate"), SMALL_TAU_SHAPE
    skip_unless_runs(backend, Inputs("gate", device, dtype, {"B": b, "L": length, "d": d}))
    leaves = gate_leaves((b, length, d, "contiguous"), dtype, device)
    leaves[2] = randn(2, d, dtype=dtype, device=device, scale=d**-0.5)
    conforms(backend, gate_call(tau), leaves, gate_grad_outputs((b, length, d, ""), 2, dtype, device), GATE_GRADS)


@pytest.mark.parametrize("tau", SMALL_TAUS)
@pytest.mark.parametrize("n_stages", [2, 9])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_stage_gate_small_temperatures(backend, dtype, n_stages, tau):
    skip_float64_below_1e3(dtype, tau)
    device, (b, length, d) = device_for(backend, "stage_gate"), SMALL_TAU_SHAPE
    skip_unless_runs(backend, Inputs("stage_gate", device, dtype, {"T": n_stages, "B": b, "L": length, "d": d}))
    stages, _, bias = stage_leaves(b, length, d, n_stages, dtype, device)
    weight = randn(n_stages, n_stages * d, dtype=dtype, device=device, scale=(n_stages * d) ** -0.5)
    conforms(backend, stage_call(tau), [weight, bias, *stages],
             gate_grad_outputs((b, length, d, ""), n_stages, dtype, device), stage_names(n_stages))


# ------------------------------------------------------------------------------------------------------ the op layer

def opcheck_cases(op: str, device: torch.device):
    """Arguments of the op ``op`` (as ``DECLARATION.op(backend)`` takes them) that exercise every option."""
    r = lambda *s: torch.randn(*s, device=device, requires_grad=True)  # noqa: E731
    if op == "tanh_attention":
        q, k, v = r(2, 5, 3), r(2, 6, 3), r(1, 6, 4)
        no_seed = torch.empty(0, dtype=torch.int64)
        return [(q, k, v, torch.tensor([7]), 0.5, 0.3, "tanh_relu", True, "tanh", 0.0),
                (q, k, v, no_seed, 0.5, 0.0, "none", False, "sigmoid", -1.0),
                (q, k, r(2, 6, 4), torch.tensor([9]), 0.5, 0.3, "tanh_relu", False, "sigmoid", 0.5)]
    if op == "gate":
        return [(r(2, 3, 5), r(2, 3, 5), r(2, 5), r(2), 0.1)]
    if op == "stage_gate":
        return [([r(2, 3, 4) for _ in range(3)], r(3, 12), r(3), 0.2)]
    raise AssertionError(f"no opcheck case for the op {op!r}: add one here")


def opcheck_inputs(op: str, args, device) -> Inputs:
    tensors = args[0] if op == "stage_gate" else args[:3]
    x = tensors[0]
    sizes = {"tanh_attention": lambda: {"B": x.shape[0], "Mq": x.shape[1], "N": args[1].shape[1], "D": x.shape[2],
                                         "E": args[2].shape[2]},
             "gate": lambda: {"B": x.shape[0], "L": x.shape[1], "d": x.shape[2]},
             "stage_gate": lambda: {"T": len(tensors), "B": x.shape[0], "L": x.shape[1], "d": x.shape[2]}}[op]()
    return Inputs(op, device, x.dtype, sizes)


@pytest.mark.parametrize("op", [d.name for d in declarations()])
@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend, op):
    """torch.library.opcheck of the op that runs the backend's kernels and of its backward op: schema, fake tensors,
    autograd registration and AOT dispatch. The backward op's arguments come from the declaration's own ``save`` and
    ``backward_args``, as autograd builds them."""
    declaration = next(d for d in declarations() if d.name == op)
    device = device_for(backend, op)
    if backend == "reference":
        pytest.skip("reference: plain PyTorch, no op of its own")
    for args in opcheck_cases(op, device):
        skip_unless_runs(backend, opcheck_inputs(op, args, device))
        torch.library.opcheck(declaration.op(backend), args)
        detached = tuple([a.detach() for a in x] if isinstance(x, list) else
                         x.detach() if isinstance(x, torch.Tensor) else x for x in args)
        outputs = declaration.op(backend)(*detached)
        tensors, values = declaration.saved(detached, outputs)
        grads = [torch.randn_like(o) if o.is_floating_point() else None for o in outputs]
        torch.library.opcheck(declaration.backward_op(backend), declaration.backward_args(tensors, values, *grads))


def test_every_op_is_declared_and_checked():
    """The ops of dispatch, the declarations and this suite's opcheck cases are one list."""
    assert sorted(d.name for d in declarations()) == sorted(OPS)
    for op in OPS:
        assert opcheck_cases(op, torch.device("cpu"))
