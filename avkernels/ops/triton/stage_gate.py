"""Triton implementation of ``stage_gate`` (GRJCA's softmax over ``T`` stages).

The stage gate is the softmax mix of :mod:`avkernels.ops.triton.softmax_mix` over the ``T`` stages with logits from
every stage (``first=0``, ``W`` is ``(T, T * d)``): ``s = softmax((concat_t X_t @ W^T + b) / tau)``,
``out = ReLU(sum_t s_t X_t)``. The kernels and their design are documented there; this module adapts the
``stage_gate`` contract to them.
"""

from avkernels.dispatch import OpImpl, register_impl
from avkernels.ops.triton.softmax_mix import softmax_mix_backward, softmax_mix_forward, supports


def _forward(stages, weight, bias, tau):
    return softmax_mix_forward(stages, weight, bias, tau, first=0)


def _backward(dout, ds, stages, weight, s, out, tau):
    return softmax_mix_backward(dout, ds, stages, weight, s, out, tau, first=0, stacked=True)


register_impl("stage_gate", "triton", OpImpl(forward=_forward, backward=_backward, supports=supports))
