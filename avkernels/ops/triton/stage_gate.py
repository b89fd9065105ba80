"""Triton implementation of ``stage_gate`` (GRJCA's softmax over ``T`` stages).

The stage gate is the softmax mix of :mod:`avkernels.ops.triton.softmax_mix` over the ``T`` stages with logits from
every stage (``first=0``, ``W`` is ``(T, T * d)``): ``s = softmax((concat_t X_t @ W^T + b) / tau)``,
``out = ReLU(sum_t s_t X_t)``. The kernels and their design are documented there; this module adapts the
``stage_gate`` contract to them.
"""

from typing import List, Tuple

from avkernels.backends import OpImpl, register_impl
from avkernels.ops.triton.softmax_mix import (
    MAX_STAGES_AOT,
    softmax_mix_backward,
    softmax_mix_forward,
    softmax_mix_specializations,
    supports,
)


def _forward(stages, weight, bias, tau):
    return softmax_mix_forward(stages, weight, bias, tau, first=0)


def _backward(dout, ds, stages, weight, s, out, tau):
    return softmax_mix_backward(dout, ds, stages, weight, s, out, tau, first=0, stacked=True)


def aot_specializations() -> List[Tuple[object, dict, dict, dict]]:
    """Every ``(kernel, signature, constexprs, compile options)`` the stage-gate launchers produce for ``T = 1`` to
    :data:`~avkernels.ops.triton.softmax_mix.MAX_STAGES_AOT`, for ahead-of-time compilation checks
    (tests/test_triton_compile.py)."""
    return [spec for n_stages in range(1, MAX_STAGES_AOT + 1) for spec in softmax_mix_specializations(n_stages, 0)]


register_impl("stage_gate", "triton", OpImpl(forward=_forward, backward=_backward, supports=supports))
