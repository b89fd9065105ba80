"""The Triton kernels' dropout generator as a test oracle: one small kernel around the very ``dropout_uniform`` the
Triton tanh_attention kernels call, so tests can check that the cpp and cuda backends draw the same stream."""

import os

import pytest
import torch

try:
    import triton
    import triton.language as tl

    from avkernels.ops.triton.dropout import dropout_uniform
except ImportError:  # the tests that need the oracle skip
    triton = None
else:

    @triton.jit
    def _uniform_kernel(out_ptr, seed, first_row, keys, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        j = tl.arange(0, BLOCK)
        u = dropout_uniform(seed, first_row + row.to(tl.int64), j, keys)
        tl.store(out_ptr + row * keys + j, u, mask=j < keys)


def triton_dropout_uniform(seed: int, first_row: int, rows: int, keys: int) -> torch.Tensor:
    """(rows, keys) fp32 uniforms of map rows ``first_row ..`` drawn by the Triton kernels' generator (on the GPU when
    there is one, else through the interpreter); skips the test when neither can run a Triton kernel."""
    if triton is None:
        pytest.skip("triton is needed as the oracle of the dropout mask")
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("no GPU and TRITON_INTERPRET is not set: cannot run a Triton kernel as the oracle")
    out = torch.empty(rows, keys, device="cuda" if torch.cuda.is_available() else "cpu")
    _uniform_kernel[(rows,)](out, seed, first_row, keys, BLOCK=triton.next_power_of_2(max(keys, 16)))
    return out.cpu()
