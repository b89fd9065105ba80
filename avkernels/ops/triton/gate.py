"""Triton implementation of ``gate`` (the two-way gate of DCA and GRJCA).

The gate is the softmax mix of :mod:`avkernels.ops.triton.softmax_mix` over the two stages ``(unattended, attended)``
with logits from the attended features only (``FIRST = 1``): ``g = softmax((attended @ W^T + b) / tau)``,
``out = ReLU(g0 * unattended + g1 * attended)``. The kernels, their one-pass design and the deterministic weight
gradient (per-program partials summed in a fixed order, no atomics) are documented there; this module adapts the
``gate`` contract to them.
"""

from avkernels.dispatch import OpImpl, register_impl
from avkernels.ops.triton.softmax_mix import softmax_mix_backward, softmax_mix_forward, supports

ATTENDED_STAGE = 1  # stages are (unattended, attended): g[..., 0] weighs the unattended features, as in SPEC 3


def _forward(attended, unattended, weight, bias, tau):
    return softmax_mix_forward((unattended, attended), weight, bias, tau, first=ATTENDED_STAGE)


def _backward(dout, dg, attended, unattended, weight, g, out, tau):
    (d_unattended, d_attended), d_weight, d_bias = softmax_mix_backward(
        dout, dg, (unattended, attended), weight, g, out, tau, first=ATTENDED_STAGE, stacked=False
    )
    return d_attended, d_unattended, d_weight, d_bias


register_impl("gate", "triton", OpImpl(forward=_forward, backward=_backward, supports=supports))
