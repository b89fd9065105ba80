"""What belongs to the Triton gate kernels alone (avkernels/ops/triton/softmax_mix.py): their launch configurations
(tiled feature axes, row blocks looped per program), the 16-bit regression seeds of the
backward's renormalised gate values, run-to-run determinism. The gates against the fp64 reference on every backend,
dtype and shape are tests/test_conformance.py.

Without a GPU the kernels run in Triton's interpreter on CPU tensors (tests/conftest.py sets TRITON_INTERPRET).
"""

import pytest
import torch

import avkernels
from avkernels.ops.triton.softmax_mix import MAX_BLOCK_D, launch_config
from test_conformance import conforms, gate_call, gate_grad_outputs, gate_leaves, stage_call, stage_leaves, stage_names

pytestmark = pytest.mark.skipif("triton" not in avkernels.backends(), reason="triton backend unavailable here")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
F64 = torch.float64
WIDE = 1100  # > MAX_BLOCK_D: the tiled (two-read) path


def _leaves_and_call(op, shape, dtype, n_stages=2):
    """The leaves of one gate call, its grad outputs and ``call(backend)`` (tau = 0.1) for the conformance check."""
    if op == "gate":
        leaves, call, n_gates = gate_leaves((*shape, "contiguous"), dtype, DEVICE), gate_call(0.1), 2
    else:
        stages, w, b = stage_leaves(*shape, n_stages, dtype, DEVICE)
        leaves, call, n_gates = [w, b, *stages], stage_call(0.1), n_stages
    return leaves, gate_grad_outputs((*shape, "contiguous"), n_gates, dtype, DEVICE), call


def _run(fn, leaves, grad_outputs):
    leaves = [x.detach().requires_grad_(True) for x in leaves]
    outputs = fn(*leaves)
    return [o.detach() for o in outputs] + list(torch.autograd.grad(outputs, leaves, grad_outputs))


def test_stage_gate_many_stages_tile_the_features():
    """With 4 stages the backward's register budget forces a tiled feature axis even for d = 300."""
    assert launch_config(4, 0, 300, 10, backward=True).one_tile is False
    leaves, grad_outputs, _ = _leaves_and_call("stage_gate", (2, 5, 300), F64, n_stages=4)
    conforms("triton", stage_call(0.1), leaves, grad_outputs, stage_names(4))


@pytest.mark.parametrize("seed", [0, 7, 10])  # 7 and 10 failed before the backward renormalised s
@pytest.mark.parametrize("op", ["gate", "stage_gate"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_renormalised_gate_values(op, dtype, seed):
    """16-bit gate values saved for backward no longer sum to one; seeds that once biased the bias gradient."""
    torch.manual_seed(seed)
    leaves, grad_outputs, call = _leaves_and_call(op, (4, 9, 48), dtype)
    names = ["out", "g", "d_attended", "d_unattended", "d_weight", "d_bias"] if op == "gate" else stage_names(2)
    conforms("triton", call, leaves, grad_outputs, names)


@pytest.mark.parametrize("op", ["gate", "stage_gate"])
@pytest.mark.parametrize("shape", [(8, 60, 13), (2, 6, WIDE)], ids=str)
def test_backward_is_deterministic(op, shape):
    """Bit-for-bit identical gradients run to run, also when each backward program loops over several row blocks
    (more row blocks than the interpreter's 4 programs) and when the features are tiled."""
    n_rows, d = shape[0] * shape[1], shape[2]
    cfg = launch_config(2, 1 if op == "gate" else 0, d, n_rows, backward=True)
    assert -(-n_rows // cfg.block_r) > 4 and cfg.one_tile == (d <= MAX_BLOCK_D)
    leaves, grad_outputs, call = _leaves_and_call(op, shape, torch.float32)
    first, second = (_run(call("triton"), leaves, grad_outputs) for _ in range(2))
    for a, b in zip(first, second):
        assert torch.equal(a, b)
