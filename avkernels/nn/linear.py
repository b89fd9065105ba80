"""``Linear``: ``nn.Linear`` whose 16-bit products run on float32 units on CPUs that have no 16-bit matrix units.

Under ``torch.autocast("cpu", dtype=bfloat16 | float16)`` PyTorch runs ``nn.Linear`` as a 16-bit GEMM. On a CPU
without bfloat16 matrix hardware (no AMX, no AVX-512 BF16: e.g. AMD Zen 3, the machine this library is tested on)
oneDNN has no fast kernel for it: measured there with 2 threads, bf16 GEMM ran at 1-21 GFLOP/s depending on the
operand layout against 187 GFLOP/s in fp32, and an autocast training step of GRJCA spent 92% of its time in those
GEMMs, 14x slower than the same step in fp32.

So on such CPUs this layer rounds its input, weight and bias to the autocast dtype, as autocast would, and multiplies
the rounded values in float32: the products of two 16-bit numbers are exact in float32 and the sums are float32, which
is the arithmetic of a 16-bit GEMM with float32 accumulation, and the output is rounded back to the autocast dtype.
Same results up to summation order, at the float32 GEMM's speed; the gradients flow through the casts into the
parameters' own dtype as usual. Elsewhere (GPUs, CPUs with AMX or AVX-512 BF16, no autocast) it is ``nn.Linear``,
except for inference under autocast (autograd off), where it casts its operands itself instead of through autocast's
weight cache, so that no cast weight outlives its product (see ``Linear.forward``).
The parameters and their names are those of ``nn.Linear``, so checkpoints do not change.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from avkernels.dispatch import active_autocast_dtype, cast_for_autocast


def _cpu_has_16bit_matrix_units(dtype: torch.dtype) -> bool:
    if dtype == torch.bfloat16:
        return torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported()
    return torch.cpu._is_amx_fp16_supported()


# Decided once: torch.compile traces the constant, not a CPUID query.
NATIVE_16BIT_GEMM = {dtype: _cpu_has_16bit_matrix_units(dtype) for dtype in (torch.bfloat16, torch.float16)}


def emulated_autocast_dtype(device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype whose GEMMs this layer runs in float32 on ``device``, or ``None`` (then ``nn.Linear``)."""
    if device.type != "cpu" or not torch.is_autocast_enabled("cpu"):
        return None
    dtype = torch.get_autocast_dtype("cpu")
    return dtype if dtype in NATIVE_16BIT_GEMM and not NATIVE_16BIT_GEMM[dtype] else None


class Linear(nn.Linear):
    """``nn.Linear`` with fast autocast on CPUs without 16-bit matrix units (see the module docstring)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = emulated_autocast_dtype(x.device)
        if dtype is not None:
            with torch.autocast("cpu", enabled=False):
                bias = None if self.bias is None else self.bias.to(dtype).float()
                return F.linear(x.to(dtype).float(), self.weight.to(dtype).float(), bias).to(dtype)
        if torch.is_grad_enabled() or active_autocast_dtype(x.device) is None:
            return super().forward(x)
        # Autocast's weight cache would hold every cast weight until the autocast region ends (10 MiB of bf16 weights
        # in GRJCA at the official shape, more than its whole fp32 forward); with no graph to save them for, each is
        # freed after its product. The same casts and the same 16-bit product as autocast's own linear. A strided
        # batch of rows is copied first: without autograd, matmul would run it as a batched product against the
        # expanded weight, 16x slower in bf16 (F.linear also folds the bias into addmm only for contiguous rows).
        x, weight = cast_for_autocast([x.contiguous() if x.dim() > 2 else x, self.weight])
        bias = None if self.bias is None else cast_for_autocast([self.bias])[0]
        with torch.autocast(x.device.type, enabled=False):
            return F.linear(x, weight, bias)
