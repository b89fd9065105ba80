"""``stage_gate``: GRJCA's softmax over the gated outputs of every iteration (SPEC 3).

``s = softmax((concat_t X_t @ W^T + b) / tau)``, ``out = ReLU(sum_t s[..., t] * X_t)``.

Public functional op plus the op's declaration (:mod:`avkernels.ops.declaration`). A Python-kernel backend
registers an :class:`~avkernels.dispatch.OpImpl` under ``"stage_gate"`` with

``forward(stages, weight, bias, tau) -> (out, s)``
    ``stages`` a list of ``T`` tensors ``(B, L, d)`` of arbitrary strides, ``weight (T, T * d)``, ``bias (T,)``;
    returns contiguous ``out (B, L, d)`` and ``s (B, L, T)``.
``backward(dout, ds, stages, weight, s, out, tau) -> (d_stages, d_weight, d_bias)``
    ``d_stages`` is one contiguous ``(T, B, L, d)`` tensor (row ``t`` is the gradient of ``stages[t]``); the weight
    and bias gradients reduce over ``B * L``, deterministically when
    ``torch.are_deterministic_algorithms_enabled()``.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch

from avkernels import reference
from avkernels._validation import check_float_tensor, check_positive, check_same, check_shape
from avkernels.dispatch import Inputs, cast_for_autocast
from avkernels.ops.declaration import OpDeclaration, declare


def _backward_args(saved, values, dout, ds):
    weight, s, out, *stages = saved
    dout = torch.zeros_like(out) if dout is None else dout  # an output that was not used has no gradient
    ds = torch.zeros_like(s) if ds is None else ds
    return (dout, ds, stages, weight, s, out, *values)


def _input_grads(grads):
    d_stages, d_weight, d_bias = grads  # d_stages is one (T, B, L, d) tensor: one gradient per stage
    return list(d_stages.unbind(0)), d_weight, d_bias, None


DECLARATION = declare(
    OpDeclaration(
        "stage_gate",
        schema="(Tensor[] stages, Tensor weight, Tensor bias, float tau) -> (Tensor, Tensor)",
        backward_schema="(Tensor dout, Tensor ds, Tensor[] stages, Tensor weight, Tensor s, Tensor out, float tau) "
        "-> (Tensor, Tensor, Tensor)",
        fake=lambda stages, *_: (stages[0].new_empty(stages[0].shape),
                                 stages[0].new_empty(*stages[0].shape[:-1], len(stages))),
        backward_fake=lambda dout, ds, stages, weight, *_: (
            stages[0].new_empty(len(stages), *stages[0].shape), weight.new_empty(weight.shape),
            weight.new_empty(weight.shape[0]),
        ),
        save=lambda a, output: ((a.weight, output[1], output[0], *a.stages), (a.tau,)),
        backward_args=_backward_args,
        input_grads=_input_grads,
    )
)


def stage_gate(
    stages: Sequence[torch.Tensor],
    weight: torch.Tensor,
    bias: torch.Tensor,
    *,
    tau: float = 0.1,
    backend: Optional[str] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Softmax gate across ``T`` stages (GRJCA; SPEC 3).

    Args:
        stages: a sequence of ``T >= 1`` tensors of one shape ``(B, L, d)``: the candidate features.
        weight: ``(T, T * d)`` and bias: ``(T,)``, stored as ``nn.Linear(T * d, T)`` stores them.
        tau: softmax temperature (0.1 by default).
        backend: see :func:`avkernels.tanh_attention`.
    Returns:
        ``(out, s)``: ``out = ReLU(sum_t s[..., t] * stages[t])`` of shape ``(B, L, d)`` and ``s`` of shape
        ``(B, L, T)``, in the inputs' dtype (under ``torch.autocast``, the autocast dtype; SPEC 8).
    """
    if isinstance(stages, torch.Tensor) or not isinstance(stages, (list, tuple)) or len(stages) == 0:
        raise TypeError(f"stages: expected a non-empty list or tuple of (B, L, d) tensors, got {type(stages).__name__}")
    stages = list(stages)
    names = [f"stages[{t}]" for t in range(len(stages))]
    for name, x in zip(names, stages):
        check_float_tensor(x, name)
    check_shape(stages[0], names[0], ("B", "L", "d"))
    for name, x in zip(names[1:], stages[1:]):
        check_shape(x, name, tuple(stages[0].shape))
    check_float_tensor(weight, "weight")
    check_float_tensor(bias, "bias")
    n_stages, d = len(stages), stages[0].shape[-1]
    check_shape(weight, "weight", (n_stages, n_stages * d))
    check_shape(bias, "bias", (n_stages,))
    tau = check_positive(tau, "tau")
    *stages, weight, bias = cast_for_autocast(stages + [weight, bias])
    check_same(stages + [weight, bias], names + ["weight", "bias"], autocast_may_mix=False)
    batch, length, d = stages[0].shape
    sizes = {"T": n_stages, "B": batch, "L": length, "d": d}
    return DECLARATION.run(backend, Inputs("stage_gate", stages[0].device, stages[0].dtype, sizes),
                           lambda: reference.stage_gate(stages, weight, bias, tau),
                           lambda: (stages, weight, bias, tau), empty=stages[0].numel() == 0)
